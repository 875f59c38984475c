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
def _has_base(cls: type, name: str, module: str) -> bool:
    return any(b.__name__ == name and b.__module__.startswith(module) for b in cls.__mro__)


def is_variable(x) -> bool:
    """True for a Flax NNX `Variable` (e.g. `nnx.Param`), detected without importing flax."""
    return _has_base(type(x), "Variable", "flax.nnx")


def is_box(x) -> bool:
    """True for a Flax Linen `AxisMetadata` box (`nn.Partitioned`, `oc.with_constraint`'s)."""
    return _has_base(type(x), "AxisMetadata", "flax.core.meta")


def value_of(x):
    """An NNX `Variable`'s array; anything else as it is."""
    if is_variable(x):
        return x.get_value() if hasattr(x, "get_value") else x.value
    return x


def shape_of(x) -> tuple[int, ...]:
    """The shape of an array, or of the one inside a `Variable` and boxes; () for a non-array."""
    x = value_of(x)
    while is_box(x):
        x = x.unbox()
    return tuple(getattr(x, "shape", ()))


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


def flat_paths(tree: PyTree, is_leaf=_is_node_leaf) -> list[tuple[Path, Any]]:
    """`(path as key strings, leaf)` for every leaf; NNX `Variable`s and empty nodes are leaves."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    return [(tuple(key_name(e) for e in path), x) for path, x in flat]


@dataclass(frozen=True)
class Leaf:
    """One parameter leaf: its position in the flat leaf list, path and array."""

    index: int
    path: Path
    value: Any  # the array (an NNX Variable's value is unwrapped)

    @property
    def path_str(self) -> str:
        return path_to_str(self.path)


def resolve_labels(params: PyTree, param_labels) -> list[tuple[Leaf, Hashable]]:
    """Pairs every array leaf of `params` with its label (`None` = unconstrained).

    A label at path `p` covers every leaf whose path starts with `p`; the
    longest such prefix wins. `None` and `optax.MaskedNode` in `params` hold
    no parameter, but a label may point at them. Raises `ValueError`, naming
    the leaf path and shape, when the labels tree does not fit the params.
    """
    leaves: list[Leaf] = []
    empty: list[Path] = []
    for path, x in flat_paths(params):
        if _is_empty(x):
            empty.append(path)
        else:
            leaves.append(Leaf(len(leaves), path, value_of(x)))
    labels = param_labels(params) if callable(param_labels) else param_labels
    entries: dict[Path, Hashable] = {}
    for path, x in flat_paths(labels):
        x = value_of(x)
        entries[path] = None if isinstance(x, optax.MaskedNode) else x

    used: set[Path] = set()
    out = []
    for leaf in leaves:
        cuts = range(len(leaf.path), -1, -1)  # the longest prefix first
        prefix = next((leaf.path[:c] for c in cuts if leaf.path[:c] in entries), None)
        if prefix is None:
            raise ValueError(
                f"No label for the parameter at '{leaf.path_str}' (shape"
                f" {shape_of(leaf.value)}): the labels tree does not fit the params."
                f" Label paths given: {sample(map(path_to_str, entries))}."
                f"{_level_hint(leaf.path, entries, 'params', 'labels')} {LABELS_HELP}"
            )
        used.add(prefix)
        out.append((leaf, entries[prefix]))

    # A label at the root covers any tree (even one without leaves), and one
    # may point at, above or into a None / MaskedNode part of the params.
    unused = [p for p in entries if p and p not in used]
    if unused:
        empty_set = set(empty)
        above_empty = {e[:cut] for e in empty for cut in range(len(e) + 1)}
        for path in unused:
            if path in above_empty or any(path[:cut] in empty_set for cut in range(len(path))):
                continue
            raise ValueError(
                f"The label at '{path_to_str(path)}' matches no parameter: the labels tree"
                f" does not fit the params. Parameter paths:"
                f" {sample(lf.path_str for lf in leaves)}."
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
        extra, where, lacking = path[0], this, other
    else:
        extra = next((o[0] for o in others if len(o) == len(path) + 1 and o[1:] == path), None)
        where, lacking = other, this
        if extra is None:
            return ""
    example = " (variables['params'], not variables)" if extra == "params" else ""
    return (
        f" (The {where} have an extra top-level key {extra!r} that the {lacking} lack:"
        f" pass the {where}' subtree under {extra!r}{example}.)"
    )


def sample(names, n: int = 6) -> str:
    """The first `n` of some "/"-joined paths, for a message, and how many there are."""
    names = list(names)
    shown = ", ".join(repr(p) for p in names[:n])
    return shown + (f", ... ({len(names)} in all)" if len(names) > n else "")


# --- label_by_path -----------------------------------------------------------

GLOB_HELP = (
    "A rule is a glob over the '/'-joined key path of a leaf: '*' matches within"
    " one segment, '?' one character, '**' any number of whole segments (none"
    " included), e.g. '**/kernel', 'encoder/*/bias', 'Dense_0/**'."
)


@functools.cache
def _compile_glob(pattern: str) -> re.Pattern:
    """A glob over "/"-joined paths as a regular expression."""
    if not isinstance(pattern, str) or not pattern.strip("/"):
        raise ValueError(f"label_by_path: got the rule {pattern!r}. {GLOB_HELP}")
    segments = []
    for seg in pattern.strip("/").split("/"):
        if not (seg == "**" and segments and segments[-1] == "**"):  # '**/**' is '**'
            segments.append(seg)
    last = len(segments) - 1
    regex = []
    for i, seg in enumerate(segments):
        if seg == "**":  # zero or more whole segments; the token carries the "/" around it
            if last == 0:
                regex.append(".*")  # just '**'
            elif i == 0:
                regex.append("(?:.*/)?")  # '**/b'
            elif i == last:
                regex.append("(?:/.*)?")  # 'a/**'
            else:
                regex.append("/(?:.*/)?")  # 'a/**/b'
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

    >>> import optax_constraints as oc
    >>> oc.glob_match("**/kernel", "Dense_0/kernel"), oc.glob_match("**/kernel", "kernel")
    (True, True)
    >>> oc.glob_match("*/kernel", "block/Dense_0/kernel"), oc.glob_match("Dense_?", "Dense_10")
    (False, False)
    """
    return _compile_glob(pattern).match(path) is not None


