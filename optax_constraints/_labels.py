"""Which leaf gets which constraint.

Labels are matched to parameters by *key path*, not by container type, so a
plain-dict labels tree fits `FrozenDict`, `nnx.State` (with or without
`Param` wrappers) and any registered pytree whose keys spell the same path.
A labels leaf at path `a/b` labels every parameter under `a/b` (labels may be
a prefix of the params tree, as in `optax.partition`); a `None` label leaves
that part unconstrained.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Any

import jax
import optax

PyTree = Any
Path = tuple[str, ...]

LABELS_HELP = (
    "param_labels must be a pytree with the params' structure (or a prefix of"
    " it) whose leaves are labels or None, or a callable params -> such a tree,"
    " e.g. oc.label_by_path({'**/kernel': 'kernel', '**/bias': 'bias'})."
)


@functools.cache
def _is_variable_type(cls: type) -> bool:
    return any(
        base.__name__ == "Variable" and base.__module__.startswith("flax.nnx")
        for base in cls.__mro__
    )


def is_variable(x) -> bool:
    """True for a Flax NNX `Variable` (e.g. `nnx.Param`), detected without importing flax."""
    return _is_variable_type(type(x))


def _is_empty(x) -> bool:
    return x is None or isinstance(x, optax.MaskedNode)


def _is_node_leaf(x) -> bool:
    return _is_empty(x) or is_variable(x)


def key_name(entry) -> str:
    """One path entry as a string segment: dict key, attribute name or index."""
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def path_to_str(path: Path) -> str:
    """The "/"-joined key path shown in messages and matched by `label_by_path`."""
    return "/".join(path) if path else "<root>"


@dataclass(frozen=True)
class Leaf:
    """One parameter leaf: its position in the flat leaf list, path and array."""

    index: int
    path: Path
    value: Any  # the array (an NNX Variable's value is unwrapped)

    @property
    def path_str(self) -> str:
        return path_to_str(self.path)


def param_leaves(params: PyTree) -> tuple[list[Leaf], list[Path]]:
    """The array leaves of `params` with their paths, and the paths of empty nodes.

    NNX `Variable`s count as one leaf (their path ends at the variable, without
    `.value`). `None` and `optax.MaskedNode` are empty nodes: they hold no
    parameter, but a label may point at them.
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_node_leaf)
    leaves, empty = [], []
    for path, x in flat:
        spath = tuple(key_name(e) for e in path)
        if _is_empty(x):
            empty.append(spath)
            continue
        if is_variable(x):
            x = x.get_value() if hasattr(x, "get_value") else x.value
        leaves.append(Leaf(len(leaves), spath, x))
    return leaves, empty


def _label_entries(labels: PyTree) -> dict[Path, Hashable]:
    flat, _ = jax.tree_util.tree_flatten_with_path(labels, is_leaf=_is_node_leaf)
    out = {}
    for path, x in flat:
        if is_variable(x):
            x = x.get_value() if hasattr(x, "get_value") else x.value
        if isinstance(x, optax.MaskedNode):
            x = None
        out[tuple(key_name(e) for e in path)] = x
    return out


def resolve_labels(params: PyTree, param_labels) -> list[tuple[Leaf, Hashable]]:
    """Pairs every array leaf of `params` with its label (`None` = unconstrained).

    Raises `ValueError`, naming the leaf path and shape, when the labels tree
    does not fit the params.
    """
    leaves, empty = param_leaves(params)
    labels = param_labels(params) if callable(param_labels) else param_labels
    entries = _label_entries(labels)
    used: set[Path] = set()
    out = []
    for leaf in leaves:
        for cut in range(len(leaf.path), -1, -1):
            prefix = leaf.path[:cut]
            if prefix in entries:
                used.add(prefix)
                out.append((leaf, entries[prefix]))
                break
        else:
            raise ValueError(
                f"No label for the parameter at '{leaf.path_str}' (shape"
                f" {tuple(getattr(leaf.value, 'shape', ()))}): the labels tree does not"
                f" fit the params. Label paths given: {_sample(entries)}. {LABELS_HELP}"
            )
    for path in entries:
        if path in used:
            continue
        if any(_prefix_related(path, e) for e in empty):
            continue  # points into a masked-out or None part of the params
        raise ValueError(
            f"The label at '{path_to_str(path)}' matches no parameter: the labels"
            f" tree does not fit the params. Parameter paths: {_sample([lf.path for lf in leaves])}."
            f" {LABELS_HELP}"
        )
    return out


