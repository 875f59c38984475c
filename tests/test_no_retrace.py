"""jit: a training step with `oc.project` compiles once, and constraints are
hashable values that can be static arguments."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import EPS32, rescaled_norm_rtol, update_form_error

import optax_constraints as oc


def make_params():
    k1, k2 = jax.random.split(jax.random.key(0))
    return {
        "dense": {"kernel": jax.random.normal(k1, (4, 3)), "bias": jnp.zeros(3)},
        "conv": {"kernel": jax.random.normal(k2, (3, 3, 2, 5)), "bias": jnp.zeros(5)},
    }


LABELS = oc.label_by_path({"**/kernel": "kernel", "**/bias": "bias"})

TRANSFORMS = {
    "max_norm+non_neg": lambda: oc.project(
        {"kernel": oc.MaxNorm(1.0, axis="fan_in"), "bias": oc.NonNeg()}, LABELS
    ),
    "every_k_steps": lambda: oc.project(
        {"kernel": oc.UnitNorm(axis="fan_in"), "bias": None}, LABELS, every_k_steps=3
    ),
    "schedule": lambda: oc.project(
        {"kernel": oc.MaxNorm(optax.linear_schedule(3.0, 1.0, 10), axis="fan_in"), "bias": None},
        LABELS,
    ),
    "min_max_norm": lambda: oc.project(
        {"kernel": oc.MinMaxNorm(0.5, 1.0, rate=0.5, axis="fan_in"), "bias": oc.Clip(0, 1)},
        LABELS,
    ),
}


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_training_step_compiles_once(name):
    tx = optax.chain(optax.adam(1e-2), TRANSFORMS[name]())
    params = make_params()
    state = tx.init(params)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(params, state, x):
        def loss(p):
            h = x @ p["dense"]["kernel"] + p["dense"]["bias"]
            return jnp.sum(h**2) + jnp.sum(p["conv"]["kernel"] ** 2) + jnp.sum(p["conv"]["bias"])

        grads = jax.grad(loss)(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    chex.clear_trace_counter()
    for i in range(6):
        x = jax.random.normal(jax.random.key(i), (2, 4))
        before = params["dense"]["kernel"]
        params, state = step(params, state, x)
    assert step._cache_size() == 1
    # The step really projects (the contract, checked against numpy-free math).
    kernel = params["dense"]["kernel"]
    norms = np.sqrt(np.sum(np.asarray(kernel, np.float64) ** 2, axis=0))
    if name == "max_norm+non_neg":
        # The rescaling's rounding over units of 4, and the last step's p + u'
        # (its update_form_error, in 2-norm over the unit).
        rounding = np.sqrt(np.sum(update_form_error(kernel, before) ** 2, axis=0))
        assert np.all(norms <= 1.0 + rescaled_norm_rtol(kernel.shape[0], 1.0) + rounding)
        assert bool(jnp.all(params["dense"]["bias"] >= 0))


def test_project_update_jitted_directly_compiles_once():
    tx = TRANSFORMS["max_norm+non_neg"]()
    params = make_params()
    state = tx.init(params)
    update = jax.jit(chex.assert_max_traces(tx.update, n=1))
    chex.clear_trace_counter()
    for i in range(4):
        grads = jax.tree.map(lambda p, i=i: jnp.full_like(p, 0.1 * i), params)
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
    assert int(state.count) == 4


@pytest.mark.parametrize(
    "make",
    [
        lambda: oc.MaxNorm(2.0, axis=0),
        lambda: oc.MaxNorm(max_value=2.0, axis=[0]),  # list and tuple axes are the same
        lambda: oc.MinMaxNorm(0.1, 1.0, rate=0.5, axis="fan_in"),
        lambda: oc.UnitNorm(axis=(0, 1)),
        lambda: oc.NonNeg(),
        lambda: oc.Clip(-1.0, 1.0),
        lambda: oc.get("max_norm"),
    ],
)
def test_equal_constraints_hit_the_jit_cache_as_static_args(make):
    a, b = make(), make()
    assert a is not b
    assert a == b and hash(a) == hash(b)

    traces = []

    def f(w, constraint):
        traces.append(constraint)
        return oc.apply_constraints({"w": w}, constraint)["w"]

    jitted = jax.jit(f, static_argnums=1)
    w = jax.random.normal(jax.random.key(0), (3, 4, 2))
    out_a = jitted(w, a)
    out_b = jitted(w, b)
    assert len(traces) == 1
    assert jitted._cache_size() == 1
    chex.assert_trees_all_equal(out_a, out_b)


def test_different_constraints_do_not_share_a_cache_entry():
    def f(w, constraint):
        return constraint(w)

    jitted = jax.jit(f, static_argnums=1)
    w = jnp.array([[3.0], [4.0]])
    one = jitted(w, oc.MaxNorm(1.0))
    two = jitted(w, oc.MaxNorm(2.0))
    assert jitted._cache_size() == 2
    # The norm 5 is exact and 5 + 1e-7 rounds to 5: the factor m / 5, the
    # product and the float32 literal compared with are the only roundings,
    # half an ulp each.
    chex.assert_trees_all_close(one, jnp.array([[0.6], [0.8]]), rtol=1.5 * EPS32, atol=0)
    chex.assert_trees_all_close(two, jnp.array([[1.2], [1.6]]), rtol=1.5 * EPS32, atol=0)


def test_whole_transform_rebuilt_each_time_is_cached_through_static_constraints():
    # A common pattern: build the transform inside a jitted function from
    # static constraint arguments; equal constraints reuse the compilation.
    params = make_params()

    def step(params, grads, kernel_c, bias_c):
        tx = optax.chain(optax.sgd(0.1), oc.project({"kernel": kernel_c, "bias": bias_c}, LABELS))
        updates, _ = tx.update(grads, tx.init(params), params)
        return optax.apply_updates(params, updates)

    jitted = jax.jit(step, static_argnums=(2, 3))
    grads = jax.tree.map(jnp.ones_like, params)
    jitted(params, grads, oc.MaxNorm(1.0, axis="fan_in"), oc.NonNeg())
    out = jitted(params, grads, oc.MaxNorm(1.0, axis="fan_in"), oc.NonNeg())
    assert jitted._cache_size() == 1
    assert bool(jnp.all(out["dense"]["bias"] >= 0))
