"""The `fit_runtime` benchmark compares like with like (`benchmarks/_fit.py`).

No timing is asserted (speed lives in `benchmarks/run.py`). What is checked:
our Linen models and their Keras twins have the same parameter shapes; the
Keras models constrain exactly the leaves our path rules constrain, with the
same projection, measured against a float64 NumPy reference of Keras's
definition; and the section's code runs end to end at a tiny size, with the
constraints holding after the timed steps where they are set and not where
they are not.
"""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest

pytest.importorskip("flax")
keras = pytest.importorskip("keras")

from benchmarks import _fit as F  # noqa: E402
from benchmarks import _models as M  # noqa: E402

EPS32 = float(np.finfo(np.float32).eps)
MODELS = {
    "cnn": (lambda: F.flax_cnn(batch=4), F.keras_cnn),
    "lm1": (lambda: M.lm(1), lambda constrained: F.keras_lm(1, constrained)),
}


def _reference(w: np.ndarray, constraint_name: str) -> np.ndarray:
    """float64: MaxNorm(3) over every axis but the last (fan-in), or max(w, 0)."""
    w = w.astype(np.float64)
    if constraint_name == "NonNeg":
        return np.maximum(w, 0.0)
    norms = np.sqrt(np.sum(w**2, axis=tuple(range(w.ndim - 1)), keepdims=True))
    return w * np.minimum(1.0, M.MAX_VALUE / norms)


def _test_array(shape, rng) -> np.ndarray:
    """Units (slices over the fan-in axes) with norms spread over [1, 6]: some above 3."""
    w = rng.standard_normal(shape)
    norms = np.sqrt(np.sum(w**2, axis=tuple(range(w.ndim - 1)), keepdims=True))
    return (w / norms * rng.uniform(1.0, 6.0, norms.shape)).astype(np.float32)


@pytest.mark.parametrize("model", MODELS)
def test_same_architecture_and_constraints(model):
    make_flax, make_keras = MODELS[model]
    params, _, _ = make_flax()
    plain, keras_model = make_keras(False), make_keras(True)
    ours = sorted(tuple(w.shape) for w in jax.tree.leaves(params))
    for m in (plain, keras_model):  # the same architecture: the same parameter shapes
        assert sorted(tuple(v.shape) for v in m.trainable_variables) == ours
    assert all(v.constraint is None for v in plain.trainable_variables)
    shapes = F.constrained_shapes(params, keras_model)
    assert shapes["ours"] == shapes["keras"]
    assert set(shapes["ours"]) == {"MaxNorm", "NonNeg"}
    by_name = {"MaxNorm": M.CONSTRAINTS["kernel"], "NonNeg": M.CONSTRAINTS["bias"]}
    rng = np.random.default_rng(0)
    for v in keras_model.trainable_variables:
        if v.constraint is None:
            continue
        name = type(v.constraint).__name__
        w = _test_array(v.shape, rng)
        expected = _reference(w, name)
        if name == "NonNeg":
            rtol = 0.0  # max(w, 0) is exact
        else:
            # float32 sum of `fan_in` positive squares: relative error at most
            # (fan_in - 1) eps, halved by the square root; a few roundings in the
            # scale; Keras divides by `1e-7 + norm` (norms >= 1: 1e-7 relative).
            fan_in = math.prod(v.shape[:-1])
            rtol = (fan_in - 1) / 2 * EPS32 + 4 * EPS32 + 1e-7
        for got in (np.asarray(v.constraint(w)), np.asarray(by_name[name](w))):
            np.testing.assert_allclose(got, expected, rtol=rtol, atol=0)
        if name == "MaxNorm":  # the test array exercises both sides of the bound
            assert np.any(expected != w) and np.any(expected == w.astype(np.float64))


def test_section_runs_tiny():
    # The benchmark section's own code at a tiny size: one round of one step.
    from benchmarks import run

    entry = run.fit_runtime_model(
        lambda: F.flax_cnn(batch=4), F.keras_cnn, F.cnn_data, batch=4, steps=1, reps=1
    )
    variants = {"plain", "project", "keras_plain", "keras_constrained"}
    assert set(entry["times"]) == variants
    for times in entry["times"].values():
        for clock in ("cpu", "wall"):
            assert math.isfinite(times[clock]["median_ms"]) and times[clock]["min_ms"] > 0
    assert set(entry["ratios"]) == {
        "project/plain",
        "keras_constrained/keras_plain",
        "project/keras_constrained",
        "plain/keras_plain",
    }
    assert entry["constrained"] == {"MaxNorm": 4, "NonNeg": 4}
    after = entry["violations_after"]
    # Four Adam steps from zero biases: some biases are negative without
    # NonNeg (Adam's steps are about +-lr), none with it, on either side.
    for name in ("plain", "keras_plain"):
        assert after[name]["bias"] > 0
    for name in ("project", "keras_constrained"):
        assert after[name]["bias"] == 0
        assert after[name]["kernel"] == 0  # MaxNorm(3) does not bind from these inits
