"""A real multi-process JAX cluster: 2 processes on localhost, 4 CPU devices each.

`docs/multihost.md` says training on several hosts needs nothing special:
each process runs the same jitted step on global arrays, and XLA inserts the
collectives, which here go between processes (CPU collectives over gloo).
This test runs it. `SCRIPT` is started three times: twice as the two
processes of a cluster (`jax.distributed.initialize` with a coordinator on a
free localhost port), and once as a single process with 8 devices, the
reference. All three build the same `(2, 4)` mesh and the same sharded
parameters, and train a few steps of `optax.chain(optax.adam(...),
oc.project(...))` with a constraint of every kind: norm (`MaxNorm`,
`UnitNorm`, reducing over a sharded axis), elementwise (`NonNeg`), matrix
(`Orthogonal("newton_schulz")`) and stateful (`SpectralNorm`'s power
method, whose vector lives in the optimizer state), on an `Explicit` and an
`Auto` mesh, all three at once. Each process prints the blocks of the
results that its devices hold (no collective needed to read them); the test
puts the cluster's blocks together, compares them with the reference and
checks that every parameter and state leaf kept its sharding, which spans
both processes.

The processes write to files (a full pipe would stall a process and with it
the cluster), run with a timeout and are killed as soon as one of them
fails, so a lost peer cannot hang the suite.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest
from helpers import EPS32, norm_ulps

SCRIPT = r"""
import json, sys
mode = sys.argv[1]
import jax
if mode == "worker":
    process_id, port = int(sys.argv[2]), int(sys.argv[3])
    # gloo is the default CPU collectives implementation of the JAX versions
    # we support; set it anyway: without CPU collectives a cross-process
    # all-reduce fails.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                               process_id=process_id, initialization_timeout=60)
import numpy as np
import jax.numpy as jnp
import optax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
import optax_constraints as oc

assert len(jax.devices()) == 8, jax.devices()
assert len(jax.local_devices()) == (4 if mode == "worker" else 8)

STEPS, NS_ITERS = int(sys.argv[-2]), int(sys.argv[-1])
# name: (shape, spec, label)
LEAVES = {
    "dense": ((64, 32), P("model", "data"), "max"),       # norm over sharded axis 0
    "embedding": ((64, 32), P("data", "model"), "unit"),  # norm over sharded axis 1
    "bias": ((32,), P("model"), "nonneg"),
    "square": ((32, 32), P("data", "model"), "orthogonal"),
    "head": ((64, 16), P("model", None), "spectral"),
    "free": ((16, 8), P("data", "model"), None),
}
CONSTRAINTS = {
    "max": oc.MaxNorm(1.0, axis=0),
    "unit": oc.UnitNorm(axis=1),
    "nonneg": oc.NonNeg(),
    # Few iterations: each waits on a cross-process all-reduce.
    "orthogonal": oc.Orthogonal("newton_schulz", num_iters=NS_ITERS),
    # A fixed number of power iterations: the same work in every run.
    "spectral": oc.SpectralNorm(1.0, num_iters=2, max_iters=2),
}
tx = optax.chain(optax.adam(0.05), oc.project(CONSTRAINTS, {k: v[2] for k, v in LEAVES.items()}))
rng = np.random.default_rng(0)
params_np = {k: (2.0 * rng.standard_normal(s)).astype(np.float32) for k, (s, _, _) in LEAVES.items()}
grads_np = [{k: rng.standard_normal(s).astype(np.float32) for k, (s, _, _) in LEAVES.items()}
            for _ in range(STEPS)]


def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state


def global_array(x, sharding):
    # Each process fills only its own devices' blocks.
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def blocks(x):
    # This process's blocks of a global array, each once (no collective needed).
    return {"shape": x.shape, "blocks": [
        ([[i.start or 0, x.shape[d] if i.stop is None else i.stop] for d, i in enumerate(s.index)],
         np.asarray(s.data).tolist()) for s in x.addressable_shards if s.replica_id == 0]}


