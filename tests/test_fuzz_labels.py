"""Fuzzed label routing: every params/labels pair works exactly or fails clearly.

Hypothesis builds random parameter trees (nested dicts, lists, tuples, `None`,
`FrozenDict`, `nnx.State`, `nnx.Param` leaves, float and integer arrays) and
random labels for them: mirrored trees (with plain dicts/lists standing in for
`FrozenDict`/`nnx.State`/tuples), prefix labels, corrupted trees, a single
root label, or `oc.label_by_path` rules built from real keys and wildcards.

A small reference written from the spec (docs: DESIGN.md, "labels") predicts
the outcome: either the label of every leaf, or the catalogued errors that may
be raised. Then `oc.apply_constraints` must do exactly that: succeed and change
precisely the labelled leaves (label "a" adds 1, "b" adds 2), or raise
`ValueError`/`TypeError` with a message from docs/misuse.md; never an internal
`KeyError`, `AttributeError`, `IndexError`, nor a silent success where an
error was due.

Profiles as in tests/test_properties.py (`HYPOTHESIS_PROFILE=ci|dev`).
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.core import FrozenDict
from helpers import examples
from hypothesis import event, given
from hypothesis import strategies as st

import optax_constraints as oc

OFFSETS = {"a": 1.0, "b": 2.0}
CONSTRAINTS = {"a": lambda w: w + 1, "b": lambda w: w + 2}
UNKNOWN = "zzz"  # a label that is not a key of CONSTRAINTS
LABELS = st.sampled_from(["a", "b", None, "a", "b", None, UNKNOWN])

# Message stems of the catalogued errors (each is checked to be in docs/misuse.md).
FIT = "the labels tree does not fit the params"
NOT_A_KEY = "which is not a key of constraints"
NOT_FLOAT = "constraints apply to floating-point arrays"
NO_MATCH = "match no parameter"
SHADOWED = "never applies"
REQUIRED = "param_labels is required"  # labels=None cannot mean "all unconstrained"
STEMS = (FIT, NOT_A_KEY, NOT_FLOAT, NO_MATCH, SHADOWED, REQUIRED)

KEYS = ["kernel", "bias", "scale", "Dense_0", "Dense_1", "layers", "0", "1", "a_b"]

# --- params ------------------------------------------------------------------------


def _array(spec):
    shape, dtype = spec
    return jnp.zeros(shape, dtype)


ARRAYS = st.tuples(
    st.sampled_from([(2,), (2, 3)]),
    st.sampled_from([jnp.float32] * 4 + [jnp.bfloat16, jnp.int32]),
).map(_array)
PARAM_LEAVES = st.one_of(ARRAYS, ARRAYS.map(nnx.Param), st.none())


def _containers(children):
    dicts = st.dictionaries(st.sampled_from(KEYS), children, max_size=3)
    return st.one_of(
        dicts,
        st.lists(children, max_size=3),
        st.lists(children, max_size=3).map(tuple),
        dicts.map(FrozenDict),
        dicts.map(nnx.State),
    )


PARAMS = st.recursive(PARAM_LEAVES, _containers, max_leaves=8)


# --- the reference ---------------------------------------------------------------------


@dataclasses.dataclass
class Node:
    path: tuple[str, ...]
    value: object  # the array, or None for an empty node


def walk(tree, path=()) -> list[Node]:
    """Leaves and empty nodes of a params or labels tree, by key path."""
    if tree is None:
        return [Node(path, None)]
    if isinstance(tree, nnx.Variable):
        return [Node(path, tree.get_value())]
    if isinstance(tree, Mapping):
        return [n for k, v in tree.items() for n in walk(v, (*path, str(k)))]
    if isinstance(tree, list | tuple):
        return [n for i, v in enumerate(tree) for n in walk(v, (*path, str(i)))]
    return [Node(path, tree)]


def label_entries(labels) -> dict[tuple[str, ...], object]:
    return {n.path: n.value for n in walk(labels)}


@dataclasses.dataclass
class Prediction:
    labels: dict[tuple[str, ...], object] | None  # per array leaf, when it works
    errors: set[str]  # message stems that may be raised instead


def _check_constraints(leaves, labels) -> set[str]:
    errors = set()
    for node in leaves:
        label = labels[node.path]
        if label is None:
            continue
        if label not in CONSTRAINTS:
            errors.add(NOT_A_KEY)
        elif not jnp.issubdtype(node.value.dtype, jnp.floating):
            errors.add(NOT_FLOAT)
    return errors


def predict_tree_labels(params, labels) -> Prediction:
    if labels is None:
        return Prediction(None, {REQUIRED})
    nodes = walk(params)
    leaves = [n for n in nodes if n.value is not None]
    empties = [n.path for n in nodes if n.value is None]
    entries = label_entries(labels)
    got, used = {}, set()
    for node in leaves:
        prefixes = [node.path[:cut] for cut in range(len(node.path), -1, -1)]
        found = next((p for p in prefixes if p in entries), None)
        if found is None:
            return Prediction(None, {FIT})
        used.add(found)
        got[node.path] = entries[found]
    for path in entries:
        if path in used or not path:
            continue
        into_empty = any(e[: len(path)] == path or path[: len(e)] == e for e in empties)
        if not into_empty:
            return Prediction(None, {FIT})
    errors = _check_constraints(leaves, got)
    return Prediction(None if errors else got, errors)


def glob_matches(pattern: str, path: tuple[str, ...]) -> bool:
    """The spec's glob: `*`/`?` within a segment, `**` any number of segments."""
    segments = ("/".join(path) or "<root>").split("/")

    def match(pat, segs):
        if not pat:
            return not segs
        if pat[0] == "**":
            return any(match(pat[1:], segs[i:]) for i in range(len(segs) + 1))
        return bool(segs) and fnmatch.fnmatchcase(segs[0], pat[0]) and match(pat[1:], segs[1:])

    return match(pattern.strip("/").split("/"), segments)


