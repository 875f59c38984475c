"""Sharded parameters on 8 simulated CPU devices.

`--xla_force_host_platform_device_count=8` only takes effect if it is set
before jax is imported, so the checks run in one subprocess (the `SCRIPT`
below) that prints a JSON report; the tests assert on it.

What the script does, on a `(2, 4)` mesh with axes `("data", "model")`:

* shards every parameter with `NamedSharding`, several of them *along* the
  axis a norm reduces over, and the Adam state like its parameter;
* runs a jitted `chain(adam, oc.project(...))` step and the same step on one
  device, and compares the values;
* records every output's sharding next to its input's;
* lists the collectives in the compiled program
  (`jitted.lower(...).compile().as_text()`).
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import run_on_devices

SCRIPT = r"""
import json, re
import numpy as np
import jax, jax.numpy as jnp, optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import optax_constraints as oc

devices = jax.devices()
assert len(devices) == 8, devices
mesh = Mesh(np.array(devices).reshape(2, 4), ("data", "model"))

# name: (shape, spec, label). Comments say where the norm reduces.
LEAVES = {
    "dense_kernel": ((64, 32), P("model", "data"), "max"),       # reduces over sharded axis 0
    "dense_bias": ((48,), P("data"), "nonneg"),
    "conv_kernel": ((3, 3, 16, 32), P(None, None, "data", "model"), "fan_in"),  # over 0..2
    "embedding": ((64, 32), P("data", "model"), "unit"),         # UnitNorm(axis=1), sharded
    "head_kernel": ((32, 16), P(None, "model"), "minmax"),       # reduce axis local
    "mixing": ((64, 32), P("model", "data"), "simplex"),         # Simplex over sharded axis 0
    "box": ((32, 16), P("data", "model"), "clip"),               # elementwise
    "free": ((32, 16), P("data", "model"), None),                # unconstrained
}
CONSTRAINTS = {
    "max": oc.MaxNorm(1.0, axis=0),
    "nonneg": oc.NonNeg(),
    "fan_in": oc.MaxNorm(2.0, axis="fan_in"),
    "unit": oc.UnitNorm(axis=1),
    "minmax": oc.MinMaxNorm(0.5, 1.0, rate=0.8, axis=0),
    "simplex": oc.Simplex(axis=0),
    "clip": oc.Clip(-0.5, 0.5),
}
labels = {k: v[2] for k, v in LEAVES.items()}
tx = optax.chain(optax.adam(0.1), oc.project(CONSTRAINTS, labels))

keys = jax.random.split(jax.random.key(0), 2 * len(LEAVES))
params = {k: 2.0 * jax.random.normal(keys[i], s) for i, (k, (s, _, _)) in enumerate(LEAVES.items())}
grads = [{k: jax.random.normal(jax.random.fold_in(keys[len(LEAVES) + i], t), s)
          for i, (k, (s, _, _)) in enumerate(LEAVES.items())} for t in range(3)]
shard = {k: NamedSharding(mesh, spec) for k, (_, spec, _) in LEAVES.items()}
replicated = NamedSharding(mesh, P())


def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state


def state_shardings(state):
    # Adam's moments like their params, scalars replicated.
    def one(path, x):
        name = getattr(path[-1], "key", None)
        return shard[name] if name in shard and x.ndim else replicated
    return jax.tree_util.tree_map_with_path(one, state)


# -- sharded run ------------------------------------------------------------
p_sh = jax.device_put(params, shard)
s_sh = tx.init(p_sh)
s_sh = jax.device_put(s_sh, state_shardings(s_sh))
g_sh = [jax.device_put(g, shard) for g in grads]
jitted = jax.jit(step)
in_p, in_s = p_sh, s_sh
for g in g_sh:
    p_sh, s_sh = jitted(p_sh, s_sh, g)

# -- one device -------------------------------------------------------------
one = jax.devices()[0]
p_1 = jax.device_put(params, one)
s_1 = tx.init(p_1)
for g in grads:
    p_1, s_1 = jax.jit(step)(p_1, s_1, jax.device_put(g, one))

report = {"leaves": {}, "state": []}
for k in LEAVES:
    a = np.asarray(p_sh[k], np.float64)
    b = np.asarray(p_1[k], np.float64)
    report["leaves"][k] = {
        "max_abs_diff": float(np.max(np.abs(a - b))),
        "bitwise": bool(np.array_equal(a, b)),
        "in_sharding": str(in_p[k].sharding),
        "out_sharding": str(p_sh[k].sharding),
        "same_sharding": bool(p_sh[k].sharding == in_p[k].sharding),
        "equivalent": bool(p_sh[k].sharding.is_equivalent_to(in_p[k].sharding, a.ndim)),
        "num_shards": len(p_sh[k].addressable_shards),
        "shard_shape": list(p_sh[k].addressable_shards[0].data.shape),
    }

