"""The Optax glue: `project` (a `GradientTransformation`) and `apply_constraints`."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_constraints._routing import Constraints, Route, normalize, route
from optax_constraints._shard_map import leaf_specs, on_leaf
from optax_constraints.constraints._sphere import MissingStateError
from optax_constraints.projections import compute_dtype

PyTree = Any

NO_PARAMS_MSG = (
    "You are using a transformation that requires the current value of"
    " parameters, but you are not passing `params` when calling `update`."
)
"""The error text when `update` gets no `params` (optax's own wording)."""


class ProjectState(NamedTuple):
    """State of `project`.

    Attributes:
      count: number of `update` calls so far (int32); schedules read it.
      constraint_states: per-leaf state of stateful constraints, keyed by the
        leaf's "/"-joined path (empty when every constraint is stateless).

    >>> import jax.numpy as jnp
    >>> import optax_constraints as oc
    >>> params = {"dense": {"kernel": jnp.ones((4, 3))}}
    >>> state = oc.project(oc.SpectralNorm(1.0)).init(params)
    >>> int(state.count), list(state.constraint_states)
    (0, ['dense/kernel'])
    >>> oc.project(oc.MaxNorm(1.0)).init(params).constraint_states
    {}
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

    `update(updates, state, params)` returns `u'` such that
    `optax.apply_updates(params, u')` equals `C(params + updates)` (up to
    rounding) for every constrained leaf, where `C` is the leaf's constraint;
    unconstrained leaves' updates come back untouched. This is what Keras's
    `fit()` does with `kernel_constraint=...`, expressed as an update, so it
    chains with any Optax optimizer. **Put it last in `optax.chain`**: anything
    after it changes the update and can leave the feasible set.

    Args:
      constraints: mapping label -> constraint (an `oc.Constraint`, a name or
        config `oc.get` accepts, any callable `w -> w`, or `None`). A single
        constraint with `param_labels=None` applies to every leaf.
      param_labels: pytree of labels with the params' structure (or a prefix
        of it; `None` leaves are unconstrained), or a callable
        `params -> labels` such as `oc.label_by_path(...)`.
      every_k_steps: project on the k-th, 2k-th, ... update (counting from 1)
        and pass updates through unchanged otherwise.
      param_specs: for an `update` that runs inside `jax.shard_map`: the
        params' `PartitionSpec`s (a pytree prefix, the `in_specs` you gave
        `shard_map`). Each leaf is then the local block of a global parameter,
        and the result equals the global projection (norms are `psum`med over
        the mesh axes that split a unit; matrix and custom constraints see
        the all-gathered leaf). Call `init` on the global params as usual.

    Returns:
      An `optax.GradientTransformation` with state `ProjectState`.

    Labels are checked once, in `init`: a label missing from `constraints`, a
    labels tree that does not fit, an axis out of range or a non-float leaf
    raise `ValueError` naming the leaf's path and shape. Inside `shard_map`
    without `param_specs`, a constraint that reduces over a leaf split over
    the mesh raises `ValueError` at trace time (elementwise ones need nothing).

    Inside `optax.MultiSteps` the projection lands only on the steps that emit
    an update (Keras projects after every micro-batch step).

    >>> import jax.numpy as jnp
    >>> import numpy as np
    >>> import optax
    >>> import optax_constraints as oc
    >>> params = {"kernel": jnp.array([[3.0], [4.0]]), "bias": jnp.array([-1.0])}
    >>> tx = optax.chain(
    ...     optax.sgd(0.1),
    ...     oc.project({"k": oc.MaxNorm(1.0), "b": oc.NonNeg()},
    ...                {"kernel": "k", "bias": "b"}),
    ... )
    >>> state = tx.init(params)
    >>> grads = {"kernel": jnp.zeros((2, 1)), "bias": jnp.ones(1)}
    >>> updates, state = tx.update(grads, state, params)
    >>> new = optax.apply_updates(params, updates)
    >>> np.asarray(new["kernel"], np.float64).round(4).tolist(), new["bias"].tolist()
    ([[0.6], [0.8]], [0.0])
    """
    mapping, labels = normalize(constraints, param_labels)
    if not (isinstance(every_k_steps, int) and every_k_steps >= 1):
        raise ValueError(f"project: every_k_steps must be an int >= 1; got {every_k_steps!r}.")

    def init_fn(params):
        states = {}
        for r, c, _ in _plan(params, mapping, labels, param_specs, check=True):
            s = c.init_state(jnp.asarray(r.leaf.value))
            if s is not None:
                states[r.leaf.path_str] = s
        return ProjectState(jnp.zeros([], jnp.int32), states)

    def update_fn(updates, state, params=None):
        flat_updates, treedef, flat_params = flatten_pair(updates, params, "project")
        plan = _plan(params, mapping, labels, param_specs, check=False)

        def projected(operands):
            us, states = operands[0], dict(operands[1])
            out = []
            for (r, c, _), u in zip(plan, us, strict=True):
                key = r.leaf.path_str
                p = flat_params[r.leaf.index]
                new_u, s = c.project_update(p, u, states.get(key), state.count)
                out.append(new_u)
                if key in states:
                    states[key] = s
            return out, states

        operands = ([flat_updates[r.leaf.index] for r, _, _ in plan], state.constraint_states)
        if every_k_steps == 1:
            projected_u, states = projected(operands)
        else:
            due = (state.count + 1) % every_k_steps == 0
            projected_u, states = jax.lax.cond(due, projected, lambda ops: ops, operands)
        for (r, _, _), u in zip(plan, projected_u, strict=True):
            flat_updates[r.leaf.index] = u
        new_count: jax.Array = optax.safe_int32_increment(state.count)  # pyright: ignore[reportAssignmentType]  (an int32 Array)
        return jax.tree.unflatten(treedef, flat_updates), ProjectState(new_count, states)

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


def _plan(params, mapping, labels, param_specs, *, check: bool):
    """`(route, constraint as this trace runs it, split mesh axes)` per constrained leaf."""
    routes = route(params, mapping, labels, check=check)
    specs = leaf_specs(params, param_specs, routes)
    return [(r, *on_leaf(r, specs.get(r.leaf.index))) for r in routes if r.constraint is not None]


def project_states(state: PyTree) -> dict[str, PyTree]:
    """The per-leaf constraint states in an optimizer state, keyed by leaf path.

    `state` is the state of an optimizer that contains `oc.project(...)`
    (anywhere in a chain, `multi_transform`, `inject_hyperparams`, ...) or
    that `ProjectState` itself; several `ProjectState`s are merged.

    >>> import jax.numpy as jnp, optax
    >>> import optax_constraints as oc
    >>> tx = optax.chain(optax.sgd(0.1), oc.project(oc.Sphere("init")))
    >>> project_states(tx.init({"w": jnp.ones((2, 3))}))["w"].shape  # one norm per unit
    (1, 3)
    """
    found = [
        x
        for x in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, ProjectState))
        if isinstance(x, ProjectState)
    ]
    if not found:
        raise ValueError(
            f"state= has no oc.ProjectState in it (got {type(state).__name__}): pass the"
            " state of an optimizer that contains oc.project(...) (the opt_state its init"
            " returned and update keeps returning), or the ProjectState itself."
        )
    return {k: v for s in found for k, v in s.constraint_states.items()}


