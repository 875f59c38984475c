"""Labels layer: `label_by_path` rules, label trees and the routing report.

Checks that one rule set labels the same leaves on every pytree users train
(dicts, `FrozenDict`, Linen `TrainState.params`, `nnx.State` with and without
`Param` wrappers, lists, tuples, dataclasses, `None` and `MaskedNode`), that
`axis="fan_in"` resolves per leaf, that misfits fail at `init` with the leaf
named, and that every rule in the routing guide (docs/routing.md) lands where it says on real
Flax modules.
"""

import ast
import dataclasses
import re
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx
from flax.core import FrozenDict
from flax.training import train_state
from helpers import assert_close_ulps, norm_ulps, rescaled_norm_rtol, ulps

import optax_constraints as oc

ROUTING = Path(__file__).resolve().parents[1] / "docs" / "routing.md"


# --- helpers (independent of the code under test) ------------------------------


def _segment(entry) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    raise AssertionError(f"unexpected key entry {entry!r}")


def _is_leaf(x) -> bool:
    return x is None or isinstance(x, optax.MaskedNode | nnx.Variable)


# flax 0.12.7 renamed nnx.pure (same function) to nnx.as_pure; older flax,
# down to the floor CI tests, has only the old name.
_as_pure = getattr(nnx, "as_pure", None) or nnx.pure


def by_path(tree) -> dict:
    """{"a/b/c": leaf} for a labels or params tree (NNX Variables unwrapped)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_leaf)
    out = {}
    for path, leaf in flat:
        if isinstance(leaf, nnx.Variable):
            leaf = leaf.get_value()
        out["/".join(_segment(e) for e in path)] = leaf
    return out


def shapes(tree) -> dict:
    return {k: tuple(np.shape(v)) for k, v in by_path(tree).items() if v is not None}


def keras_max_norm(w, max_value, axis):
    """Keras's MaxNorm formula in NumPy float32."""
    w = np.asarray(w, np.float32)
    norms = np.sqrt(np.sum(w * w, axis=axis, keepdims=True))
    return w * (np.clip(norms, 0, max_value) / (np.float32(1e-7) + norms))


def unit_norms(w, axis):
    return np.sqrt(np.sum(np.asarray(w, np.float64) ** 2, axis=axis))


KEY = jax.random.key(0)


# --- one logical tree, many containers -----------------------------------------

# Dense_0: kernel (3, 4), bias (4,); LayerNorm_0: scale (4,), bias (4,).
RULES = {"LayerNorm_*/**": "norm", "**/kernel": "kernel", "**/bias": "bias"}
EXPECTED = {
    "Dense_0/kernel": "kernel",
    "Dense_0/bias": "bias",
    "LayerNorm_0/scale": "norm",
    "LayerNorm_0/bias": "norm",  # first match wins over "**/bias"
}


def _arrays():
    k1, k2 = jax.random.split(KEY)
    return {
        "Dense_0": {"kernel": jax.random.normal(k1, (3, 4)), "bias": -jnp.ones(4)},
        "LayerNorm_0": {"scale": jnp.ones(4), "bias": jax.random.normal(k2, (4,))},
    }


