"""`project`: the Optax `GradientTransformation` that keeps parameters feasible."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_constraints._routing import Constraints, normalize, route
from optax_constraints._shard_map import leaf_specs, on_leaf

PyTree = Any

NO_PARAMS_MSG = (
    "You are using a transformation that requires the current value of"
    " parameters, but you are not passing `params` when calling `update`."
)
"""The error text when `update` gets no `params` (optax's own wording)."""


class ProjectState(NamedTuple):
    """State of `project`: `count`, the number of `update` calls (schedules read
    it), and `constraint_states`, the stateful constraints' states by leaf path.

    >>> import jax.numpy as jnp
    >>> import optax_constraints as oc
    >>> state = oc.project(oc.SpectralNorm(1.0)).init({"dense": {"kernel": jnp.ones((4, 3))}})
    >>> int(state.count), list(state.constraint_states)
    (0, ['dense/kernel'])
    """

    count: jax.Array  # pyright: ignore[reportIncompatibleMethodOverride]  (as in optax's states)
    constraint_states: dict[str, PyTree]


def project(
    constraints: Constraints,
    param_labels: PyTree | None = None,
    *,
    every_k_steps: int = 1,
    param_specs: PyTree | None = None,
) -> optax.GradientTransformation:
    """Projects the parameters onto their constraints after each update.

    `update(updates, state, params)` returns `u'` with
    `optax.apply_updates(params, u') == C(params + updates)` (up to rounding)
    for every constrained leaf, `C` being the leaf's constraint; other leaves'
    updates pass through. This is Keras's `fit()` with `kernel_constraint=...`,
    as an update that chains with any Optax optimizer. **Put it last in
    `optax.chain`**: anything after it can leave the feasible set.

    Labels are checked once, in `init`: a label missing from `constraints`, a
    labels tree that does not fit, an axis out of range or a non-float leaf
    raise `ValueError` naming the leaf's path and shape.

    Args:
      constraints: mapping label -> constraint (an `oc.Constraint`, a name or
        config `oc.get` accepts, a callable `w -> w`, or `None`), or a single
        constraint for every leaf (with `param_labels=None`).
      param_labels: pytree of labels with the params' structure (or a prefix
        of it; `None` leaves are unconstrained), or a callable
        `params -> labels` such as `oc.label_by_path(...)`.
      every_k_steps: project on the k-th, 2k-th, ... update (counting from 1)
        and pass updates through otherwise.
      param_specs: when `update` runs inside `jax.shard_map`, the params'
        `PartitionSpec`s (the `in_specs` given to `shard_map`; a pytree
        prefix). The result then equals the global projection (docs/multihost.md).

    Returns:
      An `optax.GradientTransformation` whose state is a `ProjectState`.

    >>> import jax.numpy as jnp, optax
    >>> import optax_constraints as oc
    >>> params = {"kernel": jnp.array([[3.0], [4.0]]), "bias": jnp.array([-1.0])}
    >>> tx = optax.chain(
    ...     optax.sgd(0.1),
    ...     oc.project({"k": oc.MaxNorm(1.0), "b": oc.NonNeg()}, {"kernel": "k", "bias": "b"}),
    ... )
    >>> grads = {"kernel": jnp.zeros((2, 1)), "bias": jnp.ones(1)}
    >>> updates, _ = tx.update(grads, tx.init(params), params)
    >>> new = optax.apply_updates(params, updates)
    >>> [round(float(x), 4) for x in new["kernel"].ravel()], new["bias"].tolist()
    ([0.6, 0.8], [0.0])
    """
    mapping, labels = normalize(constraints, param_labels)
    if not (isinstance(every_k_steps, int) and every_k_steps >= 1):
        raise ValueError(f"project: every_k_steps must be an int >= 1; got {every_k_steps!r}.")

    def init_fn(params):
        states = {}
        for r, c, _ in plan(params, mapping, labels, param_specs, check=True):
            s = c.init_state(jnp.asarray(r.leaf.value))
            if s is not None:
                states[r.leaf.path_str] = s
        return ProjectState(jnp.zeros([], jnp.int32), states)

    def update_fn(updates, state, params=None):
        flat_updates, treedef, flat_params = flatten_pair(updates, params, "project")
        leaves = plan(params, mapping, labels, param_specs, check=False)

        def projected(operands):
            us, states = operands[0], dict(operands[1])
            for j, (r, c, _) in enumerate(leaves):
                key = r.leaf.path_str
                us[j], s = c.project_update(
                    flat_params[r.leaf.index], us[j], states.get(key), state.count
                )
                if key in states:
                    states[key] = s
            return us, states

        operands = ([flat_updates[r.leaf.index] for r, _, _ in leaves], state.constraint_states)
        if every_k_steps == 1:
            new_updates, states = projected(operands)
        else:
            due = (state.count + 1) % every_k_steps == 0
            new_updates, states = jax.lax.cond(due, projected, lambda ops: ops, operands)
        for (r, _, _), u in zip(leaves, new_updates, strict=True):
            flat_updates[r.leaf.index] = u
        count: jax.Array = optax.safe_int32_increment(state.count)  # pyright: ignore[reportAssignmentType]  (an int32 Array)
        return jax.tree.unflatten(treedef, flat_updates), ProjectState(count, states)

    return optax.GradientTransformation(init_fn, update_fn)


def flatten_pair(updates, params, owner: str):
    """`(flat updates, their treedef, flat params)`, checking `params` is given and fits."""
    if params is None:
        raise ValueError(NO_PARAMS_MSG)
    flat_updates, treedef = jax.tree.flatten(updates)
    flat_params = jax.tree.leaves(params)
    if len(flat_updates) != len(flat_params):
        raise ValueError(
            f"{owner}: updates have {len(flat_updates)} leaves but params have"
            f" {len(flat_params)}; pass the same structure for both."
        )
    return flat_updates, treedef, flat_params


def plan(params, mapping, labels, param_specs, *, check: bool):
    """`(route, constraint as this trace runs it, mesh axes splitting the leaf)` per constrained leaf."""
    routes = route(params, mapping, labels, check=check)
    specs = leaf_specs(params, param_specs, routes)
    return [(r, *on_leaf(r, specs.get(r.leaf.index))) for r in routes if r.constraint is not None]
