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


_KEY_ATTRS = {
    jax.tree_util.DictKey: "key",
    jax.tree_util.GetAttrKey: "name",
    jax.tree_util.SequenceKey: "idx",
    jax.tree_util.FlattenedIndexKey: "key",
}


def key_name(entry) -> str:
    """One path entry as a string segment: dict key, attribute name or index."""
    attr = _KEY_ATTRS.get(type(entry))
    if attr is not None:  # the common case, without hasattr's cost
        return str(getattr(entry, attr))
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

    A label at path `p` covers every leaf whose path starts with `p`; the
    longest such prefix wins. Runs in time linear in the total path length.

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
                f" fit the params. Label paths given: {_sample(entries)}."
                f"{_level_hint(leaf.path, entries, 'params', 'labels')} {LABELS_HELP}"
            )
    if len(used) < len(entries):
        # A label may point into a None / MaskedNode part of the params: fine.
        empty_set = set(empty)
        empty_prefixes = {e[:cut] for e in empty for cut in range(len(e) + 1)}
        for path in entries:
            if path in used or path in empty_prefixes or not path:
                continue  # (a label at the root covers any tree, even one without leaves)
            if any(path[:cut] in empty_set for cut in range(len(path))):
                continue
            raise ValueError(
                f"The label at '{path_to_str(path)}' matches no parameter: the labels tree"
                f" does not fit the params. Parameter paths:"
                f" {_sample([lf.path for lf in leaves])}."
                f"{_level_hint(path, [lf.path for lf in leaves], 'labels', 'params')} {LABELS_HELP}"
            )
    return out


def _level_hint(path: Path, others, this: str, other: str) -> str:
    """Spots the usual misfit: one tree has an extra top level (e.g. 'params').

    `path` is from the `this` tree and found no partner among `others`, the
    paths of the `other` tree.
    """
    others = set(others)
    if len(path) > 1 and path[1:] in others:
        extra, where = path[0], this
    else:
        extra = next((o[0] for o in others if len(o) == len(path) + 1 and o[1:] == path), None)
        where = other
        if extra is None:
            return ""
    lacking = other if where == this else this
    example = " (variables['params'], not variables)" if extra == "params" else ""
    return (
        f" (The {where} have an extra top-level key {extra!r} that the {lacking} lack:"
        f" pass the {where}' subtree under {extra!r}{example}.)"
    )


def _sample(paths, n: int = 6) -> str:
    paths = [path_to_str(p) for p in paths]
    shown = ", ".join(repr(p) for p in paths[:n])
    return shown + (f", ... ({len(paths)} in all)" if len(paths) > n else "")


# --- label_by_path -----------------------------------------------------------

GLOB_HELP = (
    "A rule is a glob over the '/'-joined key path of a leaf: '*' matches within"
    " one segment, '?' one character, '**' any number of whole segments (none"
    " included), e.g. '**/kernel', 'encoder/*/bias', 'Dense_0/**'."
)


def _double_star(i: int, last: int) -> str:
    """Zero or more whole segments; the token also carries the "/" around it."""
    if last == 0:
        return ".*"  # the pattern is just '**'
    if i == 0:
        return "(?:.*/)?"  # '**/b': any leading segments
    if i == last:
        return "(?:/.*)?"  # 'a/**': any trailing segments
    return "/(?:.*/)?"  # 'a/**/b': any segments in between


@functools.cache
def _compile_glob(pattern: str) -> re.Pattern:
    """A glob over "/"-joined paths as a regular expression (cached per pattern)."""
    if not isinstance(pattern, str) or not pattern.strip("/"):
        raise ValueError(f"label_by_path: got the rule {pattern!r}. {GLOB_HELP}")
    segments = []
    for seg in pattern.strip("/").split("/"):
        if not (seg == "**" and segments and segments[-1] == "**"):  # '**/**' is '**'
            segments.append(seg)
    last = len(segments) - 1
    regex = []
    for i, seg in enumerate(segments):
        if seg == "**":
            regex.append(_double_star(i, last))
            continue
        if i > 0 and segments[i - 1] != "**":
            regex.append("/")
        regex.append(
            "".join("[^/]*" if ch == "*" else "[^/]" if ch == "?" else re.escape(ch) for ch in seg)
        )
    return re.compile("".join(regex) + r"\Z", re.DOTALL)


def glob_match(pattern: str, path: str) -> bool:
    """Whether a "/"-joined key `path` matches a `label_by_path` rule.

    `*` matches any characters within one segment, `?` one character, and a
    `**` segment any number of whole segments, none included. The whole path
    must match.

    Args:
      pattern: the glob, e.g. `"**/kernel"`.
      path: a "/"-joined key path, e.g. `"Dense_0/kernel"`.

    Returns:
      True when `pattern` matches all of `path`.

    >>> import optax_constraints as oc
    >>> oc.glob_match("**/kernel", "Dense_0/kernel"), oc.glob_match("**/kernel", "kernel")
    (True, True)
    >>> oc.glob_match("*/kernel", "block/Dense_0/kernel")
    False
    >>> oc.glob_match("block/**", "block"), oc.glob_match("block/**/b*", "block/a/b/bias")
    (True, True)
    >>> oc.glob_match("Dense_?/kernel", "Dense_10/kernel")
    False
    """
    return _compile_glob(pattern).match(path) is not None