# The constraint holds on the sharded result (numpy reference).
def norms(x, axis):
    x = np.asarray(x, np.float64)
    return np.sqrt(np.sum(x * x, axis=axis))
report["feasible"] = {
    "dense_kernel": float(norms(p_sh["dense_kernel"], 0).max()),
    "conv_kernel": float(norms(p_sh["conv_kernel"], (0, 1, 2)).max()),
    "embedding_min": float(norms(p_sh["embedding"], 1).min()),
    "embedding_max": float(norms(p_sh["embedding"], 1).max()),
    "dense_bias_min": float(np.min(np.asarray(p_sh["dense_bias"]))),
    "mixing_sum_error": float(np.abs(np.asarray(p_sh["mixing"], np.float64).sum(0) - 1).max()),
    "mixing_min": float(np.min(np.asarray(p_sh["mixing"]))),
    "box_abs_max": float(np.abs(np.asarray(p_sh["box"])).max()),
}

for (path, x_in), x_out in zip(jax.tree_util.tree_leaves_with_path(in_s),
                               jax.tree_util.tree_leaves(s_sh)):
    report["state"].append({
        "path": jax.tree_util.keystr(path),
        "same_sharding": bool(x_out.sharding == x_in.sharding),
        "equivalent": bool(x_out.sharding.is_equivalent_to(x_in.sharding, x_in.ndim)),
    })

# -- what travels between devices -------------------------------------------
from helpers import hlo_collectives

def collectives_of(jitted):
    return hlo_collectives(jitted.lower(in_p, in_s, g_sh[0]).compile().as_text())

report["collectives"] = {"default": collectives_of(jitted)}
report["param_shapes"] = {k: list(v[0]) for k, v in LEAVES.items()}
report["shard_shapes"] = {k: list(p_sh[k].addressable_shards[0].data.shape) for k in LEAVES}
# Per-device size of each norm array: the shard with its reduced axes set to 1.
REDUCED = {"dense_kernel": (0,), "conv_kernel": (0, 1, 2), "embedding": (1,), "head_kernel": (0,),
           "mixing": (0,)}
report["norm_shard_sizes"] = {
    k: int(np.prod([1 if i in ax else d for i, d in enumerate(report["shard_shapes"][k])]))
    for k, ax in REDUCED.items()}

# apply_constraints under jit keeps the sharding as well.
ac = jax.jit(lambda p: oc.apply_constraints(p, CONSTRAINTS, labels))(in_p)
report["apply_constraints_equivalent"] = all(
    ac[k].sharding.is_equivalent_to(in_p[k].sharding, ac[k].ndim) for k in LEAVES)
print("REPORT" + json.dumps(report))
"""


@pytest.fixture(scope="module")
def report():
    return run_on_devices(SCRIPT)


def test_sharded_values_match_one_device(report):
    for name, leaf in report["leaves"].items():
        # Partial sums of a sharded norm are added in another order: allow a
        # few float32 ulps of the O(1) values.
        assert leaf["max_abs_diff"] <= 1e-6, (name, leaf)


def test_params_are_really_sharded(report):
    for name, leaf in report["leaves"].items():
        assert leaf["num_shards"] == 8
        full, local = report["param_shapes"][name], leaf["shard_shape"]
        assert local != full, (name, local)


def test_outputs_keep_their_input_sharding(report):
    for name, leaf in report["leaves"].items():
        assert leaf["same_sharding"], (name, leaf["in_sharding"], leaf["out_sharding"])
        assert leaf["equivalent"], name
    assert report["state"], "no optimizer state leaves recorded"
    for leaf in report["state"]:
        assert leaf["same_sharding"] and leaf["equivalent"], leaf
    assert report["apply_constraints_equivalent"]


def test_constraints_hold_on_the_sharded_result(report):
    f = report["feasible"]
    assert f["dense_kernel"] <= 1.0 * (1 + 1e-6)
    assert f["conv_kernel"] <= 2.0 * (1 + 1e-6)
    assert 1 - 1e-5 <= f["embedding_min"] <= f["embedding_max"] <= 1 + 1e-6
    assert f["dense_bias_min"] >= 0
    assert f["mixing_sum_error"] <= 1e-5 and f["mixing_min"] >= 0
    assert f["box_abs_max"] <= 0.5


def test_only_small_norm_reductions_travel(report):
    collectives = report["collectives"]["default"]
    # Norms over a sharded axis need partial sums from the other devices.
    assert any(c["op"] == "all-reduce" for c in collectives), collectives
    # Nothing is gathered or shuffled: only all-reduces.
    assert {c["op"] for c in collectives} == {"all-reduce"}, collectives
    # ... and only of norm-sized arrays (one number per unit on this device),
    # far smaller than the parameter shards they summarise.
    largest_norm = max(report["norm_shard_sizes"].values())
    smallest_shard = min(_size(report["shard_shapes"][k]) for k in report["norm_shard_sizes"])
    assert largest_norm * 4 <= smallest_shard
    for c in collectives:
        for shape in c["shapes"]:
            assert _size(shape) <= largest_norm, (c, report["norm_shard_sizes"])
            assert shape not in report["param_shapes"].values(), c


def _size(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# -- every built-in constraint, on `Explicit` and `Auto` mesh axes ------------

AXIS_TYPES_SCRIPT = r"""
import json, re
import numpy as np
import jax, jax.numpy as jnp, optax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
import optax_constraints as oc
from helpers import constraint_instances

