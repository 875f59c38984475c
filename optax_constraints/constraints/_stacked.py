"""Layout wrappers: `Stacked` (one constraint per copy) and `OutputFirst` (`(out, *fan_in)`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from optax_constraints.constraints._base import Constraint
from optax_constraints.constraints._registry import as_constraint, serialize
from optax_constraints.projections._axis import canonical_axis, in_range
from optax_constraints.projections._sharding import explicit_mesh_axes, padded_spec


class _View(Constraint):
    """A constraint applied to each leaf through a view of it (`Stacked`, `OutputFirst`)."""

    constraint: Constraint

    def __init__(self, constraint):
        obj = as_constraint(constraint)
        if obj is None:
            owner = type(self).__name__
            raise TypeError(
                f"{owner} needs the constraint to apply, e.g. {owner}(oc.MaxNorm(2.0,"
                " axis='fan_in')); got None."
            )
        self.constraint = obj

    def _on_whole_leaf(self, ndim: int) -> Constraint | None:
        """The same constraint written on the leaf's own axes, or `None`."""
        raise NotImplementedError

    def _through(self, fn, ndim: int, in_kinds: tuple[str, ...], out_kinds: tuple[str, ...]):
        """`fn` (returning a tuple) through the view: "leaf" arguments and results
        are views of the leaf, "copy" ones (states, violations) the view's own."""
        raise NotImplementedError

    def _check_view(self, shape, dtype, where: str):
        """`constraint.check_leaf` on the view's `shape`, its reason prefixed by `where`."""
        try:
            self.constraint.check_leaf(shape, dtype)
        except ValueError as err:
            raise ValueError(
                f"{where} {shape}, and {self.constraint!r} rejects it: {str(err).rstrip('.')}"
            ) from None

    def _run(self, name, args, in_kinds, out_kinds, *extra):
        """`constraint.<name>(*args, *extra)`, on the whole leaf if it can be (no state)."""
        args = tuple(jnp.asarray(a) if k == "leaf" else a for a, k in zip(args, in_kinds))
        ndim = args[0].ndim
        whole = self._on_whole_leaf(ndim)
        if whole is not None and all(a is None for a, k in zip(args, in_kinds) if k == "copy"):
            return getattr(whole, name)(*args, *extra)

        def one(*args):
            out = getattr(self.constraint, name)(*args, *extra)
            return (out,) if len(out_kinds) == 1 else out

        out = self._through(one, ndim, in_kinds, out_kinds)(*args)
        return out[0] if len(out_kinds) == 1 else out

    def __call__(self, w):
        return self._run("__call__", (w,), ("leaf",), ("leaf",))

    def init_state(self, w):
        def one(w):
            return (self.constraint.init_state(w),)

        w = jnp.asarray(w)
        return self._through(one, w.ndim, ("leaf",), ("copy",))(w)[0]

    def apply(self, w, state, step):
        return self._run("apply", (w, state), ("leaf", "copy"), ("leaf", "copy"), step)

    def project_update(self, param, update, state, step):
        if not self.elementwise:
            return super().project_update(param, update, state, step)
        kinds = ("leaf", "leaf", "copy")
        return self._run("project_update", (param, update, state), kinds, ("leaf", "copy"), step)

    def tangent(self, w, u):
        return self._run("tangent", (w, u), ("leaf", "leaf"), ("leaf",))

    def violation(self, w):
        return jnp.max(self._run("violation", (w,), ("leaf",), ("copy",)), initial=0.0)

    @property
    def elementwise(self) -> bool:  # pyright: ignore[reportIncompatibleVariableOverride]
        return self.constraint.elementwise

    def on_shards(self, spec):
        whole = self._on_whole_leaf(len(spec))
        return None if whole is None else whole.on_shards(spec)


