"""Stacked kernels sharded along the layer axis on 8 simulated CPU devices.

The typical large-model layout: a scanned stack of layers whose parameters
are split over devices by layer (`PartitionSpec("layers")`). Every copy then
lives on one device, so `oc.Stacked` must project each copy where it is:
the values of a per-copy loop of the unwrapped constraint on one device,
same shardings out as in, and no gather of the stack. Every built-in constraint
that loops (the power method, Newton-Schulz, the simplex and L1 thresholds)
and a custom one with a loop are among the leaves.

As in `test_multidevice.py`, the device count must be set before jax is
imported, so the checks run in one subprocess that prints a JSON report, on
a mesh with `Auto` axes and on one with `Explicit` axes (`jax.make_mesh`'s
default since JAX 0.7), inside `jax.set_mesh` and without it.
"""

from __future__ import annotations

import math

import pytest
from helpers import EPS32, run_on_devices

SCRIPT = r"""
import json, re, sys
import numpy as np
import jax, jax.numpy as jnp, optax
from jax.sharding import NamedSharding, PartitionSpec as P, AxisType
import optax_constraints as oc

kind, context = sys.argv[1], sys.argv[2]
mesh = jax.make_mesh((8,), ("layers",), axis_types=(getattr(AxisType, kind),))
LAYERS = 8

def simplex_copy(w):  # a custom constraint with a loop: Stacked maps it with vmap
    return oc.projections.simplex(w, 1.0, 0)

LEAVES = {  # name: (shape, constraint)
    "mlp_in": ((LAYERS, 64, 32), oc.Stacked(oc.MaxNorm(0.5, axis="fan_in"))),
    "mlp_big": ((LAYERS, 128, 128), oc.Stacked(oc.MaxNorm(0.5, axis="fan_in"))),  # ordered
    "orth": ((LAYERS, 32, 32), oc.Stacked(oc.Orthogonal())),
    # Loops under Stacked's vmap: the power method's while_loop (state per
    # layer), Newton-Schulz's fori_loop + cond (stop_early inside project), a
    # custom constraint's while_loop; Simplex / L1Ball loop on the whole leaf.
    "spec": ((LAYERS, 32, 16), oc.Stacked(oc.SpectralNorm(1.0))),
    "spec_out_first": ((LAYERS, 16, 32), oc.Stacked(oc.OutputFirst(oc.SpectralNorm(1.0)))),
    "orth_ns": ((LAYERS, 32, 32), oc.Stacked(oc.Orthogonal("newton_schulz"))),
    "simplex_fn": ((LAYERS, 32, 16), oc.Stacked(simplex_copy)),
    "simplex": ((LAYERS, 32, 16), oc.Stacked(oc.Simplex())),
    "l1": ((LAYERS, 32, 16), oc.Stacked(oc.L1Ball(1.0))),
    "spec_svd": ((LAYERS, 32, 16), oc.Stacked(oc.SpectralNorm(1.0, method="svd"))),
    "bias": ((LAYERS, 32), oc.Stacked(oc.NonNeg())),
}
STEPS = 3
constraints = {k: c for k, (_, c) in LEAVES.items()}
labels = {k: k for k in LEAVES}
tx = optax.chain(optax.adam(0.05), oc.project(constraints, labels))
keys = jax.random.split(jax.random.key(0), 2 * len(LEAVES))
params = {k: jax.random.normal(keys[i], s) for i, (k, (s, _)) in enumerate(LEAVES.items())}
grads = [{k: jax.random.normal(jax.random.fold_in(keys[len(LEAVES) + i], t), s)
          for i, (k, (s, _)) in enumerate(LEAVES.items())} for t in range(STEPS)]

def step(tx, params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

by_layer = NamedSharding(mesh, P("layers"))
if context == "set_mesh":
    ctx = jax.sharding.use_mesh(mesh) if hasattr(jax.sharding, "use_mesh") else jax.set_mesh(mesh)
else:  # the arrays' shardings only
    import contextlib
    ctx = contextlib.nullcontext()
with ctx:
    p_sh = jax.device_put(params, by_layer)
    s_sh = jax.jit(tx.init)(p_sh)
    g_sh = [jax.device_put(g, by_layer) for g in grads]
    jitted = jax.jit(lambda p, s, g: step(tx, p, s, g))
    in_p, in_s = p_sh, s_sh
    for g in g_sh:
        p_sh, s_sh = jitted(p_sh, s_sh, g)
    hlo = jitted.lower(in_p, in_s, g_sh[0]).compile().as_text()
    # Monitoring and direct projection take the same per-copy path.
    applied = jax.jit(lambda p: oc.apply_constraints(p, constraints, labels))(in_p)
    violations = jax.jit(lambda p: oc.constraint_violations(p, constraints, labels))(in_p)

# The same program on one device.
one = jax.devices()[0]
p_1 = jax.device_put(params, one)
s_1 = tx.init(p_1)
for g in grads:
    p_1, s_1 = jax.jit(lambda p, s, g: step(tx, p, s, g))(p_1, s_1, jax.device_put(g, one))

# The reference: every layer trained on its own, one device, with the
# unwrapped constraint (a separate leaf, no Stacked, no vmap).
inner = {k: c.constraint for k, c in constraints.items()}
tx_copy = optax.chain(optax.adam(0.05), oc.project(inner, labels))
step_copy = jax.jit(lambda p, s, g: step(tx_copy, p, s, g))
copies, copy_states, copy_applied, copy_violations = [], [], [], []
for i in range(LAYERS):
    p_i = jax.device_put({k: v[i] for k, v in params.items()}, one)
    s_i = tx_copy.init(p_i)
    copy_applied.append(oc.apply_constraints(p_i, inner, labels))
    copy_violations.append(oc.constraint_violations(p_i, inner, labels))
    for g in grads:
        p_i, s_i = step_copy(p_i, s_i, jax.device_put({k: v[i] for k, v in g.items()}, one))
    copies.append(p_i)
    copy_states.append(s_i[1].constraint_states)

def f64(x):
    return np.asarray(x, np.float64)

report = {"leaves": {}, "collectives": [], "state": {}}
for k in LEAVES:
    a, b = f64(p_sh[k]), f64(p_1[k])
    ref = np.stack([f64(c[k]) for c in copies])
    ref_applied = np.stack([f64(c[k]) for c in copy_applied])
    report["leaves"][k] = {
        "max_abs_diff": float(np.max(np.abs(a - b))),
        "per_copy_diff": float(np.max(np.abs(a - ref))),
        "applied_diff": float(np.max(np.abs(f64(applied[k]) - ref_applied))),
        "scale": float(max(np.max(np.abs(ref)), np.max(np.abs(ref_applied)))),
        "violation": float(violations[k]),
        "copy_violation": max(float(v[k]) for v in copy_violations),
        "same_sharding": bool(p_sh[k].sharding.is_equivalent_to(in_p[k].sharding, a.ndim)),
        "applied_same_sharding": bool(applied[k].sharding.is_equivalent_to(in_p[k].sharding, a.ndim)),
        "shard_shape": list(p_sh[k].addressable_shards[0].data.shape),
    }
for k in ("spec", "spec_out_first"):
    state = s_sh[1].constraint_states[k]
    sigmas = [np.linalg.svd(f64(c[k]), compute_uv=False) for c in copies]
    report["state"][k] = {
        "shape": list(state.shape),
        "shard_shape": list(state.addressable_shards[0].data.shape),
        "max_abs_diff": float(np.max(np.abs(f64(state) - f64(s_1[1].constraint_states[k])))),
        "per_copy_diff": float(np.max(np.abs(f64(state) - np.stack([f64(s[k]) for s in copy_states])))),
        # How fast the power iteration forgets a perturbation of `u`.
        "contraction": float(max((sv[1] / sv[0]) ** 2 for sv in sigmas)),
    }

# Per layer, numerically (float64 numpy).
w = {k: f64(v) for k, v in p_sh.items()}
report["per_layer"] = {
    "mlp_in_max_norm": np.linalg.norm(w["mlp_in"], axis=1).max(axis=1).tolist(),
    "mlp_big_max_norm": np.linalg.norm(w["mlp_big"], axis=1).max(axis=1).tolist(),
    "orth_gap": [float(np.abs(m.T @ m - np.eye(32)).max()) for m in w["orth"]],
    "orth_ns_gap": [float(np.abs(m.T @ m - np.eye(32)).max()) for m in w["orth_ns"]],
    "spec_svd_sigma": [float(np.linalg.svd(m, compute_uv=False)[0]) for m in w["spec_svd"]],
    "simplex_sums": np.concatenate([w["simplex"].sum(axis=1), w["simplex_fn"].sum(axis=1)]).ravel().tolist(),
    "simplex_min": float(min(w["simplex"].min(), w["simplex_fn"].min())),
    "l1_max_norm": float(np.abs(w["l1"]).sum(axis=1).max()),
    "bias_min": float(w["bias"].min()),
}
from helpers import hlo_collectives
report["collectives"] = hlo_collectives(hlo)
print("REPORT" + json.dumps(report))
"""


