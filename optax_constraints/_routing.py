"""Labels + constraints -> the checked list of which leaf is projected by what."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from optax_constraints import constraints as C
from optax_constraints._labels import Leaf, resolve_labels, shape_of
from optax_constraints.constraints._registry import as_constraint

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


def route(params, constraints: Mapping, param_labels, *, check: bool = True) -> list[Route]:
    """Pairs every array leaf with its constraint.

    With `check=True` (at `init`), raises `ValueError` naming the leaf's path
    and shape when its label is not in `constraints`, it is not a float array,
    or the constraint does not fit it (e.g. an `axis` out of range).
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
            raise ValueError(
                f"The parameter at '{leaf.path_str}' (shape {shape_of(leaf.value)}) has label"
                f" {label!r}, which is not a key of constraints. Labels in use:"
                f" {_set(used)}; constraints keys: {_set(constraints)}; missing:"
                f" {_set(used - set(constraints))}. Add the missing labels to constraints"
                " (a value of None leaves a label unconstrained), or relabel those leaves."
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
    if builtin and not isinstance(constraint, C.FunctionConstraint):
        return
    # A user's constraint must trace (project's update runs under jit) and keep the shape.
    try:
        out = jax.eval_shape(constraint, jax.ShapeDtypeStruct(shape, dtype))
    except _TRACING_ERRORS as err:
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
            f"{constraint!r} returns {returned} for {where}: a constraint must return an"
            " array of the leaf's shape (w -> projected w), not a reduction or a pytree."
        )


_TRACING_ERRORS = (
    jax.errors.TracerArrayConversionError,
    jax.errors.ConcretizationTypeError,
    jax.errors.TracerBoolConversionError,
    jax.errors.TracerIntegerConversionError,
)
