"""`oc.get`, `oc.serialize`, `oc.deserialize`, `oc.register`: names and configs."""

import json

import jax.numpy as jnp
import keras
import numpy as np
import pytest
from helpers import assert_close_ulps, norm_ulps

import optax_constraints as oc

BUILTINS = {
    "MaxNorm": oc.MaxNorm,
    "MinMaxNorm": oc.MinMaxNorm,
    "NonNeg": oc.NonNeg,
    "UnitNorm": oc.UnitNorm,
}
SNAKE = {
    "max_norm": "MaxNorm",
    "min_max_norm": "MinMaxNorm",
    "non_neg": "NonNeg",
    "unit_norm": "UnitNorm",
}

# One non-default instance of every class the package ships.
INSTANCES = [
    oc.MaxNorm(3.5, axis=[0, 1]),
    oc.MaxNorm(1, axis=None),
    oc.MaxNorm(0.5, axis="fan_in"),
    oc.MinMaxNorm(0.25, 4.0, 0.3, axis=-1),
    oc.UnitNorm(axis=(0, 2)),
    oc.NonNeg(),
    oc.Clip(-1.0, 2.0),
    oc.Clip(None, 0.5),
    oc.CenterAround(0.75),
    oc.Constraint(),
]
IDS = [repr(c) for c in INSTANCES]


def example_kernel():
    return jnp.asarray(np.random.default_rng(0).standard_normal((3, 4, 5)) * 2, jnp.float32)


# --- get ----------------------------------------------------------------------


def test_get_none_is_none():
    assert oc.get(None) is None


@pytest.mark.parametrize("name", list(BUILTINS) + list(SNAKE))
def test_get_by_name(name):
    cls = BUILTINS[SNAKE.get(name, name)]
    obj = oc.get(name)
    assert type(obj) is cls
    assert obj == cls()


def test_get_by_name_matches_keras_names():
    """Every name Keras's `constraints.get` accepts, we accept too."""
    for name in list(BUILTINS) + list(SNAKE):
        theirs = keras.constraints.get(name)
        ours = oc.get(name)
        assert type(ours).__name__ == type(theirs).__name__
        assert ours.get_config() == theirs.get_config()


@pytest.mark.parametrize("constraint", INSTANCES, ids=IDS)
def test_get_by_dict(constraint):
    assert oc.get(oc.serialize(constraint)) == constraint


@pytest.mark.parametrize("cls", [*BUILTINS.values(), oc.Clip, oc.CenterAround])
def test_get_by_class_instantiates_defaults(cls):
    obj = oc.get(cls)
    assert type(obj) is cls
    assert obj == cls()


@pytest.mark.parametrize("constraint", INSTANCES, ids=IDS)
def test_get_instance_returns_it(constraint):
    assert oc.get(constraint) is constraint


@pytest.mark.parametrize("fn", [jnp.abs, lambda w: w * 2, np.tanh], ids=["jnp.abs", "lambda", "np"])
def test_get_arbitrary_callable_returned_as_is(fn):
    assert oc.get(fn) is fn


@pytest.mark.parametrize(
    "theirs",
    [
        keras.constraints.MaxNorm(3.0, axis=[0, 1]),
        keras.constraints.MinMaxNorm(0.1, 2.0, 0.5, axis=1),
        keras.constraints.NonNeg(),
        keras.constraints.UnitNorm(axis=-1),
    ],
    ids=lambda c: type(c).__name__,
)
def test_get_converts_keras_objects(theirs):
    ours = oc.get(theirs)
    assert type(ours) is BUILTINS[type(theirs).__name__]
    assert ours.get_config() == theirs.get_config()
    w = example_kernel()
    # Keras's formula and ours, summed in their own orders: each side's
    # norm_ulps over units of at most 12 entries (NonNeg: exactly).
    assert_close_ulps(np.asarray(ours(w)), np.asarray(theirs(w)), 2 * norm_ulps(12))


