"""Constraints declared on the model: NNX metadata, Linen boxes, Keras variables (lazily)."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Hashable, Mapping
from typing import Any

import jax

from optax_constraints import _labels as L
from optax_constraints import constraints as C
from optax_constraints._labels import Path, PyTree, path_to_str, shape_of
from optax_constraints.constraints._registry import as_constraint


def _is_keras_variable(x) -> bool:
    return type(x).__module__.startswith("keras") and hasattr(x, "constraint")


def _is_stop(x) -> bool:
    """Where a declared leaf ends: a Variable, the outermost box, an empty node."""
    return L.is_empty(x) or L.is_variable(x) or L.is_box(x) or _is_keras_variable(x)


def _checked_constraint(obj, where: str):
    try:
        constraint = as_constraint(obj)
    except (ValueError, TypeError) as err:
        raise type(err)(f"{where}: {err}") from None
    if constraint is None:
        raise TypeError(f"{where}: the constraint is None, which constrains nothing.")
    return constraint


def _restack(constraint, index: int, added: int, what: str):
    """The constraint of a param to which a transform added (+1) or removed (-1) axis `index`."""
    if added > 0:
        return C.Stacked(constraint, stack_axis=index)
    if isinstance(constraint, C.Stacked) and constraint.stack_axis == index:
        return constraint.constraint
    raise ValueError(
        f"A transform removes axis {index} from {what}, but its declared constraint"
        f" {constraint!r} was not stacked along that axis by a transform. Axes must be"
        " removed in the reverse order they were added (nn.scan / nnx.vmap nest)."
    )


@functools.cache
def _box_class():
    from flax import struct
    from flax.core import meta

    class ConstraintBox(struct.PyTreeNode, meta.AxisMetadata):
        """A Linen param and the constraint declared on it (see `with_constraint`)."""

        value: Any
        constraint: Any = struct.field(pytree_node=False)
        # The initializer's rank and the axes transforms added since: `declared` spots an
        # axis this box never saw (a `Partitioned` box outside it does not pass add_axis on).
        ndim: int = struct.field(pytree_node=False, default=0)
        added: int = struct.field(pytree_node=False, default=0)

        def unbox(self):
            return self.value

        def replace_boxed(self, val):
            return self.replace(value=val)

        def add_axis(self, index: int, params: dict) -> ConstraintBox:
            return self._moved_axis("add_axis", index, params, +1)

        def remove_axis(self, index: int, params: dict) -> ConstraintBox:
            return self._moved_axis("remove_axis", index, params, -1)

        def _moved_axis(self, method, index, params, added) -> ConstraintBox:
            constraint = _restack(self.constraint, index, added, "the Linen param")
            value = self.value
            if L.is_box(value):  # flax's meta.add_axis stops at the outermost box
                value = getattr(value, method)(index, params)
            return self.replace(value=value, constraint=constraint, added=self.added + added)

        # nn.get_partition_spec / nn.get_sharding stop at the outermost box
        # (this one): answer for a Partitioned box inside.
        def get_partition_spec(self):
            inner = getattr(self.value, "get_partition_spec", None)
            return jax.sharding.PartitionSpec() if inner is None else inner()

    ConstraintBox.__module__ = __name__
    ConstraintBox.__qualname__ = "ConstraintBox"
    return ConstraintBox


def __getattr__(name: str):
    if name == "ConstraintBox":  # made on first use (defining it imports flax); pickle finds it
        return _box_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def with_constraint(init_fn: Callable, constraint) -> Callable:
    """Wraps a Linen initializer so that its param carries `constraint`.

    The param is made inside an `AxisMetadata` box that `oc.declared` reads
    and `nn.unbox` removes; `nn.scan` / `nn.vmap` make the constraint
    `oc.Stacked(constraint, stack_axis=i)`. Wrap `nn.with_partitioning` inside.

    Args:
      init_fn: a Flax initializer `(key, shape, dtype) -> array` (or -> a box).
      constraint: anything `oc.get` accepts.

    >>> import jax, jax.numpy as jnp
    >>> import flax.linen as nn
    >>> import optax_constraints as oc
    >>> init = oc.with_constraint(nn.initializers.lecun_normal(), oc.MaxNorm(1.0))
    >>> params = nn.Dense(2, kernel_init=init).init(jax.random.key(0), jnp.ones((1, 3)))
    >>> oc.declared(params["params"])[0]
    {'kernel': MaxNorm(max_value=1.0, axis=0)}
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


def _nnx_axis_hook(added: int, variable, index: int, axis_name) -> None:
    constraint = _restack(variable.get_metadata("constraint"), index, added, "an NNX variable")
    variable.set_metadata(constraint=constraint)


_NNX_HOOKS = {  # one pair of objects, so that equal constraints give equal metadata
    "on_add_axis": (functools.partial(_nnx_axis_hook, +1),),
    "on_remove_axis": (functools.partial(_nnx_axis_hook, -1),),
}


def constraint_metadata(constraint) -> dict[str, Any]:
    """NNX `Variable` metadata declaring `constraint`, kept per layer when stacked.

    `{"constraint": c}` plus the hooks through which `nnx.vmap` / `nnx.scan`
    (given `transform_metadata`) make it `oc.Stacked(c, stack_axis=i)`.

    >>> import jax
    >>> from flax import nnx
    >>> import optax_constraints as oc
    >>> @nnx.vmap(in_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    ... def make(key):
    ...     meta = oc.constraint_metadata(oc.MaxNorm(1.0, axis="fan_in"))
    ...     return nnx.Linear(3, 3, kernel_metadata=meta, rngs=nnx.Rngs(key))
    >>> oc.declared(make(jax.random.split(jax.random.key(0), 4)))[0]
    {'kernel': Stacked(MaxNorm(max_value=1.0, axis='fan_in'), stack_axis=0)}
    """
    return {"constraint": _checked_constraint(constraint, "constraint_metadata"), **_NNX_HOOKS}


