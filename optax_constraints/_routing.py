"""Labels + constraints -> one checked plan: which leaf is projected by what.

`route` is the single place where a labels tree meets a `constraints` mapping;
`project`'s `init`, `apply_constraints`, the violation monitor and the routing
report all go through it, so they agree and fail with the same messages.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from optax_constraints import constraints as C
from optax_constraints._labels import Leaf, resolve_labels, shape_of
from optax_constraints.constraints._registry import as_constraint

PyTree = Any
Constraints = Mapping[Any, Any] | C.Constraint | Callable[..., Any]


@dataclass(frozen=True)
class Route:
    """One parameter leaf and the constraint it gets (`None`: unconstrained)."""

    leaf: Leaf
    label: Hashable
    constraint: C.Constraint | None


def normalize(constraints: Constraints, param_labels) -> tuple[dict, Any]:
    """`(label -> Constraint mapping, labels)`; a lone constraint labels every leaf."""
    if constraints is None:
        raise TypeError(
            "constraints is None, which would constrain nothing. Pass a constraint (e.g."
            " oc.MaxNorm(3.0)) or a mapping label -> constraint; to leave some leaves"
            " unconstrained, map their label to None (e.g. {'kernel': oc.MaxNorm(3.0),"
            " 'bias': None})."
        )
    if not isinstance(constraints, Mapping):
        if param_labels is not None:
            raise TypeError(
                "constraints must be a mapping label -> constraint when param_labels is"
                f" given; got {constraints!r}. Example: oc.project({{'kernel':"
                " oc.MaxNorm(3.0)}, oc.label_by_path({'**/kernel': 'kernel'}))."
            )
        return {"__all__": as_constraint(constraints)}, "__all__"
    if param_labels is None:
        raise TypeError(
            "param_labels is required when constraints is a mapping: pass a labels"
            " pytree or a callable such as oc.label_by_path({'**/kernel': 'kernel'})."
        )
    return {label: as_constraint(c) for label, c in constraints.items()}, param_labels


def route(params: PyTree, constraints: Mapping, param_labels, *, check: bool = True) -> list[Route]:
    """Pairs every array leaf with its constraint, checking the pairing.

    With `check=True` (at `init`), raises `ValueError` naming the leaf's path and
    shape when a label is not in `constraints`, a constrained leaf is not a
    floating-point array, or the constraint does not fit the leaf (e.g. an
    `axis` out of range).
    """
    routes = []
    for leaf, label in resolve_labels(params, param_labels):
        if label is None:
            routes.append(Route(leaf, None, None))
            continue
        try:
            constraint = constraints[label]
        except (KeyError, TypeError):
            used = {lb for _, lb in resolve_labels(params, param_labels) if lb is not None}
            missing = {lb for lb in used if lb not in constraints}
            raise ValueError(
                f"The parameter at '{leaf.path_str}' (shape {shape_of(leaf.value)}) has label"
                f" {label!r}, which is not a key of constraints. Labels in use:"
                f" {_set(used)}; constraints keys: {_set(constraints)}; missing:"
                f" {_set(missing)}. Add the missing labels to constraints (a value of None"
                " leaves a label unconstrained), or relabel those leaves."
            ) from None
        if check and constraint is not None:
            _check(leaf, label, constraint)
        routes.append(Route(leaf, label, constraint))
    return routes


def _set(labels) -> str:
    return "{" + ", ".join(sorted(map(repr, labels))) + "}"


def _check(leaf: Leaf, label, constraint: C.Constraint) -> None:
    shape, dtype = shape_of(leaf.value), getattr(leaf.value, "dtype", None)
    where = f"the parameter at '{leaf.path_str}' (shape {shape}, dtype {dtype}, label {label!r})"
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(
            f"{constraint!r} cannot constrain {where}: constraints apply to floating-point"
            " arrays. Label this leaf None to leave it unconstrained."
        )
    try:
        constraint.check_leaf(shape, dtype)
    except ValueError as err:
        reason = str(err).rstrip(".")
        fix = (
            ""
            if "route" in reason or not hasattr(constraint, "axis")  # it says how to fix it
            else f" Give label {label!r} a constraint whose axis exists for a {len(shape)}-d"
            " leaf (axis='fan_in' means every axis but the last), or route this leaf to"
            " another label (a rule mapping it to None leaves it unconstrained)."
        )
        raise ValueError(f"{constraint!r} does not fit {where}: {reason}.{fix}") from None
    builtin = type(constraint).__module__.startswith("optax_constraints.")
    if not builtin or isinstance(constraint, C.FunctionConstraint):
        _check_output_shape(constraint, shape, dtype, where)


def _check_output_shape(constraint, shape, dtype, where: str) -> None:
    """A user's constraint must map a leaf to an array of the same shape."""
    try:
        out = jax.eval_shape(constraint, jax.ShapeDtypeStruct(shape, dtype))
    except _TRACING_ERRORS as err:  # what jit(tx.update) would raise, without leaf or fix
        raise TypeError(
            f"{constraint!r} cannot be traced for {where}: it converts a traced array to"
            f" NumPy ({type(err).__name__}), which fails under jax.jit, where project's"
            " update runs. Write it with jax.numpy (jnp.abs, jnp.clip, jnp.where instead of"
            " np.abs, np.clip, Python if/float() on values)."
        ) from err
    except TypeError:  # e.g. a callable that needs more arguments: checked when called
        return
    got = getattr(out, "shape", None)
    if got != shape:
        returned = f"shape {got}" if got is not None else f"{type(out).__name__} {out!r}"
        raise ValueError(
            f"{constraint!r} returns {returned} for {where}: a constraint must return an array of the leaf's shape"
            " (w -> projected w), not a reduction or a pytree."
        )