class Stacked(_View):
    """Applies a constraint to every copy of a stacked leaf on its own.

    The copies are the layers of an `nn.scan`/`nnx.vmap` stack or the members
    of a vmapped ensemble. `constraint` sees one copy: its `axis` and matrix
    view refer to the copy's axes, and a stateful one keeps one state per
    copy (stacked along leading axes, in the leaf's axis order).

    Args:
      constraint: the constraint for one copy: any `oc.Constraint` (custom
        ones too), anything `oc.get` accepts, or a callable `w -> w`.
      stack_axis: the leaf's copy axes: an int or a tuple/list of ints,
        negative ints counting from the end (like `jax.vmap`'s `in_axes`).

    >>> import jax.numpy as jnp
    >>> import numpy as np
    >>> import optax_constraints as oc
    >>> c = oc.Stacked(oc.MaxNorm(1.0, axis="fan_in"))
    >>> kernels = jnp.stack([3.0 * jnp.ones((4, 2)), 0.1 * jnp.ones((4, 2))])  # 2 layers
    >>> np.asarray(jnp.linalg.norm(c(kernels), axis=1), np.float64).round(4).tolist()
    [[1.0, 1.0], [0.2, 0.2]]
    """

    def __init__(self, constraint, stack_axis: int | Sequence[int] = 0):
        super().__init__(constraint)
        try:
            axis = canonical_axis(stack_axis)
        except ValueError:
            axis = None
        if axis is None or isinstance(axis, str) or axis == ():
            raise ValueError(
                "Stacked: stack_axis must be an int or a non-empty tuple/list of distinct"
                " ints (negative ints count from the end), naming the leaf's axes that"
                f" index the copies; got stack_axis={stack_axis!r}."
            )
        self.stack_axis = axis

    def stack_axes(self, ndim: int) -> tuple[int, ...]:
        """The stack axes of an `ndim`-d leaf, non-negative and sorted."""
        return in_range(self.stack_axis, ndim, "stack_axis")

    def _copy_axes(self, ndim: int) -> tuple[int, ...]:
        stacked = self.stack_axes(ndim)
        return tuple(a for a in range(ndim) if a not in stacked)

    def _on_whole_leaf(self, ndim: int) -> Constraint | None:
        return self.constraint.on_leaf_axes(self._copy_axes(ndim), ndim)

    def _through(self, fn, ndim: int, in_kinds: tuple[str, ...], out_kinds: tuple[str, ...]):
        """`fn` mapped over the copies ("copy" arguments and results along leading axes)."""
        stacked = self.stack_axes(ndim)
        # The outermost map takes the first stack axis of the whole leaf; the
        # i-th map sees i fewer axes, all of them before its own.
        for i in reversed(range(len(stacked))):
            at = stacked[i] - i
            in_axes = tuple(at if k == "leaf" else 0 for k in in_kinds)
            out_axes = tuple(at if k == "leaf" else 0 for k in out_kinds)
            fn = jax.vmap(fn, in_axes=in_axes, out_axes=out_axes)
        return _off_explicit_stack_axes(fn, stacked, in_kinds, out_kinds)

    def check_leaf(self, shape, dtype):
        try:
            stacked = self.stack_axes(len(shape))
        except ValueError as err:
            raise ValueError(
                f"{err}. Stacked needs a leaf with its copies along stack_axis; route"
                " unstacked leaves (biases of an unstacked layer, embeddings) to another"
                " label, or give stack_axis the axis that indexes the layers"
            ) from None
        copy = tuple(n for a, n in enumerate(shape) if a not in stacked)
        self._check_view(copy, dtype, f"each copy along stack_axis={self.stack_axis!r} has shape")

    def on_shards(self, spec):
        local = super().on_shards(spec)
        stateless = type(self.constraint).init_state is Constraint.init_state
        if local is None and stateless and not any(spec[a] for a in self._copy_axes(len(spec))):
            return self  # only the stack axes are split: every copy is local
        return local

    def at_step(self, step):
        inner = self.constraint.at_step(step)
        return self if inner is self.constraint else Stacked(inner, self.stack_axis)

    def on_leaf_axes(self, axes, ndim):
        # The copies of the sub-array are copies of the leaf, too.
        stacked = self.stack_axes(len(axes))
        copy = tuple(a for i, a in enumerate(axes) if i not in stacked)
        return self.constraint.on_leaf_axes(copy, ndim)

    def describe_leaf(self, shape):
        shape = tuple(shape)
        stacked = self.stack_axes(len(shape))
        copy_axes = self._copy_axes(len(shape))
        if self.constraint.on_leaf_axes(copy_axes, len(shape)) is self.constraint:
            return self.constraint.describe_leaf(shape)  # layout-free (elementwise)
        copies = " x ".join(str(shape[a]) for a in stacked)
        return f"{copies} x {self.constraint.describe_leaf(tuple(shape[a] for a in copy_axes))}"

    def get_config(self):
        axis = list(self.stack_axis) if isinstance(self.stack_axis, tuple) else self.stack_axis
        return {"constraint": serialize(self.constraint), "stack_axis": axis}

    def _key(self):
        axis = self.stack_axis
        return (type(self), self.constraint, (axis,) if isinstance(axis, int) else axis)

    def __repr__(self):
        return f"Stacked({self.constraint!r}, stack_axis={self.stack_axis!r})"


