"""Every known misuse raises the error docs/misuse.md promises.

docs/misuse.md is the catalogue: one table row per misuse with an id, the
exception type and an excerpt of the message. This file holds one trigger per
id and checks, for every row, that the trigger raises exactly that type with
that excerpt (`pytest.raises(..., match=re.escape(excerpt))`), and that the
catalogue and the triggers list the same ids. Rows of the "not caught" table
have their own tests showing what happens instead.
"""

from __future__ import annotations

import re
from pathlib import Path

# KERAS_BACKEND=jax is set by tests/conftest.py before Keras is imported.
import jax.numpy as jnp
import keras
import numpy as np
import optax
import pytest

import optax_constraints as oc

CATALOGUE = Path(__file__).resolve().parents[1] / "docs" / "misuse.md"
ROW = re.compile(
    r"^\|\s*`(?P<id>[a-z0-9_]+)`\s*\|(?P<misuse>.*?)\|\s*`(?P<exc>\w+)`\s*\|\s*`(?P<msg>[^`]+)`\s*\|\s*$"
)


def catalogue_rows() -> dict[str, tuple[str, str]]:
    """id -> (exception name, message excerpt), read from docs/misuse.md."""
    rows = {}
    for line in CATALOGUE.read_text().splitlines():
        m = ROW.match(line)
        if m:
            assert m["id"] not in rows, f"duplicate id {m['id']} in {CATALOGUE.name}"
            rows[m["id"]] = (m["exc"], m["msg"])
    return rows


def params():
    return {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)}}


def init(constraints, labels=None, tree=None):
    return oc.project(constraints, labels).init(params() if tree is None else tree)


def _kernel_labels():
    return {"dense": {"kernel": "k", "bias": None}}


def _update_without_params():
    tx = oc.project(oc.NonNeg())
    tx.update(params(), tx.init(params()))


def _update_structure_mismatch():
    tx = oc.project(oc.NonNeg())
    tx.update({"a": jnp.ones(2)}, tx.init(params()), params())


def _declared_tree(constraint="non_neg"):
    from flax import nnx

    return {"w": nnx.Param(jnp.ones(2), constraint=constraint), "b": jnp.ones(2)}


def _register_a_function():
    oc.register()(lambda w: w)