def state_shardings(params, shard, mesh):
    # Adam's moments like their params; counts and the power method's vectors replicated.
    def one(path, x):
        name = getattr(path[-1], "key", None)
        return shard[name] if name in shard and x.ndim == params[name].ndim else replicated

    replicated = NamedSharding(mesh, P())
    return jax.tree_util.tree_map_with_path(one, jax.eval_shape(tx.init, params))


def kept(out, before):
    return isinstance(out.sharding, NamedSharding) and out.sharding.is_equivalent_to(
        before.sharding, out.ndim)


def specs(tree):
    return [str(getattr(x.sharding, "spec", x.sharding)) for x in jax.tree.leaves(tree)]


AXIS_TYPES = ("Explicit", "Auto")
report = {"process_count": jax.process_count(), "runs": {}}
for axis_type in AXIS_TYPES:
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(getattr(AxisType, axis_type),) * 2)
    shard = {k: NamedSharding(mesh, spec) for k, (_, spec, _) in LEAVES.items()}
    params = {k: global_array(v, shard[k]) for k, v in params_np.items()}
    state = jax.jit(tx.init, out_shardings=state_shardings(params, shard, mesh))(params)
    in_params, in_state = params, state
    jitted = jax.jit(step)
    for g in grads_np:
        params, state = jitted(params, state, {k: global_array(v, shard[k]) for k, v in g.items()})
    run = {
        "fully_addressable": [x.is_fully_addressable for x in jax.tree.leaves(params)],
        # Equivalent: the same devices hold the same blocks (on an `Auto` mesh
        # XLA may drop a trailing `None` from the spec).
        "param_sharding_kept": {k: kept(params[k], in_params[k]) for k in LEAVES},
        "param_specs": {k: str(params[k].sharding.spec) for k in LEAVES},
        "state_sharding_kept": [kept(a, b) for a, b in
                                zip(jax.tree.leaves(state), jax.tree.leaves(in_state))],
        "state_specs": specs(state),
        "params": {k: blocks(v) for k, v in params.items()},
        "state": [blocks(x) for x in jax.tree.leaves(state)],
        "state_paths": [jax.tree_util.keystr(p)
                        for p, _ in jax.tree_util.tree_leaves_with_path(state)],
    }
    report["runs"][axis_type] = run
print("REPORT" + json.dumps(report), flush=True)
if mode == "worker":
    jax.distributed.shutdown()
"""

TIMEOUT = 300
"""Seconds the cluster and the reference get (they take well under a minute on an idle
machine; this is the limit a stalled cluster is killed at, not an expected time)."""


def _env(devices: int) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(commands: list[tuple[list[str], int]]) -> list[str]:
    """Runs `SCRIPT` with each `(args, devices)` at once; their stdouts.

    Kills them all if one fails or time runs out.
    """
    # Output goes to files, not pipes: a process blocked on a full pipe would
    # stall the cluster until the timeout.
    files = [(tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")) for _ in commands]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", SCRIPT, *args], env=_env(devices), stdout=out, stderr=err
        )
        for (args, devices), (out, err) in zip(commands, files)
    ]
    deadline = time.monotonic() + TIMEOUT
    try:
        while any(p.poll() is None for p in procs):
            if any(p.returncode for p in procs) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for p in procs:
            p.wait()
    outputs = []
    for out, err in files:
        out.seek(0), err.seek(0)
        outputs.append((out.read(), err.read()))
        out.close(), err.close()
    errors = [
        f"process {i} exited with {p.returncode}:\n{err[-3000:]}"
        for i, (p, (_, err)) in enumerate(zip(procs, outputs))
        if p.returncode != 0
    ]
    assert not errors, "\n".join(errors)
    return [out for out, _ in outputs]


STEPS, NS_ITERS = 2, 4
"""Training steps, and Newton–Schulz iterations per projection (each waits on all-reduces)."""


def _report(stdout: str) -> dict:
    line = next(x for x in stdout.splitlines() if x.startswith("REPORT"))
    return json.loads(line[len("REPORT") :])


def _assemble(parts: list[dict]) -> np.ndarray:
    """The global array from its blocks, gathered from every process's report."""
    out = np.full(parts[0]["shape"], np.nan)
    for part in parts:
        for index, data in part["blocks"]:
            out[tuple(slice(a, b) for a, b in index)] = data
    assert not np.isnan(out).any(), "a block is missing"
    return out