# A stack whose copies are sharded too: layers over "layers", each copy's
# output units over "model" (both Explicit). A matrix constraint needs the
# whole copy, so each copy is gathered over "model" only.
SCRIPT_2D = r"""
import json, re
import numpy as np
import jax, jax.numpy as jnp, optax
from jax.sharding import NamedSharding, PartitionSpec as P
import optax_constraints as oc

mesh = jax.make_mesh((4, 2), ("layers", "model"))  # Explicit axes
constraints = {"spec": oc.Stacked(oc.SpectralNorm(1.0)),
               "orth_ns": oc.Stacked(oc.Orthogonal("newton_schulz"))}
labels = {k: k for k in constraints}
tx = optax.chain(optax.adam(0.05), oc.project(constraints, labels))
k1, k2 = jax.random.split(jax.random.key(1))
params = {k: jax.random.normal(jax.random.fold_in(k1, i), (4, 64, 32))
          for i, k in enumerate(constraints)}
grads = {k: jax.random.normal(jax.random.fold_in(k2, i), (4, 64, 32))
         for i, k in enumerate(constraints)}

def step(tx, p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

with jax.set_mesh(mesh):
    p_sh = jax.device_put(params, NamedSharding(mesh, P("layers", None, "model")))
    s_sh = jax.jit(tx.init)(p_sh)
    jitted = jax.jit(lambda p, s, g: step(tx, p, s, g))
    g_sh = jax.device_put(grads, NamedSharding(mesh, P("layers", None, "model")))
    out, _ = jitted(p_sh, s_sh, g_sh)
    hlo = jitted.lower(p_sh, s_sh, g_sh).compile().as_text()

inner = {k: c.constraint for k, c in constraints.items()}
tx_copy = optax.chain(optax.adam(0.05), oc.project(inner, labels))
one = jax.devices()[0]
ref = []
for i in range(4):
    p_i = jax.device_put({k: v[i] for k, v in params.items()}, one)
    g_i = jax.device_put({k: v[i] for k, v in grads.items()}, one)
    ref.append(jax.jit(lambda p, s, g: step(tx_copy, p, s, g))(p_i, tx_copy.init(p_i), g_i)[0])
report = {"leaves": {}, "gathers": []}
for k in constraints:
    r = np.stack([np.asarray(x[k], np.float64) for x in ref])
    report["leaves"][k] = {
        "per_copy_diff": float(np.max(np.abs(np.asarray(out[k], np.float64) - r))),
        "scale": float(np.max(np.abs(r))),
        "same_sharding": bool(out[k].sharding.is_equivalent_to(p_sh[k].sharding, 3)),
    }
for line in hlo.splitlines():
    m = re.search(r"=\s*([a-z0-9]+\[[0-9,]*\])\S*\s+all-gather(-start)?\(", line)
    if m:
        report["gathers"].append([int(d) for d in re.findall(r"\[([0-9,]*)\]", m.group(1))[0].split(",") if d])
print("REPORT" + json.dumps(report))
"""


