"""Invariants every constraint must satisfy, old and new alike.

One test, parametrised over every constraint (with a few `axis` settings),
over kernel shapes and over float32 / bfloat16:

* feasible after projection, measured in numpy (float64) by an independent
  residual per constraint;
* idempotent (the math says every constraint here is a projection:
  `MinMaxNorm` with `rate=1`);
* shape and dtype kept; jit equals eager; no retrace across calls;
* finite gradients through the projection, also at an all-zero array;
* the same through `oc.project`: feasible after `optax.apply_updates`, and
  the jitted step does not retrace across steps.

Tolerances (relative, dimensionless: each residual is divided by the natural
scale of its constraint):

* exact constraints (`NonNeg`, `Clip`): 0 in every dtype;
* float32: 1e-5, about 80 float32 ulps -- room for the rounding of sums over
  at most 18 entries and of a backward-stable SVD (error ~ n * eps * sigma),
  and for Keras's `1e-7` epsilon, which puts `MaxNorm`/`UnitNorm` results
  `1e-7 / norm` inside the sphere, so they are idempotent only to ~1e-7;
  a real violation in these tests is O(1);
* float64 (only under `JAX_ENABLE_X64=1`, run by tests/test_x64.py):
  2e-7, Keras's `1e-7` epsilon again (it does not shrink with the dtype;
  norms after projection are >= 0.5 here, so it moves a residual by at
  most 2e-7), plus 2**12 float64 ulps of rounding (9e-13);
* bfloat16: 2**-7 (one bf16 ulp at 1). The float32 result is rounded once to
  bf16, which moves each entry by at most 2**-9 relative, so norms, L1 sums,
  means and sums move by at most 2**-9 relative, the spectral norm by at
  most 2**-9 * ||W||_F and an entry of a Gram matrix of unit columns by at
  most 2 * 2**-9; 2**-7 bounds all of these plus the float32 error.
* through `project` the result lands within rounding of the *move*
  (`params + u'`), so the tolerance is scaled by `1 + max|u'| / max|w'|`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import WRAPPERS, reference_axes

import optax_constraints as oc

TOL = {
    jnp.dtype(jnp.float32): 1e-5,
    jnp.dtype(jnp.float64): 2e-7 + 2.0**12 * float(np.finfo(np.float64).eps),
    jnp.dtype(jnp.bfloat16): 2.0**-7,
}


def _norms(w, axis):
    return np.sqrt(np.sum(w * w, axis=reference_axes(axis, w.ndim)))


def _matrix(w):
    return w.reshape(-1, w.shape[-1])


# -- residuals: 0 when feasible, divided by the constraint's natural scale ----


def norm_excess(m, axis):
    return lambda w: np.max(np.maximum(_norms(w, axis) - m, 0)) / m


def norm_interval(lo, hi, axis):
    return lambda w: (
        np.max(np.maximum(np.maximum(lo - _norms(w, axis), _norms(w, axis) - hi), 0)) / hi
    )


def unit_norm_gap(axis):
    return lambda w: np.max(np.abs(_norms(w, axis) - 1))


def sphere_gap(r, axis):
    return lambda w: np.max(np.abs(_norms(w, axis) - r)) / r


def negative_part(w):
    return max(-np.min(w), 0.0)


def box_excess(lo, hi):
    return lambda w: max(np.max(lo - w), np.max(w - hi), 0.0)


def mean_gap(ref):
    return lambda w: abs(np.mean(w) - ref) / np.mean(np.abs(w))


def l1_excess(m, axis):
    return lambda w: (
        np.max(np.maximum(np.sum(np.abs(w), axis=reference_axes(axis, w.ndim)) - m, 0)) / m
    )


def simplex_gap(s, axis):
    def residual(w):
        sums = np.sum(w, axis=reference_axes(axis, w.ndim))
        return max(negative_part(w), np.max(np.abs(sums - s))) / s

    return residual


def spectral_excess(m):
    def residual(w):
        a = _matrix(w)
        return max(np.linalg.norm(a, 2) - m, 0.0) / max(np.linalg.norm(a), 1e-30)

    return residual


def orthogonality_gap(w):
    a = _matrix(w)
    gram = a.T @ a if a.shape[0] >= a.shape[1] else a @ a.T
    return np.max(np.abs(gram - np.eye(gram.shape[0])))


def per_row_norm_excess(m):
    # One unit per index of axis 0: Stacked copies along it, or OutputFirst's
    # output units (the norm over every other axis).
    return lambda w: (
        np.max(np.maximum(np.sqrt(np.sum(w * w, axis=tuple(range(1, w.ndim)))) - m, 0)) / m
    )


def per_row_sphere_gap(r):
    return lambda w: np.max(np.abs(np.sqrt(np.sum(w * w, axis=tuple(range(1, w.ndim)))) - r)) / r


def output_first(residual):
    return lambda w: residual(np.moveaxis(w, 0, -1))


@dataclass(frozen=True)
class Case:
    constraint: oc.Constraint
    residual: Callable[[np.ndarray], float]
    exact: bool = False  # feasible to the last bit in every dtype
    # Through `project`, if looser than TOL: the power method's estimate of
    # sigma_max is a lower bound that stops once settled (relative residual
    # 1e-2), so a step is feasible only to that estimate's error, below 1e-3
    # on these small well-conditioned kernels (test_stateful.py measures it
    # on harder ones).
    project_tol: float | None = None

    def __repr__(self):
        return repr(self.constraint)


CASES = [
    Case(oc.MaxNorm(1.0), norm_excess(1.0, 0)),
    Case(oc.MaxNorm(1.5, axis="fan_in"), norm_excess(1.5, "fan_in")),
    Case(oc.MaxNorm(2.0, axis=(0, -1)), norm_excess(2.0, (0, -1))),
    Case(oc.MinMaxNorm(0.5, 1.0), norm_interval(0.5, 1.0, 0)),
    Case(oc.UnitNorm(axis=-1), unit_norm_gap(-1)),
    Case(oc.Sphere(1.5), sphere_gap(1.5, 0)),
    Case(oc.Sphere(0.5, axis="fan_in"), sphere_gap(0.5, "fan_in")),
    Case(oc.Sphere(2.0, axis=None), sphere_gap(2.0, None)),
    Case(oc.NonNeg(), negative_part, exact=True),
    Case(oc.Clip(-0.5, 0.5), box_excess(-0.5, 0.5), exact=True),
    Case(oc.CenterAround(0.3), mean_gap(0.3)),
    Case(oc.L1Ball(1.0), l1_excess(1.0, 0)),
    Case(oc.L1Ball(2.0, axis="fan_in"), l1_excess(2.0, "fan_in")),
    Case(oc.L1Ball(3.0, axis=None), l1_excess(3.0, None)),
    Case(oc.Simplex(), simplex_gap(1.0, 0)),
    Case(oc.Simplex(2.0, axis=-1), simplex_gap(2.0, -1)),
    Case(oc.SpectralNorm(1.0), spectral_excess(1.0), project_tol=1e-3),
    Case(oc.SpectralNorm(1.0, method="svd"), spectral_excess(1.0)),
    Case(oc.Orthogonal(), orthogonality_gap),
    Case(oc.Orthogonal(method="newton_schulz"), orthogonality_gap),
    Case(oc.Stacked(oc.MaxNorm(1.0, axis=None)), per_row_norm_excess(1.0)),
    Case(oc.Stacked(oc.NonNeg(), stack_axis=-1), negative_part, exact=True),
    Case(oc.Stacked(oc.Sphere(1.0, axis=None)), per_row_sphere_gap(1.0)),
    Case(oc.OutputFirst(oc.MaxNorm(1.5, axis="fan_in")), per_row_norm_excess(1.5)),
    Case(oc.OutputFirst(oc.SpectralNorm(1.0, method="svd")), output_first(spectral_excess(1.0))),
    Case(oc.OutputFirst(oc.Orthogonal()), output_first(orthogonality_gap)),
]

# Dense tall and wide, a Conv kernel (3, 3, in=2, out=5); bfloat16 on the Conv one.
SHAPES_DTYPES = [
    ((8, 4), jnp.float32),
    ((4, 8), jnp.float32),
    ((3, 3, 2, 5), jnp.float32),
    ((3, 3, 2, 5), jnp.bfloat16),
]
# Through `project`: a Dense kernel in float32 and a Conv kernel in bfloat16.
PROJECT_SHAPES_DTYPES = [((8, 4), jnp.float32), ((3, 3, 2, 5), jnp.bfloat16)]
if jax.config.jax_enable_x64:  # tests/test_x64.py runs this module so
    SHAPES_DTYPES += [((3, 3, 2, 5), jnp.float64)]
    PROJECT_SHAPES_DTYPES += [((8, 4), jnp.float64)]


def _np(x):
    return np.asarray(x).astype(np.float64)  # exact for every float dtype


def _random(shape, dtype, seed):
    # Scaled and shifted so that every constraint above is violated by it.
    return jnp.asarray(3.0 * np.random.default_rng(seed).normal(size=shape) + 1.0, dtype)


@pytest.fixture(autouse=True)
def _fresh_trace_counter():
    # chex counts traces per function body across parametrisations.
    chex.clear_trace_counter()


def _idempotent_gap(once, twice):
    return np.linalg.norm(twice - once) / max(np.linalg.norm(once), 1e-30)


@pytest.mark.parametrize("case", CASES, ids=repr)
@pytest.mark.parametrize(
    "shape,dtype", SHAPES_DTYPES, ids=[f"{s}-{jnp.dtype(d).name}" for s, d in SHAPES_DTYPES]
)
def test_invariants(case, shape, dtype):
    c, dtype = case.constraint, jnp.dtype(dtype)
    tol = 0.0 if case.exact else TOL[dtype]
    w = _random(shape, dtype, seed=0)
    assert case.residual(_np(w)) > 4 * TOL[dtype], "the input should violate the constraint"

    # Feasible; shape and dtype kept.
    out = c(w)
    assert out.shape == w.shape and out.dtype == dtype
    residual = case.residual(_np(out))
    assert residual <= tol, f"infeasible after projection: residual {residual:.3g} > {tol:.3g}"

    # Idempotent.
    gap = _idempotent_gap(_np(out), _np(c(out)))
    assert gap <= TOL[dtype], f"not idempotent: relative change {gap:.3g}"

    # jit equals eager, and no retrace across calls with new values.
    @jax.jit
    @chex.assert_max_traces(n=1)
    def jitted(w):
        return c(w)

    out_jit = jitted(w)
    scale = np.max(np.abs(_np(out)))
    np.testing.assert_allclose(_np(out_jit), _np(out), rtol=0, atol=TOL[dtype] * scale)
    w2 = _random(shape, dtype, seed=1)
    scale2 = np.max(np.abs(_np(c(w2))))  # the tolerance is relative to this output's scale
    np.testing.assert_allclose(_np(jitted(w2)), _np(c(w2)), rtol=0, atol=TOL[dtype] * scale2)

    # Finite gradients, also where every unit is zero.
    cotangent = jnp.asarray(np.random.default_rng(2).normal(size=shape), jnp.float32)
    grad = jax.jit(jax.grad(lambda w: jnp.sum(c(w).astype(jnp.float32) * cotangent)))
    for x in (w, jnp.zeros(shape, dtype)):
        g = grad(x)
        assert g.shape == shape and g.dtype == dtype
        assert np.isfinite(_np(g)).all(), f"non-finite gradient at {x.ravel()[:3]}..."


@pytest.mark.parametrize("case", CASES, ids=repr)
@pytest.mark.parametrize(
    "shape,dtype",
    PROJECT_SHAPES_DTYPES,
    ids=[f"{s}-{jnp.dtype(d).name}" for s, d in PROJECT_SHAPES_DTYPES],
)
def test_through_project(case, shape, dtype):
    c, dtype = case.constraint, jnp.dtype(dtype)
    params = {"w": _random(shape, dtype, seed=0), "b": jnp.full((shape[-1],), -1.0, dtype)}
    tx = optax.chain(optax.sgd(0.1), oc.project({"c": c}, {"w": "c", "b": None}))
    state = tx.init(params)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), updates, state

    rng = np.random.default_rng(3)
    for _ in range(2):
        # Steps small next to the weights, as in training (the power method
        # tracks sigma_max step by step; it is not meant to follow jumps).
        grads = jax.tree.map(lambda p: jnp.asarray(0.1 * rng.normal(size=p.shape), p.dtype), params)
        new, updates, state = step(params, state, grads)
        assert new["w"].dtype == dtype and new["w"].shape == shape
        # The unconstrained bias takes the plain SGD step.
        np.testing.assert_array_equal(_np(updates["b"]), _np(-0.1 * grads["b"]))
        move = np.max(np.abs(_np(updates["w"]))) / max(np.max(np.abs(_np(new["w"]))), 1e-30)
        tol = 0.0 if case.exact else max(TOL[dtype], case.project_tol or 0) * (1 + move)
        residual = case.residual(_np(new["w"]))
        assert residual <= tol, f"infeasible after apply_updates: {residual:.3g} > {tol:.3g}"
        params = new


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_config_round_trip(case):
    c = case.constraint
    for rebuilt in (
        type(c).from_config(c.get_config()),
        oc.deserialize(oc.serialize(c)),
        oc.get(oc.serialize(c)),
    ):
        assert type(rebuilt) is type(c) and rebuilt == c and hash(rebuilt) == hash(c)
    if not isinstance(c, WRAPPERS):  # a wrapper has no default to build by name
        assert isinstance(oc.get(type(c).__name__), type(c))


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: oc.L1Ball(-1.0), "max_value must be >= 0"),
        (lambda: oc.L1Ball(axis="rows"), "axis must be"),
        (lambda: oc.Simplex(0.0), "scale must be > 0"),
        (lambda: oc.Simplex(axis=[0, 0]), "repeated"),
        (lambda: oc.SpectralNorm(-0.5), "max_value must be >= 0"),
        (lambda: oc.SpectralNorm(method="exact"), "method must be one of 'power', 'svd'"),
        (lambda: oc.SpectralNorm(num_iters=0), "num_iters must be an int >= 1"),
        (lambda: oc.Orthogonal(method="qr"), "method must be one of 'svd', 'newton_schulz'"),
        (lambda: oc.Orthogonal(num_iters=2.5), "num_iters must be an int >= 1"),
    ],
)
def test_bad_hyperparameters_fail_at_construction(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("constraint", [oc.SpectralNorm(), oc.Orthogonal()], ids=repr)
def test_matrix_constraints_reject_1d_leaves_at_init(constraint):
    params = {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)}}
    with pytest.raises(ValueError, match=r"dense/bias.*\(2,\).*at least 2 dimensions"):
        oc.project(constraint).init(params)
    # Routed to kernels only, it initialises.
    oc.project({"k": constraint}, oc.label_by_path({"**/kernel": "k"})).init(params)
