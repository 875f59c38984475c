"""`tangent`: each constrained leaf's update moved into its set's tangent space."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_constraints._routing import Constraints, normalize, route
from optax_constraints._transform import flatten_pair, plan

PyTree = Any


class TangentState(NamedTuple):
    """State of `tangent`: the number of `update` calls (schedules read it).

    >>> import jax.numpy as jnp
    >>> import optax_constraints as oc
    >>> int(oc.tangent(oc.Sphere()).init({"w": jnp.ones((2, 2))}).count)
    0
    """

    count: jax.Array  # pyright: ignore[reportIncompatibleMethodOverride]  (as in optax's states)


def tangent(
    constraints: Constraints,
    param_labels: PyTree | None = None,
    *,
    param_specs: PyTree | None = None,
) -> optax.GradientTransformation:
    """Moves each constrained leaf's update into the tangent space of its set.

    For every constrained leaf, `update(updates, state, params)` returns the
    Euclidean projection of its update onto the tangent space (or cone) of the
    constraint's set at the leaf's value, `Constraint.tangent(w, u)`:

    * `Sphere`, `UnitNorm`: per unit, `u - <u, w> w / ‖w‖²`;
    * `Orthogonal`: the Stiefel manifold's, `U - W sym(WᵀU)`;
    * `Simplex` (per unit), `CenterAround`: the sum-zero plane, `u - mean(u)`;
    * `MaxNorm`, `MinMaxNorm`, `NonNeg`, `Clip`: the tangent cone (the
      outward part removed on the boundary).

    Other leaves' updates pass through. Labels are routed as `project` routes
    them; `init` raises `ValueError` naming each leaf whose constraint defines
    no tangent space. Before the optimizer, `chain(tangent(c), adam(...),
    project(c))` is Riemannian Adam on the gradients; just before `project`,
    `chain(adam(...), tangent(c), project(c))` projects the step (hyperball
    Adam; docs/manifolds.md compares them). `project`, the retraction, stays last.
    bfloat16/float16 updates are computed in float32 and keep their dtype.

    Args:
      constraints: as for `project`.
      param_labels: as for `project`.
      param_specs: inside `jax.shard_map`, as for `project`.

    Returns:
      An `optax.GradientTransformation` whose state is a `TangentState`.

    >>> import jax.numpy as jnp
    >>> import optax_constraints as oc
    >>> params = {"w": jnp.array([[1.0], [0.0]])}
    >>> tx = oc.tangent(oc.Sphere())
    >>> u, _ = tx.update({"w": jnp.array([[2.0], [3.0]])}, tx.init(params), params)
    >>> u["w"].tolist()  # the radial part is gone
    [[0.0], [3.0]]

    References:
      Absil, Mahony & Sepulchre, Optimization Algorithms on Matrix Manifolds,
      Princeton University Press, 2008 (sections 3.6 and 4.1).
    """
    mapping, labels = normalize(constraints, param_labels)

    def init_fn(params):
        for r in route(params, mapping, labels, check=True):
            if r.constraint is None:
                continue
            leaf = jax.ShapeDtypeStruct(jnp.shape(r.leaf.value), r.leaf.value.dtype)
            try:
                jax.eval_shape(r.constraint.tangent, leaf, leaf)
            except NotImplementedError:
                raise ValueError(
                    f"oc.tangent: {r.constraint!r} defines no tangent space, for the parameter"
                    f" at '{r.leaf.path_str}' (shape {leaf.shape}, label {r.label!r}). Route"
                    " this leaf to None in tangent's labels (its update then passes through;"
                    " project still constrains it), or give the constraint a"
                    " `tangent(self, w, u)` method returning u moved into the tangent space at w."
                ) from None
        return TangentState(jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None):
        flat_updates, treedef, flat_params = flatten_pair(updates, params, "tangent")
        for r, c, _ in plan(params, mapping, labels, param_specs, check=False):
            i = r.leaf.index
            u = flat_updates[i]
            flat_updates[i] = c.at_step(state.count).tangent(flat_params[i], u).astype(u.dtype)
        count: jax.Array = optax.safe_int32_increment(state.count)  # pyright: ignore[reportAssignmentType]  (an int32 Array)
        return jax.tree.unflatten(treedef, flat_updates), TangentState(count)

    return optax.GradientTransformation(init_fn, update_fn)