def label_by_path(
    rules: Mapping[str, Hashable], default: Hashable = None, *, allow_unmatched: bool = False
) -> Callable[[PyTree], PyTree]:
    """Labels each leaf by the first glob rule its "/"-joined key path matches.

    A leaf's path joins its dict keys, attribute names (registered dataclasses,
    `flax.struct.dataclass`) and list/tuple indices with "/", so
    `{"Dense_0": {"kernel": w}}` gives `"Dense_0/kernel"` whether the container
    is a dict, a `FrozenDict` or an `nnx.State`. A Flax NNX `Param` is
    addressed by its own path (no trailing `value`), so one rule works for
    `nnx.Optimizer`'s `init` (which sees `Param` leaves) and `update` (which
    sees plain arrays). In a rule, `*` matches within one segment, `?` one
    character and `**` any number of whole segments (including none); the
    rules are tried in order and the first match wins; unmatched leaves get
    `default`. `None` and `optax.MaskedNode` nodes stay as they are.

    Args:
      rules: mapping glob pattern -> label, tried in order (a dict, or a list
        of `(pattern, label)` pairs). A label of `None` leaves the leaf
        unconstrained, which is how to carve exceptions out of a later rule.
      default: label for leaves no rule matches (`None`: unconstrained).
      allow_unmatched: if False (default), a rule that labels no leaf raises
        `ValueError`: one that matches no path (usually a typo; the message
        lists some real paths) or one shadowed by earlier rules (usually an
        ordering mistake). Set True when some trees legitimately lack those
        leaves, e.g. one rule list shared by several models.

    Returns:
      A function `params -> labels` (the structure of `params`, labels at the
      leaves), usable as `param_labels` here and in `optax.partition`.

    >>> import jax.numpy as jnp
    >>> import optax_constraints as oc
    >>> params = {"Dense_0": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)},
    ...           "LayerNorm_0": {"scale": jnp.ones(2), "bias": jnp.ones(2)}}
    >>> labels = oc.label_by_path({"LayerNorm_*/**": None, "**/kernel": "max_norm",
    ...                            "**/bias": "non_neg"})
    >>> labels(params)
    {'Dense_0': {'bias': 'non_neg', 'kernel': 'max_norm'}, 'LayerNorm_0': {'bias': None, 'scale': None}}
    """
    try:
        rules = dict(rules)
    except (TypeError, ValueError):
        raise TypeError(
            "label_by_path: rules must be a mapping glob pattern -> label (or a list of"
            f" (pattern, label) pairs), e.g. {{'**/kernel': 'kernel'}}; got {rules!r}."
        ) from None
    compiled = [(pattern, _compile_glob(pattern), label) for pattern, label in rules.items()]
    for pattern, _, label in compiled:
        _check_hashable(label, f"the label of rule {pattern!r}")
    _check_hashable(default, "default")

    def labels_fn(params: PyTree) -> PyTree:
        won: set[int] = set()  # rules that labelled some leaf
        shadowed: dict[int, tuple[int, str]] = {}  # rule -> (earlier rule, a path it took)
        shown: list[str] = []
        count = 0

        def label_of(path, leaf):
            nonlocal count
            spath = path_to_str(tuple(key_name(e) for e in path))
            count += 1
            if len(shown) < 8:
                shown.append(spath)
            for i, (_, regex, label) in enumerate(compiled):
                if regex.match(spath):
                    won.add(i)
                    # Later rules that never won yet: note if this path was theirs too.
                    for j in range(i + 1, len(compiled) if not allow_unmatched else 0):
                        if j not in won and j not in shadowed and compiled[j][1].match(spath):
                            shadowed[j] = (i, spath)
                    return leaf if _is_empty(leaf) else label
            return leaf if _is_empty(leaf) else default

        labels = jax.tree_util.tree_map_with_path(label_of, params, is_leaf=_is_node_leaf)
        if allow_unmatched or not count or len(won) == len(compiled):
            return labels
        listed = ", ".join(repr(p) for p in shown)
        more = f", ... ({count} in all)" if count > len(shown) else ""
        dead = [i for i in range(len(compiled)) if i not in won]
        unmatched = [compiled[i][0] for i in dead if i not in shadowed]
        if unmatched:
            raise ValueError(
                f"label_by_path: rule(s) {unmatched} match no parameter (a typo?)."
                f" Parameter paths: {listed}{more}. Fix the pattern, or pass"
                f" allow_unmatched=True if that is intended. {GLOB_HELP}"
            )
        i = dead[0]
        earlier, spath = shadowed[i]
        raise ValueError(
            f"label_by_path: rule {compiled[i][0]!r} never applies: every path it matches"
            f" (e.g. {spath!r}) is taken first by the earlier rule {compiled[earlier][0]!r}"
            " (the first matching rule wins). Put the more specific rule first, or pass"
            " allow_unmatched=True if that is intended."
        )

    labels_fn.rules = rules
    labels_fn.default = default
    return labels_fn


def _check_hashable(label, what: str) -> None:
    try:
        hash(label)
    except TypeError:
        raise TypeError(
            f"label_by_path: {what} must be hashable (a string, say); got {label!r}."
        ) from None
