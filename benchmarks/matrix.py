"""Matrix and per-unit L1 / simplex constraints: step time and accuracy.

    python benchmarks/run.py --only matrix [--quick]

SpectralNorm (power method and SVD), Orthogonal (Newton-Schulz and SVD),
L1Ball and Simplex on square kernels near their feasible sets: Adam step
with `project` / plain Adam, and the largest violation over 5 steps.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_constraints as oc
from benchmarks import _timing as T
from benchmarks import _workload as W


def _sigma_max(w) -> float:
    a = np.asarray(w, np.float64)
    return float(np.linalg.norm(a.reshape(-1, a.shape[-1]), 2))


def run(args) -> dict:
    n, width = (2, 64) if args.quick else (4, 384)
    keys = jax.random.split(jax.random.key(3), 2 * n)
    # Kernels near the feasible set, as in training (the first projection
    # happened at init), and one Adam-sized step away from it.
    params = {
        f"k{i}": oc.Orthogonal()(jax.random.normal(keys[i], (width, width))) * 2.0 for i in range(n)
    }
    grads = {f"k{i}": jax.random.normal(keys[n + i], (width, width)) for i in range(n)}
    constraints = {
        "spectral_power": oc.SpectralNorm(2.0, method="power"),
        "spectral_svd": oc.SpectralNorm(2.0, method="svd"),
        "orthogonal_newton_schulz": oc.Orthogonal(method="newton_schulz"),
        "orthogonal_svd": oc.Orthogonal(method="svd"),
        "l1_ball": oc.L1Ball(10.0),
        "simplex": oc.Simplex(),
    }
    adam = optax.adam(1e-3)
    runs, accuracy = {}, {}

    runs["plain"] = W.compiled_run(W.step_with(adam), adam, params, grads)
    for name, c in constraints.items():
        tx = optax.chain(adam, oc.project(c))
        step = W.step_with(tx)
        runs[name] = W.compiled_run(step, tx, params, grads)
        # Accuracy over a few training steps from the same start.
        p, s, worst = params, tx.init(params), 0.0
        jitted = jax.jit(step)
        for t in range(5):
            p, s = jitted(p, s, jax.tree.map(lambda g, t=t: jnp.roll(g, t, axis=0), grads))
            if name.startswith("spectral"):
                worst = max([worst] + [_sigma_max(p[k]) / 2.0 - 1 for k in p])
            elif name == "l1_ball":
                worst = max([worst] + [float(jnp.abs(p[k]).sum(0).max()) / 10.0 - 1 for k in p])
            elif name == "simplex":
                worst = max(
                    [worst]
                    + [float(jnp.abs(p[k].sum(0) - 1).max()) for k in p]
                    + [-float(p[k].min()) for k in p]
                )
            else:
                eye = np.eye(width)
                worst = max(
                    [worst]
                    + [float(np.abs(np.asarray(p[k]).T @ np.asarray(p[k]) - eye).max()) for k in p]
                )
        key = {
            "l1_ball": "l1_excess_rel",
            "simplex": "max_abs_sum_minus_1_or_negative",
        }.get(
            name,
            "sigma_max_excess_rel"
            if name.startswith("spectral")
            else "max_abs_gram_minus_identity",
        )
        accuracy[name] = {f"{key} (5 steps)": worst}
    # The two Orthogonal methods on the same input (one Adam-sized step away
    # from a feasible kernel): distance between their results.
    q = {k: oc.Orthogonal()(params[k]) + 1e-3 * jnp.sign(grads[k]) for k in params}
    ns = [oc.Orthogonal(method="newton_schulz")(q[k]) for k in q]
    svd = [oc.Orthogonal(method="svd")(q[k]) for k in q]
    accuracy["orthogonal_newton_schulz"]["max_abs_diff_to_svd"] = max(
        float(jnp.max(jnp.abs(a - b))) for a, b in zip(ns, svd, strict=True)
    )

    reps = args.reps or (4 if args.quick else 10)
    times = T.interleaved(runs, reps, warmup=1)
    return {
        "kernels": f"{n} x ({width}, {width})",
        "ratios": T.ratios(times, [(k, "plain") for k in constraints]),
        "times": T.summary(times),
        "accuracy": accuracy,
    }


def report(result: dict) -> list[str]:
    lines = [f"matrix and per-unit L1/simplex constraints, {result['kernels']} kernels:"]
    for key, val in result["ratios"].items():
        name = key.split("/")[0]
        acc = ", ".join(f"{k} {v:.2e}" for k, v in result["accuracy"][name].items())
        lines.append(f"  {key:32s} {T.fmt(val['cpu']):>20s}   {acc}")
    return lines