class _LinenDenseNorm(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.LayerNorm()(nn.Dense(4)(x))


class _NNXDenseNorm(nnx.Module):
    def __init__(self, rngs):
        self.Dense_0 = nnx.Linear(3, 4, rngs=rngs)
        self.LayerNorm_0 = nnx.LayerNorm(4, rngs=rngs)


@flax.struct.dataclass
class _StructDense:
    kernel: jax.Array
    bias: jax.Array


@flax.struct.dataclass
class _StructNorm:
    scale: jax.Array
    bias: jax.Array


@flax.struct.dataclass
class _StructModel:
    Dense_0: _StructDense
    LayerNorm_0: _StructNorm


@dataclasses.dataclass
class _RegDense:
    kernel: jax.Array
    bias: jax.Array
    name: str = "dense"


jax.tree_util.register_dataclass(_RegDense, data_fields=["kernel", "bias"], meta_fields=["name"])


def _tree(kind):
    a = _arrays()
    if kind == "dict":
        return a
    if kind == "frozendict":
        return FrozenDict(a)
    if kind == "linen_trainstate":
        params = _LinenDenseNorm().init(KEY, jnp.ones((1, 3)))["params"]
        state = train_state.TrainState.create(
            apply_fn=_LinenDenseNorm().apply, params=params, tx=optax.sgd(0.1)
        )
        return state.params
    if kind == "nnx_param_state":  # what nnx.Optimizer passes to tx.init
        return nnx.state(_NNXDenseNorm(nnx.Rngs(0)), nnx.Param)
    if kind == "nnx_pure_state":  # what nnx.Optimizer passes to tx.update
        return _as_pure(nnx.state(_NNXDenseNorm(nnx.Rngs(0)), nnx.Param))
    if kind == "struct_dataclass":
        return _StructModel(_StructDense(**a["Dense_0"]), _StructNorm(**a["LayerNorm_0"]))
    if kind == "register_dataclass":
        return {"Dense_0": _RegDense(**a["Dense_0"]), "LayerNorm_0": a["LayerNorm_0"]}
    raise AssertionError(kind)


TREE_KINDS = [
    "dict",
    "frozendict",
    "linen_trainstate",
    "nnx_param_state",
    "nnx_pure_state",
    "struct_dataclass",
    "register_dataclass",
]


def test_label_by_path_on_what_nnx_optimizer_passes():
    """A spy transformation records what `nnx.Optimizer` hands to `init` and `update`."""
    seen = {}
    labels_fn = oc.label_by_path(RULES)

    def init(params):
        seen["init"] = (params, labels_fn(params))
        return optax.EmptyState()

    def update(updates, state, params=None):
        seen["update"] = (params, labels_fn(params))
        return updates, state

    model = _NNXDenseNorm(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.GradientTransformation(init, update), wrt=nnx.Param)
    optimizer.update(model, nnx.grad(lambda m: jnp.sum(m.Dense_0(jnp.ones((1, 3)))))(model))

    init_params, init_labels = seen["init"]
    update_params, update_labels = seen["update"]
    init_paths = [
        jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(init_params)
    ]
    update_paths = [
        jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(update_params)
    ]
    assert all(p.endswith(".value") for p in init_paths)  # Param leaves (DESIGN pitfall)
    assert not any(p.endswith(".value") for p in update_paths)  # plain arrays
    assert by_path(init_labels) == EXPECTED
    assert by_path(update_labels) == EXPECTED
    # The synthetic trees below stand for exactly these two.
    assert shapes(_tree("nnx_param_state")) == shapes(init_params)
    assert jax.tree.structure(_tree("nnx_pure_state")) == jax.tree.structure(update_params)


@pytest.mark.parametrize("kind", TREE_KINDS)
def test_label_by_path_same_labels_on_every_tree_kind(kind):
    params = _tree(kind)
    labels = oc.label_by_path(RULES)(params)
    assert by_path(labels) == EXPECTED
    # The labels tree keeps the params' container type (so optax can zip them).
    assert type(labels) is type(params)


@pytest.mark.parametrize("kind", TREE_KINDS)
def test_project_routes_by_path_on_every_tree_kind(kind):
    params = _tree(kind)
    constraints = {"kernel": oc.MaxNorm(0.1, axis="fan_in"), "bias": oc.NonNeg(), "norm": None}
    tx = oc.project(constraints, oc.label_by_path(RULES))
    state = tx.init(params)
    grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = jax.jit(tx.update)(grads, state, params)
    new = by_path(optax.apply_updates(params, updates))
    old = by_path(params)
    kernel_norms = unit_norms(new["Dense_0/kernel"], axis=0)
    rtol = rescaled_norm_rtol(new["Dense_0/kernel"].shape[0], 0.1)
    assert kernel_norms.max() <= 0.1 * (1 + rtol)
    np.testing.assert_allclose(kernel_norms, 0.1, rtol=rtol)  # all were above 0.1
    assert np.min(new["Dense_0/bias"]) >= 0.0
    # LayerNorm is labelled "norm" -> None: untouched, bit for bit.
    for name in ("LayerNorm_0/scale", "LayerNorm_0/bias"):
        np.testing.assert_array_equal(new[name], old[name])


@pytest.mark.parametrize("kind", TREE_KINDS)
def test_routing_report_lists_every_leaf(kind):
    params = _tree(kind)
    constraints = {"kernel": oc.MaxNorm(2.0, axis="fan_in"), "bias": oc.NonNeg(), "norm": None}
    report = oc.routing_report(params, constraints, oc.label_by_path(RULES))
    lines = report.splitlines()
    assert lines[0].split() == ["path", "shape", "dtype", "label", "constraint", "view"]
    rows = {re.split(r"\s{2,}", line)[0]: re.split(r"\s{2,}", line)[1:] for line in lines[1:-1]}
    leaf_shapes = shapes(params)
    assert set(rows) == set(EXPECTED)
    for path, (shape, dtype, label, _constraint, _view) in rows.items():
        assert shape == str(leaf_shapes[path])
        assert dtype == "float32"
        assert label == repr(EXPECTED[path])
    assert rows["Dense_0/kernel"][3] == "MaxNorm(max_value=2.0, axis='fan_in')"
    assert rows["Dense_0/bias"][3] == "NonNeg()"
    assert rows["LayerNorm_0/scale"][3] == "-"  # labelled, but mapped to None
    # How each constraint sees its leaf: units of the kernel, elementwise bias.
    kernel_shape = leaf_shapes["Dense_0/kernel"]
    assert rows["Dense_0/kernel"][4] == f"{kernel_shape[-1]} units of {kernel_shape[0]}"
    assert rows["Dense_0/bias"][4] == "elementwise"
    assert rows["LayerNorm_0/scale"][4] == "-"
    assert lines[-1] == "4 leaves, 2 constrained (16 of 24 values)"


def test_routing_report_shows_unlabelled_leaves_and_takes_abstract_params():
    params = jax.eval_shape(lambda: _arrays())
    report = oc.routing_report(params, {"k": oc.UnitNorm()}, oc.label_by_path({"**/kernel": "k"}))
    row = next(line for line in report.splitlines() if line.startswith("LayerNorm_0/scale"))
    assert row.split() == ["LayerNorm_0/scale", "(4,)", "float32", "-", "-", "-"]
    assert report.splitlines()[-1] == "4 leaves, 1 constrained (12 of 24 values)"


# --- glob semantics ---------------------------------------------------------------


@pytest.mark.parametrize(
    "pattern, path, expected",
    [
        ("**/kernel", "Dense_0/kernel", True),
        ("**/kernel", "kernel", True),  # ** may be zero segments
        ("**/kernel", "a/b/c/kernel", True),
        ("**/kernel", "Dense_0/kernel_1", False),
        ("*/kernel", "Dense_0/kernel", True),
        ("*/kernel", "block/Dense_0/kernel", False),  # * stays inside one segment
        ("*/kernel", "kernel", False),
        ("Dense_*/bias", "Dense_12/bias", True),
        ("Dense_?/bias", "Dense_1/bias", True),
        ("Dense_?/bias", "Dense_12/bias", False),
        ("block/**", "block", True),
        ("block/**", "block/a/b", True),
        ("block/**", "blocks/a", False),
        ("a/**/b", "a/b", True),
        ("a/**/b", "a/x/y/b", True),
        ("a/**/b", "a/xb", False),
        ("**", "anything/at/all", True),
        ("**/**/kernel", "kernel", True),
        ("/Dense_0/kernel", "Dense_0/kernel", True),  # leading "/" ignored
        ("layers/0/kernel", "layers/0/kernel", True),
        ("layers/1/kernel", "layers/10/kernel", False),
        ("a.b/kernel", "axb/kernel", False),  # regex characters are literal
        ("*Norm_*/scale", "LayerNorm_0/scale", True),
    ],
)
def test_glob_match(pattern, path, expected):
    assert oc.glob_match(pattern, path) is expected


def test_first_matching_rule_wins_and_unmatched_get_default():
    params = {
        "a": {"kernel": jnp.ones(2), "bias": jnp.ones(2)},
        "b": {"kernel": jnp.ones(2), "w": jnp.ones(2)},
    }
    ordered = oc.label_by_path({"a/*": "first", "**/kernel": "second"}, default="d")
    assert by_path(ordered(params)) == {
        "a/kernel": "first",
        "a/bias": "first",
        "b/kernel": "second",
        "b/w": "d",
    }
    flipped = oc.label_by_path({"**/kernel": "second", "a/*": "first"})
    assert by_path(flipped(params)) == {
        "a/kernel": "second",
        "a/bias": "first",
        "b/kernel": "second",
        "b/w": None,
    }


def test_rule_shadowed_by_an_earlier_rule_is_an_error():
    params = {"Dense_0": {"bias": jnp.ones(2)}, "LayerNorm_0": {"bias": jnp.ones(2)}}
    labels = oc.label_by_path({"**/bias": "bias", "LayerNorm_*/bias": "beta"})
    with pytest.raises(ValueError) as err:
        labels(params)
    msg = str(err.value)
    assert "'LayerNorm_*/bias' never applies" in msg
    assert "'LayerNorm_0/bias'" in msg and "earlier rule '**/bias'" in msg
    relaxed = oc.label_by_path(
        {"**/bias": "bias", "LayerNorm_*/bias": "beta"}, allow_unmatched=True
    )
    assert by_path(relaxed(params)) == {"Dense_0/bias": "bias", "LayerNorm_0/bias": "bias"}


def test_rules_may_be_pairs_and_map_to_none():
    params = {"enc": {"kernel": jnp.ones(2)}, "dec": {"kernel": jnp.ones(2)}}
    labels = oc.label_by_path([("dec/**", None), ("**/kernel", "k")])(params)
    assert by_path(labels) == {"enc/kernel": "k", "dec/kernel": None}


def test_lists_and_tuples_use_index_segments():
    params = {
        "layers": [{"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}, {"kernel": jnp.ones((2, 2))}],
        "pair": (jnp.ones(2), jnp.ones(3)),
    }
    labels = oc.label_by_path({"layers/0/*": "first", "layers/*/kernel": "k", "pair/1": "p1"})
    assert by_path(labels(params)) == {
        "layers/0/kernel": "first",
        "layers/0/bias": "first",
        "layers/1/kernel": "k",
        "pair/0": None,
        "pair/1": "p1",
    }


def test_linen_sequential_and_nnx_list_paths():
    seq = nn.Sequential([nn.Dense(2), nn.relu, nn.Dense(2)])
    linen = seq.init(KEY, jnp.ones((1, 3)))["params"]

    class Stack(nnx.Module):
        def __init__(self, rngs):
            self.layers = nnx.List([nnx.Linear(3, 2, rngs=rngs), nnx.Linear(2, 2, rngs=rngs)])

    nnx_state = nnx.state(Stack(nnx.Rngs(0)), nnx.Param)
    rules = {"layers_0/kernel": "first", "layers/0/kernel": "first", "**/kernel": "k"}
    linen_labels = by_path(oc.label_by_path(rules, allow_unmatched=True)(linen))
    nnx_labels = by_path(oc.label_by_path(rules, allow_unmatched=True)(nnx_state))
    assert linen_labels == {
        "layers_0/kernel": "first",
        "layers_0/bias": None,
        "layers_2/kernel": "k",
        "layers_2/bias": None,
    }
    assert nnx_labels == {
        "layers/0/kernel": "first",
        "layers/0/bias": None,
        "layers/1/kernel": "k",
        "layers/1/bias": None,
    }


def test_none_leaves_stay_none_and_count_as_matched():
    params = {"Dense_0": {"kernel": jnp.array([[3.0], [4.0]]), "bias": None}, "extra": None}
    labels_fn = oc.label_by_path({"**/kernel": "k", "**/bias": "b"})  # "**/bias" only hits None
    labels = labels_fn(params)
    assert labels == {"Dense_0": {"kernel": "k", "bias": None}, "extra": None}
    new = oc.apply_constraints(params, {"k": oc.UnitNorm(), "b": oc.NonNeg()}, labels_fn)
    assert new["Dense_0"]["bias"] is None and new["extra"] is None
    # Exact: 3^2 + 4^2 = 25 and its root are exact, 5 + 1e-7 rounds to 5 in
    # float32, so the entries are the correctly rounded quotients 3/5 and 4/5.
    np.testing.assert_array_equal(new["Dense_0"]["kernel"], np.float32([[0.6], [0.8]]))


def test_masked_nodes_kept_and_project_inside_optax_masked():
    params = {
        "enc": {"kernel": jnp.full((2, 2), 3.0)},
        "dec": {"kernel": jnp.full((2, 2), 3.0)},
    }
    masked_params = {"enc": params["enc"], "dec": {"kernel": optax.MaskedNode()}}
    labels = oc.label_by_path({"**/kernel": "k"})(masked_params)
    assert labels == {"enc": {"kernel": "k"}, "dec": {"kernel": optax.MaskedNode()}}

    inner = oc.project({"k": oc.MaxNorm(1.0)}, oc.label_by_path({"**/kernel": "k"}))
    tx = optax.chain(optax.sgd(0.0), optax.masked(inner, {"enc": True, "dec": False}))
    state = tx.init(params)
    updates, _ = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, params), state, params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_allclose(
        unit_norms(new["enc"]["kernel"], 0), 1.0, rtol=rescaled_norm_rtol(2, 1.0)
    )
    np.testing.assert_array_equal(new["dec"]["kernel"], params["dec"]["kernel"])


# --- plain-dict and prefix labels ---------------------------------------------------


@pytest.mark.parametrize(
    "kind",
    [
        "frozendict",
        "linen_trainstate",
        "nnx_param_state",
        "nnx_pure_state",
        "struct_dataclass",
        "register_dataclass",
    ],
)
def test_plain_dict_labels_fit_other_containers(kind):
    labels = {
        "Dense_0": {"kernel": "kernel", "bias": "bias"},
        "LayerNorm_0": {"scale": None, "bias": None},
    }
    params = _tree(kind)
    new = by_path(
        oc.apply_constraints(params, {"kernel": oc.UnitNorm(), "bias": oc.NonNeg()}, labels)
    )
    old = by_path(params)
    kernel = old["Dense_0/kernel"]
    rtol = rescaled_norm_rtol(kernel.shape[0], unit_norms(kernel, 0).min())
    np.testing.assert_allclose(unit_norms(new["Dense_0/kernel"], 0), 1.0, rtol=rtol)
    assert np.min(new["Dense_0/bias"]) >= 0
    np.testing.assert_array_equal(new["LayerNorm_0/bias"], old["LayerNorm_0/bias"])


def test_prefix_labels_cover_subtrees():
    params = _arrays()
    labels = {"Dense_0": "nonneg", "LayerNorm_0": None}
    new = oc.apply_constraints(params, {"nonneg": oc.NonNeg()}, labels)
    np.testing.assert_array_equal(
        new["Dense_0"]["kernel"], np.maximum(params["Dense_0"]["kernel"], 0)
    )
    np.testing.assert_array_equal(new["Dense_0"]["bias"], np.zeros(4))
    np.testing.assert_array_equal(new["LayerNorm_0"]["bias"], params["LayerNorm_0"]["bias"])
    # A single label for the whole tree is the shortest prefix of all.
    everything = oc.apply_constraints(params, {"nonneg": oc.NonNeg()}, "nonneg")
    assert min(float(jnp.min(x)) for x in jax.tree.leaves(everything)) >= 0


def test_nnx_optimizer_with_dict_and_prefix_labels():
    model = _NNXDenseNorm(nnx.Rngs(0))
    labels = {"Dense_0": {"kernel": "kernel", "bias": "bias"}, "LayerNorm_0": None}
    tx = optax.chain(
        optax.sgd(1.0),
        oc.project({"kernel": oc.MaxNorm(0.1, axis="fan_in"), "bias": oc.NonNeg()}, labels),
    )
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)  # init: Param leaves
    scale_before = np.asarray(model.LayerNorm_0.scale.get_value())
    grads = nnx.grad(lambda m: jnp.sum(m.LayerNorm_0(m.Dense_0(jnp.ones((2, 3)))) ** 2))(model)
    optimizer.update(model, grads)  # update: pure arrays
    assert unit_norms(model.Dense_0.kernel.get_value(), 0).max() <= 0.1 * (1 + 1e-5)
    assert float(jnp.min(model.Dense_0.bias.get_value())) >= 0
    expected_scale = scale_before - np.asarray(grads["LayerNorm_0"]["scale"].get_value())
    np.testing.assert_array_equal(model.LayerNorm_0.scale.get_value(), expected_scale)


# --- axis="fan_in" resolves per leaf ------------------------------------------------


def _filled(abstract):
    """Random normal arrays in place of `jax.eval_shape` structs (no init compile)."""
    rng = np.random.default_rng(0)
    return jax.tree.map(
        lambda s: (
            jnp.asarray(rng.normal(size=s.shape), s.dtype)
            if isinstance(s, jax.ShapeDtypeStruct)
            else s
        ),
        abstract,
    )


def _linen_params(module, shape, *, dtype=jnp.float32):
    return _filled(jax.eval_shape(module.init, KEY, jnp.ones(shape, dtype))["params"])


def _nnx_params(make):
    return _filled(nnx.state(nnx.eval_shape(lambda: make(nnx.Rngs(0))), nnx.Param))


FAN_IN_CASES = {
    "linen_dense": lambda: _linen_params(nn.Dense(5), (1, 7)),
    "linen_conv1d": lambda: _linen_params(nn.Conv(5, (3,)), (1, 8, 4)),
    "linen_conv2d": lambda: _linen_params(nn.Conv(5, (3, 3)), (1, 8, 8, 4)),
    "linen_conv3d": lambda: _linen_params(nn.Conv(5, (3, 2, 3)), (1, 6, 6, 6, 4)),
    "linen_grouped_conv2d": lambda: _linen_params(
        nn.Conv(6, (3, 3), feature_group_count=2), (1, 8, 8, 4)
    ),
    "linen_conv_transpose2d": lambda: _linen_params(nn.ConvTranspose(5, (3, 3)), (1, 8, 8, 4)),
    "nnx_linear": lambda: _nnx_params(lambda rngs: nnx.Linear(7, 5, rngs=rngs)),
    "nnx_conv2d": lambda: _nnx_params(lambda rngs: nnx.Conv(4, 5, (3, 3), rngs=rngs)),
}
EXPECTED_KERNEL_SHAPES = {
    "linen_dense": (7, 5),
    "linen_conv1d": (3, 4, 5),
    "linen_conv2d": (3, 3, 4, 5),
    "linen_conv3d": (3, 2, 3, 4, 5),
    "linen_grouped_conv2d": (3, 3, 2, 6),
    "linen_conv_transpose2d": (3, 3, 4, 5),
    "nnx_linear": (7, 5),
    "nnx_conv2d": (3, 3, 4, 5),
}


@pytest.mark.parametrize("case", list(FAN_IN_CASES))
def test_fan_in_is_per_output_unit_for_every_kernel(case):
    params = FAN_IN_CASES[case]()
    kernel = np.asarray(by_path(params)["kernel"])
    assert kernel.shape == EXPECTED_KERNEL_SHAPES[case]  # the layout the table promises
    explicit_axes = tuple(range(kernel.ndim - 1))
    max_value = 0.5 * float(unit_norms(kernel, explicit_axes).min())  # binds on every unit
    labels = oc.label_by_path({"**/kernel": "k"})
    got = by_path(
        oc.apply_constraints(params, {"k": oc.MaxNorm(max_value, axis="fan_in")}, labels)
    )["kernel"]
    explicit = oc.MaxNorm(max_value, axis=explicit_axes)(jnp.asarray(kernel))
    np.testing.assert_array_equal(got, explicit)
    # The same float32 formula, summed in another order: each side's rounding.
    n = int(np.prod(kernel.shape[:-1]))
    assert_close_ulps(got, keras_max_norm(kernel, max_value, explicit_axes), 2 * norm_ulps(n))
    np.testing.assert_allclose(
        unit_norms(got, explicit_axes), max_value, rtol=rescaled_norm_rtol(n, max_value)
    )


# --- errors at init -----------------------------------------------------------------


def _dense_params():
    return {"Dense_0": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones(4)}}


