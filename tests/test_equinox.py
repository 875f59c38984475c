"""End to end: Equinox models, whose weights put the output axis first.

`eqx.nn.Linear.weight` is `(out, in)` and `eqx.nn.Conv2d.weight`
`(out, in, kh, kw)`, so "per output unit" is a norm over every axis but the
FIRST: `oc.OutputFirst(c)` shows `c` the Flax layout. Trained with the
idiomatic loop: `params = eqx.filter(model, eqx.is_array)`,
`eqx.filter_value_and_grad`, `tx.update(grads, state, params)`,
`eqx.apply_updates(model, updates)`, routed by path rules such as
`"**/weight"`.

Checks, in float64 NumPy, after training: every output unit's norm is at
most the bound and the bound is reached (the layers start above it);
orthogonal layers have `W Wᵀ = I`; biases are exactly non-negative; after the
first step every weight equals Keras's MaxNorm, taken per output unit, of the
plain Adam step fed the same gradients. "Equal" is up to float32 rounding,
counted in `update_form_error` and `unit_rtol`.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import (
    EPS32,
    norm_ulps,
    projected_norm_rtol,
    rescaled_norm_rtol,
    ulps,
    update_form_error,
)

import optax_constraints as oc

STEPS = 8


def _np(x):
    return np.asarray(x, np.float64)


def output_unit_norms(weight):
    """One norm per output unit of an (out, *fan_in) weight."""
    w = _np(weight)
    return np.sqrt(np.sum(w**2, axis=tuple(range(1, w.ndim))))


def unit_rtol(after, before, target):
    """Relative error allowed for each output unit's norm that MaxNorm set to `target`."""
    return projected_norm_rtol(after, before, tuple(range(1, np.ndim(after))), target)


def assert_on_the_bound(after, before, target, *, reached=True):
    """Every output unit's norm at most `target`, the largest at it (if `reached`)."""
    norms, rtol = output_unit_norms(after), unit_rtol(after, before, target)
    assert np.all(norms <= target * (1 + rtol)), norms.max()
    if reached:
        assert norms.max() >= target * (1 - rtol.max()), norms.max()


def assert_keras_step(got, expected, before):
    """`got` (project's p + u') against Keras's formula, both float32, per output unit.

    Each side's rounding of the formula (`2 * norm_ulps(n)` of each entry)
    plus `update_form_error`.
    """
    expected = _np(expected)
    n = int(np.prod(expected.shape[1:]))
    tol = 2 * norm_ulps(n) * EPS32 * np.abs(expected) + update_form_error(expected, before)
    excess = np.abs(_np(got) - expected) - tol
    assert excess.max() <= 0, f"off by {excess.max():.3g} more than float32 rounding allows"


def keras_max_norm_output_first(w, max_value):
    w = np.asarray(w, np.float32)
    axes = tuple(range(1, w.ndim))
    norms = np.sqrt(np.sum(w * w, axis=axes, keepdims=True))
    return w * (np.clip(norms, 0, max_value) / (np.float32(1e-7) + norms))


def train(model, constraints, rules, x, y, *, steps=STEPS, lr=0.05, loss=None):
    """The idiomatic Equinox loop, in lockstep with plain Adam on the same grads."""
    labels = oc.label_by_path(rules)
    adam = optax.adam(lr)
    tx = optax.chain(adam, oc.project(constraints, labels))
    params = eqx.filter(model, eqx.is_array)
    opt_state, plain_state = tx.init(params), adam.init(params)

    def loss_fn(model, x, y):
        pred = jax.vmap(model)(x) if loss is None else loss(model, x)
        return jnp.mean((pred - y) ** 2)

    @eqx.filter_jit
    def step(model, opt_state, plain_state, x, y):
        value, grads = eqx.filter_value_and_grad(loss_fn)(model, x, y)
        params = eqx.filter(model, eqx.is_array)
        updates, opt_state = tx.update(grads, opt_state, params)
        plain_updates, plain_state = adam.update(grads, plain_state, params)
        plain = eqx.apply_updates(model, plain_updates)
        return eqx.apply_updates(model, updates), plain, opt_state, plain_state, value

    losses = []
    for t in range(steps):
        previous = model
        model, plain, opt_state, plain_state, value = step(model, opt_state, plain_state, x, y)
        losses.append(float(value))
        if t == 0:
            first, first_plain = model, plain
    return model, first, first_plain, losses, previous