def _state(r: Route, states: dict | None, err: Exception) -> PyTree:
    """The leaf's state for a constraint that raised `err` without it."""
    if states is None or r.leaf.path_str not in states:
        where = f"the parameter at '{r.leaf.path_str}' (shape {tuple(jnp.shape(r.leaf.value))})"
        more = (
            ""
            if states is None
            else ": the state passed has no entry for this leaf; pass the state of the"
            " optimizer whose oc.project(...) constrains it"
        )
        raise ValueError(f"{err} [{where}]{more}.") from None
    return states[r.leaf.path_str]


def apply_constraints(
    params: PyTree,
    constraints: Constraints,
    param_labels: PyTree | None = None,
    *,
    step: int | jax.Array | None = None,
    state: PyTree | None = None,
    param_specs: PyTree | None = None,
) -> PyTree:
    """Projects a parameter tree directly: each constrained leaf `w` -> `C(w)`.

    Use it once on freshly initialised parameters so training starts
    feasible, or after loading a checkpoint. Low-precision leaves are projected
    in float32 and rounded once. Stateful constraints use their exact form
    (`__call__`); one whose set lives in `project`'s state
    (`Sphere("init")`) uses the leaf's state from `state=`.

    Args:
      params: the parameter pytree.
      constraints: as for `project`.
      param_labels: as for `project`.
      step: the step at which scheduled hyper-parameters are evaluated
        (`constraint.at_step(step)`); default 0, the schedule's start. After
        loading a checkpoint, pass the optimizer's step (e.g.
        `ProjectState.count`) to project onto the bound training had reached.
      state: the optimizer state (or the `oc.ProjectState` in it), for
        constraints whose set lives in `project`'s state (`oc.Sphere("init")`:
        the per-unit norms at `init`); without it they raise `ValueError`
        naming the leaf.
      param_specs: inside `jax.shard_map`, as for `project`.

    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_constraints as oc
    >>> oc.apply_constraints({"w": jnp.array([-1.0, 2.0])}, oc.NonNeg())
    {'w': Array([0., 2.], dtype=float32)}
    >>> shrinking = oc.MaxNorm(optax.linear_schedule(4.0, 1.0, 100), axis=None)
    >>> out = oc.apply_constraints({"w": jnp.array([3.0, 0.0])}, shrinking, step=100)
    >>> round(float(jnp.linalg.norm(out["w"])), 4)  # the bound at step 100
    1.0
    """
    mapping, labels = normalize(constraints, param_labels)
    step = 0 if step is None else step
    states = None if state is None else project_states(state)
    flat, treedef = jax.tree.flatten(params)
    for r, c, _ in _plan(params, mapping, labels, param_specs, check=True):
        w = flat[r.leaf.index]
        try:
            out = c.at_step(step)(w)
        except MissingStateError as err:
            state_of_leaf = _state(r, states, err)
            out, _ = c.apply(w.astype(compute_dtype(w.dtype)), state_of_leaf, jnp.asarray(step))
        flat[r.leaf.index] = out.astype(w.dtype)
    return jax.tree.unflatten(treedef, flat)