def test_axis_out_of_range_names_leaf_shape_and_fix():
    tx = oc.project({"k": oc.MaxNorm(2.0, axis=2)}, oc.label_by_path({"**/kernel": "k"}))
    with pytest.raises(ValueError) as err:
        tx.init(_dense_params())
    msg = str(err.value)
    assert "Dense_0/kernel" in msg and "(3, 4)" in msg
    assert "axis 2 is out of range" in msg
    assert "axis='fan_in'" in msg  # the suggested fix


def test_fan_in_on_a_vector_names_leaf_and_fix():
    labels = oc.label_by_path({"**/*": "all"})
    tx = oc.project({"all": oc.MaxNorm(2.0, axis="fan_in")}, labels)
    with pytest.raises(ValueError, match=r"Dense_0/bias.*\(4,\).*at least 2 dimensions"):
        tx.init(_dense_params())


def test_label_missing_from_constraints_lists_both_sets():
    labels = oc.label_by_path({"**/kernel": "kernel", "**/bias": "bias"})
    tx = oc.project({"kernel": oc.MaxNorm(2.0), "kernal": oc.NonNeg()}, labels)
    with pytest.raises(ValueError) as err:
        tx.init(_dense_params())
    msg = str(err.value)
    assert "Dense_0/bias" in msg and "(4,)" in msg and "'bias'" in msg
    assert "Labels in use: {'bias', 'kernel'}" in msg
    assert "constraints keys: {'kernal', 'kernel'}; missing: {'bias'}" in msg


