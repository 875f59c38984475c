"""Shared test set-up: Keras on the JAX backend, the Keras test fixture."""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import numpy as np
import pytest


def keras_example_array() -> np.ndarray:
    """The fixture of Keras's own constraints_test.py (seed 3537, [0, 0] = 0)."""
    np.random.seed(3537)
    example_array = np.random.random((100, 100)) * 100.0 - 50.0
    example_array[0, 0] = 0.0
    return example_array


@pytest.fixture
def example_array() -> np.ndarray:
    return keras_example_array()
