"""Differentiating through constraints: finite gradients, Keras forward values.

Keras's norm constraints take `sqrt(sum(w * w))`, whose derivative at an
all-zero unit is 0 * inf = NaN; ours route zeros around the square root, so
gradients are finite everywhere while the forward values stay Keras's (within
2 ulp of `keras.constraints` on the JAX backend, jitted). Differentiating a
whole training step that contains `oc.project` (a meta-gradient with respect
to the learning rate, or an unrolled step with respect to the parameters)
gives finite gradients too, and they match finite differences.
"""

from __future__ import annotations

# KERAS_BACKEND=jax is set by tests/conftest.py before Keras is imported.
import jax
import jax.numpy as jnp
import keras
import numpy as np
import optax
import pytest
from helpers import (
    EPS32,
    assert_close_ulps,
    central_difference_slack,
    constraint_instances,
    norm_ulps,
    ulps,
)

import optax_constraints as oc

EPS = 1e-7  # Keras's backend.epsilon()


# Instances with non-trivial hyper-parameters; a class not listed is tested
# with its defaults (so a newly exported class is covered at once).
EXAMPLES = {
    "MaxNorm": [oc.MaxNorm(1.0, axis=0), oc.MaxNorm(1.0, axis="fan_in")],
    "MinMaxNorm": [oc.MinMaxNorm(0.5, 1.0, axis=0), oc.MinMaxNorm(0.5, 1.0, rate=0.3, axis=1)],
    "UnitNorm": [oc.UnitNorm(axis=0), oc.UnitNorm(axis=None)],
    "Clip": [oc.Clip(-0.5, 0.5)],
    "CenterAround": [oc.CenterAround(0.25)],
    "Sphere": [oc.Sphere(2.0, axis=0)],
}


INSTANCES = constraint_instances(EXAMPLES)


def _corner_arrays() -> dict[str, np.ndarray]:
    """Kernels (4, 3) where derivatives are usually in trouble."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 3)).astype(np.float32)
    zero_unit = w.copy()
    zero_unit[:, 1] = 0.0  # one all-zero unit (a dead output)
    on_boundary = np.zeros((4, 3), np.float32)
    on_boundary[:2] = [[0.6, 0.0, 3.0], [0.8, 0.0, 4.0]]  # unit norms 1, 0, 5
    return {
        "zeros": np.zeros((4, 3), np.float32),
        "zero_unit": zero_unit,
        "rank_one": np.outer(rng.normal(size=4), rng.normal(size=3)).astype(np.float32),
        "repeated_singular_values": 2 * np.eye(4, 3, dtype=np.float32),
        "ties": np.full((4, 3), 0.5, np.float32),
        "on_boundary": on_boundary,
        "random": w,
    }


CORNERS = _corner_arrays()


def keras_formula_64(constraint, w):
    """`constraint`'s Keras formula on axis 0, in float64 NumPy, written here."""
    w = np.asarray(w, np.float64)
    if constraint is None:
        return w
    if isinstance(constraint, oc.NonNeg):
        return np.maximum(w, 0)
    norms = np.sqrt(np.sum(w * w, axis=0, keepdims=True))
    if isinstance(constraint, oc.UnitNorm):
        return w / (EPS + norms)
    if isinstance(constraint, oc.MaxNorm):
        desired = np.clip(norms, 0, constraint.max_value)
    else:
        clipped = np.clip(norms, constraint.min_value, constraint.max_value)
        desired = constraint.rate * clipped + (1 - constraint.rate) * norms
    return w * desired / (EPS + norms)


def _cotangent(shape):
    return jnp.asarray(np.cos(np.arange(np.prod(shape))).reshape(shape), jnp.float32)


# --- gradients through one projection ---------------------------------------------


@pytest.mark.parametrize("constraint", INSTANCES, ids=repr)
def test_gradient_finite_at_corners(constraint):
    names = sorted(CORNERS)
    stacked = jnp.asarray(np.stack([CORNERS[n] for n in names]))
    v = _cotangent(stacked.shape[1:])

    def derivatives(w):
        grad = jax.grad(lambda x: jnp.sum(constraint(x) * v))(w)
        _, tangent = jax.jvp(constraint, (w,), (v,))
        return grad, tangent

    # One compiled program for every corner (vmap over them).
    grads, tangents = jax.jit(jax.vmap(derivatives))(stacked)
    for name, grad, tangent in zip(names, np.asarray(grads), np.asarray(tangents)):
        assert np.all(np.isfinite(grad)), f"{constraint!r} at {name}: gradient {grad}"
        assert np.all(np.isfinite(tangent)), f"{constraint!r} at {name}: tangent {tangent}"