def _prefix_related(a: Path, b: Path) -> bool:
    n = min(len(a), len(b))
    return a[:n] == b[:n]


def _sample(paths, n: int = 6) -> str:
    paths = [path_to_str(p) for p in paths]
    shown = ", ".join(repr(p) for p in paths[:n])
    return shown + (f", ... ({len(paths)} in all)" if len(paths) > n else "")


# --- label_by_path -----------------------------------------------------------


@functools.cache
def _compile_glob(pattern: str) -> re.Pattern:
    """A glob over "/"-joined paths: `*` within a segment, `**` any segments."""
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"label_by_path: a rule must be a non-empty string; got {pattern!r}.")
    parts = []
    segments = pattern.strip("/").split("/")
    for i, seg in enumerate(segments):
        last = i == len(segments) - 1
        if seg == "**":
            parts.append(".*" if last else "(?:[^/]*/)*")
        else:
            regex = "".join(
                "[^/]*" if ch == "*" else "[^/]" if ch == "?" else re.escape(ch) for ch in seg
            )
            parts.append(regex + ("" if last else "/"))
    return re.compile("".join(parts) + r"\Z", re.DOTALL)


def glob_match(pattern: str, path: str) -> bool:
    """Whether a "/"-joined `path` matches a `label_by_path` rule.

    >>> glob_match("**/kernel", "Dense_0/kernel")
    True
    >>> glob_match("**/kernel", "kernel")
    True
    >>> glob_match("*/kernel", "block/Dense_0/kernel")
    False
    >>> glob_match("block/**/b*", "block/a/b/bias")
    True
    """
    return _compile_glob(pattern).match(path) is not None


def label_by_path(
    rules: Mapping[str, Hashable], default: Hashable = None, *, allow_unmatched: bool = False
) -> Callable[[PyTree], PyTree]:
    """Labels each leaf by the first glob rule its "/"-joined key path matches.

    Paths join dict keys, attribute names and list indices with "/"; a Flax
    NNX `Param` is addressed by its own path (no trailing `value`), so one rule
    works for `nnx.Optimizer`'s `init` and `update` alike. `*` matches within
    one segment and `**` any number of segments (including none); the first
    matching rule wins; unmatched leaves get `default`.

    Args:
      rules: mapping glob pattern -> label (rules are tried in order).
      default: label for leaves no rule matches (`None`: unconstrained).
      allow_unmatched: if False (default) a rule that matches no leaf raises
        `ValueError` (usually a typo); set True when some trees legitimately
        lack those leaves.

    Returns:
      A function `params -> labels` (same structure as `params`), usable as
      `param_labels` here and in `optax.partition`/`optax.multi_transform`.

    >>> import jax.numpy as jnp
    >>> import optax_constraints as oc
    >>> params = {"Dense_0": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)}}
    >>> oc.label_by_path({"**/kernel": "max_norm", "**/bias": "non_neg"})(params)
    {'Dense_0': {'bias': 'non_neg', 'kernel': 'max_norm'}}
    """
    rules = dict(rules)
    for pattern in rules:
        _compile_glob(pattern)

    def labels_fn(params: PyTree) -> PyTree:
        matched: set[str] = set()
        seen: list[str] = []

        def label_of(path, leaf):
            if _is_empty(leaf):
                return leaf
            spath = path_to_str(tuple(key_name(e) for e in path))
            seen.append(spath)
            for pattern, label in rules.items():
                if glob_match(pattern, spath):
                    matched.add(pattern)
                    return label
            return default

        labels = jax.tree_util.tree_map_with_path(label_of, params, is_leaf=_is_node_leaf)
        unmatched = [p for p in rules if p not in matched]
        if unmatched and not allow_unmatched and seen:
            raise ValueError(
                f"label_by_path: rule(s) {unmatched} match no parameter (a typo?)."
                f" Parameter paths: {_sample([tuple(s.split('/')) for s in seen])}."
                " Fix the pattern, or pass allow_unmatched=True if that is intended."
            )
        return labels

    labels_fn.rules = rules
    labels_fn.default = default
    return labels_fn
