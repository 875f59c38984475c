"""`Sphere`: every unit ON the sphere of a radius (nGPT, hyperspherical training)."""

# Hyper-parameters are `HyperParam` (value or schedule) in the signatures and
# values after `at_step`, which the types cannot say:
# pyright: reportArgumentType=false

from __future__ import annotations

from typing import Literal

import jax

from optax_constraints import projections as P
from optax_constraints._typing import HyperParam
from optax_constraints.constraints._base import check_number, is_python_number
from optax_constraints.constraints._basic import _config_axis, _NormConstraint

INIT = "init"


class MissingStateError(ValueError):
    """A constraint that keeps its set in `project`'s state was used without it."""


class Sphere(_NormConstraint):
    """Projects each unit onto the sphere `‖w‖ = radius`: `w * radius / ‖w‖`.

    The exact Euclidean projection, per unit over `axis` (for a Dense kernel
    `(in, out)`, `axis=0` is one norm per output unit; `axis="fan_in"` the
    same for Conv kernels; `None` the whole array). Unlike `UnitNorm`
    (Keras's `w / (1e-7 + ‖w‖)`), the result is on the sphere to rounding.
    An all-zero unit has no nearest point on the sphere (all points are
    equally near): it stays zero, with a zero gradient (see
    `projections.sphere`).

    `radius` may be

    * a number (> 0), an array that broadcasts against the per-unit norms,
      or an Optax schedule of the step;
    * `"init"`: each unit keeps the norm it had when `project`'s `init` saw
      it (hyperball / hyperspherical training: the weights keep their
      initial scale). Those norms, one per unit (float32 for low-precision
      leaves; one set per copy under `oc.Stacked`), are `project`'s state
      for the leaf (`ProjectState.constraint_states`, checkpointed with the
      optimizer state). Called directly, or by `oc.apply_constraints` /
      `oc.constraint_violations` without `state=`, it raises
      `MissingStateError` (a `ValueError`) saying so.

    `oc.tangent` moves updates into the sphere's tangent space,
    `u - <u, w> w / ‖w‖²` per unit, before the projection retracts them.

    Args:
      radius: the norm of every unit: number, array, schedule or `"init"`.
      axis: axes of one unit: int, tuple/list of ints, negative ints, `None`
        or `"fan_in"`.

    >>> import jax.numpy as jnp
    >>> import numpy as np
    >>> import optax
    >>> import optax_constraints as oc
    >>> oc.Sphere(radius=2.0)(jnp.array([[3.0, 0.0], [4.0, 0.0]]))
    Array([[1.2, 0. ],
           [1.6, 0. ]], dtype=float32)

    Hyperball SGD: each kernel column stays at its initial norm.

    >>> params = {"kernel": jnp.array([[3.0, 1.0], [4.0, 0.0]])}
    >>> c = oc.Sphere("init")
    >>> tx = optax.chain(oc.tangent(c), optax.sgd(0.1), oc.project(c))
    >>> state = tx.init(params)
    >>> updates, state = tx.update({"kernel": jnp.ones((2, 2))}, state, params)
    >>> new = optax.apply_updates(params, updates)
    >>> np.asarray(jnp.linalg.norm(new["kernel"], axis=0), np.float64).round(4).tolist()
    [5.0, 1.0]

    References:
      Loshchilov, Hsieh, Sun & Ginsburg, nGPT: Normalized Transformer with
      Representation Learning on the Hypersphere, ICLR 2025. Absil, Mahony &
      Sepulchre, Optimization Algorithms on Matrix Manifolds, 2008.
    """

    schedulable = ("radius",)

    def __init__(self, radius: HyperParam | Literal["init"] = 1.0, axis: P.AxisSpec = 0):
        if isinstance(radius, str):
            if radius != INIT:
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

    @property
    def _from_init(self) -> bool:
        return isinstance(self.radius, str)

    def _need_state(self):
        raise MissingStateError(
            f"{self!r} projects each unit onto the norm it had at project's init, which"
            " lives in project's state: pass state=opt_state (or the oc.ProjectState in it)"
            " to oc.apply_constraints / oc.constraint_violations, or give a number radius"
            " (e.g. oc.Sphere(1.0)) to use it without state"
        )

    def __call__(self, w):
        if self._from_init:
            self._need_state()
        c = self.at_step(0)
        return P.sphere(w, c.radius, c.axis, self._axis_name)

    def get_config(self):
        return {"radius": self.radius, "axis": _config_axis(self.axis)}

    # -- "init": the radii are per-leaf state --------------------------------

    def init_state(self, w):
        """The per-unit norms of `w` for `radius="init"` (else `None`)."""
        if not self._from_init:
            return None
        return self._norms(w)

    def apply(self, w, state, step):
        if not self._from_init:
            return super().apply(w, state, step)
        if state is None:
            self._need_state()
        return P.sphere(w, jax.lax.stop_gradient(state), self.axis, self._axis_name), state

    def on_leaf_axes(self, axes, ndim):
        # The radii of "init" are per copy: wrappers map over the copies.
        return None if self._from_init else super().on_leaf_axes(axes, ndim)

    # -- monitoring and tangent ------------------------------------------------

    def violation(self, w):
        """`max |w - C(w)|`: for each unit, at most `|‖w‖ - radius|`; 0 on the sphere."""
        if self._from_init:
            self._need_state()
        return super().violation(w)

    def tangent(self, w, u):
        """Per unit, `u - <u, w> w / ‖w‖²` (the same for every radius)."""
        return P.sphere_tangent(w, u, self.axis, self._axis_name)