KERAS = {
    "MaxNorm": lambda: (oc.MaxNorm(1.5, axis=0), keras.constraints.MaxNorm(1.5, axis=0)),
    "MaxNorm_fan_in": lambda: (
        oc.MaxNorm(1.5, axis="fan_in"),
        keras.constraints.MaxNorm(1.5, axis=[0, 1]),
    ),
    "UnitNorm": lambda: (oc.UnitNorm(axis=1), keras.constraints.UnitNorm(axis=1)),
    "MinMaxNorm": lambda: (
        oc.MinMaxNorm(0.5, 1.5, rate=0.7, axis=0),
        keras.constraints.MinMaxNorm(0.5, 1.5, rate=0.7, axis=0),
    ),
    "NonNeg": lambda: (oc.NonNeg(), keras.constraints.NonNeg()),
}


def _keras_input(name: str) -> np.ndarray:
    rng = np.random.default_rng(7)
    shape = (3, 3, 4) if name == "MaxNorm_fan_in" else (5, 4)
    w = (rng.normal(size=shape) * 2).astype(np.float32)
    w[..., 1] = 0.0  # a zero unit for axis 0 / fan_in
    w[0] = 0.0  # a zero unit for axis 1
    return w


@pytest.mark.parametrize("name", sorted(KERAS))
def test_forward_matches_keras_and_gradient_is_finite(name):
    ours, theirs = KERAS[name]()
    w = jnp.asarray(_keras_input(name))
    expected = np.asarray(jax.jit(theirs.__call__)(w))
    got = np.asarray(jax.jit(ours)(w))
    np.testing.assert_array_max_ulp(got, expected, maxulp=2)
    zero_unit = got[0] if name == "UnitNorm" else got[..., 1]
    assert np.all(zero_unit == 0), "a zero unit must stay zero"
    grad = jax.grad(lambda x: jnp.sum(ours(x) * _cotangent(x.shape)))(w)
    assert np.all(np.isfinite(np.asarray(grad)))


@pytest.mark.parametrize(
    "constraint, slope",
    [
        (oc.MaxNorm(1.0), 0.0),
        (oc.UnitNorm(), 1 / EPS),
        (oc.MinMaxNorm(0.5, 2.0), 0.5 / EPS),
        (oc.MinMaxNorm(0.5, 2.0, rate=0.4), 0.4 * 0.5 / EPS),
    ],
    ids=repr,
)
def test_gradient_at_zero_unit_is_the_true_derivative(constraint, slope):
    # Near a zero unit, C(t v) = t v d(t|v|) / (EPS + t|v|) = t v d(0) / EPS + O(t^2),
    # so the derivative there exists and is d(0) / EPS times the identity
    # (d(0) = rate * min_value; 0 for MaxNorm; 1 for UnitNorm).
    w = jnp.zeros((3, 2))
    jac = jax.jacobian(constraint)(w).reshape(6, 6)
    # Three roundings: float32(1e-7), rate * min_value and the quotient.
    assert_close_ulps(np.asarray(jac), slope * np.eye(6), 3)
    # ... and the forward value agrees with the slope: C(t v) ~ slope * t v.
    t_v = jnp.full((3, 2), 1e-12)
    # Next order: C(tv) - slope tv = tv [(d(n) - d(0)) - slope n] / (EPS + n) with
    # n = |tv| = sqrt(3) 1e-12 and d 1-Lipschitz: at most tv (n / EPS)(1 + slope).
    n = np.sqrt(3) * 1e-12
    truncation = 1e-12 * n / EPS * (1 + slope)
    # Rounding: float32(1e-12), the unit's norm and the rescaling (norm_ulps(3)),
    # the rate's product and sum.
    rounding = ulps(slope * 1e-12, norm_ulps(3) + 3)
    np.testing.assert_allclose(
        np.asarray(constraint(t_v)), slope * 1e-12, rtol=0, atol=truncation + rounding
    )


