"""Constraints on the local blocks of `jax.shard_map`: `param_specs`.

Under `jax.jit` every array is global and XLA inserts the collectives. Inside
`jax.shard_map` a leaf is the local block of the global parameter, and a norm
over a split axis would be a partial norm. `param_specs` (the params'
`PartitionSpec`s, the `in_specs` the user gave `shard_map`) says which mesh
axes split which axes of each leaf; each constraint then runs in the form
`Constraint.on_shards` gives it (norm constraints `psum` their per-unit sums),
or, when it has none, on the all-gathered leaf, of which each device keeps
its block (`_Gathered`).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from optax_constraints import constraints as C
from optax_constraints._labels import resolve_labels
from optax_constraints._routing import Route

PyTree = Any
Spec = tuple[tuple[str, ...], ...]

FIX = (
    "pass param_specs= (the params' PartitionSpecs, the in_specs you gave jax.shard_map)"
    " to oc.project / oc.apply_constraints / oc.constraint_violations / oc.tangent, or"
    " apply the constraint outside shard_map under jax.jit, where arrays are global"
)


def leaf_specs(params: PyTree, param_specs, routes: list[Route]) -> dict[int, Spec]:
    """Per constrained leaf index, the mesh axes splitting each of its axes.

    `param_specs` is a pytree prefix of `PartitionSpec`s (or `None`s, for
    leaves that are not split). Raises `ValueError` naming the leaf when it
    does not fit.
    """
    if param_specs is None:
        return {}
    try:
        pairs = resolve_labels(params, param_specs)
    except ValueError as err:
        raise ValueError(f"param_specs does not fit the params: {err}") from None
    specs = {}
    for leaf, spec in pairs:
        shape = tuple(getattr(leaf.value, "shape", ()))
        if spec is None:
            spec = PartitionSpec()
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
    """The constraint to run on the leaf of `r` as this trace sees it, and the
    mesh axes that split the leaf here (a violation's maximum is taken over them).

    Inside `shard_map`, with a spec that splits the leaf: the constraint's
    `on_shards` form, or the gathered one. Otherwise the constraint itself
    (outside `shard_map` a spec changes nothing: `init` runs on the global
    params), after checking that the leaf is not a local block (it varies
    over manual mesh axes) that a non-elementwise constraint would silently
    project on its own.
    """
    c = r.constraint
    assert c is not None
    split = tuple(name for entry in spec or () for name in entry)
    if split and set(split) <= _manual_axes(r.leaf.value):
        assert spec is not None
        return c.on_shards(spec) or _Gathered(c, spec), split
    vma = _varying_axes(r.leaf.value) if spec is None else None
    if vma and not c.elementwise:
        shape = tuple(r.leaf.value.shape)
        raise ValueError(
            f"{c!r} on the parameter at '{r.leaf.path_str}' (local shape {shape}) runs"
            f" inside jax.shard_map, where this leaf varies over the mesh axes"
            f" {sorted(vma)}: it is a local block, and the constraint would be computed"
            f" on that block alone, silently wrong. Fix: {FIX}."
        )
    return c, ()


def _manual_axes(x) -> frozenset[str]:
    """The mesh axes that are manual where `x` is traced (inside `shard_map`)."""
    mesh = getattr(getattr(jax.typeof(x), "sharding", None), "mesh", None)
    return frozenset(getattr(mesh, "manual_axes", ()))


def _varying_axes(x) -> frozenset[str]:
    """The manual mesh axes `x` varies over inside `shard_map` (empty outside)."""
    aval = jax.typeof(x)
    manual = getattr(aval, "manual_axis_type", None)  # JAX >= 0.9; `vma` before
    return frozenset(manual.varying if manual is not None else getattr(aval, "vma", ()))


def _size(names: tuple[str, ...]) -> int:
    return math.prod(jax.lax.axis_size(n) for n in names)


class _Gathered(C.Constraint):
    """`constraint` on the all-gathered leaf; each device keeps its own block.

    For constraints without an `on_shards` form (matrix, simplex, custom):
    exact, at the cost of one whole leaf per device while it is projected
    (and an all-reduce of the leaf's size to assemble it).
    A state (SpectralNorm's vector) is the whole leaf's, the same on every
    device.
    """

    def __init__(self, constraint: C.Constraint, spec: Spec):
        self.constraint, self.spec = constraint, spec

    def _gather(self, x):
        # Each block at its place in zeros, summed over the devices: exact
        # (x + 0 == x), and, unlike `all_gather`, typed the same on every
        # device, so loops inside the constraint (power method, simplex
        # threshold) carry one type.
        shape, start = list(x.shape), []
        for axis, names in enumerate(self.spec):
            shape[axis] *= _size(names)
            start.append(jax.lax.axis_index(names) * x.shape[axis] if names else 0)
        whole = jax.lax.dynamic_update_slice(jnp.zeros(shape, x.dtype), x, start)
        return jax.lax.psum(whole, tuple(n for names in self.spec for n in names))

    def _block(self, x, like):
        for axis, names in enumerate(self.spec):
            if names:
                n = like.shape[axis]
                x = jax.lax.dynamic_slice_in_dim(x, jax.lax.axis_index(names) * n, n, axis)
        return x

    def at_step(self, step):
        return _Gathered(self.constraint.at_step(step), self.spec)

    def __call__(self, w):
        return self._block(self.constraint(self._gather(w)), w)

    def init_state(self, w):
        return self.constraint.init_state(self._gather(w))

    def apply(self, w, state, step):
        out, state = self.constraint.apply(self._gather(w), state, step)
        return self._block(out, w), state

    def violation(self, w):
        return self.constraint.violation(self._gather(w))

    def tangent(self, w, u):
        return self._block(self.constraint.tangent(self._gather(w), self._gather(u)), u)