EXAMPLES = {
    "MaxNorm": [oc.MaxNorm(1.0, axis="fan_in")],
    "UnitNorm": [oc.UnitNorm(axis="fan_in")],
    "MinMaxNorm": [oc.MinMaxNorm(0.5, 1.0, rate=0.8, axis="fan_in")],
    "L1Ball": [oc.L1Ball(2.0, axis="fan_in")],
    "Simplex": [oc.Simplex(axis="fan_in")],
    "Clip": [oc.Clip(-0.5, 0.5)],
    "CenterAround": [oc.CenterAround(0.5)],
    "SpectralNorm": [oc.SpectralNorm(1.0), oc.SpectralNorm(1.0, method="svd")],
    "Sphere": [oc.Sphere(2.0, axis="fan_in")],
}
CONSTRAINTS = constraint_instances(EXAMPLES)
SPECS = {  # the issue's conv kernel, a dense kernel, one free leaf
    "conv": ((3, 3, 8, 16), P(None, None, "data", "model")),
    "dense": ((32, 16), P("data", "model")),
    "free": ((16, 8), P("data", "model")),
}
keys = jax.random.split(jax.random.key(0), 2 * len(SPECS))
params = {k: 2.0 * jax.random.normal(keys[i], s) for i, (k, (s, _)) in enumerate(SPECS.items())}
updates = {k: jax.random.normal(keys[len(SPECS) + i], s)
           for i, (k, (s, _)) in enumerate(SPECS.items())}
labels = {k: (None if k == "free" else "c") for k in SPECS}


def gathers(hlo):
    return [[int(d) for d in dims.split(",") if d]
            for line in hlo.splitlines() if re.search(r"all-gather(-start)?\(", line)
            for dims in re.findall(r"f32\[([0-9,]*)\]", line.split("=", 1)[1].split("all-gather")[0])]


def run(c, p, u, context, eager=False):
    tx = oc.project({"c": c}, labels)

    def everything(p, u, state):
        new_u, _ = tx.update(u, state, p)
        return {
            "new": optax.apply_updates(p, new_u),
            "updates": new_u,
            "applied": oc.apply_constraints(p, {"c": c}, labels),
            "violations": oc.constraint_violations(p, {"c": c}, labels),
        }

    with context():
        state = tx.init(p)
        compiled = jax.jit(everything).lower(p, u, state).compile()
        out, hlo = compiled(p, u, state), compiled.as_text()
        if eager:  # op by op, outside jit
            out["applied_eager"] = oc.apply_constraints(p, {"c": c}, labels)
            out["violations_eager"] = oc.constraint_violations(p, {"c": c}, labels)
    return out, gathers(hlo)


class nothing:
    def __enter__(self): return self
    def __exit__(self, *a): return False