_TRACING_ERRORS = (
    jax.errors.TracerArrayConversionError,
    jax.errors.ConcretizationTypeError,
    jax.errors.TracerBoolConversionError,
    jax.errors.TracerIntegerConversionError,
)


def routing_report(params: PyTree, constraints: Constraints, param_labels=None) -> str:
    """A table of every leaf: path, shape, dtype, label, constraint and its view.

    Print it before training, the way you would `model.summary()`, to see that
    every kernel and bias gets what you meant (unconstrained leaves show `-`).
    The `view` column says how the constraint sees the leaf
    (`Constraint.describe_leaf`): norm constraints as units of a size, matrix
    ones as the matrix they constrain, `oc.Stacked` as copies of those.
    Raises exactly the errors `project`'s `init` raises.

    Args:
      params: the parameter pytree (arrays or `jax.eval_shape` structs).
      constraints: as for `project`: mapping label -> constraint, or one
        constraint for every leaf.
      param_labels: as for `project`: labels pytree or callable.

    >>> import jax.numpy as jnp
    >>> import optax_constraints as oc
    >>> params = {"Dense_0": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)}}
    >>> print(oc.routing_report(params, {"k": oc.MaxNorm(3.0)},
    ...                         oc.label_by_path({"**/kernel": "k"})))
    path            shape   dtype    label  constraint                      view
    Dense_0/bias    (2,)    float32  -      -                               -
    Dense_0/kernel  (3, 2)  float32  'k'    MaxNorm(max_value=3.0, axis=0)  2 units of 3
    2 leaves, 1 constrained (6 of 8 values)

    Two scanned stacks of 4 layers: the first constrained as one array (one
    norm over all layers, a mistake), the second per layer:

    >>> c = oc.MaxNorm(2.0, axis="fan_in")
    >>> params = {"a": {"kernel": jnp.ones((4, 16, 16))}, "b": {"kernel": jnp.ones((4, 16, 16))}}
    >>> print(oc.routing_report(params, {"plain": c, "stacked": oc.Stacked(c)},
    ...                         {"a": {"kernel": "plain"}, "b": {"kernel": "stacked"}}))
    path      shape        dtype    label      constraint                                                    view
    a/kernel  (4, 16, 16)  float32  'plain'    MaxNorm(max_value=2.0, axis='fan_in')                         16 units of 64
    b/kernel  (4, 16, 16)  float32  'stacked'  Stacked(MaxNorm(max_value=2.0, axis='fan_in'), stack_axis=0)  4 x 16 units of 16
    2 leaves, 2 constrained (2048 of 2048 values)
    """
    mapping, labels = normalize(constraints, param_labels)
    routes = route(params, mapping, labels)
    rows = [("path", "shape", "dtype", "label", "constraint", "view")]
    sizes = {True: 0, False: 0}  # values constrained or not
    for r in routes:
        shape, c = shape_of(r.leaf.value), r.constraint
        sizes[c is not None] += math.prod(shape)
        dtype = getattr(r.leaf.value, "dtype", type(r.leaf.value).__name__)
        label = "-" if r.label is None else repr(r.label)
        shown, view = ("-", "-") if c is None else (repr(c), c.describe_leaf(shape))
        rows.append((r.leaf.path_str, str(shape), str(dtype), label, shown, view))
    constrained = sum(r.constraint is not None for r in routes)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    total = sizes[True] + sizes[False]
    lines.append(
        f"{len(routes)} leaves, {constrained} constrained ({sizes[True]} of {total} values)"
    )
    return "\n".join(lines)