TRIGGERS = {
    # -- hyper-parameters, at construction
    "max_norm_negative": lambda: oc.MaxNorm(max_value=-1.0),
    "max_norm_nan": lambda: oc.MaxNorm(max_value=float("nan")),
    "max_norm_string": lambda: oc.MaxNorm(max_value="2"),
    "max_norm_bool": lambda: oc.MaxNorm(max_value=True),
    "min_max_norm_min_above_max": lambda: oc.MinMaxNorm(min_value=2.0, max_value=1.0),
    "min_max_norm_min_negative": lambda: oc.MinMaxNorm(min_value=-1.0),
    "min_max_norm_rate_above_1": lambda: oc.MinMaxNorm(rate=1.5),
    "min_max_norm_rate_negative": lambda: oc.MinMaxNorm(rate=-0.1),
    "clip_min_above_max": lambda: oc.Clip(min_value=1.0, max_value=0.0),
    "center_around_string": lambda: oc.CenterAround(ref_value="a"),
    "l1_ball_negative": lambda: oc.L1Ball(max_value=-1.0),
    "simplex_scale_zero": lambda: oc.Simplex(scale=0.0),
    "spectral_norm_method": lambda: oc.SpectralNorm(method="exact"),
    "spectral_norm_iters": lambda: oc.SpectralNorm(num_iters=0),
    "orthogonal_method": lambda: oc.Orthogonal(method="qr"),
    "sphere_radius_zero": lambda: oc.Sphere(radius=0.0),
    # -- axis, at construction
    "axis_float": lambda: oc.MaxNorm(axis=1.5),
    "axis_typo": lambda: oc.UnitNorm(axis="fanin"),
    "axis_repeated": lambda: oc.MaxNorm(axis=(0, 0)),
    "axis_bool": lambda: oc.MaxNorm(axis=True),
    "axis_numpy_array": lambda: oc.MaxNorm(axis=np.array([0, 1])),
    # -- a constraint that does not fit a leaf, at init
    "axis_out_of_range": lambda: init({"k": oc.MaxNorm(axis=2)}, _kernel_labels()),
    "axis_fan_in_on_1d": lambda: init(
        {"k": oc.MaxNorm(axis="fan_in")}, oc.label_by_path({"**": "k"})
    ),
    "axis_same_dim_twice": lambda: init({"k": oc.MaxNorm(axis=(0, -2))}, _kernel_labels()),
    "axis_on_scalar": lambda: init(oc.MaxNorm(axis=0), tree={"scale": jnp.ones(())}),
    "matrix_on_1d": lambda: init({"k": oc.SpectralNorm()}, oc.label_by_path({"**": "k"})),
    "stacked_axis_out_of_range": lambda: init(
        {"k": oc.Stacked(oc.NonNeg(), stack_axis=2)}, _kernel_labels()
    ),
    "stacked_copy_rejected": lambda: init({"k": oc.Stacked(oc.SpectralNorm())}, _kernel_labels()),
    "stacked_bad_stack_axis": lambda: oc.Stacked(oc.NonNeg(), stack_axis="layers"),
    "wrapper_without_constraint": lambda: oc.Stacked(None),
    "non_float_leaf": lambda: init(oc.NonNeg(), tree={"step": jnp.zeros(2, jnp.int32)}),
    "custom_wrong_shape": lambda: init(lambda w: jnp.sum(w)),
    "custom_numpy": lambda: init(np.abs),
    "call_out_of_range": lambda: oc.MaxNorm(axis=3)(jnp.ones((2, 2))),
    "call_on_a_tree": lambda: oc.MaxNorm()(params()),
    "sphere_init_without_state": lambda: oc.apply_constraints(params(), oc.Sphere("init")),
    "tangent_without_hook": lambda: oc.tangent(oc.L1Ball()).init(params()),
    # -- labels
    "labels_missing_leaf": lambda: init({"k": oc.MaxNorm()}, {"dense": {"kernel": "k"}}),
    "labels_extra_leaf": lambda: init(
        {"k": oc.MaxNorm()}, {"dense": {"kernel": "k", "bias": None, "scale": "k"}}
    ),
    "labels_extra_level": lambda: init({"k": oc.MaxNorm()}, {"params": _kernel_labels()}),
    "labels_list_for_dict": lambda: init({"k": oc.MaxNorm()}, ["k", None]),
    "label_not_in_constraints": lambda: init(
        {"k": oc.MaxNorm()}, {"dense": {"kernel": "kk", "bias": None}}
    ),
    "default_label_not_in_constraints": lambda: init(
        {"k": oc.MaxNorm()}, oc.label_by_path({"**/kernel": "k"}, default="rest")
    ),
    "rule_matches_nothing": lambda: init({"k": oc.MaxNorm()}, oc.label_by_path({"**/kernal": "k"})),
    "rule_shadowed": lambda: init(
        {"k": oc.MaxNorm(), "b": oc.NonNeg()}, oc.label_by_path({"**": "k", "**/kernel": "b"})
    ),
    "rule_empty": lambda: oc.label_by_path({"": "k"}),
    "rule_not_a_string": lambda: oc.label_by_path({3: "k"}),
    "rules_not_a_mapping": lambda: oc.label_by_path(["**/kernel"]),
    "rule_label_unhashable": lambda: oc.label_by_path({"**/kernel": ["k"]}),
    "mapping_without_labels": lambda: oc.project({"k": oc.MaxNorm()}),
    "labels_without_mapping": lambda: oc.project(oc.MaxNorm(), {"dense": "k"}),
    "constraints_none": lambda: oc.project(None),
    "constraint_not_interpretable": lambda: oc.project({"k": 3}, _kernel_labels()),
    "constraint_unknown_name": lambda: oc.project({"k": "maxnorm"}, _kernel_labels()),
    # -- the transform
    "update_without_params": _update_without_params,
    "update_structure_mismatch": _update_structure_mismatch,
    "every_k_steps_zero": lambda: oc.project(oc.NonNeg(), every_k_steps=0),
    # -- the registry
    "get_unknown_name": lambda: oc.get("max_nrom"),
    "get_number": lambda: oc.get(3),
    "get_other_class": lambda: oc.get(dict),
    "get_dict_without_class_name": lambda: oc.get({"max_value": 2}),
    "get_dict_bad_argument": lambda: oc.get({"class_name": "MaxNorm", "config": {"max_vaule": 2}}),
    "deserialize_unknown_class": lambda: oc.deserialize({"class_name": "MaxNorn", "config": {}}),
    "deserialize_config_not_dict": lambda: oc.deserialize({"class_name": "MaxNorm", "config": [2]}),
    "serialize_function_constraint": lambda: oc.serialize(oc.FunctionConstraint(jnp.abs)),
    "serialize_plain_function": lambda: oc.serialize(jnp.abs),
    "function_constraint_not_callable": lambda: oc.FunctionConstraint(3),
    "register_a_function": _register_a_function,
    # -- declared constraints
    "declared_conflict": lambda: oc.declared(_declared_tree(), rules={"w": oc.MaxNorm()}),
    "declared_rule_matches_nothing": lambda: oc.declared(
        _declared_tree(), rules={"**/kernal": oc.NonNeg()}
    ),
    "declared_prefer_typo": lambda: oc.declared(_declared_tree(), rules={}, prefer="rule"),
    "declared_prefer_without_rules": lambda: oc.declared(_declared_tree(), prefer="rules"),
    "declared_unknown_constraint": lambda: oc.declared(_declared_tree("maxnorm")),
    "declared_leaf_missing": lambda: init(*oc.declared(_declared_tree()), tree=params()),
    "with_constraint_swapped": lambda: oc.with_constraint(oc.MaxNorm(), jnp.zeros),
}