def test_get_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as err:
        oc.get("max_nrom")
    msg = str(err.value)
    assert "max_nrom" in msg
    for name in list(BUILTINS) + list(SNAKE):
        assert name in msg


@pytest.mark.parametrize("bad", [3, 2.5, [1, 2], int], ids=["int", "float", "list", "class"])
def test_get_uninterpretable_identifier(bad):
    with pytest.raises(ValueError):
        oc.get(bad)


# --- serialize / deserialize -------------------------------------------------------


@pytest.mark.parametrize("constraint", INSTANCES, ids=IDS)
def test_serialize_has_keras_shape(constraint):
    d = oc.serialize(constraint)
    assert set(d) == {"module", "class_name", "config", "registered_name"}
    assert d["class_name"] == type(constraint).__name__
    assert d["config"] == constraint.get_config()
    assert d["registered_name"] is None
    assert isinstance(d["module"], str) and d["module"]
    assert json.loads(json.dumps(d)) == d  # plain JSON


def test_serialize_matches_keras_for_builtins():
    for cls_name, cls in BUILTINS.items():
        theirs = keras.constraints.serialize(getattr(keras.constraints, cls_name)())
        ours = oc.serialize(cls())
        assert set(ours) == set(theirs)
        assert ours["class_name"] == theirs["class_name"]
        assert ours["config"] == theirs["config"]
        assert ours["registered_name"] == theirs["registered_name"]


def test_serialize_rejects_plain_functions():
    with pytest.raises(TypeError):
        oc.serialize(jnp.abs)


@pytest.mark.parametrize("constraint", INSTANCES, ids=IDS)
def test_deserialize_round_trip(constraint):
    d = json.loads(json.dumps(oc.serialize(constraint)))
    back = oc.deserialize(d)
    assert type(back) is type(constraint)
    assert back == constraint
    w = example_kernel()
    np.testing.assert_array_equal(np.asarray(back(w)), np.asarray(constraint(w)))


@pytest.mark.parametrize("name", list(BUILTINS) + list(SNAKE))
def test_deserialize_a_name(name):
    assert oc.deserialize(name) == BUILTINS[SNAKE.get(name, name)]()


def test_deserialize_rejects_dicts_without_class_name():
    with pytest.raises(ValueError, match="class_name"):
        oc.deserialize({"config": {"max_value": 2.0}})
    with pytest.raises(ValueError):
        oc.deserialize({"class_name": "NoSuchConstraint", "config": {}})


class Shift(oc.Constraint):
    """Not registered: found only through `custom_objects`."""

    def __init__(self, by=1.0):
        self.by = by

    def __call__(self, w):
        return w + self.by

    def get_config(self):
        return {"by": self.by}


def test_deserialize_with_custom_objects():
    d = oc.serialize(Shift(2.5))
    assert d["class_name"] == "Shift" and d["config"] == {"by": 2.5}
    with pytest.raises(ValueError, match="Shift"):
        oc.deserialize(d)
    back = oc.deserialize(d, custom_objects={"Shift": Shift})
    assert type(back) is Shift and back.by == 2.5
    np.testing.assert_array_equal(back(jnp.zeros(2)), [2.5, 2.5])


def test_custom_objects_override_builtins():
    d = oc.serialize(oc.NonNeg())
    back = oc.deserialize(d, custom_objects={"NonNeg": Shift})
    assert type(back) is Shift


# --- register ---------------------------------------------------------------------


@oc.register(package="test_registry")
class Scale(oc.Constraint):
    def __init__(self, factor=2.0):
        self.factor = factor

    def __call__(self, w):
        return w * self.factor

    def get_config(self):
        return {"factor": self.factor}


@oc.register(package="test_registry_other", name="Scale")
class OtherScale(oc.Constraint):
    """Registered under the same short name in another package."""

    def __init__(self, factor=2.0):
        self.factor = factor

    def __call__(self, w):
        return w / self.factor

    def get_config(self):
        return {"factor": self.factor}


