"""The reference workload in bfloat16 (the projections compute in float32).

    python benchmarks/run.py --only bfloat16 [--quick]

Rows: `project`, the hand-written loop with our constraints, and the same
loop through `oc.apply_constraints`; step time / plain Adam (CPU time) and
the compiled step's memory (`_traffic.memory`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

import optax_constraints as oc
from benchmarks import _timing as T
from benchmarks import _traffic as TR
from benchmarks import _workload as W
from benchmarks.step import sizes


def run(args) -> dict:
    to_bf16 = functools.partial(jax.tree.map, lambda x: x.astype(jnp.bfloat16))
    params = to_bf16(W.reference_params(*sizes(args.quick)))
    grads = to_bf16(W.gradients(params))
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    steps = W.optax_steps()
    adam = steps["plain"][1]

    def hand_apply(p, s, g):
        u, s = adam.update(g, s, p)
        p = optax.apply_updates(p, u)
        return oc.apply_constraints(p, W.CONSTRAINTS, W.labels_of), s

    variants = {
        "plain": steps["plain"],
        "project": steps["project"],
        "hand_oc": steps["hand_oc"],
        "hand_apply_constraints": (hand_apply, adam),
    }
    runs = {name: W.compiled_run(step, tx, params, grads) for name, (step, tx) in variants.items()}
    memory = {name: TR.memory(compiled, param_bytes) for name, (compiled, _) in runs.items()}
    reps = args.reps or (6 if args.quick else 24)
    times = T.interleaved(runs, reps)
    return {
        "reps": reps,
        "memory": memory,
        "ratios": {
            f"{name}/plain": T.ratio_stats(t["cpu"], times["plain"]["cpu"])
            for name, t in times.items()
            if name != "plain"
        },
    }


def report(result: dict) -> list[str]:
    lines = [f"bfloat16 parameters, {result['reps']} rounds, step / plain Adam (CPU time):"]
    for key, st in result["ratios"].items():
        m = result["memory"][key.split("/")[0]]
        lines.append(
            f"  {key:30s} {T.fmt(st):>20s}   passes {m['passes']:5.2f}"
            f"   temp {m['temp_mb']:6.1f} MB"
        )
    return lines
