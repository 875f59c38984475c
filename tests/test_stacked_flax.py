"""End to end: stacked layers as Flax users write them, trained with `oc.Stacked`.

* Linen: a transformer-style block (self-attention + MLP) under `nn.scan`
  with `variable_axes={"params": 0}`, `split_rngs={"params": True}`, trained
  through `TrainState.apply_gradients`;
* NNX: blocks created by `nnx.vmap`, applied with `nnx.scan`, trained by
  `nnx.Optimizer(model, tx, wrt=nnx.Param)` / `optimizer.update(model, grads)`;
* an ensemble made by `jax.vmap` of a Linen `init`.

After training, every layer (every member) is checked on its own, in float64
NumPy: its largest unit norm is at most the bound and, where the layers
start above the bound, equals it (the constraint binds in every layer);
each orthogonal layer has `WᵀW = I`; each spectrally normalised layer's
largest singular value is at most its bound. "At most" and "equals" are up
to float32 rounding (the rescaling's `rescaled_norm_rtol`, the SVD's backward
error, and `update_form_error` of the last step), or for the power method
the Kato-Temple bound of its settled estimate. After the first step each
constrained layer also equals Keras's formula applied to that layer of a
plain Adam run fed the same gradients.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from flax.training import train_state
from helpers import EPS32, norm_ulps, rescaled_norm_rtol, ulps, update_form_error

import optax_constraints as oc

LAYERS, DIM, HEADS, STEPS = 4, 16, 2, 8


def _np(x):
    return np.asarray(x, np.float64)


def per_unit_norms(kernel, axes):
    """Norms over `axes` of one layer's kernel (numpy float64)."""
    return np.sqrt(np.sum(_np(kernel) ** 2, axis=axes))


def assert_every_layer_capped(stacked_kernel, before, bound, axes, *, binds=True):
    """Each layer's unit norms at most `bound` (and the largest at it, if `binds`).

    Up to the rescaling's rounding and Keras's epsilon (`rescaled_norm_rtol`)
    and the last step's `update_form_error` (`before`: the leaf before it),
    in 2-norm over the unit.
    """
    for layer, (kernel, old) in enumerate(zip(_np(stacked_kernel), _np(before))):
        norms = per_unit_norms(kernel, axes)
        n = int(np.prod([kernel.shape[a] for a in np.atleast_1d(axes)]))
        rounding = per_unit_norms(update_form_error(kernel, old), axes) / bound
        rtol = rescaled_norm_rtol(n, bound) + rounding
        assert np.all(norms <= bound * (1 + rtol)), (layer, norms.max())
        if binds:
            assert norms.max() >= bound * (1 - rtol.max()), (layer, norms.max())


def assert_every_layer_orthogonal(stacked_kernel, before):
    """Each layer's smaller Gram matrix is I, up to rounding.

    The SVD's polar factor is orthonormal to its backward error (a reflection
    per row and column); `update_form_error` moves each vector of the Gram
    product, and the Gram entries by twice that vector's 2-norm at most.
    """
    for layer, (kernel, old) in enumerate(zip(_np(stacked_kernel), _np(before))):
        a = kernel.reshape(-1, kernel.shape[-1])
        err = update_form_error(a, old.reshape(a.shape))
        tall = a.shape[0] >= a.shape[1]
        gram = a.T @ a if tall else a @ a.T
        moved = np.sqrt(np.sum(err**2, axis=0 if tall else 1)).max()
        slack = ulps(1.0, 2 * norm_ulps(sum(a.shape))) + 2 * moved
        assert np.abs(gram - np.eye(len(gram))).max() <= slack, layer


ADAM_STEP = 0.1 / np.sqrt(0.001 * (1 - 0.9**2 / 0.999))
"""The most one Adam step (b1 = 0.9, b2 = 0.999) moves an entry, in units of the
learning rate: Cauchy-Schwarz on its two moving averages (bias corrections only
shrink it)."""


