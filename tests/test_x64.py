"""Everything works with `jax_enable_x64` on: float64 stays float64, float32 stays float32.

x64 is a process-wide switch read when JAX starts, so this module runs
itself in a subprocess with `JAX_ENABLE_X64=1`, together with the common
invariants of `test_common.py` (which adds float64 kernels under x64), by
`test_under_x64`. In a normal run every other test here is skipped: they
are the checks that subprocess runs.

Under x64 Python scalars and reductions of booleans default to 64-bit
(`jnp.sum(mask)` is int64), which is what broke the L1 ball and simplex
loops; and a computation that silently went through float32 would show up
here as an error of ~1e-7 against a float64 NumPy reference, where the
float64 tolerance is `FLOAT64_TOL`.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_optimality import l1_reference, per_unit, simplex_reference

import optax_constraints as oc

X64 = bool(jax.config.jax_enable_x64)
ROOT = Path(__file__).resolve().parents[1]
EPS64 = float(np.finfo(np.float64).eps)
# Backward-stable float64 algorithms on these small kernels (at most 32
# entries per reduction, SVDs of 8x4 matrices): error <= c * n * eps * scale
# with n <= 32 and a modest c; 2**12 ulps (9e-13) bounds that, while a
# computation that went through float32 anywhere errs by ~1e-7.
FLOAT64_TOL = 2.0**12 * EPS64
# Keras's `1e-7` epsilon in `w * clip(n) / (1e-7 + n)` is part of the
# definition, in every dtype: the references below include it.
KERAS_EPSILON = 1e-7

needs_x64 = pytest.mark.skipif(
    not X64, reason="runs in the JAX_ENABLE_X64=1 subprocess of test_under_x64"
)


@pytest.mark.skipif(X64, reason="this is the x64 run")
def test_under_x64():
    # The x64 checks of this module, and the common invariants on a float64
    # Conv kernel and through `project` in float32 and float64 (every
    # constraint). The other float32 and bfloat16 invariants take the same
    # code paths (bfloat16 computes in float32), and are left out to keep
    # this run short.
    env = {**os.environ, "JAX_ENABLE_X64": "1", "KERAS_BACKEND": "jax"}
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-p",
        "no:nbmake",
        "-o",
        "addopts=",
        "tests/test_x64.py",
        "tests/test_common.py",
        "-k",
        "not test_under_x64 and (test_x64 or float64 or (test_through_project and float32))",
    ]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-6000:]
    passed = re.search(r"(\d+) passed", out)
    assert passed and int(passed.group(1)) >= 80, out[-2000:]
    assert "skipped" not in out, out[-2000:]


# -- float64 NumPy references, written from the definitions ---------------------


def _norms(w, axis=0):
    return np.sqrt(np.sum(w * w, axis=axis, keepdims=True))


def _polar(w):
    u, _, vt = np.linalg.svd(w, full_matrices=False)
    return u @ vt


def _spectral_clip(w, m):
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    return (u * np.minimum(s, m)) @ vt


REFERENCES = [
    (oc.MaxNorm(1.0), lambda w: w * np.clip(_norms(w), 0, 1.0) / (KERAS_EPSILON + _norms(w))),
    (
        oc.MinMaxNorm(0.5, 1.0),
        lambda w: w * np.clip(_norms(w), 0.5, 1.0) / (KERAS_EPSILON + _norms(w)),
    ),
    (oc.UnitNorm(), lambda w: w / (KERAS_EPSILON + _norms(w))),
    (oc.Sphere(1.5), lambda w: w * 1.5 / _norms(w)),
    (oc.NonNeg(), lambda w: np.maximum(w, 0)),
    (oc.Clip(-0.5, 0.5), lambda w: np.clip(w, -0.5, 0.5)),
    (oc.CenterAround(0.3), lambda w: w - np.mean(w) + 0.3),
    (oc.L1Ball(1.0), lambda w: per_unit(w, 0, lambda r: l1_reference(r, 1.0))),
    (oc.Simplex(), lambda w: per_unit(w, 0, lambda r: simplex_reference(r, 1.0))),
    (oc.SpectralNorm(1.0), lambda w: w * min(1.0, 1.0 / np.linalg.norm(w, 2))),
    (oc.SpectralNorm(1.0, method="svd"), lambda w: _spectral_clip(w, 1.0)),
    (oc.Orthogonal(), _polar),
    (oc.Orthogonal(method="newton_schulz"), _polar),
]


def _kernel(dtype, seed=0):
    # Scaled and shifted so that every constraint above moves it; the 8x4
    # Gaussian has condition number ~3, so Newton-Schulz converges fully.
    return jnp.asarray(3.0 * np.random.default_rng(seed).normal(size=(8, 4)) + 1.0, dtype)


def test_every_constraint_has_a_float64_reference():
    from helpers import exported_constraint_classes

    covered = {type(c) for c, _ in REFERENCES}
    assert covered == set(exported_constraint_classes())


@needs_x64
@pytest.mark.parametrize("constraint,reference", REFERENCES, ids=[repr(c) for c, _ in REFERENCES])
def test_float64_matches_numpy_float64(constraint, reference):
    w = _kernel(jnp.float64)
    expected = reference(np.asarray(w))
    scale = np.abs(expected).max()
    for out in (constraint(w), jax.jit(constraint)(w)):
        assert out.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(out), expected, rtol=0, atol=FLOAT64_TOL * scale)
    grad = jax.jit(jax.grad(lambda w: jnp.sum(constraint(w) * w)))(w)
    assert grad.dtype == jnp.float64 and np.isfinite(np.asarray(grad)).all()


@needs_x64
@pytest.mark.parametrize("constraint,reference", REFERENCES, ids=[repr(c) for c, _ in REFERENCES])
@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
def test_project_apply_and_violations_keep_dtypes(constraint, reference, dtype):
    dtype = jnp.dtype(dtype)
    params = {"w": _kernel(dtype), "b": jnp.full((4,), -1.0, dtype)}
    constraints, labels = {"c": constraint}, {"w": "c", "b": None}
    tx = optax.chain(optax.sgd(0.1), oc.project(constraints, labels))
    state = tx.init(params)
    grads = jax.tree.map(lambda p: jnp.full(p.shape, 0.5, p.dtype), params)
    updates, state = jax.jit(tx.update)(grads, state, params)
    new = optax.apply_updates(params, updates)
    applied = oc.apply_constraints(params, constraints, labels)
    violations = oc.constraint_violations(params, constraints, labels)
    for tree in (updates, new, applied):
        assert {k: v.dtype for k, v in tree.items()} == {"w": dtype, "b": dtype}
    assert int(state[1].count) == 1 and state[1].count.dtype == jnp.int32
    # float64 violations are measured in float64, low precision in float32.
    assert violations["c"].dtype == (jnp.float64 if dtype == jnp.float64 else jnp.float32)
    if dtype == jnp.float64:
        expected = reference(np.asarray(params["w"]))
        scale = np.abs(expected).max()
        np.testing.assert_allclose(
            np.asarray(applied["w"]), expected, rtol=0, atol=FLOAT64_TOL * scale
        )
        if not isinstance(constraint, oc.SpectralNorm) or constraint.method == "svd":
            # Through `project`: the exact projection of the moved params (the
            # power method estimates sigma_max instead: tests/test_stateful.py).
            moved = np.asarray(params["w"]) - 0.1 * 0.5
            expected = reference(moved)
            move = np.abs(np.asarray(updates["w"])).max()
            np.testing.assert_allclose(
                np.asarray(new["w"]),
                expected,
                rtol=0,
                atol=FLOAT64_TOL * (np.abs(expected).max() + move),
            )


@needs_x64
def test_float64_violations_resolve_float64_excesses():
    # A unit norm 1e-10 above the bound: float64 arithmetic sees it (to a few
    # ulps of the norm), float32 arithmetic could not (its ulp at 1 is 1.2e-7).
    w = jnp.zeros((3, 2), jnp.float64).at[0, 0].set(1.0 + 1e-10).at[1, 1].set(0.5)
    got = oc.constraint_violations({"w": w}, oc.MaxNorm(1.0))["__all__"]
    assert got.dtype == jnp.float64
    np.testing.assert_allclose(float(got), 1e-10, rtol=0, atol=4 * EPS64)


@needs_x64
def test_python_scalar_hyperparameters_do_not_promote_float32():
    # Under x64 a Python float is a weak float64: it must not turn a float32
    # kernel into float64 anywhere, including traced and scheduled values.
    w = _kernel(jnp.float32)
    for c in (
        oc.MaxNorm(jnp.asarray(1.0, jnp.float64)),
        oc.L1Ball(optax.linear_schedule(2.0, 1.0, 10)),
        oc.Simplex(jnp.asarray(2.0)),
    ):
        assert c(w).dtype == jnp.float32
        assert oc.apply_constraints({"w": w}, c)["w"].dtype == jnp.float32