EAGER = ("MaxNorm", "SpectralNorm")  # eager dispatch on 8 devices is slow: two suffice
one = jax.devices()[0]
p1, u1 = jax.device_put(params, one), jax.device_put(updates, one)
refs = {repr(c): run(c, p1, u1, nothing, eager=type(c).__name__ in EAGER)[0] for c in CONSTRAINTS}
report = {"constraints": sorted({type(c).__name__ for c in CONSTRAINTS}), "runs": []}
for axis_type in ("Explicit", "Auto"):
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(getattr(AxisType, axis_type),) * 2)
    shard = {k: NamedSharding(mesh, spec) for k, (_, spec) in SPECS.items()}
    p, u = jax.device_put(params, shard), jax.device_put(updates, shard)
    for c in CONSTRAINTS:
        ref = refs[repr(c)]
        contexts = {"jit": nothing, "set_mesh": lambda: jax.set_mesh(mesh)}
        if axis_type == "Auto":  # the context changes nothing there; keep the test short
            contexts.pop("set_mesh")
        for ctx_name, context in contexts.items():
            entry = {"axis_type": axis_type, "context": ctx_name, "constraint": repr(c),
                     "class": type(c).__name__}
            try:
                eager = ctx_name == "set_mesh" and type(c).__name__ in EAGER
                got, gathered = run(c, p, u, context, eager)
            except Exception as e:
                entry["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                report["runs"].append(entry)
                continue
            entry["gathered"] = gathered
            entry["diff"], entry["scale"], entry["kept"] = {}, {}, {}
            for what in got:
                if what.startswith("violations"):
                    a, b = float(got[what]["c"]), float(ref[what]["c"])
                    entry["diff"][what], entry["scale"][what] = abs(a - b), abs(b)
                    continue
                for k in SPECS:
                    a, b = np.asarray(got[what][k], np.float64), np.asarray(ref[what][k], np.float64)
                    entry["diff"][f"{what}/{k}"] = float(np.max(np.abs(a - b)))
                    entry["scale"][f"{what}/{k}"] = float(np.max(np.abs(b)))
                    entry["kept"][f"{what}/{k}"] = bool(
                        got[what][k].sharding.is_equivalent_to(shard[k], a.ndim))
            report["runs"].append(entry)
report["fan_in"] = {k: int(np.prod(s[:-1])) for k, (s, _) in SPECS.items()}
report["sizes"] = {k: int(np.prod(s)) for k, (s, _) in SPECS.items()}
print("REPORT" + json.dumps(report))
"""

MATRIX = {"SpectralNorm", "Orthogonal"}


@pytest.fixture(scope="module")
def axis_types_report():
    return run_on_devices(AXIS_TYPES_SCRIPT)


def test_every_constraint_runs_on_explicit_and_auto_meshes(axis_types_report):
    runs = axis_types_report["runs"]
    assert {r["axis_type"] for r in runs} == {"Explicit", "Auto"}
    assert {r["context"] for r in runs} == {"jit", "set_mesh"}
    from helpers import exported_constraint_classes

    covered = set(axis_types_report["constraints"])
    assert covered == {c.__name__ for c in exported_constraint_classes(wrappers=True)}
    failed = [
        (r["axis_type"], r["context"], r["constraint"], r["error"]) for r in runs if "error" in r
    ]
    assert not failed, failed
    eager = {r["class"] for r in runs if "applied_eager/conv" in r.get("diff", {})}
    assert eager == {"MaxNorm", "SpectralNorm"}


def test_sharded_results_equal_one_device(axis_types_report):
    eps = float(np.finfo(np.float32).eps)
    fan_in, sizes = axis_types_report["fan_in"], axis_types_report["sizes"]
    for r in axis_types_report["runs"]:
        for key, diff in r.get("diff", {}).items():
            leaf = key.split("/")[-1]
            # Sharded reductions add their partial sums in another order: at
            # most n * eps relative error for a sum of n terms (n: the longest
            # reduction, a unit's fan-in, or every entry for CenterAround's mean).
            n = sizes.get(leaf, max(sizes.values()))
            if r["class"] != "CenterAround":
                n = fan_in.get(leaf, max(fan_in.values()))
            bound = n * eps * max(1.0, r["scale"][key])
            assert diff <= bound, (r["axis_type"], r["context"], r["constraint"], key, diff, bound)


def test_sharded_outputs_keep_their_input_sharding(axis_types_report):
    for r in axis_types_report["runs"]:
        lost = [k for k, kept in r.get("kept", {}).items() if not kept]
        assert not lost, (r["axis_type"], r["context"], r["constraint"], lost)


def test_only_matrix_constraints_gather_and_only_their_leaves(axis_types_report):
    sizes = axis_types_report["sizes"]
    constrained = {sizes[k] for k in ("conv", "dense")}
    for r in axis_types_report["runs"]:
        if "gathered" not in r:
            continue
        if r["class"] not in MATRIX:
            assert r["gathered"] == [], (r["axis_type"], r["constraint"], r["gathered"])
        for shape in r["gathered"]:
            # pieces of a constrained kernel (its matrix view needs all of it;
            # XLA may gather one mesh axis at a time), nothing larger
            assert _size(shape) <= max(constrained), (r["constraint"], shape)
