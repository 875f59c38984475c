"""Property tests every exported constraint class must pass.

For each `oc.Constraint` subclass exported by `optax_constraints` (found at
import time, so a new class is covered the day it is exported), hypothesis
draws hyper-parameters, a shape with 1-5 dimensions, an `axis` (int,
negative int, tuple/list, `None`, `"fan_in"`), a dtype (float32, bfloat16,
float16) and values from zeros and denormals up to 1e30 (float16: within its
range), and checks:

* shape and dtype are kept, and finite input gives finite output;
* the output is feasible, within tolerances stated per class below;
* the projection is idempotent where the math says so (the precise bound
  for the Keras norm constraints is derived in `_idempotence_bound`);
* `jax.jit` agrees with eager execution;
* gradients through the projection are finite.

References are written in float64 NumPy from the math, never from our code.

Hypothesis profiles: `HYPOTHESIS_PROFILE=ci` (default: derandomized, a few
thousand arrays in total, about a minute on 2 cores) or `dev` (10x more
examples, random seeds), e.g. `HYPOTHESIS_PROFILE=dev pytest tests/test_properties.py`.

Speed: compiling is the cost (one new (shape, dtype, axis) costs ~0.1 s jitted
but ~1 s eagerly, op by op), so most properties run one jitted function per
drawn case, with numeric hyper-parameters traced (never recompiled), on
several arrays per case; only `test_jit_equals_eager` runs eagerly, on a small
pool of shapes.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest

# --- hypothesis profiles -----------------------------------------------------
from helpers import PROFILE as _PROFILE
from helpers import examples, exported_constraint_classes
from hypothesis import assume, given, seed
from hypothesis import strategies as st

import optax_constraints as oc


def shared_draws(test):
    """Under "ci", tests with this decorator draw the same cases, so each case
    compiles once for all of them; under "dev" every test draws its own."""
    return seed(20240611)(test) if _PROFILE == "ci" else test


# --- the classes under test --------------------------------------------------


CLASSES = exported_constraint_classes()

EPS = 1e-7  # Keras's backend.epsilon(), added to the norm in MaxNorm/UnitNorm/MinMaxNorm
F16, BF16, F32 = jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)
DTYPES = (F32, BF16, F16)

# Value ranges: decimal exponents of the entries, and denormals of each dtype.
EXPONENTS = {F32: (-30, 30), BF16: (-30, 30), F16: (-6, 3)}
DENORMALS = {F32: (1e-40, 1.4e-45), BF16: (1e-39, 1e-40), F16: (6e-8, 3e-6)}

# --- hyper-parameter strategies -----------------------------------------------

NONNEG = st.sampled_from([0.0, 1e-3, 0.5, 1.0, 2.0, 100.0]) | st.floats(0.01, 10.0)
POSITIVE = st.sampled_from([1e-3, 0.5, 1.0, 2.0, 100.0]) | st.floats(0.01, 10.0)
REAL = st.sampled_from([0.0, -1.0, 1.0]) | st.floats(-10.0, 10.0)

# One strategy per constructor argument name; arguments not listed keep their
# defaults, so an unknown new class is still tested (with its defaults).
ARGUMENTS = {
    "max_value": NONNEG,
    "min_value": NONNEG,
    "rate": st.sampled_from([0.0, 0.5, 1.0]) | st.floats(0.0, 1.0),
    "scale": POSITIVE,
    "radius": POSITIVE,
    "ref_value": REAL,
}


def _sorted_bounds(kwargs):
    lo, hi = kwargs.get("min_value"), kwargs.get("max_value")
    if lo is not None and hi is not None and lo > hi:
        kwargs["min_value"], kwargs["max_value"] = hi, lo
    return kwargs


# Classes whose arguments need more than the table above.
SPECIAL = {
    "Clip": st.fixed_dictionaries(
        {"min_value": st.none() | REAL, "max_value": st.none() | REAL}
    ).map(_sorted_bounds),
    "SpectralNorm": st.fixed_dictionaries(
        {
            "max_value": NONNEG,
            "method": st.sampled_from(("power", "svd")),
            "num_iters": st.integers(1, 3),
        }
    ),
    "Orthogonal": st.fixed_dictionaries({"method": st.sampled_from(("svd", "newton_schulz"))}),
}


def takes_axis(cls) -> bool:
    return "axis" in inspect.signature(cls.__init__).parameters


def hyper_parameters(cls) -> st.SearchStrategy[dict]:
    """Constructor keyword arguments (without `axis`) for `cls`."""
    if cls.__name__ in SPECIAL:
        return SPECIAL[cls.__name__]
    names = [n for n in inspect.signature(cls.__init__).parameters if n in ARGUMENTS]
    return st.fixed_dictionaries({n: ARGUMENTS[n] for n in names}).map(_sorted_bounds)


def axes_for(ndim: int) -> st.SearchStrategy:
    """Every spelling of `axis` that fits an `ndim` array."""
    ints = st.integers(-ndim, ndim - 1)
    tuples = st.lists(st.integers(0, ndim - 1), min_size=1, max_size=ndim, unique=True).flatmap(
        lambda axes: st.tuples(*[st.sampled_from([a, a - ndim]) for a in axes])
    )
    options = [st.none(), ints, tuples, tuples.map(list)]
    if ndim >= 2:
        options.append(st.just("fan_in"))
    return st.one_of(options)


def unit_axes(axis, ndim: int) -> tuple[int, ...]:
    """The reduced axes of one unit (the test's own reading of the spec)."""
    if axis is None:
        return tuple(range(ndim))
    if axis == "fan_in":
        return tuple(range(ndim - 1))
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    return tuple(sorted(a % ndim for a in axes))


# --- shapes and values ---------------------------------------------------------

# Generated shapes: up to 3 per side for 1-3 dims, up to 2 for 4-5 dims
# (at most 32 elements, so tolerances stay meaningful and cases fast).
SHAPES = st.integers(1, 5).flatmap(
    lambda ndim: st.tuples(*[st.integers(1, 3 if ndim <= 3 else 2)] * ndim)
)
# A small pool for the eager checks, whose compile cost is per shape.
SHAPE_POOL = ((3,), (2, 3), (3, 1), (2, 1, 3), (1, 2, 2, 2), (2, 1, 2, 1, 2))


@st.composite
def values(draw, shape, dtype) -> np.ndarray:
    """Float64 values exactly representable in `dtype` (mixed magnitudes, zeros, denormals)."""
    lo, hi = EXPONENTS[dtype]
    regime = draw(st.sampled_from(["mixed", "one_scale", "zeros", "denormal"]))
    if regime == "zeros":
        w = np.zeros(shape)
    elif regime == "denormal":
        w = draw(hnp.arrays(np.float64, shape, elements=st.sampled_from([0.0, -1.0, 1.0])))
        w = w * DENORMALS[dtype][0]
    else:
        mantissa = draw(
            hnp.arrays(
                np.float64,
                shape,
                elements=st.floats(-9.9, 9.9) | st.sampled_from([0.0, -0.0, 1.0, -1.0]),
            )
        )
        if regime == "one_scale":
            exponent = np.full(shape, draw(st.integers(lo, hi)))
        else:
            exponent = draw(hnp.arrays(np.int64, shape, elements=st.integers(lo, hi)))
        w = mantissa * np.power(10.0, exponent)
        denormal = draw(hnp.arrays(np.bool_, shape, elements=st.sampled_from([False] * 7 + [True])))
        w = np.where(denormal, np.copysign(DENORMALS[dtype][1], w), w)
    # Round to the dtype once, so the float64 reference sees the very input.
    return np.asarray(jnp.asarray(w.astype(np.float32), dtype).astype(jnp.float32), np.float64)


@dataclasses.dataclass
class Case:
    """One drawn constraint, leaf shape/dtype and a few arrays to project."""

    constraint: oc.Constraint
    kwargs: dict
    axis: object
    shape: tuple[int, ...]
    dtype: jnp.dtype
    arrays: list[np.ndarray]  # float64, exactly representable in dtype

    def inputs(self):
        return [jnp.asarray(w, self.dtype) for w in self.arrays]

    def __repr__(self):
        return f"Case({self.constraint!r}, shape={self.shape}, dtype={self.dtype.name})"


@st.composite
def cases(draw, cls, shapes=SHAPES, max_arrays=4) -> Case:
    shape = draw(shapes)
    dtype = draw(st.sampled_from(DTYPES))
    kwargs = dict(draw(hyper_parameters(cls)))
    axis = "unused"
    if takes_axis(cls):
        axis = draw(axes_for(len(shape)))
        kwargs["axis"] = axis
    constraint = cls(**kwargs)
    try:
        constraint.check_leaf(shape, dtype)
    except ValueError:  # e.g. a matrix constraint on a 1-D leaf: not this test's business
        assume(False)
    arrays = draw(st.lists(values(shape, dtype), min_size=1, max_size=max_arrays))
    return Case(constraint, kwargs, axis, shape, dtype, arrays)


# --- jitted helpers (numeric hyper-parameters traced: no recompiles) ------------


def _split_config(constraint):
    """(static items, traced numbers): the schedulable numbers become jit arguments."""
    config = constraint.get_config()
    dynamic = {
        k: float(config[k])
        for k in type(constraint).schedulable
        if isinstance(config.get(k), int | float) and not isinstance(config.get(k), bool)
    }
    static = tuple(
        sorted(
            (k, tuple(v) if isinstance(v, list) else v)
            for k, v in config.items()
            if k not in dynamic
        )
    )
    return static, dynamic


@functools.cache
def _project_twice(cls, static):
    def fn(w, dynamic):
        c = cls.from_config({**dict(static), **dynamic})
        once = c(w)
        return once, c(once)

    return jax.jit(fn)


@functools.cache
def _gradients(cls, static):
    def fn(w, dynamic, cotangent):
        c = cls.from_config({**dict(static), **dynamic})

        def loss(x):
            return jnp.sum(c(x).astype(jnp.float32) * cotangent)

        # The gradient at the leaf's dtype, and at float32 for the same values.
        return jax.grad(loss)(w), jax.grad(loss)(w.astype(jnp.float32))

    return jax.jit(fn)


def project_twice(constraint, w):
    static, dynamic = _split_config(constraint)
    return _project_twice(type(constraint), static)(w, dynamic)


def gradients(constraint, w, cotangent):
    static, dynamic = _split_config(constraint)
    return _gradients(type(constraint), static)(w, dynamic, cotangent)


def f64(x) -> np.ndarray:
    return np.asarray(jnp.asarray(x).astype(jnp.float32), np.float64)


# --- tolerances -------------------------------------------------------------------


def rtol(dtype, size: int) -> float:
    """Relative error: one rounding to `dtype` plus float32 reductions over `size` terms."""
    return float(jnp.finfo(dtype).eps) + 16 * size * float(jnp.finfo(F32).eps)


def atol(dtype, size: int) -> float:
    """Absolute error near zero: float32 flushes denormals (XLA on CPU) and float16
    rounds to its subnormal spacing."""
    unit = jnp.finfo(dtype).smallest_subnormal if dtype == F16 else jnp.finfo(F32).tiny
    return 4 * float(unit) * math.sqrt(size)


def norms(x, axes) -> np.ndarray:
    return np.sqrt(np.sum(x * x, axis=axes, keepdims=True))


# --- feasibility, per class -------------------------------------------------------
#
# Each checker gets the case, the float64 input `w` and output `out`, and asserts
# what the class promises. For the Keras norm constraints the exact output is
# `w * d(n) / (EPS + n)` with n the unit norm and d the target norm, so the
# output norm is d(n) * n / (EPS + n): below the target by a factor
# n / (EPS + n). That is the honest statement: units much longer than 1e-7
# reach the target to float precision, tiny units fall short (and all-zero units
# stay zero).


def _target_norm(case, n):
    name, kw = type(case.constraint).__name__, case.kwargs
    if name == "MaxNorm":
        return np.minimum(n, kw["max_value"])
    if name == "UnitNorm":
        return np.ones_like(n)
    rate = kw["rate"]  # MinMaxNorm
    return rate * np.clip(n, kw["min_value"], kw["max_value"]) + (1 - rate) * n


def flushed(w, dtype) -> np.ndarray:
    """`w` as XLA on CPU computes with it: float32 denormals read as zero (DAZ).

    float16 and bfloat16 leaves are computed in float32, where float16's
    denormals are normal numbers but bfloat16's stay denormal.
    """
    if dtype == F16:
        return w
    return np.where(np.abs(w) < float(jnp.finfo(F32).tiny), 0.0, w)


def _check_keras_norm(case, w, out):
    axes = unit_axes(case.axis, w.ndim)
    w = flushed(w, case.dtype)
    n, n_out = norms(w, axes), norms(out, axes)
    r, a = rtol(case.dtype, w.size), atol(case.dtype, w.size)
    shrink = n / (EPS + n)
    # The formula, term by term (the FTZ slack covers units whose sum of squares
    # underflows float32: their factor is below 1e-12 either way).
    expected = w * (_target_norm(case, n) / (EPS + n))
    np.testing.assert_array_less(
        np.abs(out - expected), r * np.abs(expected) + 1.2e-12 * np.abs(w) + a + 1e-300
    )
    assert np.all(out[np.broadcast_to(n == 0, w.shape)] == 0), "an all-zero unit must stay zero"
    name, kw = type(case.constraint).__name__, case.kwargs
    if name == "MinMaxNorm" and kw["rate"] != 1.0:
        return  # moves part of the way by design: the formula is the whole promise
    upper = 1.0 if name == "UnitNorm" else kw["max_value"]
    lower = {"UnitNorm": 1.0, "MaxNorm": 0.0}.get(name, kw.get("min_value"))
    # Feasible from above, always; from below only up to Keras's epsilon.
    assert np.all(n_out <= upper * (1 + r) + a), (n_out.max(), upper)
    assert np.all(n_out >= lower * shrink * (1 - r) - a), (n_out.min(), lower)


def _check_sphere(case, w, out):
    """On the sphere, along `w`, where float32 measures the unit's norm exactly.

    The norm is Keras's `sqrt(sum(w * w))` in float32: a unit whose squares
    are flushed to zero (below float32's smallest normal) is measured short
    (or as zero), one whose sum of squares overflows is measured as `inf`;
    those units are only required to be finite (all-zero ones to stay zero).
    """
    axes = unit_axes(case.axis, w.ndim)
    radius = case.kwargs["radius"]
    tiny, big = float(jnp.finfo(F32).tiny), float(jnp.finfo(F32).max)
    n = norms(w, axes)
    smallest_square = np.min(np.where(w == 0, np.inf, w * w), axis=axes, keepdims=True)
    measured = (n > 0) & (smallest_square >= tiny) & (n * n <= big / 4)
    assert np.all(np.isfinite(out))
    assert np.all(out[np.broadcast_to(n == 0, w.shape)] == 0), "an all-zero unit must stay zero"
    r, a = rtol(case.dtype, w.size), atol(case.dtype, w.size)
    with np.errstate(divide="ignore", invalid="ignore"):
        expected = np.where(measured, w * (radius / n), 0.0)
    where = np.broadcast_to(measured, w.shape)
    np.testing.assert_array_less(
        np.abs(out - expected)[where], (r * np.abs(expected) + a + 1e-300)[where]
    )
    n_out = norms(out, axes)[measured]
    assert np.all(np.abs(n_out - radius) <= r * radius + a), (n_out, radius)


def _check_non_neg(case, w, out):
    a = atol(case.dtype, 1)
    assert not np.any(np.signbit(out)), "NonNeg output has a negative entry or -0.0"
    np.testing.assert_allclose(out, np.maximum(w, 0.0), rtol=0, atol=a)


def _check_clip(case, w, out):
    lo, hi = case.kwargs["min_value"], case.kwargs["max_value"]
    # The bounds as the dtype holds them (rounding is monotone, so lo <= hi still).
    lo = -np.inf if lo is None else f64(jnp.asarray(lo, case.dtype))
    hi = np.inf if hi is None else f64(jnp.asarray(hi, case.dtype))
    assert np.all((out >= lo) & (out <= hi))
    np.testing.assert_allclose(out, np.clip(w, lo, hi), rtol=0, atol=atol(case.dtype, 1))


def _check_center_around(case, w, out):
    ref = case.kwargs["ref_value"]
    scale = np.max(np.abs(w)) + abs(ref)
    tol = 2 * rtol(case.dtype, w.size) * scale + atol(case.dtype, w.size)
    assert abs(np.mean(out) - ref) <= tol, (np.mean(out), ref, tol)


def _check_l1_ball(case, w, out):
    axes = unit_axes(case.axis, w.ndim)
    m = case.kwargs["max_value"]
    l1 = np.sum(np.abs(out), axis=axes)
    r, a = rtol(case.dtype, w.size), atol(case.dtype, w.size)
    assert np.all(l1 <= m * (1 + r * out.size) + a), (l1, m)
    inside = np.sum(np.abs(w), axis=axes, keepdims=True) <= m * (1 - r)
    np.testing.assert_array_equal(
        out[np.broadcast_to(inside, w.shape)], w[np.broadcast_to(inside, w.shape)]
    )
    assert np.all(np.abs(out) <= np.abs(w) + a) and np.all(out * w >= 0)


def _check_simplex(case, w, out):
    axes = unit_axes(case.axis, w.ndim)
    s = case.kwargs["scale"]
    assert np.all(out >= 0) and not np.any(np.signbit(out))
    total = np.sum(out, axis=axes)
    r = rtol(case.dtype, w.size)
    assert np.all(np.abs(total - s) <= r * s * out.size + atol(case.dtype, w.size)), (total, s)


def _singular_values(x) -> np.ndarray:
    return np.linalg.svd(x.reshape(-1, x.shape[-1]), compute_uv=False)


def _check_spectral_norm(case, w, out):
    m = case.kwargs["max_value"]
    r = rtol(case.dtype, w.size)
    assert _singular_values(out)[0] <= m * (1 + 4 * r) + atol(case.dtype, w.size)
    if _singular_values(w)[0] <= m * (1 - 4 * r):
        # A feasible kernel comes back bit for bit (or with denormals flushed).
        assert np.array_equal(out, w) or np.array_equal(out, flushed(w, case.dtype))


def _well_conditioned(w) -> bool:
    s = _singular_values(w)
    return s[-1] > 0 and s[0] / s[-1] <= 100 and 1e-15 <= s[0] <= 1e15


def _check_orthogonal(case, w, out):
    s = _singular_values(out)
    tol = 8 * rtol(case.dtype, w.size) + 1e-5
    assert np.all(s <= 1 + tol), s
    if case.kwargs.get("method", "svd") == "svd" or _well_conditioned(w):
        # Newton-Schulz only converges to the polar factor on well-conditioned
        # kernels (its fixed point for a rank-deficient one is a partial isometry).
        assert np.all(s >= 1 - tol), s


FEASIBLE = {
    "MaxNorm": _check_keras_norm,
    "UnitNorm": _check_keras_norm,
    "MinMaxNorm": _check_keras_norm,
    "NonNeg": _check_non_neg,
    "Clip": _check_clip,
    "CenterAround": _check_center_around,
    "L1Ball": _check_l1_ball,
    "Simplex": _check_simplex,
    "SpectralNorm": _check_spectral_norm,
    "Orthogonal": _check_orthogonal,
    "Sphere": _check_sphere,
}


def _idempotence_bound(case, w, once) -> np.ndarray | float | None:
    """Largest allowed `|C(C(w)) - C(w)|` (per unit norm for the Keras norms);
    `None` where the math does not promise idempotence.

    Keras norm constraints: with n = |w| and n1 = |C(w)| = d n / (EPS + n), a
    second pass maps C(w) to C(w) * d(n1) / (EPS + n1). For MaxNorm, n1 <= m, so
    d(n1) = n1 and the unit moves by n1 * EPS / (EPS + n1) <= EPS. For
    MinMaxNorm (rate 1; UnitNorm is min = max = 1) n1 may sit below `min` by
    min * EPS / (EPS + n), and the unit moves by at most EPS * (1 + min / n).
    So the Keras norms are idempotent to an absolute 1e-7 per unit for units
    longer than `min`, but not for tiny units: that is Keras's epsilon.
    """
    name, kw = type(case.constraint).__name__, case.kwargs
    r, a = rtol(case.dtype, w.size), atol(case.dtype, w.size)
    if name in ("MaxNorm", "UnitNorm", "MinMaxNorm"):
        if name == "MinMaxNorm" and kw["rate"] != 1.0:
            return None  # moves part of the way each call, by design
        axes = unit_axes(case.axis, w.ndim)
        n = norms(w, axes)
        low = {"MaxNorm": 0.0, "UnitNorm": 1.0}.get(name, kw.get("min_value"))
        with np.errstate(divide="ignore", invalid="ignore"):
            keras_eps = np.where(n > 0, EPS * (1 + low / n), 0.0)
        return keras_eps + 4 * r * norms(once, axes) + 4 * r * low + a
    if name == "Orthogonal" and kw["method"] == "newton_schulz" and not _well_conditioned(w):
        return None
    if name == "SpectralNorm" and kw["method"] == "power":
        # A rescale by m / sigma lands on sigma = m up to rounding.
        return 8 * r * np.max(np.abs(once)) + a
    if name in ("NonNeg", "Clip"):
        return 0.0
    return 8 * r * (np.max(np.abs(once)) + np.max(np.abs(w)) * w.size) + a


# --- the properties ----------------------------------------------------------------


def _finite_inputs(case):
    for w in case.arrays:
        assert np.all(np.isfinite(w))
    return case.inputs()


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
@examples(25)
@shared_draws
@given(data=st.data())
def test_shape_dtype_kept_and_output_finite(cls, data):
    case = data.draw(cases(cls), label="case")
    for w in _finite_inputs(case):
        once, twice = project_twice(case.constraint, w)
        assert once.shape == case.shape and once.dtype == case.dtype
        assert twice.shape == case.shape and twice.dtype == case.dtype
        assert np.all(np.isfinite(f64(once))), f"{case}: non-finite output for finite input"


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
@examples(25)
@shared_draws
@given(data=st.data())
def test_feasible_after_projection(cls, data):
    case = data.draw(cases(cls), label="case")
    check = FEASIBLE.get(cls.__name__)
    for w64, w in zip(case.arrays, case.inputs()):
        once, _ = project_twice(case.constraint, w)
        if check is None:  # a class without a written checker: at least it is finite
            assert np.all(np.isfinite(f64(once)))
        else:
            check(case, w64, f64(once))


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
@examples(25)
@shared_draws
@given(data=st.data())
def test_idempotent_where_the_math_says_so(cls, data):
    case = data.draw(cases(cls), label="case")
    for w64, w in zip(case.arrays, case.inputs()):
        once, twice = project_twice(case.constraint, w)
        once, twice = f64(once), f64(twice)
        bound = _idempotence_bound(case, w64, once)
        if bound is None:
            continue
        if cls.__name__ in ("MaxNorm", "UnitNorm", "MinMaxNorm"):
            moved = norms(twice - once, unit_axes(case.axis, w64.ndim))
        else:
            moved = np.abs(twice - once)
        assert np.all(moved <= bound), f"{case}: moved {np.max(moved - bound)} beyond the bound"


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
@examples(5)
@given(data=st.data())
def test_jit_equals_eager(cls, data):
    case = data.draw(cases(cls, shapes=st.sampled_from(SHAPE_POOL), max_arrays=2), label="case")
    for w in case.inputs():
        eager = f64(case.constraint(w))
        jitted, _ = project_twice(case.constraint, w)
        jitted = f64(jitted)
        # XLA may fuse differently from op-by-op execution: a few ulp apart.
        scale = np.max(np.abs(eager)) if eager.size else 0.0
        tol = 4 * rtol(case.dtype, w.size) * scale + atol(case.dtype, w.size)
        np.testing.assert_allclose(jitted, eager, rtol=0, atol=tol)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
@examples(6)
@given(data=st.data())
def test_gradients_finite(cls, data):
    case = data.draw(cases(cls, shapes=st.sampled_from(SHAPE_POOL)), label="case")
    cotangent = jnp.asarray(np.cos(np.arange(math.prod(case.shape))).reshape(case.shape))
    cotangent = cotangent.astype(jnp.float32)
    for w in _finite_inputs(case):
        grad, grad32 = gradients(case.constraint, w, cotangent)
        assert grad.shape == case.shape and grad.dtype == case.dtype
        grad, grad32 = f64(grad), f64(grad32)
        assert np.all(np.isfinite(grad32)), f"{case}: non-finite float32 gradient"
        # In float16 a true gradient can exceed the dtype's range (UnitNorm's is
        # 1 / (EPS + n) ~ 1e7 at a zero unit); everywhere else it must be finite.
        representable = np.abs(grad32) < 0.5 * float(jnp.finfo(case.dtype).max)
        assert np.all(np.isfinite(grad[representable])), f"{case}: non-finite gradient"


def test_every_exported_class_is_covered():
    names = {c.__name__ for c in CLASSES}
    assert {"MaxNorm", "MinMaxNorm", "NonNeg", "UnitNorm"} <= names
    missing = names - set(FEASIBLE)
    # A new class still runs every generic property; this only asks for its checker.
    assert not missing, f"write a feasibility checker in FEASIBLE for {sorted(missing)}"
