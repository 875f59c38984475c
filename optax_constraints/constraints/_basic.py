"""Keras's four constraints (same names, configs and float32 numerics), `Clip`, `CenterAround`."""

# Hyper-parameters are values after `at_step`, which the types cannot say:
# pyright: reportArgumentType=false

from __future__ import annotations

import copy
import math

import jax.numpy as jnp

from optax_constraints import projections as P
from optax_constraints._typing import HyperParam
from optax_constraints.constraints._base import (
    Constraint,
    _hashable,
    as_float,
    check_number,
    check_order,
)


class _AxisConstraint(Constraint):
    """A constraint whose `axis` names the axes of one unit."""

    axis: P.AxisSpec

    def check_leaf(self, shape, dtype):
        P.resolve_axis(self.axis, len(shape))

    def on_leaf_axes(self, axes, ndim):
        # A unit of a copy is the same slice of the leaf, over the leaf's axes.
        unit = tuple(sorted(axes[a] for a in P.resolve_axis(self.axis, len(axes))))
        return type(self).from_config({**self.get_config(), "axis": list(unit)})

    def describe_leaf(self, shape):
        unit = P.resolve_axis(self.axis, len(shape))
        size = math.prod(shape[a] for a in unit)
        units = math.prod(n for a, n in enumerate(shape) if a not in unit)
        return f"{units} unit{'s' if units != 1 else ''} of {size}"

    def _key(self):
        # `axis=0` and `axis=(0,)` name the same units: equal, same hash.
        axis = (self.axis,) if isinstance(self.axis, int) else self.axis
        return (type(self), _hashable({**self.get_config(), "axis": axis}))


class _NormConstraint(_AxisConstraint):
    """Rescales each unit by a function of its norm (sums `psum`med over `_axis_name`)."""

    _axis_name: tuple[str, ...] | None = None

    def on_shards(self, spec):
        unit = P.resolve_axis(self.axis, len(spec))
        local = copy.copy(self)
        local._axis_name = tuple(name for a in unit for name in spec[a]) or None
        return local

    def at_step(self, step):
        out = super().at_step(step)
        if out is not self:
            out._axis_name = self._axis_name
        return out

    def _norms(self, w):
        return P.unit_norms(as_float(w), self.axis, self._axis_name)


class MaxNorm(_NormConstraint):
    """Caps the norm of each unit at `max_value`: Keras's `MaxNorm`.

    `w * clip(norms, 0, max_value) / (1e-7 + norms)`, the norms taken over
    `axis` (`axis="fan_in"`: per output unit of a Dense or Conv kernel).

    Args:
      max_value: largest norm per unit (>= 0; number, array or schedule).
      axis: int, tuple/list of ints, negative ints, `None` or `"fan_in"`.

    >>> import jax.numpy as jnp
    >>> import numpy as np
    >>> import optax_constraints as oc
    >>> np.asarray(oc.MaxNorm(max_value=1.0)(jnp.array([[3.0, 0.5], [4.0, 0.0]])), np.float64).round(4).tolist()
    [[0.6, 0.5], [0.8, 0.0]]
    """

    schedulable = ("max_value",)
    _config_keys = ("max_value", "axis")

    def __init__(self, max_value: HyperParam = 2, axis: P.AxisSpec = 0):
        check_number("max_value", max_value, low=0, owner="MaxNorm")
        self.max_value = max_value
        self.axis = P.canonical_axis(axis)

    def __call__(self, w):
        c = self.at_step(0)
        return P.max_norm(w, c.max_value, c.axis, self._axis_name)

    def violation(self, w):
        """The largest amount by which a unit's norm exceeds `max_value`."""
        c = self.at_step(0)
        return jnp.max(jnp.maximum(c._norms(w) - c.max_value, 0), initial=0.0)

    def tangent(self, w, u):
        """The ball's tangent cone: on the boundary, the outward radial part removed."""
        c = self.at_step(0)
        return P.ball_tangent(w, u, c.max_value, c.axis, axis_name=self._axis_name)


