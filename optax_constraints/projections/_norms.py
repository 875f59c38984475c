"""Keras's norm and sign projections, and the elementwise box, as pure functions.

Every function here maps one array to one array of the same shape and dtype.
The float32 formulas are Keras 3's, term for term, so results agree with
`keras.constraints` to the last bit or two; two things are added where Keras
returns garbage:

* a unit whose squared norm overflows (entries above ~1e19 in float32) gets its
  norm from a rescaled sum instead of `inf` (Keras returns zeros or NaN);
* the gradient of the norm at an all-zero unit is taken as zero instead of NaN.

bfloat16 and float16 inputs are computed in float32 and cast back.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
from collections.abc import Callable, Iterator
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
    """`jnp.asarray(w)`, with a clear error when `w` is a pytree, not one array."""
    try:
        return jnp.asarray(w)
    except (TypeError, ValueError):
        raise TypeError(
            f"A constraint projects one array; got {type(w).__name__} {_short(w)}. To"
            " constrain a parameter tree use oc.apply_constraints(params, constraints,"
            " param_labels) or oc.project(constraints, param_labels) in the optimizer."
        ) from None


def _short(x, n: int = 80) -> str:
    text = repr(x)
    return text if len(text) <= n else text[: n - 3] + "..."


def _is_array(value) -> bool:
    return hasattr(value, "dtype") and hasattr(value, "shape")


def _static(value):
    return tuple(value) if isinstance(value, list) else value


def projection(fn: _F) -> _F:
    """Makes `fn(w, **hyper)` one compiled XLA program in its compute dtype.

    Python-number and `axis` arguments are compile-time constants (as in
    Keras's own jitted step, so `1 - rate` is rounded the same way); arrays
    and tracers are runtime arguments, so traced hyper-parameters never
    retrace. An eager call therefore rounds exactly like a jitted one, and
    inside an outer `jax.jit` the inner program is simply inlined.
    bfloat16/float16 inputs are computed in float32 and cast back.

    Use it for your own projection functions:

    >>> import jax.numpy as jnp
    >>> from optax_constraints.projections import projection
    >>> @projection
    ... def shrink(w, factor=0.5):
    ...     return w * factor
    >>> shrink(jnp.array([2.0, 4.0], jnp.bfloat16), factor=0.25)
    Array([0.5, 1], dtype=bfloat16)
    """
    signature = inspect.signature(fn)
    first = next(iter(signature.parameters))

    @functools.cache
    def compiled(static_items, branch):
        static = dict(static_items)

        def run(w, dynamic):
            dtype = w.dtype
            with branch_on_overflow(branch):  # part of the cache key: see `unit_norms`
                out = fn(w.astype(compute_dtype(dtype)), **static, **dynamic)
            # A float64 array hyper-parameter (x64) must not promote a float32 leaf.
            out = out.astype(compute_dtype(dtype))
            return out.astype(dtype) if dtype in _LOW_PRECISION else out

        return jax.jit(run)

    @functools.wraps(fn)
    def wrapper(w, *args, **kwargs):
        bound = signature.bind(w, *args, **kwargs)
        bound.apply_defaults()
        arguments = dict(bound.arguments)
        w = as_array(arguments.pop(first))
        static = {k: _static(v) for k, v in arguments.items() if not _is_array(v)}
        dynamic = {k: v for k, v in arguments.items() if _is_array(v)}
        return compiled(tuple(sorted(static.items())), _BRANCH_ON_OVERFLOW.get())(w, dynamic)

    return wrapper  # pyright: ignore[reportReturnType]  (functools.wraps: fn's signature)


def _safe_sqrt(x):
    # sqrt(0) has an infinite derivative; route zeros through sqrt(1) so the
    # gradient there is 0 (the forward value is unchanged: sqrt(0) == 0).
    # A NaN sum stays NaN (as in Keras), so a unit that saw a NaN shows it.
    zero = x == 0
    return jnp.where(zero, 0, jnp.sqrt(jnp.where(zero, 1, x)))


def unit_norms(w: jax.Array, axis: AxisSpec = 0) -> jax.Array:
    """Euclidean norm of each unit: `sqrt(sum(w * w, axis, keepdims=True))`.

    Same float32 bits as Keras's `ops.sqrt(ops.sum(ops.square(w), ...))`;
    a unit whose sum of squares overflows is measured on a rescaled copy, so
    the norm stays finite for finite inputs. That second sum is branch-free
    by default and runs only when needed inside `branch_on_overflow` (same
    result; docs/performance.md says which is faster where).

    Args:
      w: the array.
      axis: the axes of one unit (see `resolve_axis`).

    Returns:
      An array with `w`'s rank (reduced axes kept with size 1).

    >>> unit_norms(jnp.array([[3.0, 0.0], [4.0, 0.0]]))
    Array([[5., 0.]], dtype=float32)
    """
    w = jnp.asarray(w)
    axes = resolve_axis(axis, w.ndim)
    sumsq = jnp.sum(w * w, axis=axes, keepdims=True)
    if w.size == 0 or all(w.shape[a] == 1 for a in axes):
        # One entry per unit: XLA drops the size-1 sum and rewrites
        # (w * 2**-k)**2 as (w * w) * 2**-2k, which overflows again (or
        # flushes to 0). The norm of one entry is |w|, exactly.
        return jnp.where(jnp.isinf(sumsq), jnp.abs(w), _safe_sqrt(sumsq))
    if not _BRANCH_ON_OVERFLOW.get():
        return _rescaled_where_overflowed(w, axes, sumsq)

    def branch():
        # Only the second sum is conditional: the branch not taken returns
        # its operand, and the choice per unit is made outside, where it fuses
        # into the consumer of the norms. `max(sumsq) < inf` is False on an
        # overflow and on a NaN, whose unit the `where` leaves NaN.
        again = jax.lax.cond(
            jnp.max(sumsq) < jnp.inf,
            lambda s: s,
            lambda s: _sum_scaled(w, axes, _literal_scale(w.dtype)),
            sumsq,
        )
        return _where_overflowed(sumsq, again)

    # On GPU a `cond` waits for the host to read the predicate: no branch there.
    return jax.lax.platform_dependent(
        cpu=branch, default=lambda: _rescaled_where_overflowed(w, axes, sumsq)
    )


LITERAL_SCALE_SIZE = 2**16
"""Below this many elements, the branch-free second sum scales by a literal.

A literal saves the kernel that computes a per-unit scale (compile time:
one kernel per leaf); XLA may merge the literal broadcasts of same-shaped
leaves into one array in memory, at most 256 KiB in float32 below this size.
"""


_BRANCH_ON_OVERFLOW = contextvars.ContextVar("branch_on_overflow", default=False)


@contextlib.contextmanager
def branch_on_overflow(enabled: bool = True) -> Iterator[None]:
    """While tracing, lets `unit_norms` skip its second sum unless a unit overflowed.

    By default `unit_norms` always sums a rescaled copy a second time
    (branch-free): one more read of `w`, but XLA can still write `w` into a
    donated buffer and rescale it in place. In this context, on CPU, the
    second sum runs under a `lax.cond` only when some unit's sum overflowed.
    That is faster where `w` is a temporary anyway, as `p + u` is in
    `Constraint.project_update`, which enters this context; elsewhere the
    `cond` would make XLA copy `w` (see docs/performance.md). The norms are
    the same either way.

    >>> import jax.numpy as jnp
    >>> with branch_on_overflow():
    ...     unit_norms(jnp.array([[3e30, 3.0], [4e30, 4.0]]))
    Array([[5.e+30, 5.e+00]], dtype=float32)
    """
    token = _BRANCH_ON_OVERFLOW.set(enabled)
    try:
        yield
    finally:
        _BRANCH_ON_OVERFLOW.reset(token)


def _rescaled_where_overflowed(w, axes, sumsq):
    # Units whose sum overflows are summed again on w * 2**-k: scaling by a
    # power of two is exact, so their norm is the rescaled one times 2**k.
    # On large leaves the scale is a per-unit array computed from `sumsq`
    # (2**-k where the sum overflowed, 1 elsewhere) rather than a literal:
    # XLA merges literal broadcasts of one shape across leaves, writes the
    # shared array to memory and reads it on every pass, while a computed one
    # fuses into the reduction. It has the norms' shape, so it is sharded like
    # them: nothing to slice or gather (docs/performance.md, docs/multihost.md).
    if w.size < LITERAL_SCALE_SIZE:
        scale = _literal_scale(w.dtype)
    else:
        k = _overflow_exponent(w.dtype)
        scale = jnp.where(jnp.isinf(sumsq), jnp.asarray(2.0**-k, w.dtype), jnp.ones((), w.dtype))
    return _where_overflowed(sumsq, _sum_scaled(w, axes, scale))


def _literal_scale(dtype) -> jax.Array:
    return jnp.asarray(2.0 ** -_overflow_exponent(dtype), dtype)


def _sum_scaled(w, axes, scale):
    scaled = w * scale
    return jnp.sum(scaled * scaled, axis=axes, keepdims=True)


def _where_overflowed(sumsq, sumsq_scaled):
    """The norms: from `sumsq`, or where it overflowed from the sum scaled by 2**-k."""
    k = _overflow_exponent(sumsq.dtype)
    return jnp.where(
        jnp.isinf(sumsq),
        _safe_sqrt(sumsq_scaled) * jnp.asarray(2.0**k, sumsq.dtype),
        _safe_sqrt(sumsq),
    )


def _overflow_exponent(dtype) -> int:
    # Half the exponent range: entries that overflow when squared come back
    # into range, entries that underflow are negligible next to them.
    return int(jnp.finfo(dtype).maxexp) // 2


@projection
def max_norm(w: jax.Array, max_value: jax.typing.ArrayLike = 2, axis: AxisSpec = 0) -> jax.Array:
    """Rescales each unit whose norm exceeds `max_value` down to it.

    .. math:: w' = w \\cdot \\frac{\\mathrm{clip}(\\|w\\|, 0, m)}{\\epsilon + \\|w\\|}

    with Keras's :math:`\\epsilon = 10^{-7}`, the norm taken over `axis`.

    Args:
      w: the weights.
      max_value: largest allowed norm per unit (a number, array or tracer).
      axis: axes of one unit: int, tuple/list, negative, `None` or `"fan_in"`.

    Returns:
      The projected weights, same shape and dtype.

    >>> import jax.numpy as jnp
    >>> import numpy as np
    >>> from optax_constraints.projections import max_norm
    >>> np.asarray(max_norm(jnp.array([[3.0, 0.1], [4.0, 0.0]]), max_value=1.0), np.float64).round(4).tolist()
    [[0.6, 0.1], [0.8, 0.0]]

    References:
      Srivastava et al., Dropout: a simple way to prevent neural networks from
      overfitting, JMLR 2014 (section 5.1).
    """
    norms = unit_norms(w, axis)
    desired = jnp.clip(norms, 0, max_value)
    return w * (desired / (EPSILON + norms))


@projection
def min_max_norm(
    w: jax.Array,
    min_value: jax.typing.ArrayLike = 0.0,
    max_value: jax.typing.ArrayLike = 1.0,
    rate: jax.typing.ArrayLike = 1.0,
    axis: AxisSpec = 0,
) -> jax.Array:
    """Moves each unit's norm into `[min_value, max_value]` at speed `rate`.

    .. math:: w' = w \\cdot \\frac{r\\,\\mathrm{clip}(\\|w\\|, a, b) + (1-r)\\|w\\|}
       {\\epsilon + \\|w\\|}

    `rate=1` enforces the interval strictly; smaller rates move the norm part
    of the way each time. An all-zero unit stays zero (it has no direction).

    Args:
      w: the weights.
      min_value: smallest allowed norm per unit.
      max_value: largest allowed norm per unit.
      rate: fraction of the way to move, in `[0, 1]`.
      axis: axes of one unit.

    Returns:
      The projected weights, same shape and dtype.

    >>> import jax.numpy as jnp
    >>> import numpy as np
    >>> from optax_constraints.projections import min_max_norm
    >>> np.asarray(min_max_norm(jnp.array([[0.3, 6.0], [0.4, 8.0]]), 1.0, 2.0), np.float64).round(4).tolist()
    [[0.6, 1.2], [0.8, 1.6]]
    """
    norms = unit_norms(w, axis)
    desired = rate * jnp.clip(norms, min_value, max_value) + (1 - rate) * norms
    return w * (desired / (EPSILON + norms))


@projection
def unit_norm(w: jax.Array, axis: AxisSpec = 0) -> jax.Array:
    """Divides each unit by its norm (plus Keras's epsilon).

    .. math:: w' = \\frac{w}{\\epsilon + \\|w\\|}

    An all-zero unit stays zero.

    >>> import jax.numpy as jnp
    >>> from optax_constraints.projections import unit_norm
    >>> unit_norm(jnp.array([[3.0, 0.0], [4.0, 0.0]]))
    Array([[0.6, 0. ],
           [0.8, 0. ]], dtype=float32)
    """
    norms = unit_norms(w, axis)
    return w / (EPSILON + norms)


def non_neg(w: jax.Array) -> jax.Array:
    """Elementwise `maximum(w, 0)`: negative entries (and -0.0) become +0.0.

    Exact in every dtype, so it needs no float32 round trip.

    >>> import jax.numpy as jnp
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
    """Elementwise box `[min_value, max_value]` (either bound may be `None`).

    The Euclidean projection onto the box; exact in every dtype.

    >>> import jax.numpy as jnp
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
    """Shifts `w` so its mean is `ref_value` (the Keras guide's custom example).

    .. math:: w' = w - \\mathrm{mean}(w) + r

    The Euclidean projection onto `{w : mean(w) = r}`.

    >>> import jax.numpy as jnp
    >>> from optax_constraints.projections import center_around
    >>> center_around(jnp.array([1.0, 2.0, 6.0]), ref_value=1.0)
    Array([-1.,  0.,  4.], dtype=float32)
    """
    mean = jnp.mean(w)
    return w - mean + ref_value
