"""Which leaf gets which constraint: labels matched to params by key path, and path rules."""

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
GLOB_HELP = (
    "A rule is a glob over the '/'-joined key path of a leaf: '*' matches within"
    " one segment, '?' one character, '**' any number of whole segments (none"
    " included), e.g. '**/kernel', 'encoder/*/bias', 'Dense_0/**'."
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
    return x.get_value() if is_variable(x) else x


def shape_of(x) -> tuple[int, ...]:
    """The shape of an array, or of the one inside a `Variable` and boxes; () for a non-array."""
    x = value_of(x)
    while is_box(x):
        x = x.unbox()
    return tuple(getattr(x, "shape", ()))


def is_empty(x) -> bool:
    return x is None or isinstance(x, optax.MaskedNode)


def _is_node_leaf(x) -> bool:
    return is_empty(x) or is_variable(x)


def key_name(entry) -> str:
    """One path entry as a string segment: dict key, attribute name or index."""
    return str(getattr(entry, "key", getattr(entry, "name", getattr(entry, "idx", entry))))


def path_to_str(path: Path) -> str:
    """The "/"-joined key path shown in messages and matched by `label_by_path`."""
    return "/".join(path) if path else "<root>"


def flat_paths(tree: PyTree, is_leaf=_is_node_leaf) -> tuple[list[tuple[Path, Any]], Any]:
    """`(path as key strings, leaf)` per leaf, and the treedef; `Variable`s, `None` are leaves."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    return [(tuple(map(key_name, path)), x) for path, x in flat], treedef


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
    """Pairs every array leaf of `params` with its label, reading labels as `optax.partition`.

    A label covers the leaves under its path (the longest such prefix wins).
    Raises `ValueError` naming the leaf when the labels do not fit the params.
    """
    flat = flat_paths(params)[0]
    empty = [path for path, x in flat if is_empty(x)]
    arrays = [(path, value_of(x)) for path, x in flat if not is_empty(x)]
    leaves = [Leaf(i, path, x) for i, (path, x) in enumerate(arrays)]
    labels = param_labels(params) if callable(param_labels) else param_labels
    entries: dict[Path, Hashable] = {}
    for path, x in flat_paths(labels)[0]:
        entries[path] = None if isinstance(x := value_of(x), optax.MaskedNode) else x

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

    for path in entries:  # a label at the root covers any tree, even one without leaves
        at_empty = any(path[: len(e)] == e or e[: len(path)] == path for e in empty)
        if path and path not in used and not at_empty:
            raise ValueError(
                f"The label at '{path_to_str(path)}' matches no parameter: the labels tree"
                f" does not fit the params. Parameter paths:"
                f" {sample(lf.path_str for lf in leaves)}."
                f"{_level_hint(path, [lf.path for lf in leaves], 'labels', 'params')} {LABELS_HELP}"
            )
    return out


def _level_hint(path: Path, others, this: str, other: str) -> str:
    """Spots the usual misfit: the `this` or the `other` tree has an extra top level."""
    others = set(others)
    if len(path) > 1 and path[1:] in others:
        extra, where, lacking = path[0], this, other
    elif (extra := next((o[0] for o in others if o and o[1:] == path), None)) is not None:
        where, lacking = other, this
    else:
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


@functools.cache
def _glob_matcher(pattern: str) -> Callable[[str], bool]:
    """Whether a "/"-joined path matches `pattern` (a regex matched on the path + "/")."""
    if not isinstance(pattern, str) or not pattern.strip("/"):
        raise ValueError(f"label_by_path: got the rule {pattern!r}. {GLOB_HELP}")
    regex = "".join(
        "(?:.*/)?"  # '**': zero or more whole segments
        if seg == "**"
        else re.escape(seg).replace(r"\*", "[^/]*").replace(r"\?", "[^/]") + "/"
        for seg in pattern.strip("/").split("/")
    )
    compiled = re.compile(regex + r"\Z", re.DOTALL)
    return lambda path: compiled.match(path + "/") is not None


def glob_match(pattern: str, path: str) -> bool:
    """Whether a "/"-joined key `path` matches a glob (`*`: within a segment, `**`: any segments).

    >>> import optax_constraints as oc
    >>> oc.glob_match("**/kernel", "kernel"), oc.glob_match("*/kernel", "a/b/kernel")
    (True, False)
    """
    return _glob_matcher(pattern)(path)


class GlobRules:
    """Ordered glob rules -> values (each checked by `convert`); the first match wins."""

    def __init__(self, rules: Mapping[str, Any], convert: Callable[[str, Any], Any]):
        self.patterns = list(rules)
        self.matchers = [_glob_matcher(p) for p in self.patterns]
        self.values = [convert(p, v) for p, v in rules.items()]

    def first(self, path: str) -> int | None:
        """The index of the first rule `path` matches (None: no rule)."""
        return next((i for i, matches in enumerate(self.matchers) if matches(path)), None)

    def check_all_apply(self, owner: str, paths: list[str], won, alternative: str = "") -> None:
        """Raises `ValueError` for a rule that won none of `paths` (`won`: each path's rule)."""
        dead = sorted(set(range(len(self.patterns))) - set(won)) if paths else []
        unmatched = [self.patterns[i] for i in dead if not any(self.matchers[i](p) for p in paths)]
        if unmatched:
            raise ValueError(
                f"{owner}: rule(s) {unmatched} match no parameter (a typo?). Parameter paths:"
                f" {sample(paths)}. Fix the pattern{alternative}. {GLOB_HELP}"
            )
        if not dead:
            return
        i = dead[0]
        path = next(p for p in paths if self.matchers[i](p))
        earlier = next(j for j in range(i) if self.matchers[j](path))
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


def label_by_path(
    rules: Mapping[str, Hashable], default: Hashable = None, *, allow_unmatched: bool = False
) -> Callable[[PyTree], PyTree]:
    """A `param_labels` function: each leaf gets the first glob rule its "/"-joined path matches.

    Args:
      rules: mapping glob -> label (or a list of `(glob, label)` pairs), tried in
        order (docs/routing.md). A rule to `None` exempts its leaves from later rules.
      default: the label of leaves no rule matches (`None`: unconstrained).
      allow_unmatched: if False, a rule that labels no leaf (a typo, or one
        shadowed by earlier rules) raises `ValueError`.

    >>> import jax.numpy as jnp
    >>> import optax_constraints as oc
    >>> labels = oc.label_by_path({"LayerNorm_*/**": None, "**/kernel": "k", "**/bias": "b"})
    >>> labels({"Dense_0": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)},
    ...         "LayerNorm_0": {"scale": jnp.ones(2), "bias": jnp.ones(2)}})
    {'Dense_0': {'bias': 'b', 'kernel': 'k'}, 'LayerNorm_0': {'bias': None, 'scale': None}}
    """
    try:
        rules = dict(rules)
    except (TypeError, ValueError):
        raise TypeError(
            "label_by_path: rules must be a mapping glob pattern -> label (or a list of"
            f" (pattern, label) pairs), e.g. {{'**/kernel': 'kernel'}}; got {rules!r}."
        ) from None
    engine = GlobRules(rules, lambda pattern, x: _hashable(x, f"the label of rule {pattern!r}"))
    _hashable(default, "default")

    def labels_fn(params: PyTree) -> PyTree:
        flat, treedef = flat_paths(params)
        paths = [path_to_str(path) for path, _ in flat]
        won = [engine.first(path) for path in paths]
        if not allow_unmatched:
            engine.check_all_apply(
                "label_by_path", paths, won, ", or pass allow_unmatched=True if that is intended"
            )
        labels = [default if i is None else engine.values[i] for i in won]
        return treedef.unflatten([x if is_empty(x) else y for (_, x), y in zip(flat, labels)])

    return labels_fn