def _declared_on(x, path: Path):
    """The constraint a wrapped leaf declares (None when it declares nothing)."""
    where = f"the parameter at '{path_to_str(path)}'"
    if L.is_variable(x) or _is_keras_variable(x):
        found = x.get_metadata("constraint", None) if L.is_variable(x) else x.constraint
        at = f"declared: the constraint on {where} (shape {shape_of(x)})"
        return None if found is None else _checked_constraint(found, at)
    ours, box = [], x
    while L.is_box(box):
        if type(box) is _box_class():
            ours.append(box)
        box = box.unbox()
    if len(ours) > 1:
        raise ValueError(
            f"declared: {where} is wrapped by oc.with_constraint {len(ours)} times; declare one"
            " constraint per param (combine them in one oc.Constraint subclass)."
        )
    if ours and len(shape_of(x)) != ours[0].ndim + ours[0].added:
        raise ValueError(
            f"declared: {where} (shape {shape_of(x)}) was created"
            f" with {ours[0].ndim} dimension(s), and a transform"
            " (nn.scan / nn.vmap) added an axis that its oc.with_constraint box never saw:"
            " a box outside it (nn.with_partitioning's Partitioned) does not pass"
            " add_axis on. Put oc.with_constraint outermost:"
            " oc.with_constraint(nn.with_partitioning(init, names), c)."
        )
    return ours[0].constraint if ours else None


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
        for path, x in L.flat_paths(tree, _is_stop)[0]
        if not L.is_empty(x)
    ]


class DeclaredLabels:
    """`oc.declared`'s `param_labels`: `params -> labels`, from `labels` (path tuple -> label).

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import optax_constraints as oc
    >>> param = nnx.Param(jnp.ones(2), constraint=oc.NonNeg())
    >>> oc.declared({"w": param, "b": jnp.ones(2)})[1]({"w": jnp.ones(2), "b": jnp.ones(2)})
    {'b': None, 'w': 'w'}
    """

    def __init__(self, labels: Mapping[Path, Hashable]):
        self.labels = dict(labels)

    def __call__(self, params: PyTree) -> PyTree:
        flat, treedef = L.flat_paths(params, _is_stop)
        paths = {path for path, _ in flat}
        missing = [p for p in self.labels if p not in paths]
        if missing:
            found = [path_to_str(path) for path, _ in flat]
            raise ValueError(
                f"oc.declared: the parameter at '{path_to_str(missing[0])}' declares a"
                f" constraint, but the params given have no leaf there"
                f" ({len(missing)} constrained path(s) missing; parameter paths:"
                f" {L.sample(found)}). Pass oc.declared the tree you train: the same"
                " params (variables['params'], not variables), or for NNX the state"
                " the optimizer trains, e.g. oc.declared(nnx.state(model, nnx.Param))"
                " for wrt=nnx.Param."
            )
        return treedef.unflatten([x if L.is_empty(x) else self.labels.get(p) for p, x in flat])

    def __repr__(self):
        return f"DeclaredLabels({len(self.labels)} constrained leaves)"


def declared(
    tree: PyTree, rules: Mapping[str, Any] | None = None, *, prefer: str | None = None
) -> tuple[dict[Hashable, C.Constraint], DeclaredLabels]:
    """The constraints a model declares, as `(constraints, param_labels)` for `project`.

    Each constrained leaf is labelled by its path; the labels fit the wrapped
    tree and the plain arrays alike (docs/routing.md).

    Args:
      tree: an `nnx.Module` / `nnx.State` with `constraint` metadata, Linen params
        boxed by `oc.with_constraint`, or a Keras model, layer or list of variables.
      rules: glob -> constraint (or `None`) for the leaves that declare nothing.
      prefer: who wins where both give one: `"declared"`, `"rules"` or `None` (error).

    >>> import optax
    >>> from flax import nnx
    >>> import optax_constraints as oc
    >>> meta = {"constraint": oc.MaxNorm(1.0)}
    >>> model = nnx.Linear(3, 2, kernel_metadata=meta, rngs=nnx.Rngs(0))
    >>> constraints, labels = oc.declared(model, rules={"**/bias": oc.NonNeg()})
    >>> constraints
    {'bias': NonNeg(), 'kernel': MaxNorm(max_value=1.0, axis=0)}
    >>> tx = optax.chain(optax.sgd(0.1), oc.project(constraints, labels))
    """
    if prefer not in (None, "declared", "rules"):
        raise ValueError(
            f"declared: prefer must be None, 'declared' or 'rules'; got prefer={prefer!r}."
        )
    entries = _entries(tree)
    engine = L.GlobRules(
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
        if rule is not None and engine.values[rule] is not None:  # a rule to None only exempts
            pattern, rule_c = engine.patterns[rule], engine.values[rule]
            if prefer is None and own is not None and own != rule_c:
                raise ValueError(
                    f"declared: the parameter at '{name}' (shape {shape_of(x)}) declares"
                    f" {own!r} and the rule {pattern!r} gives it {rule_c!r}. Say which"
                    " wins with prefer='declared' or prefer='rules', or narrow the rule"
                    " (an earlier rule mapping this path to None, e.g."
                    f" {{'{name}': None, {pattern!r}: ...}}, exempts it)."
                )
            if own is None or prefer == "rules":
                chosen = rule_c
        if chosen is not None:
            constraints[name] = chosen
            labels[path] = name
    engine.check_all_apply("declared", [name for _, name, _, _ in entries], won)
    return constraints, DeclaredLabels(labels)
