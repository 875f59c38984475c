"""The README's main job (examples/train_digits.py) trains and its constraints hold."""

import importlib.util
import sys
from pathlib import Path

import numpy as np

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_digits.py"


def load_example():
    spec = importlib.util.spec_from_file_location("train_digits", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # Flax modules are dataclasses: they look it up
    spec.loader.exec_module(module)
    return module


def test_digits_example_trains_with_constraints_holding(capsys):
    example = load_example()
    result = example.main(epochs=5)
    out = capsys.readouterr().out
    # The routing report is printed before training, one row per leaf.
    assert "hidden_0/kernel" in out and "MaxNorm(max_value=2.0, axis='fan_in')" in out
    assert "out/bias" in out  # listed, unconstrained
    # Independent check of the constraints on the returned figures.
    assert max(result["max_norms"].values()) <= example.MAX_NORM * (1 + 1e-6)
    assert result["min_bias"] >= 0.0
    assert result["accuracy"] > 0.9
    assert np.isfinite(result["accuracy"])