def test_labels_tree_missing_a_leaf_names_the_path():
    tx = oc.project({"k": oc.UnitNorm()}, {"Dense_0": {"kernel": "k"}})
    with pytest.raises(ValueError, match=r"No label for the parameter at 'Dense_0/bias' \(shape"):
        tx.init(_dense_params())


def test_labels_tree_with_an_extra_path_names_it():
    labels = {"Dense_0": {"kernel": "k", "bias": None}, "Dense_1": {"kernel": "k"}}
    tx = oc.project({"k": oc.UnitNorm()}, labels)
    with pytest.raises(ValueError, match=r"label at 'Dense_1/kernel' matches no parameter"):
        tx.init(_dense_params())


def test_labels_tree_with_an_extra_top_level_says_so():
    labels = {"params": {"Dense_0": {"kernel": "k", "bias": None}}}
    tx = oc.project({"k": oc.UnitNorm()}, labels)
    with pytest.raises(ValueError, match=r"The labels have an extra top-level key 'params'"):
        tx.init(_dense_params())
    # The other way round: params given as Linen `variables`, labels for variables["params"].
    tx = oc.project({"k": oc.UnitNorm()}, {"Dense_0": {"kernel": "k", "bias": None}})
    with pytest.raises(ValueError, match=r"The params have an extra top-level key 'params'"):
        tx.init({"params": _dense_params()})


