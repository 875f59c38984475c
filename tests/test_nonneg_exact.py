"""Exact non-negativity: after `optax.apply_updates`, a NonNeg leaf has no
element below zero and no -0.0, in every dtype, however large the step.

`NonNeg.project_update` writes the update as `where(p + u <= 0, -p, u)`:
`p + (-p)` is exactly +0.0 in IEEE round-to-nearest arithmetic, and a
positive `p + u` cannot round to a negative number when `apply_updates` casts
it to the param dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_constraints as oc

N = 1_000_000
DTYPES = [
    (jnp.float32, jnp.float32),
    (jnp.bfloat16, jnp.bfloat16),
    (jnp.float16, jnp.float16),
    (jnp.bfloat16, jnp.float32),  # mixed precision: low-precision params, f32 updates
    (jnp.float16, jnp.float32),
]
IDS = [f"{jnp.dtype(p).name}-params-{jnp.dtype(u).name}-updates" for p, u in DTYPES]


def assert_nonneg_no_negative_zero(x) -> None:
    a = np.asarray(jnp.asarray(x).astype(jnp.float32))
    assert not np.any(a < 0), f"{int(np.sum(a < 0))} negative elements, min {a.min()}"
    assert not np.any(np.signbit(a)), f"{int(np.sum(np.signbit(a)))} elements are -0.0"


def projected_step(tx):
    @jax.jit
    def step(params, grads, state):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), updates, state

    return step


@pytest.mark.parametrize(("param_dtype", "update_dtype"), DTYPES, ids=IDS)
@pytest.mark.parametrize("jit", [True, False], ids=["jit", "eager"])
def test_million_elements_huge_updates(param_dtype, update_dtype, jit):
    # params ~ U(0, 1e-3), updates ~ N(0, 10): about half the elements would
    # land far below zero without the constraint.
    k1, k2 = jax.random.split(jax.random.key(0))
    params = {"w": (jax.random.uniform(k1, (N,)) * 1e-3).astype(param_dtype)}
    updates = {"w": (jax.random.normal(k2, (N,)) * 10.0).astype(update_dtype)}
    tx = oc.project({"nn": oc.NonNeg()}, {"w": "nn"})
    state = tx.init(params)
    update = jax.jit(tx.update) if jit else tx.update
    projected, _ = update(updates, state, params)
    new = optax.apply_updates(params, projected)

    assert new["w"].dtype == jnp.dtype(param_dtype)
    assert_nonneg_no_negative_zero(new["w"])
    # Reference (numpy, float64): maximum(p + u, 0), then rounded to the param
    # dtype as plain apply_updates would round p + u.
    p64 = np.asarray(params["w"].astype(jnp.float32), np.float64)
    u64 = np.asarray(updates["w"].astype(jnp.float32), np.float64)
    clipped = (p64 + u64) <= 0
    assert 0.4 < clipped.mean() < 0.6  # the case really is adversarial
    got = np.asarray(new["w"].astype(jnp.float32), np.float64)
    assert np.all(got[clipped] == 0.0)
    plain = np.asarray(optax.apply_updates(params, updates)["w"].astype(jnp.float32))
    np.testing.assert_array_equal(got[~clipped], plain[~clipped])


@pytest.mark.parametrize(("param_dtype", "update_dtype"), DTYPES, ids=IDS)
def test_edge_cases(param_dtype, update_dtype):
    # Updates that cancel the parameter exactly or to within an ulp, zeros of
    # both signs, subnormals, and the largest finite values.
    finfo_p = jnp.finfo(param_dtype)
    tiny = float(finfo_p.smallest_subnormal)
    base = np.array(
        [0.0, tiny, 2 * tiny, float(finfo_p.smallest_normal), 1e-3, 0.5, 1.0, 3.0, 100.0],
        np.float64,
    )
    base = np.concatenate([base, [float(finfo_p.max) / 4]])
    p = jnp.asarray(base, param_dtype)
    p64 = np.asarray(p.astype(jnp.float32), np.float64)
    ulp = np.asarray(jnp.finfo(update_dtype).eps, np.float64)
    factors = [-1.0, -(1 + ulp), -(1 - ulp / 2), -(1 + 4 * ulp), -2.0, 0.0, -0.0, 1.0]
    params, updates = [], []
    for f in factors:
        params.append(p)
        updates.append(jnp.asarray(p64 * f, jnp.float32).astype(update_dtype))
    # Signed zeros on both sides, tiny negative updates, -0.0 params.
    params.append(jnp.asarray([0.0, -0.0, 0.0, -0.0, tiny, tiny], param_dtype))
    updates.append(jnp.asarray([-0.0, 0.0, -tiny, -0.0, -tiny, -2 * tiny], update_dtype))
    params = {"w": jnp.concatenate([x.reshape(-1) for x in params])}
    updates = {"w": jnp.concatenate([x.reshape(-1) for x in updates])}
    tx = oc.project(oc.NonNeg())
    step = projected_step(tx)
    new, _, _ = step(params, updates, tx.init(params))
    assert_nonneg_no_negative_zero(new["w"])
    assert bool(jnp.all(jnp.isfinite(new["w"])))
    # Eager too (no XLA fusion).
    eager = optax.apply_updates(params, tx.update(updates, tx.init(params), params)[0])
    assert_nonneg_no_negative_zero(eager["w"])


@pytest.mark.parametrize(("param_dtype", "update_dtype"), DTYPES, ids=IDS)
def test_inside_a_chain_over_many_steps(param_dtype, update_dtype):
    # Adam moves every element by about lr per step whatever the gradient
    # scale; start at tiny values so elements hit the floor repeatedly.
    k1, k2 = jax.random.split(jax.random.key(2))
    shape = (1000, 100)
    params = {"w": (jax.random.uniform(k1, shape) * 1e-3).astype(param_dtype)}
    tx = optax.chain(optax.adam(0.3), oc.project(oc.NonNeg()))
    state = tx.init(params)
    step = projected_step(tx)
    for key in jax.random.split(k2, 5):
        grads = {"w": jax.random.normal(key, shape).astype(update_dtype) * 10}
        params, _, state = step(params, grads, state)
        assert params["w"].dtype == jnp.dtype(param_dtype)
        assert_nonneg_no_negative_zero(params["w"])


def test_apply_constraints_turns_negative_zero_into_positive_zero():
    w = jnp.asarray([-0.0, -1e-30, 0.0, 2.0], jnp.float32)
    for dtype in [jnp.float32, jnp.bfloat16, jnp.float16]:
        out = oc.apply_constraints(w.astype(dtype), oc.NonNeg())
        assert out.dtype == jnp.dtype(dtype)
        assert_nonneg_no_negative_zero(out)
