"""Constraints declared where the model is defined, as Keras's `kernel_constraint=`.

NNX metadata, Linen `with_constraint` boxes and Keras variables' `.constraint`,
read by `declared`. Flax and Keras are imported lazily, only when met.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Hashable, Mapping
from typing import Any

import jax

from optax_constraints import constraints as C
from optax_constraints._labels import (
    GlobRules,
    Path,
    _is_empty,
    flat_paths,
    is_box,
    is_variable,
    key_name,
    path_to_str,
    sample,
    shape_of,
)
from optax_constraints.constraints._registry import as_constraint

PyTree = Any


def _is_keras_variable(x) -> bool:
    return type(x).__module__.startswith("keras") and hasattr(x, "constraint")


def _is_stop(x) -> bool:
    """Where a declared leaf ends: a Variable, the outermost box, an empty node."""
    return _is_empty(x) or is_variable(x) or is_box(x) or _is_keras_variable(x)


def _checked_constraint(obj, where: str):
    try:
        constraint = as_constraint(obj)
    except (ValueError, TypeError) as err:
        raise type(err)(f"{where}: {err}") from None
    if constraint is None:
        raise TypeError(f"{where}: the constraint is None, which constrains nothing.")
    return constraint


def _unstack(constraint, index: int, what: str):
    if isinstance(constraint, C.Stacked) and constraint.stack_axis == index:
        return constraint.constraint
    raise ValueError(
        f"A transform removes axis {index} from {what}, but its declared constraint"
        f" {constraint!r} was not stacked along that axis by a transform. Axes must be"
        " removed in the reverse order they were added (nn.scan / nnx.vmap nest)."
    )


# --- Linen: the with_constraint box -----------------------------------------


@functools.cache
def _box_class():
    from flax import struct
    from flax.core import meta

    class ConstraintBox(struct.PyTreeNode, meta.AxisMetadata):
        """A Linen param and the constraint declared on it (see `with_constraint`).

        `ndim` is the rank the initializer gave the param and `added` the
        number of axes that stacking transforms have added since, so that
        `declared` can tell when a transform stacked the param without
        telling this box (a `Partitioned` box outside it does not forward
        `add_axis`).
        """

        value: Any
        constraint: Any = struct.field(pytree_node=False)
        ndim: int = struct.field(pytree_node=False, default=0)
        added: int = struct.field(pytree_node=False, default=0)

        def unbox(self):
            return self.value

        def replace_boxed(self, val):
            return self.replace(value=val)

        def add_axis(self, index: int, params: dict) -> ConstraintBox:
            constraint = C.Stacked(self.constraint, stack_axis=index)
            return self._moved_axis("add_axis", index, params, constraint, +1)

        def remove_axis(self, index: int, params: dict) -> ConstraintBox:
            constraint = _unstack(self.constraint, index, "the Linen param")
            return self._moved_axis("remove_axis", index, params, constraint, -1)

        def _moved_axis(self, method, index, params, constraint, added) -> ConstraintBox:
            value = self.value
            if is_box(value):  # flax's meta.add_axis stops at the outermost box
                value = getattr(value, method)(index, params)
            return self.replace(value=value, constraint=constraint, added=self.added + added)

        # nn.get_partition_spec / nn.get_sharding stop at the outermost box:
        # answer for a Partitioned box inside (oc.with_constraint outermost).
        def get_partition_spec(self):
            if hasattr(self.value, "get_partition_spec"):
                return self.value.get_partition_spec()
            return jax.sharding.PartitionSpec()

        def get_sharding(self, mesh):
            if hasattr(self.value, "get_sharding"):
                return self.value.get_sharding(mesh)
            return jax.sharding.NamedSharding(mesh, self.get_partition_spec())

        def __repr__(self):
            return f"ConstraintBox({self.value!r}, constraint={self.constraint!r})"

    ConstraintBox.__module__ = __name__
    ConstraintBox.__qualname__ = "ConstraintBox"
    globals()["ConstraintBox"] = ConstraintBox  # so pickle finds it by name
    return ConstraintBox


def __getattr__(name: str):
    if name == "ConstraintBox":  # made on first use: defining it imports flax
        return _box_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def with_constraint(init_fn: Callable, constraint) -> Callable:
    """Wraps a Linen initializer so that its param carries `constraint`.

    The Linen counterpart of Keras's `Dense(..., kernel_constraint=c)`: the
    param is created inside a `flax.core.meta.AxisMetadata` box (the
    mechanism `nn.with_partitioning` uses) that holds the constraint.
    `oc.declared(params)` reads it; the model sees the plain array, and
    `nn.unbox(params)` removes the box. Under `nn.scan` / `nn.vmap` the
    constraint becomes per-layer, `oc.Stacked(constraint, stack_axis=i)`.

    With `nn.with_partitioning` on the same param, make this the *outer*
    wrapper, `oc.with_constraint(nn.with_partitioning(init, names), c)`:
    flax's `Partitioned` box does not pass `add_axis` on to a box inside it,
    so under `nn.scan` the other order would lose the stacking (`declared`
    then raises, asking for this order).

    Args:
      init_fn: a Flax initializer `(key, shape, dtype) -> array` (or one that
        returns another `AxisMetadata` box).
      constraint: anything `oc.get` accepts: an `oc.Constraint`, a name, a
        Keras constraint object, a callable `w -> w`.

    Returns:
      An initializer returning the box.

    >>> import jax, jax.numpy as jnp
    >>> import flax.linen as nn
    >>> import optax_constraints as oc
    >>> dense = nn.Dense(2, kernel_init=oc.with_constraint(
    ...     nn.initializers.lecun_normal(), oc.MaxNorm(1.0)))
    >>> params = dense.init(jax.random.key(0), jnp.ones((1, 3)))["params"]
    >>> constraints, labels = oc.declared(params)
    >>> constraints
    {'kernel': MaxNorm(max_value=1.0, axis=0)}
    >>> nn.unbox(params)["kernel"].shape
    (3, 2)
    """
    if not callable(init_fn) or isinstance(init_fn, C.Constraint):
        raise TypeError(
            f"with_constraint: init_fn must be an initializer (key, shape, dtype) -> array;"
            f" got {init_fn!r}. Example: oc.with_constraint(nn.initializers.lecun_normal(),"
            " oc.MaxNorm(2.0))."
        )
    constraint = _checked_constraint(constraint, "with_constraint")
    box = _box_class()

    @functools.wraps(init_fn)
    def init(*args, **kwargs):
        value = init_fn(*args, **kwargs)
        return box(value, constraint, len(shape_of(value)))

    return init


# --- NNX: the axis hooks ------------------------------------------------------


def _nnx_on_add_axis(variable, index: int, axis_name) -> None:
    stacked = C.Stacked(variable.get_metadata("constraint"), stack_axis=index)
    variable.set_metadata(constraint=stacked)


def _nnx_on_remove_axis(variable, index: int, axis_name) -> None:
    constraint = variable.get_metadata("constraint")
    variable.set_metadata(constraint=_unstack(constraint, index, "an NNX variable"))


def constraint_metadata(constraint) -> dict[str, Any]:
    """NNX `Variable` metadata declaring `constraint`, kept per layer when stacked.

    Like `kernel_metadata={"constraint": c}`, and also installs the
    `on_add_axis` / `on_remove_axis` hooks through which `nnx.vmap` /
    `nnx.scan` with `transform_metadata={nnx.PARTITION_NAME: ...}` report each
    axis they add: the constraint becomes `oc.Stacked(c, stack_axis=i)`, one
    projection per layer (without the hooks a stacked `(layers, in, out)`
    kernel would be ONE array to `c`). Flax 0.12 warns that Variable hooks are
    deprecated; they are the only axis hook an `nnx.Param` has.

    Args:
      constraint: anything `oc.get` accepts.

    Returns:
      `{"constraint": c, "on_add_axis": ..., "on_remove_axis": ...}`, for
      `kernel_metadata=`, `nnx.with_metadata(init, **...)` or
      `nnx.Param(x, **...)`.

    >>> import warnings
    >>> import jax
    >>> from flax import nnx
    >>> import optax_constraints as oc
    >>> @nnx.vmap(in_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    ... def make(key):
    ...     meta = oc.constraint_metadata(oc.MaxNorm(1.0, axis="fan_in"))
    ...     return nnx.Linear(3, 3, kernel_metadata=meta, rngs=nnx.Rngs(key))
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore")  # flax: "Variable hooks are deprecated"
    ...     stack = make(jax.random.split(jax.random.key(0), 4))
    >>> oc.declared(stack)[0]
    {'kernel': Stacked(MaxNorm(max_value=1.0, axis='fan_in'), stack_axis=0)}
    """
    return {
        "constraint": _checked_constraint(constraint, "constraint_metadata"),
        "on_add_axis": (_nnx_on_add_axis,),
        "on_remove_axis": (_nnx_on_remove_axis,),
    }


# --- reading the declarations ---------------------------------------------------


def _declared_on(x, path: Path):
    """The constraint a wrapped leaf declares (None when it declares nothing)."""
    if is_variable(x) or _is_keras_variable(x):
        found = x.get_metadata("constraint", None) if is_variable(x) else x.constraint
        if found is None:
            return None
        at = f"the parameter at '{path_to_str(path)}' (shape {shape_of(x)})"
        return _checked_constraint(found, f"declared: the constraint on {at}")
    ours, box = [], x
    while is_box(box):
        if type(box) is _box_class():
            ours.append(box)
        box = box.unbox()
    if len(ours) > 1:
        raise ValueError(
            f"declared: the parameter at '{path_to_str(path)}' is wrapped by oc.with_constraint {len(ours)} times; declare one"
            " constraint per param (combine them in one oc.Constraint subclass)."
        )
    if not ours:
        return None
    if len(shape_of(x)) != ours[0].ndim + ours[0].added:
        raise ValueError(
            f"declared: the parameter at '{path_to_str(path)}' (shape {shape_of(x)}) was created"
            f" with {ours[0].ndim} dimension(s), and a transform"
            " (nn.scan / nn.vmap) added an axis that its oc.with_constraint box never saw:"
            " a box outside it (nn.with_partitioning's Partitioned) does not pass"
            " add_axis on. Put oc.with_constraint outermost:"
            " oc.with_constraint(nn.with_partitioning(init, names), c)."
        )
    return ours[0].constraint


def _entries(tree) -> list[tuple[Path, str, Any, Any]]:
    """`(path, name, wrapped leaf, declared constraint)` for every non-empty leaf of `tree`."""
    nnx = sys.modules.get("flax.nnx")  # an nnx.Module exists only once flax.nnx is imported
    if type(tree).__module__.startswith("keras") and hasattr(tree, "trainable_variables"):
        tree = list(tree.trainable_variables)  # a Keras layer or model
    elif nnx is not None and isinstance(tree, nnx.Module):
        tree = nnx.state(tree)
    if isinstance(tree, (list, tuple)) and tree and all(map(_is_keras_variable, tree)):
        out, seen = [], set()
        for i, v in enumerate(tree):
            name = str(getattr(v, "path", None) or getattr(v, "name", None) or i)
            if name in seen:  # two variables with one path: keep both labels apart
                name = f"{name}#{i}"
            seen.add(name)
            out.append(((str(i),), name, v, _declared_on(v, (name,))))
        return out
    return [
        (path, path_to_str(path), x, _declared_on(x, path))
        for path, x in flat_paths(tree, _is_stop)
        if not _is_empty(x)
    ]


class DeclaredLabels:
    """The `param_labels` that `oc.declared` returns: leaf path -> label.

    Callable `params -> labels tree`, as `project` and `optax.partition`
    take it. It matches paths with `Param` and box wrappers removed, and
    raises when a constrained path is missing from `params` (the labels were
    made for another tree, or the optimizer's `wrt` leaves that leaf out).

    Attributes:
      labels: mapping path (a tuple of key strings) -> label, for every
        constrained leaf.

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import optax_constraints as oc
    >>> param = nnx.Param(jnp.ones((2, 2)), constraint=oc.NonNeg())
    >>> constraints, labels = oc.declared({"w": param, "b": jnp.ones(2)})
    >>> labels({"w": jnp.ones((2, 2)), "b": jnp.ones(2)})
    {'b': None, 'w': 'w'}
    """

    def __init__(self, labels: Mapping[Path, Hashable]):
        self.labels = dict(labels)

    def __call__(self, params: PyTree) -> PyTree:
        seen: set[Path] = set()

        def label_of(path, x):
            spath = tuple(key_name(e) for e in path)
            if spath in self.labels:
                seen.add(spath)
            return x if _is_empty(x) else self.labels.get(spath)

        labels = jax.tree_util.tree_map_with_path(label_of, params, is_leaf=_is_stop)
        missing = [p for p in self.labels if p not in seen]
        if missing:
            found = [path_to_str(p) for p, _ in flat_paths(params, _is_stop)]
            raise ValueError(
                f"oc.declared: the parameter at '{path_to_str(missing[0])}' declares a"
                f" constraint, but the params given have no leaf there"
                f" ({len(missing)} constrained path(s) missing; parameter paths:"
                f" {sample(found)}). Pass oc.declared the tree you train: the same"
                " params (variables['params'], not variables), or for NNX the state"
                " the optimizer trains, e.g. oc.declared(nnx.state(model, nnx.Param))"
                " for wrt=nnx.Param."
            )
        return labels

    def __repr__(self):
        return f"DeclaredLabels({len(self.labels)} constrained leaves)"


def declared(
    tree: PyTree, rules: Mapping[str, Any] | None = None, *, prefer: str | None = None
) -> tuple[dict[Hashable, C.Constraint], DeclaredLabels]:
    """The constraints a model declares where it is defined, ready for `project`.

    Reads Keras-style declarations, the way `Dense(..., kernel_constraint=c)`
    does, and returns `(constraints, param_labels)` for `oc.project`,
    `oc.apply_constraints`, `oc.constraint_violations` and
    `oc.routing_report`: `oc.project(*oc.declared(model))`.

    `tree` is one of:

    * an `nnx.Module` or `nnx.State` whose variables carry `constraint`
      metadata: `nnx.Linear(..., kernel_metadata={"constraint": c})` (also
      `bias_metadata`, ...), `nnx.with_metadata(init, constraint=c)`,
      `nnx.Param(x, constraint=c)`, `oc.constraint_metadata(c)` (for layers
      stacked by `nnx.vmap`/`nnx.scan`);
    * Linen params (boxed, as `init` returns them) made by
      `oc.with_constraint(init_fn, c)`;
    * a Keras model or layer, or a list of Keras variables
      (`model.trainable_variables`): each variable's `.constraint`, for a
      Keras model trained by a JAX/Optax loop on `[v.value for v in
      model.trainable_variables]`.

    Each constrained leaf gets its own label, its "/"-joined path (for Keras
    the variable's `path`, e.g. `"dense/kernel"`). The labels are matched by
    path with `Param` and box wrappers removed: they fit the wrapped tree
    (`nnx.Optimizer`'s `init`, boxed Linen params) and the plain one (its
    `update`, `nn.unbox`'s output, the list of values). Leaves that declare
    nothing are unconstrained.

    Args:
      tree: the model, its state or params, or the Keras variables.
      rules: optional mapping glob -> constraint (or `None`) for leaves that
        declare nothing, as `label_by_path` takes them: the first matching
        rule wins, a rule to `None` exempts the leaves it matches from later
        rules (a declared constraint stays), and a rule that matches no leaf
        is an error (a typo).
      prefer: when a leaf declares a constraint and a rule gives it a
        different one: `"declared"` (the declaration wins), `"rules"` (the
        rule wins) or `None` (an error naming the leaf).

    Returns:
      `(constraints, param_labels)`: a dict label -> constraint, and a
      `DeclaredLabels` callable.

    >>> import jax, jax.numpy as jnp, optax
    >>> from flax import nnx
    >>> import optax_constraints as oc
    >>> model = nnx.Linear(3, 2, kernel_metadata={"constraint": oc.MaxNorm(1.0)},
    ...                    rngs=nnx.Rngs(0))
    >>> constraints, labels = oc.declared(model, rules={"**/bias": oc.NonNeg()})
    >>> constraints
    {'bias': NonNeg(), 'kernel': MaxNorm(max_value=1.0, axis=0)}
    >>> optimizer = nnx.Optimizer(model, optax.chain(optax.sgd(0.1),
    ...                           oc.project(constraints, labels)), wrt=nnx.Param)
    >>> grads = jax.tree.map(lambda p: 10 * jnp.ones_like(p), nnx.state(model, nnx.Param))
    >>> _ = optimizer.update(model, grads)  # kernel -= 1, bias -= 1: both bind
    >>> model.bias[...]
    Array([0., 0.], dtype=float32)
    >>> v = oc.constraint_violations(nnx.state(model, nnx.Param), constraints, labels)
    >>> {label: float(x) < 1e-6 for label, x in v.items()}  # 0 up to float32 rounding
    {'bias': True, 'kernel': True}
    """
    if prefer not in (None, "declared", "rules"):
        raise ValueError(
            f"declared: prefer must be None, 'declared' or 'rules'; got prefer={prefer!r}."
        )
    entries = _entries(tree)
    engine = GlobRules(
        dict(rules or {}),
        lambda pattern, c: (
            None if c is None else _checked_constraint(c, f"declared: rule {pattern!r}")
        ),
    )
    if prefer is not None and not engine.patterns:
        raise ValueError(
            f"declared: prefer={prefer!r} without rules has nothing to decide; pass"
            " rules={glob: constraint} or drop prefer."
        )

    constraints: dict[Hashable, C.Constraint] = {}
    labels: dict[Path, Hashable] = {}
    won = [engine.first(name) for _, name, _, _ in entries]
    for (path, name, x, own), rule in zip(entries, won, strict=True):
        chosen = own
        # A rule to None only exempts the leaf from later rules.
        if rule is not None and engine.values[rule] is not None:
            pattern, rule_c = engine.patterns[rule], engine.values[rule]
            if own is None or prefer == "rules":
                chosen = rule_c
            elif prefer is None and own != rule_c:
                raise ValueError(
                    f"declared: the parameter at '{name}' (shape {shape_of(x)}) declares"
                    f" {own!r} and the rule {pattern!r} gives it {rule_c!r}. Say which"
                    " wins with prefer='declared' or prefer='rules', or narrow the rule"
                    " (an earlier rule mapping this path to None, e.g."
                    f" {{'{name}': None, {pattern!r}: ...}}, exempts it)."
                )
        if chosen is not None:
            constraints[name] = chosen
            labels[path] = name
    engine.check_all_apply("declared", [name for _, name, _, _ in entries], won)
    return constraints, DeclaredLabels(labels)