def sigma_rtol(kernel, before, lr=None) -> float:
    """A spectrally projected layer's sigma_max off its bound 1: relative, by rounding.

    The last step's `update_form_error` (2-norm <= Frobenius) and the
    rescaling's: for the power method (`lr=None`) sigma's sums over a row and
    a column, relative to the result; for the SVD (`lr`: Adam's learning
    rate) its backward error, a reflection per row and column, relative to
    the moved kernel's sigma, at most sigma(before) + the Frobenius norm of
    one Adam step.
    """
    a = _np(kernel).reshape(-1, np.shape(kernel)[-1])
    old = _np(before).reshape(a.shape)
    err = update_form_error(a, old)
    moved = 1.0 if lr is None else sigma_max(old) + np.sqrt(a.size) * lr * ADAM_STEP
    return norm_ulps(sum(a.shape)) * EPS32 * moved + float(np.linalg.norm(err))


def sigma_max(matrix):
    a = _np(matrix)
    return np.linalg.svd(a.reshape(-1, a.shape[-1]), compute_uv=False)[0]


def keras_max_norm(w, max_value, axis):
    w = np.asarray(w, np.float32)
    norms = np.sqrt(np.sum(w * w, axis=axis, keepdims=True))
    return w * (np.clip(norms, 0, max_value) / (np.float32(1e-7) + norms))


def data(n=32):
    k1, k2 = jax.random.split(jax.random.key(1))
    return jax.random.normal(k1, (n, 6, DIM)), jax.random.normal(k2, (n, 6, DIM))


# --- (a) Linen nn.scan ------------------------------------------------------------


class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        h = nn.SelfAttention(num_heads=HEADS, qkv_features=DIM)(nn.LayerNorm()(x))
        x = x + h
        h = nn.Dense(4 * DIM)(nn.LayerNorm()(x))  # Dense_0: (DIM, 4 DIM)
        x = x + nn.Dense(DIM)(nn.gelu(h))  # Dense_1: (4 DIM, DIM)
        return x, None


class Transformer(nn.Module):
    @nn.compact
    def __call__(self, x):
        blocks = nn.scan(
            Block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=LAYERS,
        )
        x, _ = blocks(name="blocks")(nn.Dense(DIM)(x), None)
        return nn.Dense(DIM)(x)


LINEN_RULES = {
    "blocks/**/query/kernel": "qkv",  # (layers, in, heads, head_dim)
    "blocks/**/key/kernel": "qkv",
    "blocks/**/value/kernel": "qkv",
    "blocks/**/out/kernel": "attn_out",  # (layers, heads, head_dim, out)
    "blocks/Dense_0/kernel": "mlp_in",  # (layers, DIM, 4 DIM)
    "blocks/Dense_1/kernel": "mlp_out",  # (layers, 4 DIM, DIM)
}
LINEN_CONSTRAINTS = {
    "qkv": oc.Stacked(oc.MaxNorm(0.5, axis=0)),  # per (head, feature): over the inputs
    "attn_out": oc.Stacked(oc.SpectralNorm(1.0, method="svd")),
    "mlp_in": oc.Stacked(oc.MaxNorm(0.5, axis="fan_in")),
    "mlp_out": oc.Stacked(oc.Orthogonal()),
}


