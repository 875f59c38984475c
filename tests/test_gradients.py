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
from helpers import constraint_instances

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
    np.testing.assert_allclose(np.asarray(jac), slope * np.eye(6), rtol=1e-6)
    # ... and the forward value agrees with the slope: C(t v) ~ slope * t v.
    t_v = jnp.full((3, 2), 1e-12)
    np.testing.assert_allclose(
        np.asarray(constraint(t_v)), slope * 1e-12, rtol=1e-4, atol=1e-12 * 1e-4
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
    np.testing.assert_allclose(np.sum(grad * direction), numeric, rtol=2e-2, atol=2e-3)


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
    np.testing.assert_allclose(meta, numeric, rtol=5e-2, atol=1e-3)

    if keras_constraints is not None:
        # The step's forward values are Keras's: constraint(param - lr * grad).
        new = _one_step(params, lr, constraints, x, y)
        grads = jax.grad(_loss)(params, x, y)
        for layer in params:
            for leaf, kc in keras_constraints.items():
                moved = params[layer][leaf] - lr * grads[layer][leaf]
                expected = np.asarray(jax.jit(kc.__call__)(moved))
                np.testing.assert_allclose(
                    np.asarray(new[layer][leaf]), expected, rtol=2e-6, atol=1e-7
                )


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