def label_by_path(
    rules: Mapping[str, Hashable], default: Hashable = None, *, allow_unmatched: bool = False
) -> Callable[[PyTree], PyTree]:
    """Labels each leaf by the first glob rule (`glob_match`) its "/"-joined key path matches.

    A leaf's path joins its dict keys, attribute names (registered dataclasses,
    `flax.struct.dataclass`) and list/tuple indices with "/", so
    `{"Dense_0": {"kernel": w}}` gives `"Dense_0/kernel"` whether the container
    is a dict, a `FrozenDict` or an `nnx.State`. A Flax NNX `Param` is
    addressed by its own path (no trailing `value`), so one rule works for
    `nnx.Optimizer`'s `init` (which sees `Param` leaves) and `update` (which
    sees plain arrays). `None` and `optax.MaskedNode` nodes stay as they are.

    Args:
      rules: mapping glob pattern -> label, tried in order (a dict, or a list
        of `(pattern, label)` pairs). A label of `None` leaves the leaf
        unconstrained, which is how to carve exceptions out of a later rule.
      default: label for leaves no rule matches (`None`: unconstrained).
      allow_unmatched: if False (default), a rule that labels no leaf raises
        `ValueError`: one that matches no path (usually a typo) or one
        shadowed by earlier rules (usually an ordering mistake). Set True when
        some trees legitimately lack those leaves.

    Returns:
      A function `params -> labels`, usable as `param_labels` here and in
      `optax.partition`.

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
    engine = GlobRules(
        rules, lambda pattern, label: _hashable(label, f"the label of rule {pattern!r}")
    )
    _hashable(default, "default")

    def labels_fn(params: PyTree) -> PyTree:
        paths: list[str] = []
        won: list[int | None] = []

        def label_of(path, leaf):
            paths.append(path_to_str(tuple(key_name(e) for e in path)))
            won.append(engine.first(paths[-1]))
            if _is_empty(leaf):
                return leaf
            return default if won[-1] is None else engine.values[won[-1]]

        labels = jax.tree_util.tree_map_with_path(label_of, params, is_leaf=_is_node_leaf)
        if not allow_unmatched:
            engine.check_all_apply(
                "label_by_path", paths, won, ", or pass allow_unmatched=True if that is intended"
            )
        return labels

    return labels_fn


class GlobRules:
    """Ordered glob rules -> values: a path takes the first rule it matches.

    The engine of `label_by_path` (values are labels) and `declared(rules=)`
    (values are constraints); `convert(pattern, value)` checks each value.
    """

    def __init__(self, rules: Mapping[str, Any], convert: Callable[[str, Any], Any]):
        self.patterns = list(rules)
        self.regexes = [_compile_glob(p) for p in self.patterns]
        self.values = [convert(p, v) for p, v in rules.items()]

    def first(self, path: str) -> int | None:
        """The index of the first rule `path` matches (None: no rule)."""
        return next((i for i, r in enumerate(self.regexes) if r.match(path)), None)

    def check_all_apply(self, owner: str, paths: list[str], won, alternative: str = "") -> None:
        """Raises `ValueError` for a rule that won none of `paths` (`won`: each path's rule).

        A rule that matches no path is a typo; one whose paths earlier rules all
        took is in the wrong order. Nothing to check when there are no paths.
        """
        won = set(won)
        dead = [i for i in range(len(self.patterns)) if i not in won]
        if not dead or not paths:
            return
        taken = [(i, next((p for p in paths if self.regexes[i].match(p)), None)) for i in dead]
        unmatched = [self.patterns[i] for i, path in taken if path is None]
        if unmatched:
            raise ValueError(
                f"{owner}: rule(s) {unmatched} match no parameter (a typo?). Parameter paths:"
                f" {sample(paths)}. Fix the pattern{alternative}. {GLOB_HELP}"
            )
        i, path = taken[0]
        earlier = next(j for j in range(i) if self.regexes[j].match(path))
        raise ValueError(
            f"{owner}: rule {self.patterns[i]!r} never applies: every path it matches (e.g."
            f" {path!r}) is taken first by the earlier rule {self.patterns[earlier]!r} (the"
            f" first matching rule wins). Put the more specific rule first{alternative}."
        )


def _hashable(label, what: str):
    try:
        hash(label)
    except TypeError:
        raise TypeError(
            f"label_by_path: {what} must be hashable (a string, say); got {label!r}."
        ) from None
    return label