def constraint_violations(
    params: PyTree,
    constraints: Constraints,
    param_labels: PyTree | None = None,
    *,
    step: int | jax.Array | None = None,
    state: PyTree | None = None,
    param_specs: PyTree | None = None,
) -> dict[Hashable, jax.Array]:
    """Per label, the largest violation over its leaves (0 when feasible).

    Pure and jittable: cheap enough to log every step. The measure is each
    constraint's `violation(w)`: the norm excess for `MaxNorm`, the most
    negative entry for `NonNeg`, `max |w - C(w)|` by default (with `C` applied
    with the leaf's state for `Sphere("init")`). It is computed
    in the leaf's compute dtype (float32 for float32 and lower precision,
    float64 for float64 leaves under `jax_enable_x64`). Inside
    `jax.shard_map` with `param_specs`, it is the global maximum, the same on
    every device.

    Args:
      params: the parameter pytree.
      constraints: as for `project`.
      param_labels: as for `project`.
      step: the step at which scheduled hyper-parameters are evaluated;
        default 0, the schedule's start. While training, pass the
        optimizer's step count (the value `project` used on the last update
        is `ProjectState.count - 1`).
      state: as for `apply_constraints`.
      param_specs: inside `jax.shard_map`, as for `project`.

    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_constraints as oc
    >>> params = {"kernel": jnp.array([[3.0], [4.0]]), "bias": jnp.array([-0.5])}
    >>> v = oc.constraint_violations(params, {"k": oc.MaxNorm(2.0), "b": oc.NonNeg()},
    ...                              {"kernel": "k", "bias": "b"})
    >>> {k: round(float(x), 3) for k, x in v.items()}
    {'b': 0.5, 'k': 3.0}
    >>> shrinking = oc.MaxNorm(optax.linear_schedule(6.0, 1.0, 100))
    >>> at = lambda s: float(oc.constraint_violations(params, shrinking, step=s)["__all__"])
    >>> at(0), at(100)
    (0.0, 4.0)
    """
    mapping, labels = normalize(constraints, param_labels)
    step = 0 if step is None else step
    states = None if state is None else project_states(state)
    out: dict[Hashable, jax.Array] = {}
    for r, c, split in _plan(params, mapping, labels, param_specs, check=True):
        w = jnp.asarray(r.leaf.value)
        w = w.astype(compute_dtype(w.dtype))
        try:
            v = jnp.asarray(c.at_step(step).violation(w), w.dtype)
        except MissingStateError as err:
            projected, _ = c.apply(w, _state(r, states, err), jnp.asarray(step))
            v = jnp.max(jnp.abs(projected - w), initial=0.0)
        if split:
            v = jax.lax.pmax(v, split)
        out[r.label] = jnp.maximum(out[r.label], v) if r.label in out else v
    return dict(sorted(out.items(), key=lambda kv: repr(kv[0])))