def predict_rules(params, rules: dict, default, allow_unmatched: bool) -> Prediction:
    nodes = walk(params)
    won, got = set(), {}
    for node in nodes:
        first = next((i for i, p in enumerate(rules) if glob_matches(p, node.path)), None)
        if first is not None:
            won.add(first)
        if node.value is not None:
            got[node.path] = default if first is None else list(rules.values())[first]
    if nodes and not allow_unmatched and len(won) < len(rules):
        return Prediction(None, {NO_MATCH, SHADOWED})
    errors = _check_constraints([n for n in nodes if n.value is not None], got)
    return Prediction(None if errors else got, errors)


# --- labels strategies -------------------------------------------------------------


@st.composite
def mirrored(draw, tree, prefix_ok=True):
    """A labels tree for `tree`: same paths, plain containers or the same ones,
    with random labels, and now and then one label for a whole subtree."""
    if (
        tree is None
        or isinstance(tree, nnx.Variable)
        or not isinstance(tree, Mapping | list | tuple)
    ):
        return draw(LABELS)
    if prefix_ok and draw(st.integers(0, 5)) == 0:
        return draw(LABELS)  # one label for the whole subtree (a prefix)
    if isinstance(tree, Mapping):
        items = {k: draw(mirrored(v)) for k, v in tree.items()}
        kind = draw(st.sampled_from(["dict", "same"]))
        if kind == "same" and isinstance(tree, FrozenDict):
            return FrozenDict(items)
        if kind == "same" and isinstance(tree, nnx.State):
            return nnx.State(items)
        return items
    items = [draw(mirrored(v)) for v in tree]
    return tuple(items) if draw(st.booleans()) else items


@st.composite
def corrupted(draw, tree):
    """A mirrored labels tree with one structural mistake (or none left to make)."""
    labels = draw(mirrored(tree, prefix_ok=False))
    mistake = draw(st.sampled_from(["extra_key", "drop_key", "extra_level", "as_list"]))
    if mistake == "extra_level":
        return {"params": labels}
    if mistake == "as_list" and isinstance(labels, Mapping):
        return list(labels.values())
    if isinstance(labels, Mapping):
        labels = dict(labels)
        if mistake == "extra_key":
            labels[draw(st.sampled_from(["extra", *KEYS]))] = draw(LABELS)
        elif labels:
            del labels[draw(st.sampled_from(sorted(labels)))]
    return labels


PATTERN_SEGMENTS = st.sampled_from([*KEYS, "*", "**", "?", "Dense_*", "*_0", "k*l", "<root>"])
PATTERNS = st.lists(PATTERN_SEGMENTS, min_size=1, max_size=3).map("/".join)


# --- the property ------------------------------------------------------------------------


def _offsets(params, out) -> dict[tuple[str, ...], float]:
    before = {n.path: n.value for n in walk(params) if n.value is not None}
    after = {n.path: n.value for n in walk(out) if n.value is not None}
    assert before.keys() == after.keys()
    moved = {}
    for path, w in after.items():
        assert w.shape == before[path].shape and w.dtype == before[path].dtype
        delta = np.unique(np.asarray(w, np.float64) - np.asarray(before[path], np.float64))
        assert delta.size <= 1, f"{path}: not one offset: {delta}"
        moved[path] = float(delta[0]) if delta.size else 0.0
    return moved


def check(params, labels, prediction: Prediction):
    try:
        out = oc.apply_constraints(params, CONSTRAINTS, labels)
    except (ValueError, TypeError) as err:
        message = str(err)
        event(f"error: {next((s for s in STEMS if s in message), 'other')}")
        assert prediction.labels is None, f"unexpected error for a fitting tree: {message}"
        assert any(stem in message for stem in prediction.errors), (
            f"expected one of {prediction.errors}; got {type(err).__name__}: {message}"
        )
        return
    event("works")
    assert prediction.labels is not None, f"no error, but one of {prediction.errors} was due"
    assert jax.tree.structure(out) == jax.tree.structure(params)
    expected = {p: OFFSETS.get(label, 0.0) for p, label in prediction.labels.items()}
    assert _offsets(params, out) == expected


@examples(300)
@given(data=st.data())
def test_mirrored_and_prefix_labels(data):
    params = data.draw(PARAMS, label="params")
    labels = data.draw(mirrored(params), label="labels")
    check(params, labels, predict_tree_labels(params, labels))


@examples(300)
@given(data=st.data())
def test_corrupted_labels(data):
    params = data.draw(PARAMS, label="params")
    labels = data.draw(corrupted(params), label="labels")
    check(params, labels, predict_tree_labels(params, labels))


@examples(50)
@given(params=PARAMS, label=LABELS)
def test_one_label_for_everything(params, label):
    check(params, label, predict_tree_labels(params, label))


@examples(300)
@given(
    params=PARAMS,
    rules=st.lists(st.tuples(PATTERNS, LABELS), min_size=1, max_size=3),
    default=LABELS,
    allow_unmatched=st.booleans(),
)
def test_label_by_path_rules(params, rules, default, allow_unmatched):
    rules = dict(rules)
    labels = oc.label_by_path(rules, default=default, allow_unmatched=allow_unmatched)
    check(params, labels, predict_rules(params, rules, default, allow_unmatched))


@pytest.mark.parametrize("stem", STEMS)
def test_stems_are_catalogued(stem):
    catalogue = (Path(__file__).resolve().parents[1] / "docs" / "misuse.md").read_text()
    assert stem in catalogue, f"{stem!r} is not in docs/misuse.md"
