"""Checkpoints: an optimizer state holding `oc.ProjectState` saves and restores
(flax msgpack bytes, orbax), and training resumed from a checkpoint matches
uninterrupted training bit for bit."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import serialization

import optax_constraints as oc


class CountingMaxNorm(oc.MaxNorm):
    """A stateful constraint (counts its projections), so that
    `ProjectState.constraint_states` is not empty in these tests."""

    def init_state(self, w):
        return {"calls": jnp.zeros((), jnp.int32), "last_norm": jnp.zeros((), jnp.float32)}

    def apply(self, w, state, step):
        out = self.at_step(step)(w)
        norm = jnp.max(jnp.sqrt(jnp.sum(out.astype(jnp.float32) ** 2, axis=0)))
        return out, {"calls": state["calls"] + 1, "last_norm": norm}


def make_params():
    k1, k2 = jax.random.split(jax.random.key(0))
    return {
        "Dense_0": {"kernel": jax.random.normal(k1, (6, 4)), "bias": jnp.zeros((4,), jnp.float32)},
        "Dense_1": {"kernel": jax.random.normal(k2, (4, 1)), "bias": jnp.zeros((1,), jnp.float32)},
    }


def make_tx():
    return optax.chain(
        optax.adam(0.05),
        oc.project(
            {"kernel": CountingMaxNorm(1.0), "bias": oc.NonNeg(), "out": oc.UnitNorm()},
            oc.label_by_path({"Dense_1/kernel": "out", "**/kernel": "kernel", "**/bias": "bias"}),
        ),
    )


X = jax.random.normal(jax.random.key(1), (32, 6))
Y = jnp.sin(X[:, :1])


def make_step(tx):
    @jax.jit
    def step(params, opt_state):
        def loss(p):
            h = jax.nn.relu(X @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
            return jnp.mean((h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"] - Y) ** 2)

        grads = jax.grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return step


def train(step, params, opt_state, n):
    for _ in range(n):
        params, opt_state = step(params, opt_state)
    return params, opt_state


def project_state(opt_state) -> oc.ProjectState:
    (state,) = [s for s in opt_state if isinstance(s, oc.ProjectState)]
    return state


def trained_state(n=3):
    tx = make_tx()
    params = make_params()
    return tx, *train(make_step(tx), params, tx.init(params), n)


def test_the_state_is_worth_checkpointing():
    _, _, opt_state = trained_state(3)
    state = project_state(opt_state)
    assert int(state.count) == 3
    assert set(state.constraint_states) == {"Dense_0/kernel"}
    assert int(state.constraint_states["Dense_0/kernel"]["calls"]) == 3


def test_flax_msgpack_round_trip():
    tx, params, opt_state = trained_state(3)
    blob = serialization.to_bytes({"params": params, "opt_state": opt_state})
    assert isinstance(blob, bytes)
    target = {"params": make_params(), "opt_state": tx.init(make_params())}
    restored = serialization.from_bytes(target, blob)
    chex.assert_trees_all_equal(restored["params"], params, strict=True)
    chex.assert_trees_all_equal(restored["opt_state"], opt_state, strict=True)
    assert isinstance(project_state(restored["opt_state"]), oc.ProjectState)
    # The state dict is plain data: keys are the "/"-joined leaf paths.
    as_dict = serialization.to_state_dict(opt_state)
    assert "Dense_0/kernel" in str(as_dict)


def _orbax():
    return pytest.importorskip("orbax.checkpoint")


@pytest.mark.parametrize("checkpointer", ["PyTreeCheckpointer", "StandardCheckpointer"])
def test_orbax_round_trip(tmp_path, checkpointer):
    ocp = _orbax()
    tx, params, opt_state = trained_state(3)
    item = {"params": params, "opt_state": opt_state}
    target = {"params": make_params(), "opt_state": tx.init(make_params())}
    path = tmp_path / checkpointer
    ckptr = getattr(ocp, checkpointer)()
    ckptr.save(path, item)
    if hasattr(ckptr, "wait_until_finished"):
        ckptr.wait_until_finished()
    if checkpointer == "StandardCheckpointer":
        restored = ckptr.restore(path, target)
    else:
        restore_args = ocp.checkpoint_utils.construct_restore_args(target)
        restored = ckptr.restore(path, item=target, restore_args=restore_args)
    # Orbax restores NamedTuples from the target's structure.
    chex.assert_trees_all_equal(restored["params"], params)
    chex.assert_trees_all_equal(jax.tree.leaves(restored["opt_state"]), jax.tree.leaves(opt_state))
    assert jax.tree.structure(restored["opt_state"]) == jax.tree.structure(opt_state)


@pytest.mark.parametrize("how", ["msgpack", "orbax"])
def test_resumed_training_is_bitwise_identical(tmp_path, how):
    tx = make_tx()
    step = make_step(tx)
    params0 = make_params()

    full_params, full_state = train(step, params0, tx.init(params0), 10)

    half_params, half_state = train(step, params0, tx.init(params0), 5)
    target = {"params": make_params(), "opt_state": tx.init(make_params())}
    if how == "msgpack":
        blob = serialization.to_bytes({"params": half_params, "opt_state": half_state})
        restored = serialization.from_bytes(target, blob)
    else:
        ocp = _orbax()
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(tmp_path / "ckpt", {"params": half_params, "opt_state": half_state})
        ckptr.wait_until_finished()
        restored = ckptr.restore(tmp_path / "ckpt", target)
    # A fresh transform object and step function, as after a restart.
    tx2 = make_tx()
    resumed_params, resumed_state = train(
        make_step(tx2), restored["params"], restored["opt_state"], 5
    )

    for a, b in zip(jax.tree.leaves(resumed_params), jax.tree.leaves(full_params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(jax.tree.leaves(resumed_state), jax.tree.leaves(full_state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(project_state(resumed_state).count) == 10
    # Still feasible (numpy check).
    k = np.asarray(resumed_params["Dense_0"]["kernel"], np.float64)
    assert np.all(np.sqrt((k * k).sum(0)) <= 1.0 + 1e-6)
    assert np.all(np.asarray(resumed_params["Dense_0"]["bias"]) >= 0)
