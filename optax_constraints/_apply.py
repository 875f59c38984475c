"""Constraints on a parameter tree outside the optimizer: apply, measure, report."""

from __future__ import annotations

import math
from collections.abc import Hashable
from typing import Any

import jax
import jax.numpy as jnp

from optax_constraints._labels import shape_of
from optax_constraints._routing import Constraints, Route, normalize, route
from optax_constraints._transform import ProjectState, plan
from optax_constraints.constraints._sphere import MissingStateError
from optax_constraints.projections import compute_dtype

PyTree = Any


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

    Use it on freshly initialised parameters so training starts feasible, or
    after loading a checkpoint. Low-precision leaves are projected in float32
    and rounded once.

    Args:
      params: the parameter pytree.
      constraints: as for `project`.
      param_labels: as for `project`.
      step: the step at which scheduled hyper-parameters are evaluated
        (default 0). After loading a checkpoint, pass the optimizer's step.
      state: the optimizer state (or its `oc.ProjectState`), for constraints
        whose set lives in `project`'s state (`oc.Sphere("init")`); without
        it they raise `ValueError` naming the leaf.
      param_specs: inside `jax.shard_map`, as for `project`.

    >>> import jax.numpy as jnp
    >>> import optax_constraints as oc
    >>> oc.apply_constraints({"w": jnp.array([-1.0, 2.0])}, oc.NonNeg())
    {'w': Array([0., 2.], dtype=float32)}
    """
    mapping, labels = normalize(constraints, param_labels)
    step = 0 if step is None else step
    states = None if state is None else project_states(state)
    flat, treedef = jax.tree.flatten(params)
    for r, c, _ in plan(params, mapping, labels, param_specs, check=True):
        w = flat[r.leaf.index]
        try:
            out = c.at_step(step)(w)
        except MissingStateError as err:
            w_state = _state(r, states, err)
            out, _ = c.apply(w.astype(compute_dtype(w.dtype)), w_state, jnp.asarray(step))
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

    Pure and jittable, cheap enough to log every step. The measure is each
    constraint's `violation(w)` (the norm excess for `MaxNorm`, the most
    negative entry for `NonNeg`, `max |w - C(w)|` by default), in the leaf's
    compute dtype. Inside `jax.shard_map` with `param_specs`, the global
    maximum, the same on every device.

    Args:
      params: the parameter pytree.
      constraints: as for `project`.
      param_labels: as for `project`.
      step: the step at which scheduled hyper-parameters are evaluated
        (default 0). While training, `project` used `ProjectState.count - 1`
        on its last update.
      state: as for `apply_constraints`.
      param_specs: inside `jax.shard_map`, as for `project`.

    >>> import jax.numpy as jnp
    >>> import optax_constraints as oc
    >>> params = {"kernel": jnp.array([[3.0], [4.0]]), "bias": jnp.array([-0.5])}
    >>> v = oc.constraint_violations(params, {"k": oc.MaxNorm(2.0), "b": oc.NonNeg()},
    ...                              {"kernel": "k", "bias": "b"})
    >>> {k: round(float(x), 3) for k, x in v.items()}
    {'b': 0.5, 'k': 3.0}
    """
    mapping, labels = normalize(constraints, param_labels)
    step = 0 if step is None else step
    states = None if state is None else project_states(state)
    out: dict[Hashable, jax.Array] = {}
    for r, c, split in plan(params, mapping, labels, param_specs, check=True):
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


def project_states(state: PyTree) -> dict[str, PyTree]:
    """The per-leaf constraint states of every `ProjectState` in an optimizer state."""
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
    """The leaf's state, for a constraint that raised `err` without it."""
    if states is not None and r.leaf.path_str in states:
        return states[r.leaf.path_str]
    where = f"the parameter at '{r.leaf.path_str}' (shape {shape_of(r.leaf.value)})"
    if states is not None:
        where += ": the state passed has no entry for this leaf; pass the state of the optimizer"
        where += " whose oc.project(...) constrains it"
    raise ValueError(f"{err} [{where}].") from None


def routing_report(params: PyTree, constraints: Constraints, param_labels=None) -> str:
    """A table of every leaf: path, shape, dtype, label, constraint and its view.

    Print it before training, as you would `model.summary()`, to see that every
    kernel and bias gets what you meant (unconstrained leaves show `-`). The
    `view` column (`Constraint.describe_leaf`) says how the constraint sees the
    leaf: units of a size, a matrix, or (`oc.Stacked`) copies of those. Raises
    the errors `project`'s `init` raises.

    Args:
      params: the parameter pytree (arrays or `jax.eval_shape` structs).
      constraints: as for `project`.
      param_labels: as for `project`.

    >>> import jax.numpy as jnp
    >>> import optax_constraints as oc
    >>> params = {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)}
    >>> print(oc.routing_report(params, {"k": oc.MaxNorm(3.0)}, {"kernel": "k", "bias": None}))
    path    shape   dtype    label  constraint                      view
    bias    (2,)    float32  -      -                               -
    kernel  (3, 2)  float32  'k'    MaxNorm(max_value=3.0, axis=0)  2 units of 3
    2 leaves, 1 constrained (6 of 8 values)
    """
    mapping, labels = normalize(constraints, param_labels)
    routes = route(params, mapping, labels)
    rows = [("path", "shape", "dtype", "label", "constraint", "view")]
    for r in routes:
        shape, c = shape_of(r.leaf.value), r.constraint
        dtype = getattr(r.leaf.value, "dtype", type(r.leaf.value).__name__)
        label = "-" if r.label is None else repr(r.label)
        shown, view = ("-", "-") if c is None else (repr(c), c.describe_leaf(shape))
        rows.append((r.leaf.path_str, str(shape), str(dtype), label, shown, view))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    constrained = [r for r in routes if r.constraint is not None]
    size = sum(math.prod(shape_of(r.leaf.value)) for r in constrained)
    total = sum(math.prod(shape_of(r.leaf.value)) for r in routes)
    lines.append(f"{len(routes)} leaves, {len(constrained)} constrained ({size} of {total} values)")
    return "\n".join(lines)
