"""Tangent maps: an update `u` moved into the tangent space (or cone) of a set at `w`."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from optax_constraints.projections._axis import AxisSpec, resolve_axis
from optax_constraints.projections._matrix import on_tall_view
from optax_constraints.projections._norms import EPSILON, AxisName, compute_dtype, safe_div

BOUNDARY_RTOL = 2.0**-16
"""A unit with `‖w‖ >= m (1 - BOUNDARY_RTOL) - 1e-7` is on a ball's boundary (~500 ulps of
slack, so that units `MaxNorm` just projected, which Keras's epsilon leaves inside, count)."""


def _in_compute_dtype(fn):
    """`fn(w, u, ...)` run in the compute dtype of `w` and `u`; returns `u`'s dtype."""

    @functools.wraps(fn)
    def wrapper(w, u, *args, **kwargs):
        w, u = jnp.asarray(w), jnp.asarray(u)
        dtype = jnp.promote_types(compute_dtype(w.dtype), compute_dtype(u.dtype))
        return fn(w.astype(dtype), u.astype(dtype), *args, **kwargs).astype(u.dtype)

    return wrapper


def _radial(w, u, axes, axis_name=None):
    """Per unit: `<u, w>` and `‖w‖²` (kept dims), `psum`med over `axis_name`."""
    inner = jnp.sum(u * w, axis=axes, keepdims=True)
    sumsq = jnp.sum(w * w, axis=axes, keepdims=True)
    if axis_name:
        inner, sumsq = jax.lax.psum((inner, sumsq), axis_name)
    return inner, sumsq


@_in_compute_dtype
def sphere_tangent(
    w: jax.Array, u: jax.Array, axis: AxisSpec = 0, axis_name: AxisName = None
) -> jax.Array:
    """Per unit, `u - <u, w> w / ‖w‖²` (`u` for a zero unit): the sphere's tangent space.

    >>> sphere_tangent(jnp.array([[1.0], [0.0]]), jnp.array([[2.0], [3.0]]))
    Array([[0.],
           [3.]], dtype=float32)
    """
    inner, sumsq = _radial(w, u, resolve_axis(axis, w.ndim), axis_name)
    return u - safe_div(inner, sumsq) * w


@_in_compute_dtype
def ball_tangent(
    w: jax.Array,
    u: jax.Array,
    max_value: jax.typing.ArrayLike,
    axis: AxisSpec = 0,
    min_value: jax.typing.ArrayLike | None = None,
    axis_name: AxisName = None,
) -> jax.Array:
    """The tangent cone of `‖w‖ <= max_value` (and `‖w‖ >= min_value`), per unit.

    On the boundary (see `BOUNDARY_RTOL`) an outward radial component of `u`
    is removed (with `min_value > 0`, an inward one on the inner boundary).

    >>> ball_tangent(jnp.array([[1.0, 0.5], [0.0, 0.0]]), jnp.array([[2.0, 2.0], [3.0, 3.0]]), 1.0)
    Array([[0., 2.],
           [3., 3.]], dtype=float32)
    """
    inner, sumsq = _radial(w, u, resolve_axis(axis, w.ndim), axis_name)
    norms = jnp.sqrt(sumsq)
    blocked = (norms >= max_value * (1 - BOUNDARY_RTOL) - EPSILON) & (inner > 0)
    if min_value is not None:
        at_min = (norms <= min_value * (1 + BOUNDARY_RTOL) + EPSILON) & (min_value > 0)
        blocked = blocked | (at_min & (inner < 0))
    return u - jnp.where(blocked, safe_div(inner, sumsq), 0) * w


@_in_compute_dtype
def sum_zero_tangent(w: jax.Array, u: jax.Array, axis: AxisSpec = None) -> jax.Array:
    """Per unit, `u` minus its mean: the tangent space of `{sum(w) = const}`.

    >>> sum_zero_tangent(jnp.zeros(3), jnp.array([1.0, 2.0, 6.0]))
    Array([-2., -1.,  3.], dtype=float32)
    """
    return u - jnp.mean(u, axis=resolve_axis(axis, w.ndim), keepdims=True)


def box_tangent(
    w: jax.Array,
    u: jax.Array,
    min_value: jax.typing.ArrayLike | None = None,
    max_value: jax.typing.ArrayLike | None = None,
) -> jax.Array:
    """The tangent cone of the box `[min_value, max_value]`: outward components at a bound zeroed.

    >>> box_tangent(jnp.array([0.0, 0.0, 0.5]), jnp.array([-1.0, 1.0, -1.0]), 0.0)
    Array([ 0.,  1., -1.], dtype=float32)
    """
    w, u = jnp.asarray(w), jnp.asarray(u)
    if min_value is not None:
        u = jnp.where((w <= jnp.asarray(min_value, w.dtype)) & (u < 0), 0, u)
    if max_value is not None:
        u = jnp.where((w >= jnp.asarray(max_value, w.dtype)) & (u > 0), 0, u)
    return u


@_in_compute_dtype
def stiefel_tangent(w: jax.Array, u: jax.Array) -> jax.Array:
    """The tangent space of the Stiefel manifold at the `(fan_in, out)` view of `w`.

    `U - W sym(WᵀU)`, `sym(A) = (A + Aᵀ) / 2`, on views transposed to be tall.

    >>> stiefel_tangent(jnp.eye(2), jnp.array([[1.0, 2.0], [0.0, 3.0]]))
    Array([[ 0.,  1.],
           [-1.,  0.]], dtype=float32)
    """

    def tangent(a, b):
        m = a.T @ b
        return b - a @ ((m + m.T) / 2)

    return on_tall_view(tangent, w, u)