def test_optax_partition_with_label_by_path_under_nnx_optimizer():
    model = _NNXDenseNorm(nnx.Rngs(0))
    inner = oc.project({"k": oc.MaxNorm(0.1, axis="fan_in")}, oc.label_by_path({"**/kernel": "k"}))
    tx = optax.partition(
        {"train": optax.chain(optax.sgd(1.0), inner), "frozen": optax.set_to_zero()},
        oc.label_by_path({"LayerNorm_0/**": "frozen", "**": "train"}),
    )
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    scale = np.asarray(model.LayerNorm_0.scale.get_value())
    grads = nnx.grad(lambda m: jnp.sum(m.LayerNorm_0(m.Dense_0(jnp.ones((2, 3)))) ** 2))(model)
    optimizer.update(model, grads)
    np.testing.assert_allclose(
        unit_norms(model.Dense_0.kernel.get_value(), 0), 0.1, rtol=rescaled_norm_rtol(3, 0.1)
    )
    np.testing.assert_array_equal(model.LayerNorm_0.scale.get_value(), scale)


def test_rule_matching_no_leaf_lists_real_paths():
    labels = oc.label_by_path({"**/kernal": "k"})
    tx = oc.project({"k": oc.UnitNorm()}, labels)
    with pytest.raises(ValueError) as err:
        tx.init(_dense_params())
    msg = str(err.value)
    assert "['**/kernal'] match no parameter" in msg
    assert "'Dense_0/kernel'" in msg and "allow_unmatched=True" in msg
    # Opting out: the typo'd rule is ignored, nothing is constrained.
    quiet = oc.project(
        {"k": oc.UnitNorm()}, oc.label_by_path({"**/kernal": "k"}, allow_unmatched=True)
    )
    quiet.init(_dense_params())


def test_routing_report_raises_the_init_errors():
    with pytest.raises(ValueError, match="Dense_0/kernel"):
        oc.routing_report(
            _dense_params(), {"k": oc.MaxNorm(axis=3)}, oc.label_by_path({"**/kernel": "k"})
        )


@pytest.mark.parametrize("bad", ["", "/", 3])
def test_bad_rule_is_an_error_at_construction(bad):
    with pytest.raises(ValueError, match="label_by_path"):
        oc.label_by_path({bad: "k"})


def test_unhashable_label_is_an_error_at_construction():
    with pytest.raises(TypeError, match="hashable"):
        oc.label_by_path({"**/kernel": ["k"]})


# --- scale: label resolution is linear in the number of leaves ----------------------


def _wide_tree(n_blocks):
    return {
        f"block_{i}": {
            "Dense_0": {"kernel": jnp.ones((2, 2)), "bias": jnp.zeros(2)},
            "LayerNorm_0": {"scale": jnp.ones(2), "bias": None},
        }
        for i in range(n_blocks)
    }