class MinMaxNorm(_NormConstraint):
    """Keeps the norm of each unit in `[min_value, max_value]`: Keras's `MinMaxNorm`.

    The norm moves to `rate * clip(norm, min_value, max_value) + (1 - rate) * norm`.

    Args:
      min_value: smallest norm per unit (>= 0).
      max_value: largest norm per unit (>= min_value).
      rate: in `[0, 1]`.
      axis: axes of one unit.

    >>> import jax.numpy as jnp
    >>> import numpy as np
    >>> import optax_constraints as oc
    >>> c = oc.MinMaxNorm(min_value=1.0, max_value=2.0)
    >>> np.asarray(jnp.linalg.norm(c(jnp.array([[0.3, 6.0], [0.4, 8.0]])), axis=0), np.float64).round(4).tolist()
    [1.0, 2.0]
    """

    schedulable = ("min_value", "max_value", "rate")
    _config_keys = ("min_value", "max_value", "rate", "axis")

    def __init__(
        self,
        min_value: HyperParam = 0.0,
        max_value: HyperParam = 1.0,
        rate: HyperParam = 1.0,
        axis: P.AxisSpec = 0,
    ):
        check_number("min_value", min_value, low=0, owner="MinMaxNorm")
        check_number("max_value", max_value, low=0, owner="MinMaxNorm")
        check_number("rate", rate, low=0, high=1, owner="MinMaxNorm")
        check_order("MinMaxNorm", min_value, max_value)
        self.min_value = min_value
        self.max_value = max_value
        self.rate = rate
        self.axis = P.canonical_axis(axis)

    def __call__(self, w):
        c = self.at_step(0)
        return P.min_max_norm(w, c.min_value, c.max_value, c.rate, c.axis, self._axis_name)

    def violation(self, w):
        """The largest distance of a unit's norm from `[min_value, max_value]`."""
        c = self.at_step(0)
        norms = c._norms(w)
        gap = jnp.maximum(c.min_value - norms, norms - c.max_value)
        return jnp.max(jnp.maximum(gap, 0), initial=0.0)

    def tangent(self, w, u):
        """The shell's tangent cone: the outward (outer sphere) or inward part removed."""
        c = self.at_step(0)
        return P.ball_tangent(
            w, u, c.max_value, c.axis, min_value=c.min_value, axis_name=self._axis_name
        )


class UnitNorm(_NormConstraint):
    """Scales each unit to unit norm: Keras's `UnitNorm`, `w / (1e-7 + norms)`.

    >>> import jax.numpy as jnp
    >>> import optax_constraints as oc
    >>> oc.UnitNorm()(jnp.array([[3.0, 0.0], [4.0, 0.0]]))
    Array([[0.6, 0. ],
           [0.8, 0. ]], dtype=float32)
    """

    _config_keys = ("axis",)

    def __init__(self, axis: P.AxisSpec = 0):
        self.axis = P.canonical_axis(axis)

    def __call__(self, w):
        return P.unit_norm(w, self.axis, self._axis_name)

    def tangent(self, w, u):
        """Per unit, `u - <u, w> w / ‖w‖²` (a zero unit's update unchanged)."""
        return P.sphere_tangent(w, u, self.axis, self._axis_name)


class NonNeg(Constraint):
    """Constrains the weights to be non-negative: `maximum(w, 0)`, Keras's `NonNeg`.

    After `project`'s update and `optax.apply_updates` no element is below zero.

    >>> import jax.numpy as jnp
    >>> import optax_constraints as oc
    >>> oc.NonNeg()(jnp.array([-1.0, 0.5]))
    Array([0. , 0.5], dtype=float32)
    """

    elementwise = True

    def __call__(self, w):
        return P.non_neg(w)

    def project_update(self, param, update, state, step):
        # p + (-p) is exactly +0.0 in IEEE arithmetic; p + u > 0 stays > 0 when
        # optax.apply_updates casts it to the param dtype.
        return jnp.where(param + update <= 0, -param, update), state

    def violation(self, w):
        return jnp.maximum(-jnp.min(as_float(w), initial=0), 0)

    def tangent(self, w, u):
        """Where `w <= 0`, a negative update component is dropped."""
        return P.box_tangent(w, u, 0.0)


class Clip(Constraint):
    """Elementwise box: every weight in `[min_value, max_value]` (`None`: unbounded).

    >>> import jax.numpy as jnp
    >>> import optax_constraints as oc
    >>> oc.Clip(-1.0, 1.0)(jnp.array([-3.0, 0.25, 2.0]))
    Array([-1.  ,  0.25,  1.  ], dtype=float32)
    """

    schedulable = ("min_value", "max_value")
    _config_keys = ("min_value", "max_value")
    elementwise = True

    def __init__(self, min_value: HyperParam | None = None, max_value: HyperParam | None = None):
        for name, value in (("min_value", min_value), ("max_value", max_value)):
            if value is not None:
                check_number(name, value, owner="Clip")
        check_order("Clip", min_value, max_value)
        self.min_value = min_value
        self.max_value = max_value

    def __call__(self, w):
        c = self.at_step(0)
        return P.clip(w, c.min_value, c.max_value)

    def tangent(self, w, u):
        """At a bound, the update component pointing out of the box is dropped."""
        c = self.at_step(0)
        return P.box_tangent(w, u, c.min_value, c.max_value)


class CenterAround(Constraint):
    """Shifts the weights so their mean is `ref_value` (the Keras guide's example).

    >>> import jax.numpy as jnp
    >>> import optax_constraints as oc
    >>> oc.CenterAround(1.0)(jnp.array([0.0, 4.0]))
    Array([-1.,  3.], dtype=float32)
    """

    schedulable = ("ref_value",)
    _config_keys = ("ref_value",)

    def __init__(self, ref_value: HyperParam = 0.0):
        check_number("ref_value", ref_value, owner="CenterAround")
        self.ref_value = ref_value

    def __call__(self, w):
        return P.center_around(w, self.at_step(0).ref_value)

    def tangent(self, w, u):
        """The sum-zero plane: `u - mean(u)` over the whole leaf."""
        return P.sum_zero_tangent(w, u, None)


max_norm = MaxNorm
min_max_norm = MinMaxNorm
non_neg = NonNeg
unit_norm = UnitNorm
