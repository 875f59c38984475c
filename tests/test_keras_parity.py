"""Numerical and config parity with the real Keras 3 (JAX backend).

Keras is the reference: each `keras.constraints.X(...)` is called inside
`jax.jit`, as `model.fit()` calls it, and our class must give the same
float32 values within 2 ulp, jitted and eager, over Dense and Conv kernel
layouts and every accepted form of `axis`. Configs must move both ways
through `serialize`/`deserialize`.
"""

import inspect
import json

import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest

import optax_constraints as oc

MAX_ULP = 2

KERNEL_SHAPES = {
    "dense": (7, 5),  # (in, out)
    "conv1d": (3, 4, 6),  # (width, in, out)
    "conv2d": (3, 3, 4, 6),  # (h, w, in, out)
    "conv3d": (2, 3, 3, 4, 5),  # (d, h, w, in, out)
}

# Scales chosen so that MaxNorm and MinMaxNorm clip from above (30), from
# below (0.05) and sit in between (1).
SCALES = (0.05, 1.0, 30.0)

# name -> (our class, keras class, constructor kwargs); every one takes `axis`.
NORM_CONSTRAINTS = {
    "max_norm": (oc.MaxNorm, keras.constraints.MaxNorm, {"max_value": 1.5}),
    "min_max_norm": (
        oc.MinMaxNorm,
        keras.constraints.MinMaxNorm,
        {"min_value": 0.5, "max_value": 2.0, "rate": 1.0},
    ),
    "min_max_norm_rate_0.3": (
        oc.MinMaxNorm,
        keras.constraints.MinMaxNorm,
        {"min_value": 0.5, "max_value": 2.0, "rate": 0.3},
    ),
    "unit_norm": (oc.UnitNorm, keras.constraints.UnitNorm, {}),
}

PAIRS = {
    "MaxNorm": (oc.MaxNorm, keras.constraints.MaxNorm),
    "MinMaxNorm": (oc.MinMaxNorm, keras.constraints.MinMaxNorm),
    "UnitNorm": (oc.UnitNorm, keras.constraints.UnitNorm),
    "NonNeg": (oc.NonNeg, keras.constraints.NonNeg),
}


def ulp_diff(a, b) -> np.ndarray:
    """Distance in float32 units in the last place (+0.0 and -0.0 are 0 apart)."""
    a = np.asarray(a, np.float32)
    b = np.asarray(b, np.float32)
    assert a.shape == b.shape

    def ordered(x):
        # Sign-magnitude bits -> a monotonic integer line through zero.
        i = x.view(np.int32).astype(np.int64)
        return np.where(i < 0, -(i & 0x7FFFFFFF), i)

    return np.abs(ordered(a) - ordered(b))


def test_ulp_diff_helper():
    one = np.float32(1.0)
    assert ulp_diff(one, np.nextafter(one, np.float32(2))) == 1
    assert ulp_diff(np.float32(-0.0), np.float32(0.0)) == 0
    smallest = np.nextafter(np.float32(0), np.float32(1))
    assert ulp_diff(-smallest, smallest) == 2
    assert ulp_diff(np.float32(1.0), np.float32(1.5)) == 2**22


def axes_for(ndim: int) -> list:
    """Every form of `axis`: ints, negative ints, tuples, lists and None."""
    fan_in = tuple(range(ndim - 1))
    candidates = [
        0,
        -1,
        fan_in,
        list(fan_in),
        tuple(a - ndim for a in fan_in),
        [ndim - 1, 0],
        None,
    ]
    out = []
    for axis in candidates:
        if axis not in out:
            out.append(axis)
    return out


AXIS_CASES = [
    pytest.param(shape, axis, id=f"{layer}-axis={axis}")
    for layer, shape in KERNEL_SHAPES.items()
    for axis in axes_for(len(shape))
]


