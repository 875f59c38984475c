"""Stacked kernels sharded along the layer axis on 8 simulated CPU devices.

The typical large-model layout: a scanned stack of layers whose parameters
are split over devices by layer (`PartitionSpec("layers")`). Every copy then
lives on one device, so `oc.Stacked` must project each copy where it is:
same values as on one device, same shardings out as in, and no gather of the
stack (at most the few entries `project`'s ordering reads, `_InGroups`).

As in `test_multidevice.py`, the device count must be set before jax is
imported, so the checks run in one subprocess that prints a JSON report, on
a mesh with `Auto` axes and on one with `Explicit` axes (`jax.make_mesh`'s
default since JAX 0.7).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

SCRIPT = r"""
import json, re, sys
import numpy as np
import jax, jax.numpy as jnp, optax
from jax.sharding import NamedSharding, PartitionSpec as P, AxisType
import optax_constraints as oc

kind, with_big = sys.argv[1], sys.argv[2] == "big"
mesh = jax.make_mesh((8,), ("layers",), axis_types=(getattr(AxisType, kind),))
LAYERS = 8
LEAVES = {  # name: (shape, constraint)
    "mlp_in": ((LAYERS, 64, 32), oc.Stacked(oc.MaxNorm(0.5, axis="fan_in"))),
    "mlp_big": ((LAYERS, 128, 128), oc.Stacked(oc.MaxNorm(0.5, axis="fan_in"))),  # ordered
    "orth": ((LAYERS, 32, 32), oc.Stacked(oc.Orthogonal())),
    "spec": ((LAYERS, 32, 16), oc.Stacked(oc.SpectralNorm(1.0))),  # power: state per layer
    "spec_svd": ((LAYERS, 32, 16), oc.Stacked(oc.SpectralNorm(1.0, method="svd"))),
    "bias": ((LAYERS, 32), oc.Stacked(oc.NonNeg())),
}
if not with_big:
    del LEAVES["mlp_big"]
constraints = {k: c for k, (_, c) in LEAVES.items()}
labels = {k: k for k in LEAVES}
tx = optax.chain(optax.adam(0.05), oc.project(constraints, labels))
keys = jax.random.split(jax.random.key(0), 2 * len(LEAVES))
params = {k: jax.random.normal(keys[i], s) for i, (k, (s, _)) in enumerate(LEAVES.items())}
grads = [{k: jax.random.normal(jax.random.fold_in(keys[len(LEAVES) + i], t), s)
          for i, (k, (s, _)) in enumerate(LEAVES.items())} for t in range(3)]

def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

by_layer = NamedSharding(mesh, P("layers"))
with jax.sharding.use_mesh(mesh) if hasattr(jax.sharding, "use_mesh") else jax.set_mesh(mesh):
    p_sh = jax.device_put(params, by_layer)
    s_sh = jax.jit(tx.init)(p_sh)
    g_sh = [jax.device_put(g, by_layer) for g in grads]
    jitted = jax.jit(step)
    in_p, in_s = p_sh, s_sh
    for g in g_sh:
        p_sh, s_sh = jitted(p_sh, s_sh, g)
    hlo = jitted.lower(in_p, in_s, g_sh[0]).compile().as_text()

one = jax.devices()[0]
p_1 = jax.device_put(params, one)
s_1 = tx.init(p_1)
for g in grads:
    p_1, s_1 = jax.jit(step)(p_1, s_1, jax.device_put(g, one))

report = {"leaves": {}, "collectives": [], "state": {}}
for k in LEAVES:
    a, b = np.asarray(p_sh[k], np.float64), np.asarray(p_1[k], np.float64)
    report["leaves"][k] = {
        "max_abs_diff": float(np.max(np.abs(a - b))),
        "same_sharding": bool(p_sh[k].sharding.is_equivalent_to(in_p[k].sharding, a.ndim)),
        "shard_shape": list(p_sh[k].addressable_shards[0].data.shape),
    }
spec_state = s_sh[1].constraint_states["spec"]
report["state"] = {
    "shape": list(spec_state.shape),
    "shard_shape": list(spec_state.addressable_shards[0].data.shape),
    "max_abs_diff": float(np.max(np.abs(np.asarray(spec_state) - np.asarray(s_1[1].constraint_states["spec"])))),
}