def test_register_round_trip_by_registered_name():
    d = oc.serialize(Scale(3.0))
    assert d["registered_name"] == "test_registry>Scale"
    assert d["class_name"] == "Scale"
    back = oc.deserialize(json.loads(json.dumps(d)))
    assert type(back) is Scale and back == Scale(3.0)
    assert type(oc.get(d)) is Scale
    assert type(oc.get("test_registry>Scale")) is Scale
    assert "test_registry>Scale" in oc.constraints.valid_names()


def test_registered_name_picks_the_right_class():
    d = oc.serialize(OtherScale(4.0))
    assert d["registered_name"] == "test_registry_other>Scale"
    back = oc.deserialize(d)
    assert type(back) is OtherScale
    np.testing.assert_array_equal(back(jnp.ones(2) * 8.0), [2.0, 2.0])


def test_registered_class_works_in_project():
    import optax

    tx = oc.project({"s": oc.get("test_registry>Scale")}, {"w": "s"})
    params = {"w": jnp.ones(3)}
    updates, _ = tx.update({"w": jnp.ones(3)}, tx.init(params), params)
    np.testing.assert_allclose(optax.apply_updates(params, updates)["w"], [4.0, 4.0, 4.0])


def test_register_rejects_non_constraints():
    with pytest.raises(TypeError):

        @oc.register(package="test_registry")
        class NotAConstraint:
            pass


# --- get_config / from_config -----------------------------------------------------------


@pytest.mark.parametrize("constraint", INSTANCES, ids=IDS)
def test_from_config_get_config_round_trip(constraint):
    config = constraint.get_config()
    rebuilt = type(constraint).from_config(config)
    assert type(rebuilt) is type(constraint)
    assert rebuilt.get_config() == config
    assert rebuilt == constraint and hash(rebuilt) == hash(constraint)
    w = example_kernel()
    np.testing.assert_array_equal(np.asarray(rebuilt(w)), np.asarray(constraint(w)))


@pytest.mark.parametrize("constraint", INSTANCES, ids=IDS)
def test_get_config_is_json_serializable(constraint):
    config = constraint.get_config()
    assert json.loads(json.dumps(config)) == config


# --- what can and cannot be a config -------------------------------------------


@pytest.mark.parametrize(
    "value", [np.float32(2), np.float64(2.0), np.int64(2), np.asarray(2.0), jnp.asarray(2.0)]
)
def test_serialize_converts_numpy_and_0d_array_numbers(value):
    c = oc.MaxNorm(value, axis=np.int64(1))
    config = oc.serialize(c)
    assert config["config"] == {"max_value": 2, "axis": 1}
    assert type(config["config"]["max_value"]) in (int, float)
    rebuilt = oc.deserialize(json.loads(json.dumps(config)))
    assert rebuilt == oc.MaxNorm(2.0, axis=1)
    w = example_kernel()
    np.testing.assert_array_equal(rebuilt(w), oc.MaxNorm(2.0, axis=1)(w))


def test_serialize_rejects_a_schedule_naming_it_and_the_fix():
    import optax

    c = oc.MaxNorm(optax.linear_schedule(4.0, 1.0, 100))
    with pytest.raises(TypeError, match=r"MaxNorm.*max_value.*schedule.*at_step"):
        oc.serialize(c)
    # The suggested fix works: the bound at one step is a plain config.
    config = json.loads(json.dumps(oc.serialize(c.at_step(100))))
    assert oc.deserialize(config) == oc.MaxNorm(1.0)


def test_serialize_rejects_arrays_that_are_not_numbers():
    c = oc.MaxNorm(jnp.asarray([1.0, 2.0]))
    with pytest.raises(TypeError, match=r"MaxNorm.*max_value.*shape \(2,\).*number"):
        oc.serialize(c)


def test_serialize_rejects_tracers():
    import jax

    def inside_jit(m):
        return oc.serialize(oc.MaxNorm(m))

    with pytest.raises(TypeError, match=r"max_value.*traced"):
        jax.jit(inside_jit)(2.0)