EXCEPTIONS = {"ValueError": ValueError, "TypeError": TypeError}


def test_catalogue_and_triggers_list_the_same_misuses():
    rows = catalogue_rows()
    assert sorted(rows) == sorted(TRIGGERS), (
        f"only in docs/misuse.md: {sorted(set(rows) - set(TRIGGERS))}; "
        f"only in tests/test_misuse.py: {sorted(set(TRIGGERS) - set(rows))}"
    )


@pytest.mark.parametrize("misuse", sorted(TRIGGERS))
def test_misuse_raises_the_catalogued_error(misuse):
    exc_name, excerpt = catalogue_rows()[misuse]
    with pytest.raises(EXCEPTIONS[exc_name], match=re.escape(excerpt)) as info:
        TRIGGERS[misuse]()
    assert type(info.value) is EXCEPTIONS[exc_name]  # not a subclass from deeper down


LEAF_ERRORS = [
    "axis_out_of_range",
    "stacked_axis_out_of_range",
    "stacked_copy_rejected",
    "axis_fan_in_on_1d",
    "axis_same_dim_twice",
    "axis_on_scalar",
    "matrix_on_1d",
    "non_float_leaf",
    "custom_wrong_shape",
    "labels_missing_leaf",
    "label_not_in_constraints",
]


@pytest.mark.parametrize("misuse", LEAF_ERRORS)
def test_leaf_errors_name_the_path_and_shape(misuse):
    with pytest.raises(ValueError) as info:
        TRIGGERS[misuse]()
    message = str(info.value)
    assert re.search(r"at '[^']+' \(shape \(", message), message


@pytest.mark.parametrize(
    "fn",
    [np.abs, lambda w: np.clip(w, 0.0, 1.0), lambda w: w * float(np.max(w))],
    ids=["np.abs", "np.clip", "w * float(np.max(w))"],
)
def test_numpy_constraints_fail_at_init_naming_the_leaf_and_jax_numpy(fn):
    # Without the check, jit(tx.update) raised JAX's raw TracerArrayConversionError
    # (or ConcretizationTypeError), naming neither the leaf nor the fix.
    for call in (
        lambda: oc.project({"k": fn}, {"dense": {"kernel": "k", "bias": None}}).init(params()),
        lambda: oc.apply_constraints(params(), {"k": fn}, {"dense": {"kernel": "k", "bias": None}}),
    ):
        with pytest.raises(TypeError, match=r"at 'dense/kernel' \(shape \(3, 2\).*jax\.numpy"):
            call()


# --- the "not caught" table ------------------------------------------------------


def test_wrong_position_in_chain_is_not_detected():
    # Nothing in an optax chain tells a transform what comes after it; the
    # projected update is changed again and the params leave the feasible set.
    # constraint_violations is the way to notice.
    p = {"w": jnp.array([[3.0], [4.0]])}
    tx = optax.chain(oc.project(oc.MaxNorm(1.0)), optax.sgd(1.0))
    state = tx.init(p)
    updates, _ = tx.update({"w": jnp.zeros((2, 1))}, state, p)
    new = optax.apply_updates(p, updates)
    # sgd(1.0) negates the projected update (which was a move towards the ball).
    assert float(oc.constraint_violations(new, oc.MaxNorm(1.0))["__all__"]) > 1.0


def test_array_hyper_parameters_are_not_validated():
    # Arrays and tracers are never branched on (they may be traced under
    # inject_hyperparams); a negative array bound is taken as given.
    w = jnp.array([[3.0], [4.0]])
    out = oc.MaxNorm(jnp.array(-1.0))(w)
    assert float(jnp.sum(out * w)) < 0  # the unit flips sign: garbage in, garbage out


def test_rank_change_after_init_is_caught_late():
    tx = oc.project({"k": oc.MaxNorm(axis=1)}, _kernel_labels())
    state = tx.init(params())
    changed = {"dense": {"kernel": jnp.ones(3), "bias": jnp.ones(2)}}
    with pytest.raises(ValueError, match=re.escape("axis 1 is out of range")):
        tx.update(changed, state, changed)


def test_keras_class_is_accepted_by_get():
    # Not a misuse any more: a Keras constraint class (as keras.constraints.get
    # accepts) resolves to ours with the same defaults.
    assert oc.get(keras.constraints.MaxNorm) == oc.MaxNorm()
    assert oc.get(keras.constraints.UnitNorm(axis=1)) == oc.UnitNorm(axis=1)
