"""Matrix constraints on sharded kernels: contracted in place, never gathered whole.

`SpectralNorm()` (power method) and `Orthogonal("newton_schulz")` see a
kernel `(*fan_in_axes, out)` as its `(fan_in, out)` matrix, but only ever
multiply by it: power iteration by vectors, Newton–Schulz by the small Gram
matrix. Written as contractions over the fan-in axes of the kernel itself
(no reshape to 2-D), the kernel stays sharded and only vectors and partial
products travel, on `Explicit` meshes (the default of `jax.make_mesh`) and
`Auto` ones.

On 8 simulated CPU devices (a `(2, 4)` mesh `("data", "model")`), a Dense
`(1024, 512)` kernel sharded `P("data", "model")` and a Conv `(3, 3, 64,
128)` kernel sharded `P(None, None, "data", "model")`, one jitted `project`
step (init, then `update` and `apply_updates`) per constraint. The checks:
no all-gather in the compiled program whose result is as large as the
parameter, the output keeps its `NamedSharding`, and its values equal the
one-device step's within float32 rounding.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import EPS32, norm_ulps, run_on_devices

import optax_constraints as oc

SCRIPT = r"""
import json
import numpy as np
import jax, jax.numpy as jnp, optax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
import optax_constraints as oc
from helpers import hlo_collectives

LEAVES = {
    "dense": ((1024, 512), P("data", "model")),
    "conv": ((3, 3, 64, 128), P(None, None, "data", "model")),
}
CONSTRAINTS = {"power": oc.SpectralNorm(1.0), "newton_schulz": oc.Orthogonal("newton_schulz")}
rng = np.random.default_rng(0)


def kernel(shape, kind):
    fan_in = int(np.prod(shape[:-1]))
    g = rng.normal(size=(fan_in, shape[-1])) / np.sqrt(fan_in)
    if kind == "power":
        # A clear spectral gap (a rank-one spike of 4 over a Gaussian bulk
        # whose top is about 1.7): power iteration converges fast.
        a, b = rng.normal(size=fan_in), rng.normal(size=shape[-1])
        w = g + 4.0 * np.outer(a / np.linalg.norm(a), b / np.linalg.norm(b))
    else:
        # Near-orthogonal, as in training after the first step.
        q, _ = np.linalg.qr(rng.normal(size=(fan_in, shape[-1])))
        w = q + 0.01 * g
    return jnp.asarray(w.reshape(shape), jnp.float32)


def step_fn(c):
    tx = oc.project({"c": c}, "c")

    def step(p, u):
        state = tx.init(p)
        new_u, _ = tx.update(u, state, p)
        return optax.apply_updates(p, new_u)

    return step


one = jax.devices()[0]
report = {"runs": []}
for cname, c in CONSTRAINTS.items():
    for leaf, (shape, spec) in LEAVES.items():
        w = kernel(shape, cname)
        u = jnp.asarray(0.01 * rng.normal(size=shape) / np.sqrt(np.prod(shape[:-1])), jnp.float32)
        step = jax.jit(step_fn(c))
        ref = np.asarray(step(jax.device_put(w, one), jax.device_put(u, one)), np.float64)
        for axis_type in ("Explicit", "Auto"):
            mesh = jax.make_mesh((2, 4), ("data", "model"),
                                 axis_types=(getattr(AxisType, axis_type),) * 2)
            sharding = NamedSharding(mesh, spec)
            ws, us = jax.device_put(w, sharding), jax.device_put(u, sharding)
            compiled = step.lower(ws, us).compile()
            out = compiled(ws, us)
            got = np.asarray(out, np.float64)
            collectives = hlo_collectives(compiled.as_text())
            report["runs"].append({
                "constraint": cname, "leaf": leaf, "axis_type": axis_type,
                "shape": list(shape), "fan_in": int(np.prod(shape[:-1])),
                "shard_shape": list(ws.addressable_shards[0].data.shape),
                "collectives": collectives,
                "kept": bool(out.sharding.is_equivalent_to(sharding, len(shape))),
                "out_spec": str(out.sharding.spec),
                "diff": float(np.max(np.abs(got - ref))),
                "scale": float(np.max(np.abs(ref))),
            })
print("REPORT" + json.dumps(report))
"""


@pytest.fixture(scope="module")
def report():
    return run_on_devices(SCRIPT)


def _size(shape) -> int:
    return int(np.prod(shape, dtype=np.int64))


def test_every_case_ran(report):
    cases = {(r["constraint"], r["leaf"], r["axis_type"]) for r in report["runs"]}
    assert len(cases) == 8, cases
    for r in report["runs"]:
        assert _size(r["shard_shape"]) * 8 == _size(r["shape"]), r["shard_shape"]


def test_no_parameter_is_gathered_whole(report):
    for r in report["runs"]:
        full = _size(r["shape"])
        gathers = [s for c in r["collectives"] if c["op"] == "all-gather" for s in c["shapes"]]
        whole = [s for s in gathers if _size(s) >= full]
        assert not whole, (r["constraint"], r["leaf"], r["axis_type"], gathers)


def test_the_output_keeps_its_sharding(report):
    for r in report["runs"]:
        assert r["kept"], (r["constraint"], r["leaf"], r["axis_type"], r["out_spec"])


def test_values_equal_one_device(report):
    for r in report["runs"]:
        fan_in, out = r["fan_in"], r["shape"][-1]
        if r["constraint"] == "power":
            # w * min(1, m / sigma) with sigma = v . (W u): a dot product over
            # fan_in terms of products over out terms, summed in another order
            # when sharded (relative error at most (fan_in + out) eps on each
            # side; sigma is stationary in u and v, so their own rounding
            # enters at second order), then the division and the product.
            bound = 2 * (fan_in + out + 2) * EPS32 * r["scale"]
        else:
            # Each Newton–Schulz iteration's X (1.5 I - G / 2) rounds a sum over
            # the smaller side that later iterations do not undo (the Gram's
            # symmetric rounding they do); at most NEWTON_SCHULZ_ITERS of them,
            # on each side of the comparison.
            iters = oc.projections.NEWTON_SCHULZ_ITERS
            bound = 2 * iters * norm_ulps(min(fan_in, out)) * EPS32
        assert r["diff"] <= bound, (r["constraint"], r["leaf"], r["axis_type"], r["diff"], bound)