@pytest.mark.parametrize(
    "constraint",
    [oc.MaxNorm(1.0), oc.MinMaxNorm(0.5, 1.0), oc.UnitNorm(), oc.NonNeg()],
    ids=repr,
)
def test_gradient_matches_finite_differences(constraint):
    rng = np.random.default_rng(1)
    w = rng.normal(size=(3, 4))
    w[:, 0] *= 0.1  # units inside, on both sides of the bounds
    w = jnp.asarray(w, jnp.float32)
    v = _cotangent(w.shape)
    grad = np.asarray(jax.grad(lambda x: jnp.sum(constraint(x) * v))(w), np.float64)
    direction = rng.normal(size=w.shape).astype(np.float32)
    h = 1e-3

    def loss(x):
        return float(jnp.sum(constraint(jnp.asarray(x, jnp.float32)) * v))

    numeric = (loss(w + h * direction) - loss(w - h * direction)) / (2 * h)
    v64, w64, d64 = np.asarray(v, np.float64), np.asarray(w, np.float64), direction.astype(float)

    def loss64(t):
        return float(np.sum(keras_formula_64(constraint, w64 + t * d64) * v64))

    # One float32 loss: each entry of C carries norm_ulps(3) roundings (units
    # of 3), the 12-term sum 12 more; the input w +- h d is rounded (an ulp of
    # |w|, through the gradient). The gradient's own error: norm_ulps(3).
    terms = max(np.abs(keras_formula_64(constraint, w64 + t * d64) * v64).sum() for t in (-h, h))
    rounding = ulps(terms, norm_ulps(3) + 12) + ulps(np.sum(np.abs(grad * w64)), 1)
    slack = central_difference_slack(loss64, h, rounding)
    slack += ulps(np.sum(np.abs(grad * d64)), norm_ulps(3))
    np.testing.assert_allclose(np.sum(grad * direction), numeric, rtol=0, atol=slack)


# --- gradients through a whole training step -------------------------------------


def _mlp():
    rng = np.random.default_rng(3)
    params = {
        "dense_0": {
            "kernel": jnp.asarray(rng.normal(size=(4, 5)) * 2, jnp.float32),
            "bias": jnp.asarray(rng.normal(size=5), jnp.float32),
        },
        "dense_1": {
            "kernel": jnp.asarray(rng.normal(size=(5, 2)), jnp.float32),
            "bias": jnp.zeros(2, jnp.float32),
        },
    }
    # A dead unit: zero weights in and zero gradient, the classic NaN trap.
    params["dense_0"]["kernel"] = params["dense_0"]["kernel"].at[:, 2].set(0.0)
    x = jnp.asarray(rng.normal(size=(8, 4)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(8, 2)), jnp.float32)
    return params, x, y


def _loss(params, x, y):
    h = jax.nn.relu(x @ params["dense_0"]["kernel"] + params["dense_0"]["bias"])
    h = h * jnp.array([1, 1, 0, 1, 1], jnp.float32)  # the dead unit gets no gradient
    out = h @ params["dense_1"]["kernel"] + params["dense_1"]["bias"]
    return jnp.mean((out - y) ** 2)


STEP_CONSTRAINTS = {
    "keras": (
        {"kernel": oc.MaxNorm(1.0), "bias": oc.NonNeg()},
        {"kernel": keras.constraints.MaxNorm(1.0), "bias": keras.constraints.NonNeg()},
    ),
    "unit_norm": ({"kernel": oc.UnitNorm(), "bias": None}, None),
    "min_max_norm": ({"kernel": oc.MinMaxNorm(0.5, 1.0), "bias": oc.NonNeg()}, None),
}


MASK = np.array([1, 1, 0, 1, 1], np.float64)  # `_loss`'s dead unit


def _forward_64(p, x, err=None):
    """`_loss`'s network in float64, with a bound on its float32 rounding.

    Running error analysis (Higham 2002, ch. 3): a sum of `n` products adds
    `n` ulps of the sum of |terms| (one more for the bias), and errors in the
    inputs (`err`, per parameter) propagate through |x| and |W|.
    """
    err = err or {k: {n: 0 * v for n, v in d.items()} for k, d in p.items()}
    k0, b0, k1, b1 = (p[k][n] for k in ("dense_0", "dense_1") for n in ("kernel", "bias"))
    pre = x @ k0 + b0
    err_pre = ulps(1.0, 5) * (np.abs(x) @ np.abs(k0) + np.abs(b0))
    err_pre += np.abs(x) @ err["dense_0"]["kernel"] + err["dense_0"]["bias"]
    h, err_h = np.maximum(pre, 0) * MASK, err_pre * MASK  # relu is 1-Lipschitz
    out = h @ k1 + b1
    err_out = ulps(1.0, 6) * (np.abs(h) @ np.abs(k1) + np.abs(b1)) + err_h @ np.abs(k1)
    err_out += np.abs(h) @ err["dense_1"]["kernel"] + err["dense_1"]["bias"]
    return pre, h, err_h, out, err_out


