"""Keras 3's own `keras/src/constraints/constraints_test.py`, ported to `oc`.

Every test of the Keras file appears here under the same name with the same
inputs and assertions (Keras's `assertAllClose` is `rtol=atol=1e-6`). Two
changes: Keras's `test_get_method` asserts `assertTrue(obj, UnitNorm)`, which
passes for any truthy object; here it checks the type. And where float32
rounding can exceed Keras's 1e-6 (norms over the fixture's 100-entry units:
`norm_ulps(100)` ulps, 1.2e-5, for any summation order), the bound is that
rounding instead, so the port does not depend on how the CPU sums.
"""

import numpy as np
import pytest
from conftest import keras_example_array
from helpers import EPS32, norm_ulps, rescaled_norm_rtol

import optax_constraints as oc


def get_example_array():
    return keras_example_array()


def assert_all_close(actual, desired, ulps=0):
    """Keras's `assertAllClose`, with `rtol` raised to `ulps` float32 ulps if larger."""
    rtol = max(1e-6, ulps * EPS32)
    np.testing.assert_allclose(np.asarray(actual), np.asarray(desired), rtol=rtol, atol=1e-6)


def test_max_norm():
    constraint_fn = oc.MaxNorm(2.0)
    x = np.array([[0, 0, 0], [1.0, 0, 0], [3, 0, 0], [3, 3, 3]]).T
    target = np.array(
        [
            [0, 0, 0],
            [1.0, 0, 0],
            [2.0, 0, 0],
            [2.0 / np.sqrt(3), 2.0 / np.sqrt(3), 2.0 / np.sqrt(3)],
        ]
    ).T
    output = constraint_fn(x)
    assert_all_close(output, target)


def test_non_neg():
    constraint_fn = oc.NonNeg()
    output = np.asarray(constraint_fn(get_example_array()))
    assert (np.min(output, axis=1) >= 0.0).all()


def test_unit_norm():
    constraint_fn = oc.UnitNorm()
    output = np.asarray(constraint_fn(get_example_array()))
    l2 = np.sqrt(np.sum(np.square(output.astype(np.float64)), axis=0))
    assert_all_close(l2, np.ones_like(l2), ulps=norm_ulps(100))


def test_min_max_norm():
    constraint_fn = oc.MinMaxNorm(min_value=0.2, max_value=0.5)
    output = np.asarray(constraint_fn(get_example_array()))
    l2 = np.sqrt(np.sum(np.square(output.astype(np.float64)), axis=0))
    assert np.all(l2 >= 0.2)
    assert np.all(l2 <= 0.5 + max(1e-6, 0.5 * rescaled_norm_rtol(100, 0.5)))


def test_get_method():
    obj = oc.get("unit_norm")
    assert isinstance(obj, oc.UnitNorm)

    obj = oc.get(None)
    assert obj is None

    with pytest.raises(ValueError):
        oc.get("typo")


def test_default_constraint_call():
    constraint_fn = oc.Constraint()
    x = np.array([1.0, 2.0, 3.0])
    output = constraint_fn(x)
    assert_all_close(x, output)


def test_constraint_get_config():
    constraint_fn = oc.Constraint()
    config = constraint_fn.get_config()
    assert config == {}


def test_constraint_from_config():
    constraint_fn = oc.Constraint()
    config = constraint_fn.get_config()
    recreated_constraint_fn = oc.Constraint.from_config(config)
    assert isinstance(recreated_constraint_fn, oc.Constraint)


def test_max_norm_get_config():
    constraint_fn = oc.MaxNorm(max_value=3.0, axis=1)
    config = constraint_fn.get_config()
    expected_config = {"max_value": 3.0, "axis": 1}
    assert config == expected_config
    restored = oc.MaxNorm.from_config(config)
    assert restored.max_value == constraint_fn.max_value
    assert restored.axis == constraint_fn.axis
    x = get_example_array()
    assert_all_close(constraint_fn(x), restored(x))


def test_unit_norm_get_config():
    constraint_fn = oc.UnitNorm(axis=1)
    config = constraint_fn.get_config()
    expected_config = {"axis": 1}
    assert config == expected_config
    restored = oc.UnitNorm.from_config(config)
    assert restored.axis == constraint_fn.axis
    x = get_example_array()
    assert_all_close(constraint_fn(x), restored(x))


def test_min_max_norm_get_config():
    constraint_fn = oc.MinMaxNorm(min_value=0.5, max_value=2.0, rate=0.7, axis=1)
    config = constraint_fn.get_config()
    expected_config = {
        "min_value": 0.5,
        "max_value": 2.0,
        "rate": 0.7,
        "axis": 1,
    }
    assert config == expected_config
    restored = oc.MinMaxNorm.from_config(config)
    assert restored.min_value == constraint_fn.min_value
    assert restored.max_value == constraint_fn.max_value
    assert restored.rate == constraint_fn.rate
    assert restored.axis == constraint_fn.axis
    x = get_example_array()
    assert_all_close(constraint_fn(x), restored(x))


def test_non_neg_get_config():
    constraint_fn = oc.NonNeg()
    config = constraint_fn.get_config()
    assert config == {}


def test_non_neg_from_config():
    constraint_fn = oc.NonNeg()
    config = constraint_fn.get_config()
    recreated = oc.NonNeg.from_config(config)
    assert isinstance(recreated, oc.NonNeg)


def test_non_neg_serialization_roundtrip():
    original = oc.NonNeg()
    config = original.get_config()
    restored = oc.NonNeg.from_config(config)
    x = get_example_array()
    assert_all_close(original(x), restored(x))


def test_non_neg_zeroes_negatives():
    constraint_fn = oc.NonNeg()
    x = np.full((5, 5), -3.0)
    output = constraint_fn(x)
    assert_all_close(output, np.zeros((5, 5)))


def test_non_neg_preserves_positives():
    constraint_fn = oc.NonNeg()
    x = np.full((5, 5), 3.0)
    output = constraint_fn(x)
    assert_all_close(output, x)


def test_non_neg_all_zeros_input():
    constraint_fn = oc.NonNeg()
    x = np.zeros((5, 5))
    output = constraint_fn(x)
    assert_all_close(output, np.zeros((5, 5)))
