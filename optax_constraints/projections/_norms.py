"""Norm projections (Keras 3's float32 formulas, term for term), the sign and the box."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import TypeVar

import jax
import jax.numpy as jnp

from optax_constraints.projections._axis import AxisSpec, resolve_axis

_F = TypeVar("_F", bound=Callable[..., jax.Array])

EPSILON = 1e-7
"""Keras's `backend.epsilon()`: the norm-constraint denominators add it."""

_LOW_PRECISION = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def compute_dtype(dtype) -> jnp.dtype:
    """The dtype a projection computes in for inputs of `dtype`.

    >>> compute_dtype(jnp.bfloat16)
    dtype('float32')
    """
    dtype = jnp.dtype(dtype)
    if dtype in _LOW_PRECISION:
        return jnp.dtype(jnp.float32)
    if not jnp.issubdtype(dtype, jnp.floating):
        return jnp.dtype(jnp.result_type(float))
    return dtype


def as_array(w) -> jax.Array:
    """`jnp.asarray(w)`, with a clear error when `w` is a pytree."""
    try:
        return jnp.asarray(w)
    except (TypeError, ValueError):
        text = repr(w)
        text = text if len(text) <= 80 else text[:77] + "..."
        raise TypeError(
            f"A constraint projects one array; got {type(w).__name__} {text}. To"
            " constrain a parameter tree use oc.apply_constraints(params, constraints,"
            " param_labels) or oc.project(constraints, param_labels) in the optimizer."
        ) from None


def safe_div(num, den, fallback: jax.typing.ArrayLike = 0):
    """`num / den` where `den != 0`, else `fallback`; finite gradients either way (NaN stays)."""
    nonzero = den != 0
    return jnp.where(nonzero, num / jnp.where(nonzero, den, 1), fallback)


def projection(fn: _F) -> _F:
    """Makes `fn(w, ...)` compute in `w`'s compute dtype and return `w`'s dtype.

    bfloat16/float16 inputs are computed in float32 and cast back. An eager call
    runs `fn` as one compiled program (Python numbers and `axis` as constants),
    so it rounds like the jitted call.

    >>> from optax_constraints.projections import projection
    >>> @projection
    ... def shrink(w, factor=0.5):
    ...     return w * factor
    >>> shrink(jnp.array([2.0, 4.0], jnp.bfloat16), factor=0.25)
    Array([0.5, 1], dtype=bfloat16)
    """

    def run(w, *args, **kwargs):
        dtype = compute_dtype(w.dtype)
        out = fn(w.astype(dtype), *args, **kwargs).astype(dtype)
        return out.astype(w.dtype) if w.dtype in _LOW_PRECISION else out

    signature = inspect.signature(fn)

    @functools.cache
    def compiled(constants):
        return jax.jit(lambda w, arrays: run(w, **arrays, **dict(constants)))

    @functools.wraps(fn)
    def wrapper(w, *args, **kwargs):
        w = as_array(w)
        if isinstance(w, jax.core.Tracer):  # pyright: ignore[reportAttributeAccessIssue]
            return run(w, *args, **kwargs)
        arguments = signature.bind(w, *args, **kwargs).arguments
        arguments.pop(next(iter(signature.parameters)))
        arrays = {k: v for k, v in arguments.items() if hasattr(v, "dtype")}
        constants = tuple(
            (k, tuple(v) if isinstance(v, list) else v)
            for k, v in arguments.items()
            if k not in arrays
        )
        return compiled(constants)(w, arrays)

    return wrapper  # pyright: ignore[reportReturnType]  (functools.wraps: fn's signature)


AxisName = str | tuple[str, ...] | None
"""Mesh axis names to `psum` per-unit sums over inside `jax.shard_map` (`None`: none)."""


def unit_norms(w: jax.Array, axis: AxisSpec = 0, axis_name: AxisName = None) -> jax.Array:
    """Euclidean norm of each unit: `sqrt(sum(w * w, axis, keepdims=True))`.

    Keras's formula, with a zero gradient at a zero unit; inside `jax.shard_map`
    the sums are `psum`med over the mesh axes `axis_name` that split the unit.

    >>> unit_norms(jnp.array([[3.0, 0.0], [4.0, 0.0]]))
    Array([[5., 0.]], dtype=float32)
    """
    w = jnp.asarray(w)
    sumsq = jnp.sum(w * w, axis=resolve_axis(axis, w.ndim), keepdims=True)
    if axis_name:
        sumsq = jax.lax.psum(sumsq, axis_name)
    # sqrt'(0) is infinite: route zeros through sqrt(1) (gradient 0); NaN stays NaN.
    zero = sumsq == 0
    return jnp.where(zero, 0, jnp.sqrt(jnp.where(zero, 1, sumsq)))


