"""`tangent`: each constrained leaf's update moved into its set's tangent space."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_constraints._routing import Constraints, Route, normalize, route
from optax_constraints._shard_map import leaf_specs, on_leaf
from optax_constraints._transform import flatten_pair

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

    `update(updates, state, params)` returns, for every constrained leaf,
    the Euclidean projection of its update onto the tangent space of the
    constraint's set at the leaf's current value (`Constraint.tangent`):

    * `Sphere`, `UnitNorm`: per unit, `u - <u, w> w / ‖w‖²` (a zero unit's
      update unchanged);
    * `Orthogonal`: the Stiefel manifold's, `U - W sym(WᵀU)` on the
      `(fan_in, out)` view (`U - sym(U Wᵀ) W` for a wide one);
    * `Simplex` (per unit) and `CenterAround` (whole leaf): the sum-zero
      plane, `u - mean(u)`;
    * `MaxNorm`, `MinMaxNorm`, `NonNeg`, `Clip`: the tangent cone, identity
      inside the set and the outward part removed on its boundary.

    Unconstrained leaves' updates pass through. The labels are routed exactly
    as `project` routes them, and checked at `init`, which also raises
    `ValueError` naming every leaf whose constraint defines no tangent space
    (`Constraint.tangent`). bfloat16/float16 updates are computed in float32
    and returned in their own dtype.

    Where it goes in `optax.chain`: **before the optimizer**,
    `chain(tangent(c), adam(...), project(c))`, it turns gradients into
    Riemannian gradients (Riemannian SGD); **just before `project`**,
    `chain(adam(...), tangent(c), project(c))`, it projects the step itself
    (hyperball Adam; docs/manifolds.md compares the two). `project` stays last either way: the
    tangent step leaves the set by second-order terms, which `project`
    (the retraction) takes back.

    Args:
      constraints: as for `project`: mapping label -> constraint, or one
        constraint for every leaf.
      param_labels: as for `project`.
      param_specs: inside `jax.shard_map`, as for `project`: per-unit inner
        products are `psum`med over the mesh axes that split a unit; matrix
        and sum-zero tangents see the assembled leaf.

    Returns:
      An `optax.GradientTransformation` with state `TangentState`.

    >>> import jax.numpy as jnp
    >>> import numpy as np
    >>> import optax
    >>> import optax_constraints as oc
    >>> params = {"w": jnp.array([[1.0], [0.0]])}
    >>> tx = oc.tangent(oc.Sphere())
    >>> u, _ = tx.update({"w": jnp.array([[2.0], [3.0]])}, tx.init(params), params)
    >>> u["w"].tolist()  # the radial part is gone
    [[0.0], [3.0]]

    References:
      Absil, Mahony & Sepulchre, Optimization Algorithms on Matrix Manifolds,
      Princeton University Press, 2008 (sections 3.6 and 4.1). Edelman,
      Arias & Smith, The Geometry of Algorithms with Orthogonality
      Constraints, SIAM J. Matrix Anal. Appl. 20(2), 1998.
    """
    mapping, labels = normalize(constraints, param_labels)

    def init_fn(params):
        for r in route(params, mapping, labels, check=True):
            if r.constraint is not None:
                _check_tangent(r)
        return TangentState(jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None):
        flat_updates, treedef, flat_params = flatten_pair(updates, params, "tangent")
        routes = route(params, mapping, labels, check=False)
        specs = leaf_specs(params, param_specs, routes)
        for r in routes:
            if r.constraint is not None:
                i = r.leaf.index
                u = flat_updates[i]
                c, _ = on_leaf(r, specs.get(i))
                flat_updates[i] = c.at_step(state.count).tangent(flat_params[i], u).astype(u.dtype)
        count: jax.Array = optax.safe_int32_increment(state.count)  # pyright: ignore[reportAssignmentType]  (an int32 Array)
        return jax.tree.unflatten(treedef, flat_updates), TangentState(count)

    return optax.GradientTransformation(init_fn, update_fn)


def _check_tangent(r: Route) -> None:
    """Raises `ValueError` naming the leaf if its constraint has no tangent hook."""
    leaf = jax.ShapeDtypeStruct(jnp.shape(r.leaf.value), r.leaf.value.dtype)
    try:
        jax.eval_shape(r.constraint.tangent, leaf, leaf)  # pyright: ignore[reportOptionalMemberAccess]
    except NotImplementedError:
        raise ValueError(
            f"oc.tangent: {r.constraint!r} defines no tangent space, for the parameter at"
            f" '{r.leaf.path_str}' (shape {tuple(leaf.shape)}, label {r.label!r}). Route"
            " this leaf to None in tangent's labels (its update then passes through;"
            " project still constrains it), or give the constraint a"
            " `tangent(self, w, u)` method returning u moved into the tangent space at w."
        ) from None