# Per layer, numerically (float64 numpy).
w = {k: np.asarray(v, np.float64) for k, v in p_sh.items()}
report["per_layer"] = {
    "mlp_in_max_norm": np.linalg.norm(w["mlp_in"], axis=1).max(axis=1).tolist(),
    "mlp_big_max_norm": np.linalg.norm(w["mlp_big"], axis=1).max(axis=1).tolist() if with_big else None,
    "orth_gap": [float(np.abs(m.T @ m - np.eye(32)).max()) for m in w["orth"]],
    "spec_svd_sigma": [float(np.linalg.svd(m, compute_uv=False)[0]) for m in w["spec_svd"]],
    "bias_min": float(w["bias"].min()),
}
for line in hlo.splitlines():
    m = re.search(r"=\s*(\(?[^=]*?\)?)\s+(all-gather|all-reduce|all-to-all|"
                  r"collective-permute|reduce-scatter)(-start)?\(", line)
    if m:
        shapes = [[int(d) for d in dims.split(",") if d]
                  for dims in re.findall(r"[a-z]+[0-9]*\[([0-9,]*)\]", m.group(1))]
        report["collectives"].append({"op": m.group(2), "shapes": shapes})
print("REPORT" + json.dumps(report))
"""


def _run(kind: str, big: str) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, kind, big],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("REPORT"))
    return json.loads(line[len("REPORT") :])


# "big": with a leaf large enough for `project` to order it (`_InGroups`).
@pytest.fixture(scope="module", params=[("Auto", "big")], ids=str)
def report(request):
    return _run(*request.param)


@pytest.mark.xfail(
    strict=True,
    reason="known limitation: on an Explicit mesh axis, the power method's"
    " lax.while_loop (projections/_matrix.py power_iteration_until_settled) under"
    " Stacked's vmap of a stack sharded by layer fails to trace in JAX 0.10"
    " ('Resource axis: layers ... not found in mesh: ()'); Auto meshes work (above).",
)
@pytest.mark.parametrize("size", ["small", "big"])
def test_explicit_mesh(size):
    _run("Explicit", size)


def test_values_match_one_device(report):
    for name, leaf in report["leaves"].items():
        # Each copy is computed on its own device by the same program as on
        # one device; allow a float32 ulp or two of the O(1) values.
        assert leaf["max_abs_diff"] <= 1e-6, (name, leaf)
    assert report["state"]["max_abs_diff"] <= 1e-6


def test_shardings_are_kept_and_every_device_holds_one_layer(report):
    for name, leaf in report["leaves"].items():
        assert leaf["same_sharding"], name
        assert leaf["shard_shape"][0] == 1, (name, leaf["shard_shape"])
    # One power-iteration vector per layer, sharded with its layer.
    assert report["state"]["shape"] == [8, 16]
    assert report["state"]["shard_shape"] == [1, 16]


def test_the_stack_is_not_gathered(report):
    for c in report["collectives"]:
        # At most the ordering's few entries per leaf (`_InGroups`) travel.
        assert c["op"] != "all-gather", c
        for shape in c["shapes"]:
            size = 1
            for d in shape:
                size *= d
            assert size <= 8, c


def test_each_layer_satisfies_its_constraint(report):
    per_layer = report["per_layer"]
    for key in ("mlp_in_max_norm", "mlp_big_max_norm"):
        norms = per_layer[key]
        if norms is None:  # no big leaf in this run
            continue
        assert len(norms) == 8
        # Every layer binds at 0.5 (its units start with norms near 8 and 11).
        assert all(0.5 * (1 - 1e-5) <= n <= 0.5 * (1 + 1e-6) for n in norms), (key, norms)
    assert max(per_layer["orth_gap"]) <= 1e-5, per_layer["orth_gap"]
    # The exact projection: each layer's largest singular value is the bound
    # (the layers start near sqrt(32) + sqrt(16) = 9.7).
    sigmas = per_layer["spec_svd_sigma"]
    assert all(1 - 1e-5 <= s <= 1 + 1e-5 for s in sigmas), sigmas
    assert per_layer["bias_min"] >= 0
