"""`oc.Stacked` on one `(layers, in, out)` leaf against the layers as separate leaves.

    python benchmarks/run.py --only stacked [--quick]

Same constraint per layer, same Adam: the stacked step should cost what the
separate leaves cost (step time and trace + compile time), for a norm
constraint and for the matrix ones.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

import optax_constraints as oc
from benchmarks import _timing as T
from benchmarks import _workload as W


def run(args) -> dict:
    layers, n = (4, 128) if args.quick else (8, 512)
    stacked = {"kernel": jax.random.normal(jax.random.key(0), (layers, n, n)) * 0.05}
    separate = {f"layer{i}": {"kernel": stacked["kernel"][i]} for i in range(layers)}
    grads = {"stacked": W.gradients(stacked)}
    grads["separate"] = {
        f"layer{i}": {"kernel": grads["stacked"]["kernel"][i]} for i in range(layers)
    }
    inners = {
        "max_norm": oc.MaxNorm(1.0, axis="fan_in"),
        "spectral_power": oc.SpectralNorm(1.0),
        "orthogonal_ns": oc.Orthogonal(method="newton_schulz"),
    }
    adam = optax.adam(W.LEARNING_RATE)
    runs, compile_s = {}, {}
    for name, inner in inners.items():
        for layout, params, c in (
            ("stacked", stacked, oc.Stacked(inner)),
            ("separate", separate, inner),
        ):
            tx = optax.chain(adam, oc.project(c))
            g = grads[layout]
            p = jax.tree.map(jnp.copy, params)
            key = f"{name}/{layout}"
            compile_s[key], compiled = T.compile_time(W.jit_step(W.step_with(tx)), p, tx.init(p), g)
            runs[key] = (compiled, (p, tx.init(p), g))
    reps = args.reps or (8 if args.quick else 24)
    times = T.interleaved(runs, reps)
    return {
        "layers": layers,
        "n": n,
        "reps": reps,
        "ratios": {
            f"{name}: stacked/separate": T.ratio_stats(
                times[f"{name}/stacked"]["cpu"], times[f"{name}/separate"]["cpu"]
            )
            for name in inners
        },
        "compile_ratio": {
            f"{name}: stacked/separate": compile_s[f"{name}/stacked"]["total_cpu_s"]
            / compile_s[f"{name}/separate"]["total_cpu_s"]
            for name in inners
        },
    }


def report(result: dict) -> list[str]:
    lines = [
        f"oc.Stacked, {result['layers']} layers of ({result['n']}, {result['n']}), one stacked"
        " leaf / separate leaves (CPU time):"
    ]
    for key, st in result["ratios"].items():
        lines.append(
            f"  {key:32s} step {T.fmt(st):>20s}   trace+compile {result['compile_ratio'][key]:.3f}"
        )
    return lines
