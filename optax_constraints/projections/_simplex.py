"""Euclidean projections of each unit onto the L1 ball and the simplex (Michelot, 1986)."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from optax_constraints.projections._axis import AxisSpec, resolve_axis
from optax_constraints.projections._norms import projection


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _simplex_units(v, scale, axes):
    """Each unit of `v` projected onto `{x >= 0, sum x = scale}` (a loop: custom JVP)."""
    # Shift-invariant: moving the largest entry to 0 keeps the sums in the range
    # of `scale`, not of |v| ([1e30, 1.0] with scale 1 gives [1, 0], not [0, 0]).
    v = v - jnp.max(v, axis=axes, keepdims=True)
    return jnp.maximum(v - _threshold(v, scale, axes), 0)


@_simplex_units.defjvp
def _simplex_units_jvp(axes, primals, tangents):
    v, scale = primals
    dv, dscale = tangents
    out = _simplex_units(v, scale, axes)
    active = out > 0
    # d theta: the mean of the tangent over the unit's nonzero outputs.
    count = jnp.maximum(jnp.sum(active, axis=axes, keepdims=True).astype(v.dtype), 1)
    dtheta = (jnp.sum(jnp.where(active, dv, 0), axis=axes, keepdims=True) - dscale) / count
    return out, jnp.where(active, dv - dtheta, 0)


def _threshold(v, scale, axes):
    """Each unit's `theta` with `sum(max(v - theta, 0)) = scale`: from the mean, repeat
    `theta = (sum of the entries above theta - scale) / their count` until that set settles."""
    n = math.prod(v.shape[a] for a in axes)
    theta = (jnp.sum(v, axis=axes, keepdims=True) - scale) / n

    def unsettled(carry):
        _, count, previous, rounds = carry
        return jnp.any(count != previous) & (rounds <= n)

    def one_round(carry):
        theta, last_count, _, rounds = carry
        above = v > theta
        # int32 like the loop's carry (a sum of booleans is int64 under x64).
        count = jnp.sum(above, axis=axes, keepdims=True, dtype=jnp.int32)
        total = jnp.sum(jnp.where(above, v, 0), axis=axes, keepdims=True)
        # No entry above theta: theta is the largest entry (scale 0) or NaN.
        theta = jnp.where(count > 0, (total - scale) / count.astype(v.dtype), theta)
        return theta, count, last_count, rounds + 1

    # Shaped (and, under Explicit mesh axes, sharded) like the per-unit counts.
    everything = jnp.full_like(theta, n, dtype=jnp.int32)
    theta, *_ = jax.lax.while_loop(unsettled, one_round, (theta, everything, everything - 1, 0))
    return theta


@projection
def l1_ball(w: jax.Array, max_value: jax.typing.ArrayLike = 1.0, axis: AxisSpec = 0) -> jax.Array:
    """Euclidean projection of each unit onto the L1 ball of radius `max_value`.

    .. math:: P(w) = \\operatorname{sign}(w) \\max(|w| - \\theta, 0)

    with :math:`\\theta = 0` when :math:`\\|w\\|_1 \\le m` (the unit comes back
    bit for bit), else the :math:`\\theta` with :math:`\\sum \\max(|w_i| - \\theta, 0) = m`.

    >>> from optax_constraints.projections import l1_ball
    >>> l1_ball(jnp.array([[3.0, 0.2], [1.0, -0.3]]), max_value=1.0)
    Array([[ 1. ,  0.2],
           [ 0. , -0.3]], dtype=float32)
    """
    if w.size == 0:
        return w
    axes = resolve_axis(axis, w.ndim)
    magnitude = jnp.abs(w)
    inside = jnp.sum(magnitude, axis=axes, keepdims=True) <= max_value
    projected = jnp.sign(w) * _simplex_units(magnitude, jnp.asarray(max_value, w.dtype), axes)
    return jnp.where(inside, w, projected)


@projection
def simplex(w: jax.Array, scale: jax.typing.ArrayLike = 1.0, axis: AxisSpec = 0) -> jax.Array:
    """Euclidean projection of each unit onto `{x >= 0, sum(x) = scale}`.

    .. math:: P(w) = \\max(w - \\theta, 0), \\qquad \\sum_i \\max(w_i - \\theta, 0) = s

    An all-zero unit becomes the uniform vector `scale / n`. `axis` as in `max_norm`.

    >>> from optax_constraints.projections import simplex
    >>> simplex(jnp.array([[0.5, 0.0], [2.0, 0.0]]))
    Array([[0. , 0.5],
           [1. , 0.5]], dtype=float32)
    """
    if w.size == 0:
        return w
    return _simplex_units(w, jnp.asarray(scale, w.dtype), resolve_axis(axis, w.ndim))