def test_thousand_leaf_tree_routes_every_leaf():
    # Speed lives in benchmarks/ (trace + compile at 10/100/1000 leaves); this
    # checks that a wide tree with None holes routes correctly.
    params = _wide_tree(334)  # 1002 array leaves, 334 None leaves
    rules = {"**/LayerNorm_*/**": None, "**/kernel": "k", "**/bias": "b"}
    report = oc.routing_report(
        params, {"k": oc.MaxNorm(1.0, axis="fan_in"), "b": oc.NonNeg()}, oc.label_by_path(rules)
    )
    assert report.splitlines()[-1].startswith("1002 leaves, 668 constrained")
    # A labels *tree* with None entries pointing at None params.
    dict_labels = jax.tree.map(lambda x: "k" if x.ndim == 2 else None, params)
    state = oc.project({"k": oc.UnitNorm()}, dict_labels).init(params)
    assert int(state.count) == 0


# --- every rule in the routing guide, on real Flax modules -----------------------


@pytest.fixture(scope="module")
def doc():
    """Runs the routing guide's Python blocks; returns their namespace.

    `doc_rules` is the rules mapping the guide passes to `oc.label_by_path`.
    """
    namespace: dict = {}
    for block in re.findall(r"```python\n(.*?)```", ROUTING.read_text(), flags=re.S):
        exec(compile(block, str(ROUTING), "exec"), namespace)
        for node in ast.walk(ast.parse(block)):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "oc.label_by_path":
                namespace["doc_rules"] = ast.literal_eval(node.args[0])
    return namespace


def _gates(prefix, names, leaf, label):
    return {f"{prefix}/{g}/{leaf}": label for g in names}


def _attention(prefix):
    """q/k/v kernels (in, heads, head_dim) get axis 0; the out kernel per output unit."""
    out = {f"{prefix}/{p}/kernel": "qkv" for p in ("query", "key", "value")}
    out |= {f"{prefix}/{p}/bias": "bias" for p in ("query", "key", "value", "out")}
    return out | {f"{prefix}/out/kernel": "kernel"}


class _NamedNorm(nnx.Module):
    def __init__(self, rngs):
        self.attn_norm = nnx.LayerNorm(8, rngs=rngs)


class _CompactCell(nn.Module):
    cell: str

    @nn.compact
    def __call__(self, x):
        cell = getattr(nn, self.cell)(4, **({"kernel_size": (3,)} if "Conv" in self.cell else {}))
        return nn.RNN(cell)(x)


class _SetupRNN(nn.Module):
    def setup(self):
        self.rnn = nn.RNN(nn.GRUCell(4))

    def __call__(self, x):
        return self.rnn(x)


