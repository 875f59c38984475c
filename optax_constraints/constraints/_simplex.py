"""Per-unit L1 ball and simplex constraints (beyond Keras)."""

# Hyper-parameters are values after `at_step`, which the types cannot say:
# pyright: reportArgumentType=false

from __future__ import annotations

import jax.numpy as jnp

from optax_constraints import projections as P
from optax_constraints._typing import HyperParam
from optax_constraints.constraints._base import as_float, check_number, is_python_number
from optax_constraints.constraints._basic import _AxisConstraint


class L1Ball(_AxisConstraint):
    """Caps the L1 norm of each unit at `max_value` (sparsifying).

    The Euclidean projection onto :math:`\\{w : \\|w\\|_1 \\le m\\}` per unit:
    soft-thresholding :math:`\\operatorname{sign}(w)\\max(|w| - \\theta, 0)`
    with the smallest :math:`\\theta \\ge 0` that makes the unit feasible.

    Args:
      max_value: the radius :math:`m \\ge 0` (number, array or schedule).
      axis: axes of one unit, as for `MaxNorm`.

    >>> import jax.numpy as jnp
    >>> import optax_constraints as oc
    >>> oc.L1Ball(max_value=1.0)(jnp.array([[3.0, 0.2], [1.0, -0.3]]))
    Array([[ 1. ,  0.2],
           [ 0. , -0.3]], dtype=float32)
    """

    schedulable = ("max_value",)
    _config_keys = ("max_value", "axis")

    def __init__(self, max_value: HyperParam = 1.0, axis: P.AxisSpec = 0):
        check_number("max_value", max_value, low=0, owner="L1Ball")
        self.max_value = max_value
        self.axis = P.canonical_axis(axis)

    def __call__(self, w):
        c = self.at_step(0)
        return P.l1_ball(w, c.max_value, c.axis)

    def violation(self, w):
        """The largest amount by which a unit's L1 norm exceeds `max_value`."""
        c = self.at_step(0)
        w = as_float(w)
        l1 = jnp.sum(jnp.abs(w), axis=P.resolve_axis(c.axis, w.ndim))
        return jnp.max(jnp.maximum(l1 - c.max_value, 0), initial=0.0)


class Simplex(_AxisConstraint):
    """Makes each unit non-negative with entries summing to `scale`.

    The Euclidean projection onto :math:`\\{w : w \\ge 0, \\sum_i w_i = s\\}`
    per unit: :math:`\\max(w - \\theta, 0)` with the threshold
    :math:`\\theta` that makes the unit sum to :math:`s` (a zero unit becomes uniform).

    Args:
      scale: the sum :math:`s > 0` of each unit (number, array or schedule).
      axis: axes of one unit, as for `MaxNorm`.

    >>> import jax.numpy as jnp
    >>> import optax_constraints as oc
    >>> oc.Simplex()(jnp.array([[0.5, 0.0], [2.0, 0.0]]))
    Array([[0. , 0.5],
           [1. , 0.5]], dtype=float32)
    """

    schedulable = ("scale",)
    _config_keys = ("scale", "axis")

    def __init__(self, scale: HyperParam = 1.0, axis: P.AxisSpec = 0):
        check_number("scale", scale, owner="Simplex")
        if is_python_number(scale) and not scale > 0:
            raise ValueError(f"Simplex: scale must be > 0; got scale={scale!r}.")
        self.scale = scale
        self.axis = P.canonical_axis(axis)

    def __call__(self, w):
        c = self.at_step(0)
        return P.simplex(w, c.scale, c.axis)

    def violation(self, w):
        """The larger of the most negative entry and the worst `|sum - scale|`."""
        c = self.at_step(0)
        w = as_float(w)
        total = jnp.sum(w, axis=P.resolve_axis(c.axis, w.ndim))
        negative = jnp.maximum(-jnp.min(w, initial=0.0), 0)
        return jnp.maximum(negative, jnp.max(jnp.abs(total - c.scale), initial=0.0))

    def tangent(self, w, u):
        """Per unit, the sum-zero plane `u - mean(u)`; the faces `w >= 0` are left to `project`."""
        return P.sum_zero_tangent(w, u, self.axis)
