"""`apply_constraints` / `constraint_violations` with `project`'s state (`state=`).

A constraint whose set lives in `project`'s state (`oc.Sphere("init")`:
the per-unit norms seen at `init`) cannot be applied from its config
alone; it raises `MissingStateError`. These helpers find the state for a
leaf in the optimizer state the user passes and use it, or name the leaf
in the error.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from optax_constraints._routing import Route
from optax_constraints.constraints._base import Constraint
from optax_constraints.constraints._sphere import MissingStateError
from optax_constraints.projections import compute_dtype

PyTree = Any


def constraint_states(state: PyTree) -> dict[str, PyTree]:
    """The per-leaf constraint states in an optimizer state, keyed by leaf path.

    `state` is the state of an optimizer that contains `oc.project(...)`
    (anywhere in a chain, `multi_transform`, `inject_hyperparams`, ...) or
    that `oc.ProjectState` itself. Several `ProjectState`s (one per
    partition) are merged; two with a state for the same leaf are an error.

    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_constraints as oc
    >>> from optax_constraints._project_state import constraint_states
    >>> params = {"w": jnp.ones((2, 3))}
    >>> opt_state = optax.chain(optax.sgd(0.1), oc.project(oc.Sphere("init"))).init(params)
    >>> constraint_states(opt_state)["w"].shape  # one norm per unit
    (1, 3)
    """
    from optax_constraints._transform import ProjectState  # _transform imports this module

    def is_project_state(x):
        return isinstance(x, ProjectState)

    found = [s for s in jax.tree.leaves(state, is_leaf=is_project_state) if is_project_state(s)]
    if not found:
        raise ValueError(
            f"state= has no oc.ProjectState in it (got {type(state).__name__}): pass the"
            " state of an optimizer that contains oc.project(...) (the opt_state its"
            " init returned and update keeps returning), or the ProjectState itself."
        )
    merged: dict[str, PyTree] = {}
    for s in found:
        twice = sorted(merged.keys() & s.constraint_states.keys())
        if twice:
            raise ValueError(
                f"state= holds several oc.ProjectStates with a state for the same leaves"
                f" {twice}: pass the ProjectState of the project(...) you mean."
            )
        merged.update(s.constraint_states)
    return merged


def _missing(r: Route, states, err) -> ValueError:
    where = f"the parameter at '{r.leaf.path_str}' (shape {tuple(jnp.shape(r.leaf.value))})"
    if states is None:
        return ValueError(f"{err} [{where}].")
    return ValueError(
        f"{err} [{where}]: the state passed has no entry for this leaf; pass the state of"
        " the optimizer whose oc.project(...) constrains it."
    )


def project_leaf(r: Route, c: Constraint, w, states: dict | None, step) -> jax.Array:
    """`c(w)`; for a constraint that needs `project`'s state, `c.apply` with the leaf's."""
    try:
        return c(w)
    except MissingStateError as err:
        s = None if states is None else states.get(r.leaf.path_str)
        if s is None:
            raise _missing(r, states, err) from None
        return c.apply(w, s, step)[0]


def leaf_violation(r: Route, c: Constraint, w, states: dict | None, step) -> jax.Array:
    """`c.violation(w)`; with `project`'s state where `c` needs it: `max |w - C(w)|`."""
    try:
        return c.violation(w)
    except MissingStateError as err:
        s = None if states is None else states.get(r.leaf.path_str)
        if s is None:
            raise _missing(r, states, err) from None
        w = jnp.asarray(w)
        dtype = compute_dtype(w.dtype)
        target = c.apply(w, s, step)[0]
        return jnp.max(jnp.abs(target.astype(dtype) - w.astype(dtype)), initial=0.0)