def _values(reports: list[dict], axis_type: str) -> dict:
    runs = [r["runs"][axis_type] for r in reports]
    return {
        "params": {k: _assemble([r["params"][k] for r in runs]) for k in runs[0]["params"]},
        "state": [_assemble([r["state"][i] for r in runs]) for i in range(len(runs[0]["state"]))],
    }


@pytest.fixture(scope="module")
def reports():
    args = [str(STEPS), str(NS_ITERS)]
    port = _free_port()
    start = time.monotonic()
    # The two processes of the cluster, and the reference alongside.
    *cluster, single = _run(
        [(["worker", str(i), str(port), *args], 4) for i in range(2)] + [(["single", *args], 8)]
    )
    seconds = time.monotonic() - start
    return [_report(out) for out in cluster], _report(single), seconds


AXIS_TYPES = ["Explicit", "Auto"]


def test_cluster_has_two_processes_of_four_devices(reports):
    cluster, single, seconds = reports
    assert [r["process_count"] for r in cluster] == [2, 2] and single["process_count"] == 1
    for report in cluster:
        assert list(report["runs"]) == AXIS_TYPES
        for run in report["runs"].values():
            # Every parameter spans devices of both processes.
            assert not any(run["fully_addressable"]), run["fully_addressable"]
    assert seconds < TIMEOUT


# Roundings per step in which the cluster's program may differ from the
# single process's: it is the same partitioned program, whose cross-process
# all-reduces may add the partial sums in another order. A norm over n
# entries and the rescaling by it: norm_ulps(n) (see helpers.ulps: the bound
# holds in any order). Newton–Schulz: 3 products of inner dimension 32 per
# iteration. Power method: 2 iterations of 2 products and a normalisation
# over 64 entries, then sigma and the rescaling. The elementwise steps (Adam,
# NonNeg, apply_updates) round the same way in every run: equal.
ROUNDINGS = {
    "dense": norm_ulps(64),
    "embedding": norm_ulps(32),
    "bias": 0,
    "square": NS_ITERS * 3 * norm_ulps(32),
    "head": 5 * norm_ulps(64),
    "free": 0,
}


@pytest.mark.parametrize("axis_type", AXIS_TYPES)
def test_cluster_values_equal_one_process(reports, axis_type):
    cluster, single, _ = reports
    got, ref = _values(cluster, axis_type), _values([single], axis_type)
    assert set(got["params"]) == set(ROUNDINGS)
    for name, k in ROUNDINGS.items():
        a, b = got["params"][name], ref["params"][name]
        # Errors add up over the steps (each projection is 1-Lipschitz near
        # its set, for these O(1) leaves).
        bound = STEPS * k * EPS32 * max(1.0, float(np.max(np.abs(b))))
        assert np.max(np.abs(a - b)) <= bound, (axis_type, name, np.max(np.abs(a - b)), bound)
    # The optimizer state: Adam's moments (equal: elementwise in the same
    # gradients), the step counts, the power method's unit vectors.
    paths = cluster[0]["runs"][axis_type]["state_paths"]
    assert paths == single["runs"][axis_type]["state_paths"]
    assert len(paths) == len(got["state"]) == len(ref["state"])
    power = [p for p in paths if "constraint_states" in p]
    assert power, paths
    for path, a, b in zip(paths, got["state"], ref["state"]):
        bound = STEPS * ROUNDINGS["head"] * EPS32 if path in power else 0.0
        assert np.max(np.abs(a - b), initial=0.0) <= bound, (axis_type, path)


@pytest.mark.parametrize("axis_type", AXIS_TYPES)
def test_cluster_keeps_every_sharding(reports, axis_type):
    cluster, single, _ = reports
    for report in cluster:
        got = report["runs"][axis_type]
        assert all(got["param_sharding_kept"].values()), got["param_sharding_kept"]
        assert all(got["state_sharding_kept"]), list(zip(got["state_paths"], got["state_specs"]))
        assert got["param_specs"] == single["runs"][axis_type]["param_specs"]
        assert got["state_specs"] == single["runs"][axis_type]["state_specs"]
