"""NaN/Inf policy: a non-finite value stays inside its own unit and leaf.

The policy (docs/nonfinite.md): a NaN or an infinity in a parameter or an
update contaminates at most the *unit* the constraint couples it with (one
element for `NonNeg`/`Clip`; the slice over `axis` for the norm, L1-ball and
simplex constraints; the whole leaf for `CenterAround` and the matrix
constraints) and never another unit, another leaf, or the transform's state
of another leaf. Nothing is silently repaired either: the affected unit comes
back non-finite, and `constraint_violations` reports it, so `optax.apply_if_finite`
(which works around `oc.project`) or a NaN check can act on it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import EPS32, constraint_instances, norm_ulps, ulps, update_form_error

import optax_constraints as oc

SHAPE = (4, 3)
WHERE = (1, 2)  # the planted element
BAD_VALUES = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf}

# How far each class couples entries: "element", "axis" (the unit over its
# `axis`) or "leaf". A class not listed that has an `axis` is "axis", else "leaf".
COUPLING = {"NonNeg": "element", "Clip": "element"}
# The wrapper examples (helpers.WRAPPER_EXAMPLES) couple each row: on a
# (rows, cols) kernel their units reduce over axis 1.
REDUCED_AXES = {"Stacked": (1,), "OutputFirst": (1,)}


EXAMPLES = {
    "MaxNorm": [oc.MaxNorm(1.0, axis=0), oc.MaxNorm(1.0, axis=-1), oc.MaxNorm(1.0, axis=None)],
    "MinMaxNorm": [oc.MinMaxNorm(0.5, 1.0, axis="fan_in"), oc.MinMaxNorm(0.5, 1.0, 0.5, axis=1)],
    "UnitNorm": [oc.UnitNorm(axis=0), oc.UnitNorm(axis=[1])],
    "Clip": [oc.Clip(-0.5, 0.5)],
    "CenterAround": [oc.CenterAround(0.1)],
}


INSTANCES = constraint_instances(EXAMPLES, axis_variant=1)


def coupled_with(constraint, shape, where) -> np.ndarray:
    """Boolean mask of the entries that share a unit with `where`."""
    kind = COUPLING.get(type(constraint).__name__)
    if kind is None:
        wrapper = type(constraint).__name__ in REDUCED_AXES
        kind = "axis" if hasattr(constraint, "axis") or wrapper else "leaf"
    if kind == "element":
        mask = np.zeros(shape, bool)
        mask[where] = True
        return mask
    if kind == "leaf":
        return np.ones(shape, bool)
    axis, ndim = getattr(constraint, "axis", None), len(shape)
    if type(constraint).__name__ in REDUCED_AXES:
        reduced = set(REDUCED_AXES[type(constraint).__name__])
    elif axis is None:
        reduced = set(range(ndim))
    elif axis == "fan_in":
        reduced = set(range(ndim - 1))
    else:
        reduced = {a % ndim for a in ((axis,) if isinstance(axis, int) else axis)}
    coords = np.indices(shape)
    mask = np.ones(shape, bool)
    for d in range(ndim):
        if d not in reduced:
            mask &= coords[d] == where[d]
    return mask


def _kernel(seed=0):
    return np.random.default_rng(seed).normal(size=SHAPE).astype(np.float32)


def _planted(w, value):
    w = np.array(w)
    w[WHERE] = value
    return w


@pytest.mark.parametrize("bad", sorted(BAD_VALUES))
@pytest.mark.parametrize("constraint", INSTANCES, ids=repr)
def test_non_finite_entry_stays_in_its_unit(constraint, bad):
    clean = _kernel()
    dirty = _planted(clean, BAD_VALUES[bad])
    fn = jax.jit(constraint)
    out_clean, out_dirty = np.asarray(fn(clean)), np.asarray(fn(dirty))
    others = ~coupled_with(constraint, SHAPE, WHERE)
    np.testing.assert_array_equal(out_dirty[others], out_clean[others])
    assert np.all(np.isfinite(out_dirty[others]))


@pytest.mark.parametrize("constraint", INSTANCES, ids=repr)
def test_non_finite_leaf_does_not_touch_other_leaves(constraint):
    clean = {"a": jnp.asarray(_kernel(0)), "b": jnp.asarray(_kernel(1))}
    dirty = {"a": jnp.asarray(_planted(_kernel(0), np.nan)), "b": clean["b"]}
    out_clean = oc.apply_constraints(clean, constraint)
    out_dirty = oc.apply_constraints(dirty, constraint)
    np.testing.assert_array_equal(np.asarray(out_dirty["b"]), np.asarray(out_clean["b"]))
    # ... and the violation monitor flags the bad leaf instead of hiding it.
    v = oc.constraint_violations(dirty, {"k": constraint}, {"a": "k", "b": None})
    assert not np.isfinite(float(v["k"]))


def _step(tx, params, grads):
    @jax.jit
    def run(params, grads):
        state = tx.init(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return run(params, grads)


@pytest.mark.parametrize("bad", ["nan", "inf"])
@pytest.mark.parametrize("constraint", INSTANCES, ids=repr)
def test_project_keeps_a_non_finite_update_in_its_unit(constraint, bad):
    params = {"a": jnp.asarray(_kernel(0)), "b": jnp.asarray(_kernel(1))}
    grads = {"a": jnp.asarray(_kernel(2)), "b": jnp.asarray(_kernel(3))}
    dirty = {"a": jnp.asarray(_planted(grads["a"], BAD_VALUES[bad])), "b": grads["b"]}
    tx = optax.chain(optax.sgd(0.1), oc.project({"k": constraint}, {"a": "k", "b": "k"}))
    new_clean, _ = _step(tx, params, grads)
    new_dirty, state = _step(tx, params, dirty)
    np.testing.assert_array_equal(np.asarray(new_dirty["b"]), np.asarray(new_clean["b"]))
    others = ~coupled_with(constraint, SHAPE, WHERE)
    a_dirty, a_clean = np.asarray(new_dirty["a"]), np.asarray(new_clean["a"])
    np.testing.assert_array_equal(a_dirty[others], a_clean[others])
    # Per-leaf constraint state (e.g. SpectralNorm's power-iteration vector)
    # of the clean leaf is untouched too.
    for key, leaf_state in state[1].constraint_states.items():
        if key == "b":
            assert np.all(np.isfinite(np.asarray(leaf_state)))


def test_power_iteration_state_recovers_after_a_nan_step():
    tx = oc.project({"k": oc.SpectralNorm(1.0)}, {"w": "k"})
    params = {"w": jnp.asarray(_kernel(0)) * 3}
    state = tx.init(params)
    nan_update = {"w": jnp.full(SHAPE, jnp.nan)}
    _, state = tx.update(nan_update, state, params)  # the NaN reaches the state...
    # ... and the next finite step restarts the iteration instead of staying NaN.
    for _ in range(8):
        updates, state = tx.update({"w": jnp.zeros(SHAPE)}, state, params)
        new = optax.apply_updates(params, updates)["w"]
        assert np.all(np.isfinite(np.asarray(new)))
        assert np.all(np.isfinite(np.asarray(state.constraint_states["w"])))
    # The power method restarts from the fallback vector and settles again: a
    # relative residual r <= POWER_SETTLED, so (Kato-Temple) sigma is short by
    # at most r^2 / (2 (1 - r - (s2/s1)^2)), relative; plus the rounding of the
    # rescaling and of p + u' (the SVD's backward error, an ulp per entry).
    s = np.linalg.svd(np.asarray(params["w"], np.float64), compute_uv=False)
    r = oc.projections.POWER_SETTLED
    rtol = r**2 / (2 * (1 - r - (s[1] / s[0]) ** 2)) + norm_ulps(4 + 3) * EPS32
    rtol += np.linalg.norm(update_form_error(new, params["w"]))
    assert np.linalg.svd(np.asarray(new), compute_uv=False)[0] <= 1.0 + rtol


@pytest.mark.parametrize(
    "constraint",
    [oc.MaxNorm(1.0), oc.NonNeg(), oc.UnitNorm(), oc.SpectralNorm(1.0, method="svd")],
    ids=repr,
)
def test_works_under_apply_if_finite(constraint):
    params = {"w": jnp.asarray(_kernel(0)) * 3, "b": jnp.asarray(_kernel(1))}
    labels = {"w": "k", "b": None}
    inner = optax.chain(optax.sgd(0.5), oc.project({"k": constraint}, labels))
    tx = optax.apply_if_finite(inner, max_consecutive_errors=3)
    state = tx.init(params)

    @jax.jit
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    bad = {"w": jnp.asarray(_planted(_kernel(2), np.nan)), "b": jnp.zeros(SHAPE)}
    after_bad, state = step(params, state, bad)
    # The non-finite step is skipped: params unchanged, the inner state (the
    # projection's step count) not advanced.
    for key in params:
        np.testing.assert_array_equal(np.asarray(after_bad[key]), np.asarray(params[key]))
    assert int(state.notfinite_count) == 1
    assert int(state.inner_state[1].count) == 0

    good = {"w": jnp.asarray(_kernel(2)), "b": jnp.zeros(SHAPE)}
    after_good, state = step(after_bad, state, good)
    assert int(state.notfinite_count) == 0 and int(state.inner_state[1].count) == 1
    w = np.asarray(after_good["w"])
    assert np.all(np.isfinite(w))
    moved = jnp.asarray(params["w"]) - 0.5 * good["w"]
    expected = np.asarray(constraint(moved), np.float64)
    # The same float32 formula inside and outside the step: each side's
    # rounding, over units of 4 (for the SVD its backward error, a reflection
    # per row and column, relative to sigma_max of the input); then p + u'.
    if isinstance(constraint, oc.SpectralNorm):
        scale = np.linalg.norm(np.asarray(moved, np.float64), 2)
        tol = ulps(scale, 2 * norm_ulps(4 + 3))
    else:
        tol = 2 * norm_ulps(4) * EPS32 * np.abs(expected)
    tol = tol + update_form_error(expected, params["w"])
    assert np.all(np.abs(w - expected) <= tol), np.abs(w - expected).max()
