"""Euclidean projections of each unit onto the L1 ball and the simplex.

A unit is the slice over `axis`, as for `max_norm` (`axis=0` on a Dense
kernel `(in, out)`: one unit per output; `"fan_in"`: every axis but the last;
`None`: the whole array). Both projections are the sort-based algorithm of
Held, Wolfe & Crowder (1974) and Duchi et al. (2008): `O(n log n)` per unit,
no iteration, jittable and differentiable almost everywhere.

bfloat16 and float16 inputs are computed in float32 and cast back.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from optax_constraints.projections._axis import AxisSpec, resolve_axis
from optax_constraints.projections._norms import projection


def _units(w: jax.Array, axis: AxisSpec):
    """`w` as a `(units, unit_size)` matrix, and the function that undoes it."""
    axes = resolve_axis(axis, w.ndim)
    rest = tuple(a for a in range(w.ndim) if a not in axes)
    perm = rest + axes
    moved = jnp.transpose(w, perm)
    rows = math.prod(moved.shape[: len(rest)])
    units = moved.reshape((rows, math.prod(moved.shape[len(rest) :])))

    def restore(x):
        return jnp.transpose(x.reshape(moved.shape), np.argsort(perm))

    return units, restore


def _simplex_rows(v: jax.Array, scale) -> jax.Array:
    """Each row of `v` projected onto `{x >= 0, sum(x) = scale}` (scale >= 0)."""
    n = v.shape[-1]
    # The projection commutes with shifts (theta moves with them); shifting the
    # largest entry to 0 keeps the sums below in the range of `scale` rather
    # than of |v| (e.g. [1e30, 1.0] with scale 1 gives [1, 0], not [0, 0]).
    v = v - jnp.max(v, axis=-1, keepdims=True)
    desc = jnp.flip(jnp.sort(v, axis=-1), axis=-1)
    excess = jnp.cumsum(desc, axis=-1) - scale
    rank = jnp.arange(1, n + 1)
    # rho = the largest k with desc[k-1] > (sum of the k largest - scale) / k;
    # the threshold theta then zeroes exactly the entries below the top rho.
    positive = desc * rank.astype(v.dtype) > excess
    rho = jnp.maximum(jnp.max(jnp.where(positive, rank, 0), axis=-1, keepdims=True), 1)
    theta = jnp.take_along_axis(excess, rho - 1, axis=-1) / rho.astype(v.dtype)
    return jnp.maximum(v - theta, 0)


@projection
def l1_ball(w: jax.Array, max_value=1.0, axis: AxisSpec = 0) -> jax.Array:
    """Euclidean projection of each unit onto the L1 ball of radius `max_value`.

    .. math:: P(w) = \\operatorname{sign}(w) \\max(|w| - \\theta, 0)

    with :math:`\\theta = 0` when :math:`\\|w\\|_1 \\le m` (the unit is
    returned bit for bit) and otherwise the :math:`\\theta > 0` for which
    :math:`\\sum \\max(|w_i| - \\theta, 0) = m`, found exactly by sorting
    :math:`|w|` (soft-thresholding: it also makes the unit sparse).

    Args:
      w: the weights.
      max_value: the radius :math:`m \\ge 0` (number, array or tracer).
      axis: axes of one unit: int, tuple/list, negative, `None` or `"fan_in"`.

    Returns:
      The projected weights, same shape and dtype.

    >>> import jax.numpy as jnp
    >>> from optax_constraints.projections import l1_ball
    >>> l1_ball(jnp.array([[3.0, 0.2], [1.0, -0.3]]), max_value=1.0)
    Array([[ 1. ,  0.2],
           [ 0. , -0.3]], dtype=float32)

    References:
      Duchi, Shalev-Shwartz, Singer & Chandra, Efficient Projections onto the
      l1-Ball for Learning in High Dimensions, ICML 2008.
    """
    if w.size == 0:
        return w
    units, restore = _units(w, axis)
    magnitude = jnp.abs(units)
    inside = jnp.sum(magnitude, axis=-1, keepdims=True) <= max_value
    projected = jnp.sign(units) * _simplex_rows(magnitude, max_value)
    return restore(jnp.where(inside, units, projected))


@projection
def simplex(w: jax.Array, scale=1.0, axis: AxisSpec = 0) -> jax.Array:
    """Euclidean projection of each unit onto `{x >= 0, sum(x) = scale}`.

    .. math:: P(w) = \\max(w - \\theta, 0), \\qquad
       \\sum_i \\max(w_i - \\theta, 0) = s

    with the threshold :math:`\\theta` found exactly by sorting `w`. With
    `scale=1` each unit becomes a probability vector (mixture weights,
    attention-like or convex-combination layers). An all-zero unit becomes
    the uniform vector `scale / n`.

    Args:
      w: the weights.
      scale: the sum :math:`s > 0` of each unit (number, array or tracer).
      axis: axes of one unit: int, tuple/list, negative, `None` or `"fan_in"`.

    Returns:
      The projected weights, same shape and dtype.

    >>> import jax.numpy as jnp
    >>> from optax_constraints.projections import simplex
    >>> simplex(jnp.array([[0.5, 0.0], [2.0, 0.0]]))
    Array([[0. , 0.5],
           [1. , 0.5]], dtype=float32)

    References:
      Held, Wolfe & Crowder, Validation of subgradient optimization, Math.
      Programming 6, 1974. Duchi et al., ICML 2008 (figure 1). Condat, Fast
      projection onto the simplex and the l1 ball, Math. Programming 158, 2016.
    """
    if w.size == 0:
        return w
    units, restore = _units(w, axis)
    return restore(_simplex_rows(units, scale))
