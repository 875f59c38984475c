"""A jitted training step lowers for the accelerators this machine lacks.

`jax.export` lowers a jitted function for any platform from a CPU machine
(StableHLO, no device needed), so a construct that XLA's CUDA, ROCm or TPU
lowering rejects (a platform-specific primitive, a `platform_dependent`
branch without that platform, a custom call only CPU has) fails here on CPU.
The step is what a user jits: `init`, `update` and `optax.apply_updates` of
a `project` transform, for every exported constraint class and the
transform's options.

To cover a new transform or option, add one entry to `STEPS`; a new
constraint class is covered as soon as it is exported (`constraint_instances`).
"""

from __future__ import annotations

import jax
import optax
import pytest
from helpers import constraint_instances
from jax import export  # `import jax` alone does not load it in every JAX we support

import optax_constraints as oc

PLATFORMS = ("cuda", "rocm", "tpu")

# A dense kernel, a conv kernel (the "fan_in" view and the matrix view of a
# 4-D leaf) and an unconstrained bias.
SHAPES = {"dense": (16, 8), "conv": (3, 3, 4, 8), "bias": (8,)}
LABELS = {"dense": "c", "conv": "c", "bias": None}

EXAMPLES = {
    "MaxNorm": [oc.MaxNorm(1.0, axis="fan_in")],
    "MinMaxNorm": [oc.MinMaxNorm(0.5, 1.0, rate=0.8, axis="fan_in")],
    "L1Ball": [oc.L1Ball(2.0, axis="fan_in")],
    "Simplex": [oc.Simplex(axis="fan_in")],
    "Clip": [oc.Clip(-0.5, 0.5)],
    "CenterAround": [oc.CenterAround(0.5)],
}


def _project(c, labels=LABELS, **kwargs):
    return lambda: oc.project({"c": c}, labels, **kwargs)


# id -> a function building the GradientTransformation whose step is exported.
STEPS = {
    **{repr(c): _project(c) for c in constraint_instances(EXAMPLES, axis_variant=0)},
    "every_k_steps=3": _project(oc.MaxNorm(1.0, axis=0), every_k_steps=3),
    # The conv kernel as 3 stacked (3, 4, 8) kernels.
    "Stacked(SpectralNorm)": _project(oc.Stacked(oc.SpectralNorm(1.0)), {**LABELS, "dense": None}),
    "OutputFirst(Orthogonal)": _project(oc.OutputFirst(oc.Orthogonal())),
    "chain(adam, project)": lambda: optax.chain(
        optax.adam(1e-2), oc.project({"c": oc.SpectralNorm(1.0)}, LABELS)
    ),
}
if hasattr(oc, "tangent"):
    STEPS["tangent"] = lambda: optax.chain(
        oc.tangent({"c": oc.UnitNorm(axis=0)}, LABELS),
        optax.sgd(1e-2),
        oc.project({"c": oc.UnitNorm(axis=0)}, LABELS),
    )


def _step_fn(tx):
    def step(params, updates):
        state = tx.init(params)
        for _ in range(2):  # the second update sees a non-initial state
            new_updates, state = tx.update(updates, state, params)
            params = optax.apply_updates(params, new_updates)
        return params, state

    return step


def _args():
    keys = jax.random.split(jax.random.key(0), 2 * len(SHAPES))
    params = {k: jax.random.normal(keys[i], s) for i, (k, s) in enumerate(SHAPES.items())}
    updates = {k: jax.random.normal(keys[-1 - i], s) for i, (k, s) in enumerate(SHAPES.items())}
    return params, updates


@pytest.mark.parametrize("name", list(STEPS))
def test_step_exports_for_every_accelerator(name):
    params, updates = _args()
    step = jax.jit(_step_fn(STEPS[name]()))
    exported = export.export(step, platforms=PLATFORMS)(params, updates)
    assert exported.platforms == PLATFORMS
    ref = jax.tree.leaves(jax.eval_shape(step, params, updates))
    assert [(a.shape, a.dtype) for a in exported.out_avals] == [(a.shape, a.dtype) for a in ref]
    assert "stablehlo" in exported.mlir_module()


@pytest.mark.parametrize("platform", PLATFORMS)
def test_each_platform_exports_on_its_own(platform):
    # A single-platform module is lowered without the platform index
    # argument that a multi-platform one dispatches on.
    params, updates = _args()
    tx = oc.project({"c": oc.SpectralNorm(1.0)}, LABELS)
    exported = export.export(jax.jit(_step_fn(tx)), platforms=(platform,))(params, updates)
    assert exported.platforms == (platform,)