def _data(shape, seed=0):
    return jax.random.normal(jax.random.key(seed), shape)


def test_mlp_per_output_unit_max_norm_and_orthogonal_hidden_layer():
    model = eqx.nn.MLP(8, 4, 32, depth=2, key=jax.random.key(0))
    assert model.layers[0].weight.shape == (32, 8)  # (out, in)
    x = _data((64, 8))
    y = jnp.tanh(x[:, :4] * 2)
    constraints = {
        "orthogonal": oc.OutputFirst(oc.Orthogonal()),
        "max_norm": oc.OutputFirst(oc.MaxNorm(0.5, axis="fan_in")),
        "bias": oc.NonNeg(),
    }
    rules = {"layers/1/weight": "orthogonal", "**/weight": "max_norm", "**/bias": "bias"}
    report = oc.routing_report(
        eqx.filter(model, eqx.is_array), constraints, oc.label_by_path(rules)
    )
    assert "32 units of 8" in report  # layers/0/weight (32, 8): per output unit
    assert "(32, 32) matrix" in report

    trained, first, first_plain, losses, previous = train(model, constraints, rules, x, y)
    assert losses[-1] < losses[0]
    for i in (0, 2):
        # Step 1: Keras's MaxNorm per output unit of the plain Adam step.
        assert_keras_step(
            first.layers[i].weight,
            keras_max_norm_output_first(first_plain.layers[i].weight, 0.5),
            model.layers[i].weight,
        )
        assert_on_the_bound(trained.layers[i].weight, previous.layers[i].weight, 0.5)
    w = _np(trained.layers[1].weight)
    # The SVD's polar factor is orthonormal to its backward error (a reflection
    # per row and column: 2 norm_ulps(64)); the update form moves each row by
    # its update_form_error, and X X^T by twice that row's 2-norm at most.
    rows = np.sqrt(np.sum(update_form_error(w, previous.layers[1].weight) ** 2, axis=1))
    assert np.abs(w @ w.T - np.eye(32)).max() <= ulps(1.0, 2 * norm_ulps(64)) + 2 * rows.max()
    for layer in trained.layers:
        assert np.all(_np(layer.bias) >= 0)


def test_plain_fan_in_on_an_equinox_weight_caps_the_inputs_instead():
    # The mistake OutputFirst prevents: "fan_in" (all but the last axis) on
    # an (out, in) weight takes one norm per INPUT unit.
    w = 3 * _data((6, 4))
    wrong = _np(oc.MaxNorm(1.0, axis="fan_in")(w))
    right = _np(oc.OutputFirst(oc.MaxNorm(1.0, axis="fan_in"))(w))
    # per input: 4 units of 6 (every norm is above 1, so all bind)
    np.testing.assert_allclose(np.linalg.norm(wrong, axis=0), 1.0, rtol=rescaled_norm_rtol(6, 1.0))
    assert np.abs(output_unit_norms(wrong) - 1.0).max() > 0.1  # not per output unit
    # per output: 6 units of 4
    np.testing.assert_allclose(output_unit_norms(right), 1.0, rtol=rescaled_norm_rtol(4, 1.0))