def kernel(shape, scale: float, seed: int = 0) -> np.ndarray:
    """A float32 kernel with an all-zero output unit and an all-zero input row."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal(shape) * scale).astype(np.float32)
    w[..., 0] = 0.0  # a zero unit for per-output-unit axes
    w[0] = 0.0  # a zero unit for axis=-1
    return w


def keras_jitted(constraint):
    return jax.jit(lambda w: constraint(w))


def assert_matches_keras(ours, theirs, w):
    assert ours.shape == theirs.shape == w.shape
    assert ours.dtype == theirs.dtype == np.float32
    assert np.all(np.isfinite(ours)), "our projection produced NaN/inf"
    diff = ulp_diff(ours, theirs)
    assert diff.max() <= MAX_ULP, (
        f"max ulp difference {diff.max()} at {np.unravel_index(diff.argmax(), diff.shape)}"
    )


@pytest.mark.parametrize("name", list(NORM_CONSTRAINTS))
@pytest.mark.parametrize(("shape", "axis"), AXIS_CASES)
def test_norm_constraints_match_keras(name, shape, axis):
    our_cls, keras_cls, kwargs = NORM_CONSTRAINTS[name]
    ours = our_cls(**kwargs, axis=axis)
    theirs = keras_cls(**kwargs, axis=axis)
    ours_jit, theirs_jit = jax.jit(ours), keras_jitted(theirs)
    for scale in SCALES:
        w = kernel(shape, scale)
        reference = np.asarray(theirs_jit(w))
        assert_matches_keras(np.asarray(ours_jit(w)), reference, w)
        # Our eager call is one compiled program too, so it rounds like the
        # jitted reference (Keras's own op-by-op eager call can be 3 ulp off).
        assert_matches_keras(np.asarray(ours(w)), reference, w)


@pytest.mark.parametrize("name", list(NORM_CONSTRAINTS))
@pytest.mark.parametrize("layer", list(KERNEL_SHAPES))
def test_fan_in_equals_keras_per_filter_axes(name, layer):
    """`axis="fan_in"` is Keras's `axis=[0, ..., ndim - 2]` for every layout."""
    shape = KERNEL_SHAPES[layer]
    our_cls, keras_cls, kwargs = NORM_CONSTRAINTS[name]
    ours = our_cls(**kwargs, axis="fan_in")
    theirs = keras_cls(**kwargs, axis=list(range(len(shape) - 1)))
    for scale in SCALES:
        w = kernel(shape, scale, seed=1)
        reference = np.asarray(keras_jitted(theirs)(w))
        assert_matches_keras(np.asarray(jax.jit(ours)(w)), reference, w)
        assert_matches_keras(np.asarray(ours(w)), reference, w)


@pytest.mark.parametrize("name", list(NORM_CONSTRAINTS))
def test_zero_units_stay_zero(name):
    our_cls, keras_cls, kwargs = NORM_CONSTRAINTS[name]
    w = kernel(KERNEL_SHAPES["conv2d"], 30.0)
    ours = np.asarray(jax.jit(our_cls(**kwargs, axis=(0, 1, 2)))(w))
    np.testing.assert_array_equal(ours[..., 0], 0.0)
    np.testing.assert_array_equal(ours[0], 0.0)
    np.testing.assert_array_equal(
        np.asarray(keras_jitted(keras_cls(**kwargs, axis=(0, 1, 2)))(w))[..., 0], 0.0
    )
    whole = np.zeros((4, 3), np.float32)
    np.testing.assert_array_equal(np.asarray(our_cls(**kwargs, axis=None)(whole)), whole)


@pytest.mark.parametrize("layer", list(KERNEL_SHAPES))
def test_non_neg_matches_keras_bitwise(layer):
    shape = KERNEL_SHAPES[layer]
    w = kernel(shape, 1.0, seed=2)
    w.reshape(-1)[::7] = -0.0
    assert np.signbit(w[w == 0]).any(), "the input must contain -0.0"
    expected = np.asarray(keras_jitted(keras.constraints.NonNeg())(w))
    for ours in (np.asarray(jax.jit(oc.NonNeg())(w)), np.asarray(oc.NonNeg()(w))):
        assert ours.dtype == expected.dtype == np.float32
        np.testing.assert_array_equal(ours.view(np.int32), expected.view(np.int32))
        # maximum(w, 0): no negative values and no negative zeros.
        assert not np.signbit(ours).any()
        np.testing.assert_array_equal(ours, np.maximum(w, 0))


# --- configs ------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PAIRS))
def test_default_config_equals_keras(name):
    our_cls, keras_cls = PAIRS[name]
    assert our_cls().get_config() == keras_cls().get_config()


@pytest.mark.parametrize("name", list(PAIRS))
def test_constructor_signature_equals_keras(name):
    our_cls, keras_cls = PAIRS[name]
    ours = inspect.signature(our_cls.__init__).parameters
    theirs = inspect.signature(keras_cls.__init__).parameters
    assert list(ours) == list(theirs)
    assert {k: p.default for k, p in ours.items()} == {k: p.default for k, p in theirs.items()}


