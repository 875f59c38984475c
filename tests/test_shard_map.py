"""Constraints inside `jax.shard_map`: `param_specs` gives the global projection.

Inside `shard_map` each leaf is its local block. With `param_specs` every
constraint must return the block of the global result (norms `psum`med over
the mesh axes that split a unit, matrix and custom constraints on the
gathered leaf); without it, a constraint that reduces over a split leaf must
raise, naming the leaf. The checks run on 8 simulated CPU devices in one
subprocess (`SCRIPT`), on a 1-D `("fsdp",)` mesh and a 2-D `("data",
"model")` mesh; the reference is the same step on one device.
"""

from __future__ import annotations

import pytest
from helpers import EPS32, norm_ulps, run_on_devices

SCRIPT = r"""
import json
import numpy as np
import jax, jax.numpy as jnp, optax
from jax.sharding import PartitionSpec as P
import optax_constraints as oc


class Shift(oc.Constraint):  # a user's constraint: only __call__, reduces over the leaf
    def __call__(self, w):
        return w - jnp.mean(w)


CASES = {
    "max_norm": (oc.MaxNorm(1.0, axis=0), (64, 16)),
    "min_max_norm": (oc.MinMaxNorm(0.5, 1.0, rate=0.8, axis=0), (64, 16)),
    "unit_norm": (oc.UnitNorm(axis=0), (64, 16)),
    "max_norm_all": (oc.MaxNorm(3.0, axis=None), (64, 16)),
    "non_neg": (oc.NonNeg(), (64, 16)),
    "clip": (oc.Clip(-0.1, 0.1), (64, 16)),
    "center_around": (oc.CenterAround(0.1), (64, 16)),
    "l1_ball": (oc.L1Ball(2.0, axis=0), (64, 16)),
    "simplex": (oc.Simplex(axis=0), (64, 16)),
    "spectral_power": (oc.SpectralNorm(1.0), (64, 16)),
    "spectral_svd": (oc.SpectralNorm(1.0, method="svd"), (64, 16)),
    "orthogonal_svd": (oc.Orthogonal("svd"), (64, 16)),
    "orthogonal_ns": (oc.Orthogonal("newton_schulz"), (64, 16)),
    "stacked_fan_in": (oc.Stacked(oc.MaxNorm(1.0, axis="fan_in")), (8, 64, 16)),
    "stacked_spectral": (oc.Stacked(oc.SpectralNorm(1.0)), (8, 64, 16)),
    "output_first": (oc.OutputFirst(oc.MaxNorm(1.0, axis="fan_in")), (16, 64)),
    "custom": (Shift(), (64, 16)),
    "function": (lambda w: w / (1.0 + jnp.max(jnp.abs(w))), (64, 16)),
}
if hasattr(oc, "Sphere"):
    CASES["sphere"] = (oc.Sphere(1.5, axis=0), (64, 16))
MESHES = {
    "fsdp": (jax.make_mesh((8,), ("fsdp",)), [P("fsdp"), P(None, "fsdp")]),
    "2d": (
        jax.make_mesh((2, 4), ("data", "model")),
        [P("data", "model"), P(None, ("model", "data"))],
    ),
}


def spec_for(shape, spec):
    # Stacked (layers, in, out) leaves: P(a, b) splits the layers over a and
    # the outputs over b; a spec splitting both axes splits in and out.
    if len(shape) < 3:
        return spec
    first, second = (tuple(spec) + (None, None))[:2]
    return P(None, first, second) if first and second else P(first, None, second)


report = {}
for name, (c, shape) in CASES.items():
    key = jax.random.key(len(name))
    params = {"w": 0.5 * jax.random.normal(key, shape)}
    grads = {"w": jax.random.normal(jax.random.fold_in(key, 1), shape)}
    tx = oc.project(c)
    state = tx.init(params)
    update = jax.jit(tx.update)
    ref_u, ref_state = update(grads, state, params)
    ref_p = optax.apply_updates(params, ref_u)
    ref_v = oc.constraint_violations(ref_p, c)["__all__"]
    ref_a = oc.apply_constraints(params, c)["w"]
    try:  # the tangent map, for constraints that define one
        t_state = oc.tangent(c).init(params)
        ref_t = jax.jit(oc.tangent(c).update)(grads, t_state, params)[0]["w"]
    except ValueError:
        t_state = ref_t = None
    for mesh_name, (mesh, specs) in MESHES.items():
        for spec in specs:
            spec = spec_for(shape, spec)
            pspec = {"w": spec}
            sspec = jax.tree.map(lambda _: P(), state)  # constraint states: replicated

            def step(g, s, p):
                u, s = oc.project(c, param_specs=pspec).update(g, s, p)
                new = optax.apply_updates(p, u)
                v = oc.constraint_violations(new, c, param_specs=pspec)["__all__"]
                a = oc.apply_constraints(p, c, param_specs=pspec)
                t = g if ref_t is None else oc.tangent(c, param_specs=pspec).update(g, t_state, p)[0]
                return new, s, v, a, t

            run = jax.jit(jax.shard_map(
                step, mesh=mesh, in_specs=(pspec, sspec, pspec),
                out_specs=(pspec, sspec, P(), pspec, pspec),
            ))
            put = lambda tree, specs: jax.device_put(
                tree, jax.tree.map(lambda s: jax.NamedSharding(mesh, s), specs)
            )
            new, new_state, v, a, t = run(put(grads, pspec), put(state, sspec), put(params, pspec))
            report[f"{name}/{mesh_name}/{spec}"] = {
                "n": int(np.prod(shape)),
                "err": float(np.max(np.abs(np.asarray(new["w"]) - np.asarray(ref_p["w"])))),
                "scale": float(np.max(np.abs(np.asarray(ref_p["w"])))),
                "err_apply": float(np.max(np.abs(np.asarray(a["w"]) - np.asarray(ref_a)))),
                "scale_apply": float(np.max(np.abs(np.asarray(ref_a)))),
                "v": float(v), "ref_v": float(ref_v),
                "err_tangent": None if ref_t is None else float(
                    np.max(np.abs(np.asarray(t["w"]) - np.asarray(ref_t)))),
                "scale_tangent": None if ref_t is None else float(
                    np.max(np.abs(np.asarray(grads["w"])))),
                "state_err": max([0.0] + [
                    float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
                    for x, y in zip(jax.tree.leaves(new_state), jax.tree.leaves(ref_state))
                ]),
                "sharding_kept": new["w"].sharding.is_equivalent_to(
                    jax.NamedSharding(mesh, spec), len(shape)
                ),
            }

# Without param_specs: a reducing constraint raises naming the leaf; NonNeg runs.
mesh, _ = MESHES["fsdp"]
params = {"dense": {"kernel": jnp.ones((64, 16))}}
errors = {}
for name, c in {"max_norm": oc.MaxNorm(1.0), "non_neg": oc.NonNeg()}.items():
    tx = oc.project(c)
    state = tx.init(params)
    spec = {"dense": {"kernel": P("fsdp")}}
    run = jax.shard_map(lambda g, s, p: tx.update(g, s, p)[0], mesh=mesh,
                        in_specs=(spec, P(), spec), out_specs=spec)
    put = lambda tree, specs: jax.device_put(
        tree, jax.tree.map(lambda s: jax.NamedSharding(mesh, s), specs)
    )
    try:
        jax.jit(run)(put(params, spec), state, put(params, spec))
        errors[name] = None
    except ValueError as err:
        errors[name] = str(err)
report["errors"] = errors
print("REPORT" + json.dumps(report))
"""