class ConvNet(eqx.Module):
    conv1: eqx.nn.Conv2d
    conv2: eqx.nn.Conv2d
    head: eqx.nn.Linear

    def __init__(self, key):
        k1, k2, k3 = jax.random.split(key, 3)
        self.conv1 = eqx.nn.Conv2d(1, 8, 3, padding=1, key=k1)
        self.conv2 = eqx.nn.Conv2d(8, 8, 3, padding=1, key=k2)
        self.head = eqx.nn.Linear(8, 3, key=k3)

    def __call__(self, x):  # x: (1, 8, 8)
        h = jax.nn.relu(self.conv1(x))
        h = jax.nn.relu(self.conv2(h))
        return self.head(h.mean(axis=(1, 2)))


def test_conv_net_per_output_channel():
    model = ConvNet(jax.random.key(1))
    assert model.conv2.weight.shape == (8, 8, 3, 3)  # (out, in, kh, kw)
    x = _data((32, 1, 8, 8), seed=2)
    y = jnp.stack([x.mean(axis=(1, 2, 3)), x.std(axis=(1, 2, 3)), x[:, 0, 0, 0]], axis=1)
    constraints = {"max_norm": oc.OutputFirst(oc.MaxNorm(0.3, axis="fan_in")), "bias": oc.NonNeg()}
    rules = {"**/weight": "max_norm", "**/bias": "bias"}
    report = oc.routing_report(
        eqx.filter(model, eqx.is_array), constraints, oc.label_by_path(rules)
    )
    assert "8 units of 72" in report  # conv2: 8 output channels of 8 * 3 * 3
    trained, first, first_plain, _, previous = train(model, constraints, rules, x, y)
    for name in ("conv1", "conv2", "head"):
        assert_keras_step(
            getattr(first, name).weight,
            keras_max_norm_output_first(getattr(first_plain, name).weight, 0.3),
            getattr(model, name).weight,
        )
        assert_on_the_bound(getattr(trained, name).weight, getattr(previous, name).weight, 0.3)
        assert np.all(_np(getattr(trained, name).bias) >= 0)


@pytest.mark.parametrize(
    "inner,check",
    [
        (oc.MaxNorm(0.5, axis="fan_in"), "max_norm"),
        (oc.SpectralNorm(1.0, method="svd"), "spectral"),
    ],
    ids=["max_norm", "spectral"],
)
def test_filter_vmap_ensemble_constrains_each_member_per_output_unit(inner, check):
    members = 4
    make = eqx.filter_vmap(lambda key: eqx.nn.MLP(6, 2, 16, depth=2, key=key))
    ensemble = make(jax.random.split(jax.random.key(3), members))
    assert ensemble.layers[1].weight.shape == (members, 16, 16)
    x = _data((48, 6), seed=4)
    y = jnp.sin(x[:, :2])

    @eqx.filter_vmap(in_axes=(eqx.if_array(0), None))
    def predict(model, x):
        return jax.vmap(model)(x)

    constraints = {"weight": oc.Stacked(oc.OutputFirst(inner))}
    rules = {"**/weight": "weight"}
    trained, *_, previous = train(ensemble, constraints, rules, x, y, loss=predict)
    for i, layer in enumerate(trained.layers):
        for member in range(members):
            w = _np(layer.weight[member])  # (out, in)
            before = previous.layers[i].weight[member]
            if check == "max_norm":
                # the first two layers start above 0.5 in every member
                assert_on_the_bound(w, before, 0.5, reached=i < 2)
            else:
                # The SVD's backward error (a reflection per row and column),
                # relative to the moved kernel's sigma: at most sigma(before)
                # plus one Adam step's Frobenius norm (lr 0.05, at most 7.27 lr
                # per entry: Cauchy-Schwarz on Adam's moments); plus the update
                # form's, in 2-norm (<= Frobenius).
                sigma = np.linalg.svd(w, compute_uv=False)[0]
                old = _np(before)
                moved = np.linalg.norm(old, 2) + np.sqrt(old.size) * 0.05 * 7.27
                rtol = norm_ulps(sum(w.shape)) * EPS32 * moved
                rtol += np.sqrt(np.sum(update_form_error(w, before) ** 2))
                assert sigma <= 1.0 * (1 + rtol), (i, member, sigma)