def _run(kind: str, context: str, script: str = SCRIPT) -> dict:
    return run_on_devices(script, kind, context, timeout=600)


# Explicit axes inside `jax.set_mesh` and with the arrays' shardings only:
# the loops under `Stacked`'s vmap (power method, Newton-Schulz, a custom
# simplex) once failed to trace there ("Resource axis: layers ... not found
# in mesh: ()"), Auto axes did not.
@pytest.fixture(
    scope="module",
    params=[("Auto", "set_mesh"), ("Explicit", "set_mesh"), ("Explicit", "none")],
    ids="-".join,
)
def report(request):
    return _run(*request.param)


STEPS = 3  # as in SCRIPT

# Per leaf, how many float32 roundings one projection of a copy can order
# differently in a batched (vmap, sharded) program than in the per-copy one:
# the length of its longest sum (a unit's norm, a threshold's sum, a row of a
# matrix product), times the iterations that carry an error forward where
# the iteration does not damp it (Newton-Schulz moves along the orthogonal
# matrices, up to 25 iterations; the power method's rescaling reads only
# sigma, stationary in u). The projections are 1-Lipschitz (the rescaling
# nearly so), so over the steps the errors add up at most.
ROUNDINGS = {
    "mlp_in": 64,
    "mlp_big": 128,
    "orth": 32,
    "spec": 32 + 16,
    "spec_out_first": 32 + 16,
    "orth_ns": 25 * 32,
    "simplex_fn": 32,
    "simplex": 32,
    "l1": 32,
    "spec_svd": 32,
    "bias": 1,
}