def _off_explicit_stack_axes(mapped, stacked, in_kinds, out_kinds):
    """`mapped` with the leaf's `Explicit` mesh axes made `Auto` (vmapped loops need it)."""

    def run(*args) -> Any:
        leaf = args[in_kinds.index("leaf")]
        axes = explicit_mesh_axes(leaf, tuple(range(leaf.ndim)))
        if not axes:
            return mapped(*args)
        sharding = jax.typeof(leaf).sharding
        spec = padded_spec(sharding, leaf.ndim)
        per_copy = NamedSharding(sharding.mesh, PartitionSpec(*(spec[a] for a in stacked)))

        outs = tuple(sharding if k == "leaf" else per_copy for k in out_kinds)
        return jax.sharding.auto_axes(mapped, axes=axes, out_sharding=outs)(*args)

    return run


def _moved_shape(shape):
    shape = tuple(shape)
    return shape[1:] + shape[:1]


class OutputFirst(_View):
    """For weights whose output axis comes first: `(out, *fan_in)` (Equinox, PyTorch).

    `OutputFirst(c)` shows `c` the leaf with axis 0 moved last, the Flax/Keras
    `(*fan_in, out)` layout, so `axis="fan_in"`, integer axes and the matrix
    view mean "per output unit". For vmapped layers, `Stacked(OutputFirst(c))`.

    Args:
      constraint: the constraint for the `(*fan_in, out)` view: any
        `oc.Constraint`, anything `oc.get` accepts, or a callable `w -> w`.

    >>> import jax.numpy as jnp
    >>> import numpy as np
    >>> import optax_constraints as oc
    >>> weight = jnp.array([[3.0, 4.0], [0.3, 0.4]])  # eqx.nn.Linear(2, 2).weight: (out, in)
    >>> c = oc.OutputFirst(oc.MaxNorm(1.0, axis="fan_in"))
    >>> np.asarray(jnp.linalg.norm(c(weight), axis=1), np.float64).round(4).tolist()  # per output
    [1.0, 0.5]
    """

    def _on_whole_leaf(self, ndim: int) -> Constraint | None:
        return self.on_leaf_axes(tuple(range(ndim)), ndim)

    def _through(self, fn, ndim: int, in_kinds: tuple[str, ...], out_kinds: tuple[str, ...]):
        """`fn` on the leaf with its output axis moved last; "leaf" results moved back."""

        def run(*args):
            moved = (jnp.moveaxis(a, 0, -1) if k == "leaf" else a for a, k in zip(args, in_kinds))
            out = fn(*moved)
            return tuple(
                jnp.moveaxis(o, -1, 0) if k == "leaf" else o for o, k in zip(out, out_kinds)
            )

        return run

    def check_leaf(self, shape, dtype):
        if len(shape) < 1:
            raise ValueError(
                "OutputFirst needs a leaf with an output axis (axis 0); this one is a"
                " scalar. Route scalars to another label"
            )
        self._check_view(
            _moved_shape(shape), dtype, "with its output axis moved last the leaf has shape"
        )

    def at_step(self, step):
        inner = self.constraint.at_step(step)
        return self if inner is self.constraint else OutputFirst(inner)

    def on_leaf_axes(self, axes, ndim):
        # The inner constraint's axis i is the sub-array's axis i + 1 (the
        # output axis, 0, comes last).
        return self.constraint.on_leaf_axes(tuple(axes[1:]) + tuple(axes[:1]), ndim)

    def describe_leaf(self, shape):
        return self.constraint.describe_leaf(_moved_shape(shape))

    def get_config(self):
        return {"constraint": serialize(self.constraint)}

    def _key(self):
        return (type(self), self.constraint)

    def __repr__(self):
        return f"OutputFirst({self.constraint!r})"