def test_linen_scan_transformer_gets_per_layer_constraints():
    model = Transformer()
    x, y = data()
    params = model.init(jax.random.key(0), x)["params"]
    assert params["blocks"]["Dense_0"]["kernel"].shape == (LAYERS, DIM, 4 * DIM)
    labels = oc.label_by_path(LINEN_RULES)
    report = oc.routing_report(params, LINEN_CONSTRAINTS, labels)
    assert f"{LAYERS} x {4 * DIM} units of {DIM}" in report  # mlp_in, per layer
    assert f"{LAYERS} x ({4 * DIM}, {DIM}) matrix" in report  # mlp_out

    def loss_fn(params):
        return jnp.mean((model.apply({"params": params}, x) - y) ** 2)

    adam = optax.adam(0.05)
    tx = optax.chain(adam, oc.project(LINEN_CONSTRAINTS, labels))
    state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
    plain = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=adam)

    @jax.jit
    def step(state, plain):
        grads = jax.grad(loss_fn)(state.params)
        return state.apply_gradients(grads=grads), plain.apply_gradients(grads=grads)

    state, plain = step(state, plain)
    # Step 1: each layer is Keras's MaxNorm of that layer of the plain step.
    got = _np(state.params["blocks"]["Dense_0"]["kernel"])
    ref = _np(plain.params["blocks"]["Dense_0"]["kernel"])
    init = _np(params["blocks"]["Dense_0"]["kernel"])
    for layer in range(LAYERS):
        expected = _np(keras_max_norm(ref[layer], 0.5, axis=0))
        # Each side's rounding of the formula over units of DIM, then p + u'.
        tol = 2 * norm_ulps(DIM) * EPS32 * np.abs(expected)
        tol += update_form_error(expected, init[layer])
        assert np.all(np.abs(got[layer] - expected) <= tol), layer
    for _ in range(STEPS - 1):
        previous = state.params["blocks"]
        state, plain = step(state, plain)

    blocks = state.params["blocks"]
    old_attention = previous.get("SelfAttention_0", previous.get("attention"))
    attention = blocks["SelfAttention_0"] if "SelfAttention_0" in blocks else blocks["attention"]
    for name in ("query", "key", "value"):
        kernel = attention[name]["kernel"]
        assert kernel.shape == (LAYERS, DIM, HEADS, DIM // HEADS)
        assert_every_layer_capped(kernel, old_attention[name]["kernel"], 0.5, axes=0)
    out = attention["out"]["kernel"]
    for layer in range(LAYERS):
        rtol = sigma_rtol(out[layer], old_attention["out"]["kernel"][layer], lr=0.05)
        assert sigma_max(out[layer]) <= 1.0 * (1 + rtol), layer
    dense_0, dense_1 = blocks["Dense_0"]["kernel"], blocks["Dense_1"]["kernel"]
    assert_every_layer_capped(dense_0, previous["Dense_0"]["kernel"], 0.5, axes=0)
    assert_every_layer_orthogonal(dense_1, previous["Dense_1"]["kernel"])
    # The same bound on the stack as ONE array would not be per layer:
    # a norm over all layers and inputs together.
    plain_norms = per_unit_norms(blocks["Dense_0"]["kernel"], axes=(0, 1))
    assert plain_norms.max() > 0.5 * 1.5


# --- (b) NNX: nnx.vmap-created layers applied with nnx.scan ----------------------------


class NNXBlock(nnx.Module):
    def __init__(self, rngs):
        self.norm = nnx.LayerNorm(DIM, rngs=rngs)
        self.up = nnx.Linear(DIM, 2 * DIM, rngs=rngs)
        self.down = nnx.Linear(2 * DIM, DIM, rngs=rngs)

    def __call__(self, x):
        return x + self.down(nnx.relu(self.up(self.norm(x))))


class NNXStack(nnx.Module):
    def __init__(self, rngs):
        @nnx.split_rngs(splits=LAYERS)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def create_block(rngs):
            return NNXBlock(rngs)

        self.blocks = create_block(rngs)
        self.head = nnx.Linear(DIM, DIM, rngs=rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def forward(x, block):
            return block(x)

        return self.head(forward(x, self.blocks))


def test_nnx_vmap_scan_stack_trained_by_nnx_optimizer():
    model = NNXStack(nnx.Rngs(0))
    assert model.blocks.up.kernel.shape == (LAYERS, DIM, 2 * DIM)
    constraints = {
        "up": oc.Stacked(oc.MaxNorm(0.5, axis="fan_in")),
        "down": oc.Stacked(oc.SpectralNorm(1.0, num_iters=2)),  # power: one state per layer
        "bias": oc.NonNeg(),  # elementwise: the same stacked or not
    }
    labels = oc.label_by_path(
        {"blocks/up/kernel": "up", "blocks/down/kernel": "down", "blocks/*/bias": "bias"}
    )
    tx = optax.chain(optax.adam(0.02), oc.project(constraints, labels))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    x, y = data()

    @nnx.jit
    def step(model, optimizer):
        def loss_fn(model):
            return jnp.mean((model(x) - y) ** 2)

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    losses = []
    for _ in range(3 * STEPS):
        before_up, before_down = (
            _np(model.blocks.up.kernel[...]),
            _np(model.blocks.down.kernel[...]),
        )
        losses.append(float(step(model, optimizer)))
    assert losses[-1] < losses[0]
    assert_every_layer_capped(model.blocks.up.kernel[...], before_up, 0.5, axes=0)
    assert np.all(_np(model.blocks.up.bias[...]) >= 0)
    assert np.all(_np(model.blocks.down.bias[...]) >= 0)
    # The power method's settled estimate has a relative residual r <=
    # POWER_SETTLED, so (Kato-Temple) it is short of sigma_max by at most
    # r^2 / (2 (1 - r - (s2/s1)^2)) relative (the rescaling keeps s2/s1);
    # plus the rescaling's rounding and the update form's.
    r = oc.projections.POWER_SETTLED
    for layer, (k, old) in enumerate(zip(_np(model.blocks.down.kernel[...]), before_down)):
        s = np.linalg.svd(k, compute_uv=False)
        rtol = r**2 / (2 * (1 - r - (s[1] / s[0]) ** 2)) + sigma_rtol(k, old)
        assert s[0] <= 1.0 + rtol, (layer, s[0])
        assert s[0] >= 1.0 - sigma_rtol(k, old), (layer, s[0])  # every layer started above 1
    # One power-iteration vector per layer, in the optimizer's state.
    states = [
        leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.state(optimizer))
        if "constraint_states" in jax.tree_util.keystr(path)
    ]
    assert [np.shape(s) for s in states] == [(LAYERS, DIM)]


# --- (c) an ensemble made by jax.vmap of init ------------------------------------------


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(32)(x))
        x = nn.relu(nn.Dense(32)(x))
        return nn.Dense(1)(x)


