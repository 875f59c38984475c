"""`param_specs`: constraints on the local blocks of `jax.shard_map` (docs/multihost.md)."""

from __future__ import annotations

import jax
from jax.sharding import PartitionSpec

from optax_constraints import constraints as C
from optax_constraints._labels import resolve_labels
from optax_constraints._routing import Route
from optax_constraints.constraints._gathered import Gathered, Spec

FIX = (
    "pass param_specs= (the params' PartitionSpecs, the in_specs you gave jax.shard_map)"
    " to oc.project / oc.apply_constraints / oc.constraint_violations / oc.tangent, or"
    " apply the constraint outside shard_map under jax.jit, where arrays are global"
)


def leaf_specs(params, param_specs, routes: list[Route]) -> dict[int, Spec]:
    """Per constrained leaf index, the mesh axes splitting each of its axes."""
    if param_specs is None:
        return {}
    try:
        pairs = resolve_labels(params, param_specs)
    except ValueError as err:
        raise ValueError(f"param_specs does not fit the params: {err}") from None
    specs = {}
    for leaf, spec in pairs:
        shape = tuple(getattr(leaf.value, "shape", ()))
        spec = PartitionSpec() if spec is None else spec
        if not isinstance(spec, PartitionSpec) or len(spec) > len(shape):
            raise ValueError(
                f"param_specs gives {spec!r} for the parameter at '{leaf.path_str}' (shape"
                f" {shape}): each leaf needs a jax.sharding.PartitionSpec with at most one"
                " entry per axis, the one you gave jax.shard_map's in_specs for it."
            )
        entries = tuple(spec) + (None,) * (len(shape) - len(spec))
        specs[leaf.index] = tuple((e,) if isinstance(e, str) else tuple(e or ()) for e in entries)
    return {r.leaf.index: specs[r.leaf.index] for r in routes if r.constraint is not None}


def on_leaf(r: Route, spec: Spec | None) -> tuple[C.Constraint, tuple[str, ...]]:
    """The constraint to run on `r`'s leaf as this trace sees it, and the mesh axes splitting it.

    Outside `shard_map` a spec changes nothing. Inside, without a spec, only an
    elementwise constraint may project a local block on its own.
    """
    c = r.constraint
    assert c is not None
    split = tuple(name for entry in spec or () for name in entry)
    aval = jax.typeof(r.leaf.value)
    manual = getattr(getattr(getattr(aval, "sharding", None), "mesh", None), "manual_axes", ())
    if spec is not None and split and set(split) <= set(manual):
        return c.on_shards(spec) or Gathered(c, spec), split
    axis_type = getattr(aval, "manual_axis_type", None)  # JAX >= 0.9; `vma` before
    varying = axis_type.varying if axis_type is not None else getattr(aval, "vma", ())
    if spec is None and varying and not c.elementwise:
        raise ValueError(
            f"{c!r} on the parameter at '{r.leaf.path_str}' (local shape {aval.shape}) runs"
            f" inside jax.shard_map, where this leaf varies over the mesh axes"
            f" {sorted(varying)}: it is a local block, and the constraint would be computed"
            f" on that block alone, silently wrong. Fix: {FIX}."
        )
    return c, ()