def step_loss_64(params, lr, constraints, x, y):
    """`_loss(_one_step(params, lr, ...))` in float64 NumPy, and a bound on the float32 error.

    The same step written here: manual backprop, `p - lr g`, the Keras
    formulas (`keras_formula_64`), the loss at the new parameters. The bound
    follows every rounding (`_forward_64`); the gradient's sums are over the
    batch of 8 (and the 2 outputs); `p - lr g` adds 2 ulps; a projection adds
    `norm_ulps(5)` of each entry and scales incoming errors by at most
    `max(1, target / norm)` per unit (its Lipschitz constant).
    """
    p = {k: {n: np.asarray(v, np.float64) for n, v in d.items()} for k, d in params.items()}
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    pre, h, err_h, out, err_out = _forward_64(p, x)
    n_out = out.size
    dout = 2 * (out - y) / n_out
    err_dout = 2 / n_out * (err_out + ulps(np.abs(out) + np.abs(y), 1)) + ulps(np.abs(dout), 2)
    k1 = p["dense_1"]["kernel"]
    active = MASK * (pre > 0)
    dh = (dout @ k1.T) * active
    err_dh = (ulps(1.0, 2) * np.abs(dout) @ np.abs(k1.T) + err_dout @ np.abs(k1.T)) * active
    grads = {
        "dense_0": {"kernel": x.T @ dh, "bias": dh.sum(0)},
        "dense_1": {"kernel": h.T @ dout, "bias": dout.sum(0)},
    }
    err_g = {
        "dense_0": {
            "kernel": ulps(1.0, 8) * np.abs(x.T) @ np.abs(dh) + np.abs(x.T) @ err_dh,
            "bias": ulps(1.0, 8) * np.abs(dh).sum(0) + err_dh.sum(0),
        },
        "dense_1": {
            "kernel": ulps(1.0, 8) * np.abs(h.T) @ np.abs(dout)
            + np.abs(h.T) @ err_dout
            + err_h.T @ np.abs(dout),
            "bias": ulps(1.0, 8) * np.abs(dout).sum(0) + err_dout.sum(0),
        },
    }
    new, err_new = {}, {}
    for k, d in p.items():
        new[k], err_new[k] = {}, {}
        for n, value in d.items():
            moved = value - lr * grads[k][n]
            err_moved = lr * err_g[k][n] + ulps(1.0, 2) * (np.abs(value) + lr * np.abs(grads[k][n]))
            projected = keras_formula_64(constraints[n], moved)
            gain = 1.0
            if constraints[n] is not None and not isinstance(constraints[n], oc.NonNeg):
                # Near a zero unit the slope is d(0) / EPS (see the test above).
                norms = np.sqrt(np.sum(moved**2, axis=0))
                ratio = np.sqrt(np.sum(projected**2, axis=0)) / np.where(norms > 0, norms, 1)
                gain = np.maximum(1.0, np.where(norms > 0, ratio, 1 / EPS))
                err_moved = gain * np.sqrt(np.sum(err_moved**2, axis=0, keepdims=True))
            new[k][n] = projected
            err_new[k][n] = err_moved + ulps(1.0, norm_ulps(5)) * np.abs(projected)
    *_, out, err_out = _forward_64(new, x, err_new)
    r = out - y
    err_r = err_out + ulps(np.abs(out) + np.abs(y), 1)
    loss = float(np.mean(r**2))
    err_loss = float(np.mean(2 * np.abs(r) * err_r + err_r**2) + ulps(np.mean(r**2), 17))
    return loss, err_loss


def _labels():
    return oc.label_by_path({"**/kernel": "kernel", "**/bias": "bias"})


def _one_step(params, lr, constraints, x, y):
    tx = optax.chain(optax.sgd(lr), oc.project(constraints, _labels()))
    state = tx.init(params)
    grads = jax.grad(_loss)(params, x, y)
    updates, _ = tx.update(grads, state, params)
    return optax.apply_updates(params, updates)