KERAS_CONFIGS = [
    ("MaxNorm", {"max_value": 3.0, "axis": 1}),
    ("MaxNorm", {"max_value": 0.5, "axis": [0, 1, 2]}),
    ("MaxNorm", {"max_value": 4, "axis": None}),
    ("MinMaxNorm", {"min_value": 0.1, "max_value": 2.5, "rate": 0.5, "axis": -1}),
    ("MinMaxNorm", {"min_value": 0.0, "max_value": 1.0, "rate": 1.0, "axis": [0, 1]}),
    ("UnitNorm", {"axis": 0}),
    ("UnitNorm", {"axis": [0, 1, 2]}),
    ("UnitNorm", {"axis": None}),
    ("NonNeg", {}),
]
CONFIG_IDS = [f"{n}-{c}" for n, c in KERAS_CONFIGS]


@pytest.mark.parametrize(("name", "config"), KERAS_CONFIGS, ids=CONFIG_IDS)
def test_config_keys_equal_keras(name, config):
    our_cls, keras_cls = PAIRS[name]
    assert our_cls(**config).get_config() == keras_cls(**config).get_config()


def _conv_kernel():
    return kernel(KERNEL_SHAPES["conv2d"], 3.0, seed=3)


@pytest.mark.parametrize(("name", "config"), KERAS_CONFIGS, ids=CONFIG_IDS)
def test_we_read_keras_serialized_dicts(name, config):
    our_cls, keras_cls = PAIRS[name]
    theirs = keras_cls(**config)
    written = keras.constraints.serialize(theirs)
    written = json.loads(json.dumps(written))  # as stored in a .keras config
    w = _conv_kernel()
    expected = np.asarray(keras_jitted(theirs)(w))
    for ours in (oc.get(written), oc.deserialize(written)):
        assert type(ours) is our_cls
        assert ours.get_config() == theirs.get_config()
        assert ulp_diff(np.asarray(ours(w)), expected).max() <= MAX_ULP


@pytest.mark.parametrize(("name", "config"), KERAS_CONFIGS, ids=CONFIG_IDS)
def test_keras_reads_our_serialized_dicts(name, config):
    our_cls, keras_cls = PAIRS[name]
    ours = our_cls(**config)
    written = json.loads(json.dumps(oc.serialize(ours)))
    theirs = keras.constraints.deserialize(written)
    assert type(theirs) is keras_cls
    assert theirs.get_config() == ours.get_config()
    w = _conv_kernel()
    expected = np.asarray(keras_jitted(theirs)(w))
    assert ulp_diff(np.asarray(ours(w)), expected).max() <= MAX_ULP


def test_keras_tuple_axis_config_is_read():
    """Keras keeps a tuple axis as a tuple in its config; we read it all the same."""
    theirs = keras.constraints.MaxNorm(2.0, axis=(0, 1, 2))
    ours = oc.deserialize(keras.constraints.serialize(theirs))
    assert isinstance(ours, oc.MaxNorm)
    assert list(ours.get_config()["axis"]) == list(theirs.get_config()["axis"])
    w = _conv_kernel()
    assert ulp_diff(np.asarray(ours(w)), np.asarray(keras_jitted(theirs)(w))).max() <= MAX_ULP


@pytest.mark.parametrize(
    ("alias", "cls", "keras_alias", "keras_cls"),
    [
        (oc.max_norm, oc.MaxNorm, keras.constraints.max_norm, keras.constraints.MaxNorm),
        (
            oc.min_max_norm,
            oc.MinMaxNorm,
            keras.constraints.min_max_norm,
            keras.constraints.MinMaxNorm,
        ),
        (oc.non_neg, oc.NonNeg, keras.constraints.non_neg, keras.constraints.NonNeg),
        (oc.unit_norm, oc.UnitNorm, keras.constraints.unit_norm, keras.constraints.UnitNorm),
    ],
)
def test_aliases_are_the_classes_as_in_keras(alias, cls, keras_alias, keras_cls):
    assert keras_alias is keras_cls
    assert alias is cls


def test_keras_objects_are_converted_by_get():
    theirs = keras.constraints.MinMaxNorm(0.2, 3.0, 0.4, axis=[0, 1])
    ours = oc.get(theirs)
    assert isinstance(ours, oc.MinMaxNorm)
    assert ours.get_config() == theirs.get_config()
    w = jnp.asarray(_conv_kernel())
    assert ulp_diff(np.asarray(ours(w)), np.asarray(keras_jitted(theirs)(w))).max() <= MAX_ULP