@projection
def max_norm(
    w: jax.Array,
    max_value: jax.typing.ArrayLike = 2,
    axis: AxisSpec = 0,
    axis_name: AxisName = None,
) -> jax.Array:
    """Rescales each unit whose norm exceeds `max_value` down to it.

    .. math:: w' = w \\cdot \\frac{\\mathrm{clip}(\\|w\\|, 0, m)}{\\epsilon + \\|w\\|}

    with Keras's :math:`\\epsilon = 10^{-7}`.

    Args:
      w: the weights.
      max_value: largest allowed norm per unit (a number, array or tracer).
      axis: axes of one unit: int, tuple/list, negative, `None` or `"fan_in"`.
      axis_name: inside `jax.shard_map`, the mesh axes splitting the unit's axes.

    >>> from optax_constraints.projections import max_norm
    >>> max_norm(jnp.array([[3.0, 0.0], [4.0, 0.0]]), max_value=1.0)
    Array([[0.6, 0. ],
           [0.8, 0. ]], dtype=float32)
    """
    norms = unit_norms(w, axis, axis_name)
    desired = jnp.clip(norms, 0, max_value)
    return w * (desired / (EPSILON + norms))


@projection
def min_max_norm(
    w: jax.Array,
    min_value: jax.typing.ArrayLike = 0.0,
    max_value: jax.typing.ArrayLike = 1.0,
    rate: jax.typing.ArrayLike = 1.0,
    axis: AxisSpec = 0,
    axis_name: AxisName = None,
) -> jax.Array:
    """Moves each unit's norm into `[min_value, max_value]` at speed `rate`.

    .. math:: w' = w \\cdot \\frac{r\\,\\mathrm{clip}(\\|w\\|, a, b) + (1-r)\\|w\\|}
       {\\epsilon + \\|w\\|}

    A zero unit stays zero; an overflowing one is scaled by `1 - rate` (Keras: NaN).

    >>> from optax_constraints.projections import min_max_norm
    >>> min_max_norm(jnp.array([[6.0, 0.0], [8.0, 0.0]]), min_value=1.0, max_value=2.0)
    Array([[1.2, 0. ],
           [1.6, 0. ]], dtype=float32)
    """
    norms = unit_norms(w, axis, axis_name)
    desired = rate * jnp.clip(norms, min_value, max_value) + (1 - rate) * norms
    factor = desired / (EPSILON + norms)
    # The one NaN of Keras's formula for finite w: inf / inf on an overflowed unit.
    return w * jnp.where(jnp.isinf(norms), 1 - rate, factor)


@projection
def unit_norm(w: jax.Array, axis: AxisSpec = 0, axis_name: AxisName = None) -> jax.Array:
    """Divides each unit by its norm plus Keras's epsilon: :math:`w / (\\epsilon + \\|w\\|)`.

    An all-zero unit stays zero.

    >>> from optax_constraints.projections import unit_norm
    >>> unit_norm(jnp.array([[3.0, 0.0], [4.0, 0.0]]))
    Array([[0.6, 0. ],
           [0.8, 0. ]], dtype=float32)
    """
    norms = unit_norms(w, axis, axis_name)
    return w / (EPSILON + norms)


@projection
def sphere(
    w: jax.Array,
    radius: jax.typing.ArrayLike = 1.0,
    axis: AxisSpec = 0,
    axis_name: AxisName = None,
) -> jax.Array:
    """Rescales each unit onto the sphere of `radius`: exactly :math:`w\\, r / \\|w\\|`.

    No epsilon (unlike `unit_norm`). A zero unit has no nearest point on the
    sphere: it stays zero, with a zero gradient. `radius` may be an array that
    broadcasts against the per-unit norms.

    >>> from optax_constraints.projections import sphere
    >>> sphere(jnp.array([[3.0, 0.0], [4.0, 0.0]]), radius=2.0)
    Array([[1.2, 0. ],
           [1.6, 0. ]], dtype=float32)
    """
    return w * safe_div(radius, unit_norms(w, axis, axis_name))


def non_neg(w: jax.Array) -> jax.Array:
    """Elementwise `maximum(w, 0)`: negative entries (and -0.0) become +0.0; exact.

    >>> from optax_constraints.projections import non_neg
    >>> non_neg(jnp.array([-1.0, -0.0, 2.0]))
    Array([0., 0., 2.], dtype=float32)
    """
    w = as_array(w)
    return jnp.maximum(w, jnp.zeros((), w.dtype))


def clip(
    w: jax.Array,
    min_value: jax.typing.ArrayLike | None = None,
    max_value: jax.typing.ArrayLike | None = None,
) -> jax.Array:
    """Elementwise box `[min_value, max_value]` (either bound may be `None`); exact.

    >>> from optax_constraints.projections import clip
    >>> clip(jnp.array([-2.0, 0.5, 3.0]), -1.0, 1.0)
    Array([-1. ,  0.5,  1. ], dtype=float32)
    """
    w = as_array(w)
    if min_value is not None:
        w = jnp.maximum(w, jnp.asarray(min_value, w.dtype))
    if max_value is not None:
        w = jnp.minimum(w, jnp.asarray(max_value, w.dtype))
    return w


@projection
def center_around(w: jax.Array, ref_value: jax.typing.ArrayLike = 0.0) -> jax.Array:
    """Shifts `w` so its mean is `ref_value`: :math:`w - \\mathrm{mean}(w) + r`.

    >>> from optax_constraints.projections import center_around
    >>> center_around(jnp.array([1.0, 2.0, 6.0]), ref_value=1.0)
    Array([-1.,  0.,  4.], dtype=float32)
    """
    mean = jnp.mean(w)
    return w - mean + ref_value
