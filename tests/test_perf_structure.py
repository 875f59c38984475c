"""Elementwise constraints cost what optax's own elementwise transform costs.

Bytes, not kernel counts: `compiled.memory_analysis()` and the bytes the
compiled kernels read and write (`benchmarks/_traffic.py`) of `project`
with an elementwise constraint, compared with a program that does the same
work (`optax.keep_params_nonnegative`, or plain Adam whose last pass the
constraint fuses into). Both sides go through the same XLA, so an XLA
upgrade moves them together. Kernel counts, compile times and the norm
constraints' memory are XLA-specific and printed by
`python benchmarks/run.py --only memory` instead.

Shapes are abstract (`jax.ShapeDtypeStruct`): nothing is allocated or run.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
import pytest

import optax_constraints as oc
from benchmarks import _traffic

SLACK = 64 * 1024  # bytes: scalars and the step counter, not a pass over a leaf


def shapes() -> dict:
    f32 = jnp.float32
    params = {
        f"dense{i}": {
            "kernel": jax.ShapeDtypeStruct((512, 512), f32),
            "bias": jax.ShapeDtypeStruct((512,), f32),
        }
        for i in range(4)
    }
    params["conv"] = {
        "kernel": jax.ShapeDtypeStruct((3, 3, 64, 64), f32),
        "bias": jax.ShapeDtypeStruct((64,), f32),
    }
    return params


def figures(tx) -> dict[str, int]:
    """Temporaries, peak memory and bytes moved of `tx` then `apply_updates`, donated."""

    def step(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    params = shapes()
    state = jax.eval_shape(tx.init, params)
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, params).compile()
    return {
        "temp": compiled.memory_analysis().temp_size_in_bytes,
        "peak": _traffic.peak_bytes(compiled),
        "moved": _traffic.bytes_moved(compiled),
    }


def test_nonneg_everywhere_costs_what_keep_params_nonnegative_costs():
    adam = optax.adam(1e-3)
    ours = figures(optax.chain(adam, oc.project(oc.NonNeg())))
    theirs = figures(optax.chain(adam, optax.keep_params_nonnegative()))
    for key in ("temp", "peak", "moved"):
        assert ours[key] <= theirs[key] + SLACK, (key, ours, theirs)


@pytest.mark.parametrize("constraint", [oc.NonNeg(), oc.Clip(-0.1, 0.1)])
def test_elementwise_constraints_add_no_pass_over_the_params(constraint):
    # Adam's last kernel writes p + u; the constraint fuses into it.
    adam = optax.adam(1e-3)
    plain = figures(adam)
    ours = figures(optax.chain(adam, oc.project(constraint)))
    assert ours["moved"] <= plain["moved"] + SLACK
    assert ours["peak"] <= plain["peak"] + SLACK