def test_vmapped_ensemble_constrains_each_member():
    members = 5
    model = MLP()
    x = jax.random.normal(jax.random.key(2), (64, 8))
    y = jnp.sin(x.sum(axis=1, keepdims=True))
    keys = jax.random.split(jax.random.key(3), members)
    params = jax.vmap(model.init, in_axes=(0, None))(keys, x)["params"]
    assert params["Dense_0"]["kernel"].shape == (members, 8, 32)

    constraints = {"kernel": oc.Stacked(oc.MaxNorm(0.8, axis="fan_in")), "bias": oc.NonNeg()}
    labels = oc.label_by_path({"**/kernel": "kernel", "**/bias": "bias"})
    tx = optax.chain(optax.adam(0.05), oc.project(constraints, labels))
    opt_state = tx.init(params)

    def loss_fn(params):
        pred = jax.vmap(model.apply, in_axes=({"params": 0}, None))({"params": params}, x)
        return jnp.mean((pred - y) ** 2)  # members are independent: a sum of their losses

    @jax.jit
    def step(params, opt_state):
        grads = jax.grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    for _ in range(STEPS):
        previous = params
        params, opt_state = step(params, opt_state)
    for name in ("Dense_0", "Dense_1", "Dense_2"):
        kernel, before = params[name]["kernel"], previous[name]["kernel"]
        # Dense_2 (32, 1) starts below 0.8 in some members: capped, not bound.
        assert_every_layer_capped(kernel, before, 0.8, axes=0, binds=name != "Dense_2")
        assert np.all(_np(params[name]["bias"]) >= 0)
    # Each member is capped on its own, not the ensemble as one array.
    joint = per_unit_norms(params["Dense_0"]["kernel"], axes=(0, 1))
    assert joint.max() > 0.8 * 2