@pytest.mark.parametrize("name", sorted(STEP_CONSTRAINTS))
def test_meta_gradient_wrt_learning_rate(name):
    constraints, keras_constraints = STEP_CONSTRAINTS[name]
    params, x, y = _mlp()

    def validation_loss(lr):
        return _loss(_one_step(params, lr, constraints, x, y), x, y)

    lr = 0.05
    meta = float(jax.jit(jax.grad(validation_loss))(lr))
    assert np.isfinite(meta)
    h = 1e-3
    numeric = (float(validation_loss(lr + h)) - float(validation_loss(lr - h))) / (2 * h)

    def loss64(t):
        return step_loss_64(params, lr + t, constraints, x, y)[0]

    # The float32 loss's rounding (bounded in `step_loss_64`) at both points;
    # the derivative's own, by the same count, is far below that over 2h.
    rounding = max(step_loss_64(params, lr + t, constraints, x, y)[1] for t in (-h, h))
    slack = central_difference_slack(loss64, h, rounding)
    np.testing.assert_allclose(meta, numeric, rtol=0, atol=slack)

    if keras_constraints is not None:
        # The step's forward values are Keras's: constraint(param - lr * grad).
        new = _one_step(params, lr, constraints, x, y)
        grads = jax.grad(_loss)(params, x, y)
        for layer in params:
            for leaf, kc in keras_constraints.items():
                moved = params[layer][leaf] - lr * grads[layer][leaf]
                expected = np.asarray(jax.jit(kc.__call__)(moved), np.float64)
                # Each side's rounding of the formula (units of at most 5), then
                # p + u' with u' = C(moved) - p: an ulp of |u'| and of the result.
                before = np.asarray(params[layer][leaf], np.float64)
                tol = EPS32 * (
                    2 * norm_ulps(5) * np.abs(expected)
                    + np.abs(expected - before)
                    + np.abs(expected)
                )
                excess = np.abs(np.asarray(new[layer][leaf], np.float64) - expected) - tol
                assert excess.max() <= 0, (layer, leaf, excess.max())


@pytest.mark.parametrize("name", sorted(STEP_CONSTRAINTS))
def test_unrolled_step_gradient_wrt_params(name):
    constraints, _ = STEP_CONSTRAINTS[name]
    params, x, y = _mlp()

    def unrolled(p):
        return _loss(
            _one_step(_one_step(p, 0.05, constraints, x, y), 0.05, constraints, x, y), x, y
        )

    grads = jax.jit(jax.grad(unrolled))(params)
    for leaf in jax.tree.leaves(grads):
        assert np.all(np.isfinite(np.asarray(leaf)))


def test_meta_gradient_through_inject_hyperparams():
    params, x, y = _mlp()
    constraints = {"kernel": oc.MaxNorm(1.0), "bias": oc.NonNeg()}

    def validation_loss(lr):
        tx = optax.chain(
            # eps_root keeps Adam's own sqrt(v) differentiable at the dead unit.
            optax.inject_hyperparams(optax.adam)(learning_rate=lr, eps_root=1e-16),
            oc.project(constraints, _labels()),
        )
        state = tx.init(params)
        p = params
        for _ in range(3):
            updates, state = tx.update(jax.grad(_loss)(p, x, y), state, p)
            p = optax.apply_updates(p, updates)
        return _loss(p, x, y)

    meta = jax.jit(jax.grad(validation_loss))(jnp.float32(1e-2))
    assert np.isfinite(float(meta))


@pytest.mark.parametrize("constraint", INSTANCES, ids=repr)
def test_every_constraint_in_a_differentiated_step(constraint):
    # Every exported constraint, on a kernel with a dead unit, inside a step
    # differentiated with respect to both the learning rate and the params.
    params, x, y = _mlp()
    tx_constraints = {"kernel": constraint, "bias": None}

    def validation_loss(p, lr):
        return _loss(_one_step(p, lr, tx_constraints, x, y), x, y)

    g_params, g_lr = jax.jit(jax.grad(validation_loss, argnums=(0, 1)))(params, 0.05)
    assert np.isfinite(float(g_lr))
    for leaf in jax.tree.leaves(g_params):
        assert np.all(np.isfinite(np.asarray(leaf)))