@pytest.fixture(scope="module")
def report():
    return run_on_devices(SCRIPT)


def test_every_constraint_inside_shard_map_equals_the_global_projection(report):
    cases = {k: v for k, v in report.items() if k != "errors"}
    assert len(cases) >= 18 * 4
    assert sum(r["err_tangent"] is not None for r in cases.values()) >= 12 * 4
    for case, r in cases.items():
        # Reordered sums: a norm over n entries and its rescaling (norm_ulps);
        # matrix constraints run on the gathered leaf, the same program. The
        # violation compares values of the size of the bound.
        tol = norm_ulps(r["n"]) * EPS32 * max(r["scale"], 1.0)
        assert r["err"] <= tol, (case, r)
        assert r["err_apply"] <= norm_ulps(r["n"]) * EPS32 * max(r["scale_apply"], 1.0), (case, r)
        assert abs(r["v"] - r["ref_v"]) <= tol + 1e-6, (case, r)
        assert r["state_err"] <= tol, (case, r)
        if r["err_tangent"] is not None:  # <u, w> w / |w|^2 over n terms: reordered sums
            assert r["err_tangent"] <= norm_ulps(r["n"]) * EPS32 * r["scale_tangent"], (case, r)


def test_sharding_of_the_result_is_the_params(report):
    for case, r in report.items():
        if case != "errors":
            assert r["sharding_kept"], (case, r)


def test_without_param_specs_a_reducing_constraint_fails_naming_the_leaf(report):
    message = report["errors"]["max_norm"]
    assert message is not None
    assert "dense/kernel" in message and "param_specs" in message and "fsdp" in message
    assert report["errors"]["non_neg"] is None  # elementwise: the block is enough
