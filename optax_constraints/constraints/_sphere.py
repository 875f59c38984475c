"""`Sphere`: every unit ON the sphere of a radius (nGPT, hyperspherical training)."""

# Hyper-parameters are values after `at_step`, which the types cannot say:
# pyright: reportArgumentType=false

from __future__ import annotations

from typing import Literal

import jax

from optax_constraints import projections as P
from optax_constraints._typing import HyperParam
from optax_constraints.constraints._base import check_number, is_python_number
from optax_constraints.constraints._basic import _NormConstraint


class MissingStateError(ValueError):
    """A constraint that keeps its set in `project`'s state was used without it."""


class Sphere(_NormConstraint):
    """Projects each unit onto the sphere `‖w‖ = radius`: `w * radius / ‖w‖`.

    The exact Euclidean projection per unit (unlike `UnitNorm`'s `1e-7`). An
    all-zero unit has no nearest point (all are equally near): it stays zero.
    With `radius="init"` each unit keeps the norm it had at `project`'s
    `init`, stored in its state; without that state (a direct call,
    `apply_constraints` without `state=`) it raises `MissingStateError`.

    Args:
      radius: a number (> 0), an array that broadcasts against the per-unit
        norms, a schedule, or `"init"`.
      axis: axes of one unit, as for `MaxNorm`.

    >>> import jax.numpy as jnp
    >>> import optax_constraints as oc
    >>> oc.Sphere(radius=2.0)(jnp.array([[3.0, 0.0], [4.0, 0.0]]))
    Array([[1.2, 0. ],
           [1.6, 0. ]], dtype=float32)
    """

    schedulable = ("radius",)
    _config_keys = ("radius", "axis")

    def __init__(self, radius: HyperParam | Literal["init"] = 1.0, axis: P.AxisSpec = 0):
        if isinstance(radius, str):
            if radius != "init":
                raise ValueError(
                    f"Sphere: radius must be a number > 0, an array, an Optax schedule or"
                    f" 'init' (each unit keeps its norm at project's init); got radius={radius!r}."
                )
        else:
            check_number("radius", radius, owner="Sphere")
            if is_python_number(radius) and not radius > 0:
                raise ValueError(
                    f"Sphere: radius must be > 0 (a zero radius would map every unit to"
                    f" zero); got radius={radius!r}."
                )
        self.radius = radius
        self.axis = P.canonical_axis(axis)

    def _check_stateless(self):
        if isinstance(self.radius, str):
            raise MissingStateError(
                f"{self!r} projects each unit onto the norm it had at project's init, which"
                " lives in project's state: pass state=opt_state (or the oc.ProjectState in"
                " it) to oc.apply_constraints / oc.constraint_violations, or give a number"
                " radius (e.g. oc.Sphere(1.0)) to use it without state"
            )

    def __call__(self, w):
        self._check_stateless()
        c = self.at_step(0)
        return P.sphere(w, c.radius, c.axis, self._axis_name)

    def init_state(self, w):
        """The per-unit norms of `w` for `radius="init"` (else `None`)."""
        return self._norms(w) if isinstance(self.radius, str) else None

    def apply(self, w, state, step):
        if not isinstance(self.radius, str):
            return super().apply(w, state, step)
        if state is None:
            self._check_stateless()
        return P.sphere(w, jax.lax.stop_gradient(state), self.axis, self._axis_name), state

    def on_leaf_axes(self, axes, ndim):
        # The radii of "init" are per copy: wrappers map over the copies.
        return None if isinstance(self.radius, str) else super().on_leaf_axes(axes, ndim)

    def violation(self, w):
        """`max |w - C(w)|`: for each unit, at most `|‖w‖ - radius|`; 0 on the sphere."""
        self._check_stateless()
        return super().violation(w)

    def tangent(self, w, u):
        """Per unit, `u - <u, w> w / ‖w‖²` (the same for every radius)."""
        return P.sphere_tangent(w, u, self.axis, self._axis_name)
