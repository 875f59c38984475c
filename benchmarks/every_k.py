"""`project(..., every_k_steps=k)`: the mean step time over rounds / plain Adam's.

    python benchmarks/run.py --only every_k [--quick]

Only 1 in k steps projects, so the mean over many rounds (a multiple of k)
is the figure that matters; the median is a step that does not project and
the maximum one that does. Reference workload of `_workload.py`.
"""

from __future__ import annotations

import optax

import optax_constraints as oc
from benchmarks import _timing as T
from benchmarks import _workload as W
from benchmarks.step import sizes


def run(args) -> dict:
    params = W.reference_params(*sizes(args.quick))
    grads = W.gradients(params)
    adam = optax.adam(W.LEARNING_RATE)
    labels = oc.label_by_path(W.RULES, allow_unmatched=True)
    txs = {"plain": adam, "project": optax.chain(adam, oc.project(W.CONSTRAINTS, labels))}
    for k in (4, 16):
        txs[f"every_{k}"] = optax.chain(adam, oc.project(W.CONSTRAINTS, labels, every_k_steps=k))
    runs = {name: W.compiled_run(W.step_with(tx), tx, params, grads) for name, tx in txs.items()}
    reps = args.reps or (16 if args.quick else 48)
    times = T.interleaved(runs, reps, warmup=0)
    plain = times["plain"]["cpu"]
    return {
        "reps": reps,
        "ratios": {
            f"{name}/plain": {
                "mean": float(t["cpu"].mean() / plain.mean()),
                **T.ratio_stats(t["cpu"], plain),
            }
            for name, t in times.items()
            if name != "plain"
        },
    }


def report(result: dict) -> list[str]:
    lines = [f"every_k_steps, {result['reps']} rounds, step / plain Adam (CPU time):"]
    for name, st in result["ratios"].items():
        lines.append(
            f"  {name:20s} mean {st['mean']:.3f}   median {st['median']:.3f}"
            f"   min-max {st['min']:.2f}-{st['max']:.2f}"
        )
    return lines