def _bound(leaf_name, leaf, steps):
    return steps * ROUNDINGS[leaf_name] * EPS32 * leaf["scale"]


def test_every_leaf_is_checked(report):
    assert set(report["leaves"]) == set(ROUNDINGS)


def test_values_match_one_device(report):
    # The same program on one device (every copy on one device).
    for name, leaf in report["leaves"].items():
        assert leaf["max_abs_diff"] <= _bound(name, leaf, STEPS), (name, leaf)


def test_values_match_a_per_copy_loop_of_the_unwrapped_constraint(report):
    for name, leaf in report["leaves"].items():
        # `project` over STEPS steps, and `apply_constraints` once.
        assert leaf["per_copy_diff"] <= _bound(name, leaf, STEPS), (name, leaf)
        assert leaf["applied_diff"] <= _bound(name, leaf, 1), (name, leaf)
        # The largest violation over the copies is the per-copy maximum.
        tol = ROUNDINGS[name] * EPS32 * leaf["copy_violation"]
        assert abs(leaf["violation"] - leaf["copy_violation"]) <= tol, (name, leaf)
        assert leaf["copy_violation"] > 1, (name, leaf)  # the start is infeasible


def test_power_iteration_states_match_a_per_copy_loop(report):
    for name, state in report["state"].items():
        # Each iteration multiplies an error in `u` by at most the contraction
        # (sigma_2 / sigma_1)^2 and adds one matrix-vector product's rounding
        # (32 + 16 terms); over init and the steps that sums to at most
        # (STEPS + 1) * 48 eps / (1 - contraction) for a unit vector.
        bound = (STEPS + 1) * 48 * EPS32 / (1 - state["contraction"])
        assert state["per_copy_diff"] <= bound, (name, state)
        assert state["max_abs_diff"] <= bound, (name, state)


def test_shardings_are_kept_and_every_device_holds_one_layer(report):
    for name, leaf in report["leaves"].items():
        assert leaf["same_sharding"], name
        assert leaf["applied_same_sharding"], name
        assert leaf["shard_shape"][0] == 1, (name, leaf["shard_shape"])
    # One power-iteration vector per layer, sharded with its layer.
    for name, state in report["state"].items():
        assert state["shape"] == [8, 16], name
        assert state["shard_shape"] == [1, 16], name


def test_the_stack_is_not_gathered(report):
    for c in report["collectives"]:
        # At most the loops' "is any copy still iterating" flags travel.
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
        assert len(norms) == 8
        # Every layer binds at 0.5 (its units start with norms near 8 and 11).
        assert all(0.5 * (1 - 1e-5) <= n <= 0.5 * (1 + 1e-6) for n in norms), (key, norms)
    assert max(per_layer["orth_gap"]) <= 1e-5, per_layer["orth_gap"]
    assert max(per_layer["orth_ns_gap"]) <= 1e-5, per_layer["orth_ns_gap"]
    # The exact projection: each layer's largest singular value is the bound
    # (the layers start near sqrt(32) + sqrt(16) = 9.7).
    sigmas = per_layer["spec_svd_sigma"]
    assert all(1 - 1e-5 <= s <= 1 + 1e-5 for s in sigmas), sigmas
    # A unit's 32 entries sum to 1 within a 32-term sum's rounding, twice
    # (the projection, then params + update).
    assert all(abs(s - 1) <= 2 * 32 * EPS32 for s in per_layer["simplex_sums"])
    assert per_layer["simplex_min"] >= 0
    assert per_layer["l1_max_norm"] <= 1 + 2 * 32 * EPS32
    assert per_layer["bias_min"] >= 0


def test_a_stack_sharded_within_copies_too_gathers_each_copy_only():
    report = _run("Explicit", "set_mesh", SCRIPT_2D)
    for name, leaf in report["leaves"].items():
        assert leaf["same_sharding"], name
        # One step: one projection's roundings (ROUNDINGS above).
        assert leaf["per_copy_diff"] <= ROUNDINGS[name] * EPS32 * leaf["scale"], (name, leaf)
    # Each device gathers at most its own layer's (64, 32) copy over "model"
    # (Newton–Schulz's Gram pairs every column; the power method gathers only
    # its vector), never the stack of 4.
    assert [1, 64, 32] in report["gathers"], "Newton–Schulz needs every column of a copy"
    for shape in report["gathers"]:
        assert shape[0] == 1 and math.prod(shape) <= 64 * 32, report["gathers"]