class _Bidirectional(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Bidirectional(nn.RNN(nn.GRUCell(4)), nn.RNN(nn.GRUCell(4)))(x)


class _Norms(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.LayerNorm()(x)
        x = nn.BatchNorm(use_running_average=True)(x)
        x = nn.GroupNorm(num_groups=2)(x)
        return nn.RMSNorm()(x)


class _NNXRecurrent(nnx.Module):
    def __init__(self, cell, rngs):
        self.rnn = nnx.RNN(getattr(nnx, cell)(3, 4, rngs=rngs))


class _NNXNorms(nnx.Module):
    def __init__(self, rngs):
        self.norm = nnx.LayerNorm(4, rngs=rngs)
        self.norm_out = nnx.BatchNorm(4, rngs=rngs)
        self.embed = nnx.Embed(10, 4, rngs=rngs)


LSTM_GATES = "ifgo"


def _doc_cases(doc):
    seq = jnp.ones((2, 5, 3))
    cases = {
        "docs LinenModel": (
            doc["linen_params"],
            {
                "Dense_0/kernel": "kernel",
                "Dense_0/bias": "bias",
                "Embed_0/embedding": "embeddings",
                "LayerNorm_0/scale": "gamma",
                "LayerNorm_0/bias": "beta",
                "SeparableConv_0/depthwise/kernel": "depthwise",
                "SeparableConv_0/pointwise/kernel": "pointwise",
                "SeparableConv_0/pointwise/bias": "bias",
                **_gates("LSTMCell_0", [f"h{g}" for g in LSTM_GATES], "kernel", "recurrent"),
                **_gates("LSTMCell_0", [f"h{g}" for g in LSTM_GATES], "bias", "bias"),
                **_gates("LSTMCell_0", [f"i{g}" for g in LSTM_GATES], "kernel", "kernel"),
                **_attention("MultiHeadDotProductAttention_0"),
            },
        ),
        "docs NNXModel": (
            nnx.state(doc["nnx_model"], nnx.Param),
            {
                "conv/depthwise/kernel": "depthwise",
                "conv/pointwise/kernel": "pointwise",
                "conv/pointwise/bias": "bias",
                "embed/embedding": "embeddings",
                "rnn/cell/dense_h/kernel": "recurrent",
                "rnn/cell/dense_i/kernel": "kernel",
                "rnn/cell/dense_i/bias": "bias",
                "ln_f/scale": "gamma",
                "ln_f/bias": "beta",
                "head/kernel": "kernel",
                "head/bias": "bias",
                **_attention("attn"),
            },
        ),
        "nnx norm attribute named attn_norm": (
            nnx.state(_NamedNorm(nnx.Rngs(0)), nnx.Param),
            {"attn_norm/scale": "gamma", "attn_norm/bias": "beta"},
        ),
        "linen compact OptimizedLSTMCell": (
            _linen_params(_CompactCell("OptimizedLSTMCell"), seq.shape),
            {
                **_gates(
                    "OptimizedLSTMCell_0", [f"h{g}" for g in LSTM_GATES], "kernel", "recurrent"
                ),
                **_gates("OptimizedLSTMCell_0", [f"h{g}" for g in LSTM_GATES], "bias", "bias"),
                **_gates("OptimizedLSTMCell_0", [f"i{g}" for g in LSTM_GATES], "kernel", "kernel"),
            },
        ),
        "linen compact SimpleCell": (
            _linen_params(_CompactCell("SimpleCell"), seq.shape),
            {
                "SimpleCell_0/h/kernel": "recurrent",
                "SimpleCell_0/i/kernel": "kernel",
                "SimpleCell_0/i/bias": "bias",
            },
        ),
        "linen compact MGUCell": (
            _linen_params(_CompactCell("MGUCell"), seq.shape),
            {
                **_gates("MGUCell_0", ["hf", "hn"], "kernel", "recurrent"),
                "MGUCell_0/hn/bias": "bias",
                **_gates("MGUCell_0", ["if", "in"], "kernel", "kernel"),
                **_gates("MGUCell_0", ["if", "in"], "bias", "bias"),
            },
        ),
        "linen compact ConvLSTMCell": (
            _linen_params(_CompactCell("ConvLSTMCell"), (2, 5, 6, 3)),
            {
                "ConvLSTMCell_0/hh/kernel": "recurrent",
                "ConvLSTMCell_0/hh/bias": "bias",
                "ConvLSTMCell_0/ih/kernel": "kernel",
                "ConvLSTMCell_0/ih/bias": "bias",
            },
        ),
        "linen setup GRUCell": (
            _linen_params(_SetupRNN(), seq.shape),
            {
                **_gates("rnn/cell", ["hr", "hz", "hn"], "kernel", "recurrent"),
                "rnn/cell/hn/bias": "bias",
                **_gates("rnn/cell", ["ir", "iz", "in"], "kernel", "kernel"),
                **_gates("rnn/cell", ["ir", "iz", "in"], "bias", "bias"),
            },
        ),
        "linen Bidirectional GRUCell": (
            _linen_params(_Bidirectional(), seq.shape),
            {
                k: v
                for c in ("GRUCell_0", "GRUCell_1")
                for k, v in {
                    **_gates(c, ["hr", "hz", "hn"], "kernel", "recurrent"),
                    f"{c}/hn/bias": "bias",
                    **_gates(c, ["ir", "iz", "in"], "kernel", "kernel"),
                    **_gates(c, ["ir", "iz", "in"], "bias", "bias"),
                }.items()
            },
        ),
        "linen norms": (
            _linen_params(_Norms(), (2, 4)),
            {
                **{
                    f"{n}_0/scale": "gamma"
                    for n in ("LayerNorm", "BatchNorm", "GroupNorm", "RMSNorm")
                },
                **{f"{n}_0/bias": "beta" for n in ("LayerNorm", "BatchNorm", "GroupNorm")},
            },
        ),
        "nnx RNN LSTMCell": (
            _nnx_params(lambda rngs: _NNXRecurrent("LSTMCell", rngs)),
            {
                **_gates("rnn/cell", [f"h{g}" for g in LSTM_GATES], "kernel", "recurrent"),
                **_gates("rnn/cell", [f"h{g}" for g in LSTM_GATES], "bias", "bias"),
                **_gates("rnn/cell", ["ii", "if_", "ig", "io"], "kernel", "kernel"),
            },
        ),
        "nnx RNN OptimizedLSTMCell": (
            _nnx_params(lambda rngs: _NNXRecurrent("OptimizedLSTMCell", rngs)),
            {
                "rnn/cell/dense_h/kernel": "recurrent",
                "rnn/cell/dense_h/bias": "bias",
                "rnn/cell/dense_i/kernel": "kernel",
            },
        ),
        "nnx RNN SimpleCell": (
            _nnx_params(lambda rngs: _NNXRecurrent("SimpleCell", rngs)),
            {
                "rnn/cell/dense_h/kernel": "recurrent",
                "rnn/cell/dense_i/kernel": "kernel",
                "rnn/cell/dense_i/bias": "bias",
            },
        ),
        "nnx norms and embed": (
            _as_pure(_nnx_params(_NNXNorms)),
            {
                "norm/scale": "gamma",
                "norm/bias": "beta",
                "norm_out/scale": "gamma",
                "norm_out/bias": "beta",
                "embed/embedding": "embeddings",
            },
        ),
    }
    return cases


def test_doc_rules_land_where_the_doc_says(doc):
    labels_fn = doc["labels"]
    matched = set()
    for name, (params, expected) in _doc_cases(doc).items():
        got = by_path(labels_fn(params))
        assert got == expected, name
        for path in got:
            matched.update(p for p in doc["doc_rules"] if oc.glob_match(p, path))
        report = oc.routing_report(params, doc["constraints"], labels_fn)  # every axis fits
        assert f"{len(expected)} leaves, {len(expected)} constrained" in report, name
    # Every rule the doc writes was exercised by some real module above.
    assert matched == set(doc["doc_rules"])


class _NamedCell(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.RNN(nn.LSTMCell(4, name="lstm"))(x)


def test_doc_named_cell_rule():
    """The doc: a cell named "lstm" is `lstm/...`, so write "**/lstm/h*/kernel"."""
    params = _linen_params(_NamedCell(), (2, 5, 3))
    labels = oc.label_by_path({"**/lstm/h*/kernel": "recurrent", "**/kernel": "kernel"})
    assert by_path(labels(params)) == {
        **_gates("lstm", [f"h{g}" for g in LSTM_GATES], "kernel", "recurrent"),
        **_gates("lstm", [f"h{g}" for g in LSTM_GATES], "bias", None),
        **_gates("lstm", [f"i{g}" for g in LSTM_GATES], "kernel", "kernel"),
    }


def test_doc_attention_rule_separates_out_projection():
    """The doc's attention advice: "**/out/kernel" (fan_in) before "**/kernel" (axis 0)."""
    linen = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=4)
    linen_params = _linen_params(linen, (1, 3, 6))
    nnx_params = _nnx_params(
        lambda rngs: nnx.MultiHeadAttention(
            num_heads=2, in_features=6, qkv_features=4, decode=False, rngs=rngs
        )
    )
    labels = oc.label_by_path({"**/out/kernel": "out", "**/kernel": "qkv"})
    for params in (linen_params, nnx_params):
        labelled = by_path(labels(params))
        assert {k: v for k, v in labelled.items() if v} == {
            "query/kernel": "qkv",
            "key/kernel": "qkv",
            "value/kernel": "qkv",
            "out/kernel": "out",
        }
        kernels = shapes(params)
        assert kernels["query/kernel"] == (6, 2, 2)  # (in, heads, head_dim): per unit axis 0
        assert kernels["out/kernel"] == (2, 2, 6)  # (heads, head_dim, out): per unit (0, 1)
        constraints = {"out": oc.MaxNorm(0.1, axis="fan_in"), "qkv": oc.MaxNorm(0.1, axis=0)}
        new = by_path(oc.apply_constraints(params, constraints, labels))
        assert unit_norms(new["out/kernel"], (0, 1)).max() <= 0.1 * (1 + 1e-5)
        assert unit_norms(new["query/kernel"], 0).max() <= 0.1 * (1 + 1e-5)


# --- the doc's two Keras traps, checked against Keras itself --------------------------


@pytest.fixture(scope="module")
def keras():
    return pytest.importorskip("keras")  # absent in CI's floor environment


def test_conv_transpose_layouts_differ_and_axes_translate(keras):
    keras_layer = keras.layers.Conv2DTranspose(5, (3, 3))
    keras_layer.build((1, 8, 8, 4))
    keras_kernel = np.asarray(keras_layer.kernel)  # (kh, kw, out, in)
    assert keras_kernel.shape == (3, 3, 5, 4)
    flax_kernel_shape = shapes(_linen_params(nn.ConvTranspose(5, (3, 3)), (1, 8, 8, 4)))
    assert flax_kernel_shape["kernel"] == (3, 3, 4, 5)  # (kh, kw, in, out)
    flax_t = _linen_params(nn.ConvTranspose(5, (3, 3), transpose_kernel=True), (1, 8, 8, 4))
    assert shapes(flax_t)["kernel"] == (3, 3, 5, 4)  # transpose_kernel=True: Keras's layout

    kernel = keras_kernel * 10.0
    as_flax = np.transpose(kernel, (0, 1, 3, 2))
    keras_out = np.asarray(keras.constraints.MaxNorm(1.0, axis=[0, 1, 2])(kernel))
    ours = np.asarray(oc.MaxNorm(1.0, axis=(0, 1, 3))(jnp.asarray(as_flax)))
    # Keras's formula, our sum order: each side's norm_ulps over a unit of 3*3*5.
    assert_close_ulps(np.transpose(ours, (0, 1, 3, 2)), keras_out, 2 * norm_ulps(45))
    # Per output unit: Flax "fan_in" equals Keras axis=[0, 1, 3] on its own layout.
    keras_per_out = np.asarray(keras.constraints.MaxNorm(1.0, axis=[0, 1, 3])(kernel))
    ours_fan_in = np.asarray(oc.MaxNorm(1.0, axis="fan_in")(jnp.asarray(as_flax)))
    assert_close_ulps(np.transpose(ours_fan_in, (0, 1, 3, 2)), keras_per_out, 2 * norm_ulps(36))


def test_embedding_default_axis_is_per_feature_not_per_token(keras):
    layer = keras.layers.Embedding(10, 4)
    layer.build((2,))
    flax_table = by_path(_linen_params(nn.Embed(10, 4), (1,), dtype=jnp.int32))
    assert flax_table["embedding"].shape == tuple(layer.embeddings.shape)  # same layout
    # Token i's vector has norm 2 (i + 1): every token is above 1.
    table = np.repeat(np.arange(1.0, 11.0, dtype=np.float32)[:, None], 4, axis=1)
    keras_default = np.asarray(keras.constraints.MaxNorm(1.0)(table))  # axis=0
    # per feature: every feature's norm (about 19.6) is above 1
    np.testing.assert_allclose(unit_norms(keras_default, 0), 1.0, rtol=rescaled_norm_rtol(10, 1.0))
    token_norms = unit_norms(keras_default, 1)
    # Row i is (i + 1) times the rescaled first row, each entry rounded once (u),
    # so the ratio of two rows' norms is off by at most 2u.
    assert_close_ulps(token_norms / token_norms[0], np.arange(1, 11), 1)
    per_token = np.asarray(oc.MaxNorm(1.0, axis=1)(jnp.asarray(table)))
    np.testing.assert_allclose(unit_norms(per_token, 1), 1.0, rtol=rescaled_norm_rtol(4, 1.0))
    keras_per_token = keras.constraints.MaxNorm(1.0, axis=1)(table)
    assert_close_ulps(per_token, keras_per_token, 2 * norm_ulps(4))  # each side's rounding


def test_depthwise_kernel_grouping_matches_keras(keras):
    """Keras (kh, kw, in, mult) with axis=[0, 1] is Flax (kh, kw, 1, in*mult) with "fan_in"."""
    layer = keras.layers.DepthwiseConv2D((3, 3), depth_multiplier=2, use_bias=False)
    x = np.random.default_rng(0).normal(size=(1, 6, 6, 3)).astype(np.float32)
    layer.build(x.shape)
    kernel = np.asarray(layer.kernel)
    assert kernel.shape == (3, 3, 3, 2)
    flax_conv = nn.Conv(6, (3, 3), feature_group_count=3, use_bias=False, padding="VALID")
    flax_kernel = kernel.reshape(3, 3, 1, 6)
    # The same weights give the same outputs, so the channel order agrees: two
    # float32 convolutions, each output a 9-term dot product (gamma_9 of the
    # sum of |x k| on each side), where a wrong order mixes other channels.
    scale = np.abs(x).max() * np.abs(kernel).sum(axis=(0, 1)).max()
    np.testing.assert_allclose(
        flax_conv.apply({"params": {"kernel": flax_kernel}}, x),
        layer(x),
        rtol=0,
        atol=ulps(scale, 2 * 9),
    )
    # ...and so do the per-channel-filter constraints.
    keras_c = np.asarray(keras.constraints.MaxNorm(0.1, axis=[0, 1])(kernel))
    ours = np.asarray(oc.MaxNorm(0.1, axis="fan_in")(jnp.asarray(flax_kernel)))
    assert_close_ulps(ours, keras_c.reshape(3, 3, 1, 6), 2 * norm_ulps(9))  # each side's rounding
