"""Trace + compile time of the optimizer step, by number of leaves.

    python benchmarks/run.py --only compile [--quick] [--rounds N]

`n / 2` Dense layers `(64, 64)` with a bias (`_workload.many_leaves_params`)
at n = 10, 100, 1000 leaves (`--quick`: 10, 100): plain Adam, `project`, the
hand-written loop with our constraints (`hand_oc`) and with Keras's formula
(`hand_keras`), and Keras's own Adam with and without constraints when Keras
is installed. Rounds are interleaved (the order alternates); every
measurement has its own learning rate, so no cache can answer. Ratios are
taken within a round, on the process's CPU time.
"""

from __future__ import annotations

import jax
import numpy as np

from benchmarks import _timing as T
from benchmarks import _workload as W

VARIANTS = ("plain", "project", "hand_oc", "hand_keras")
PAIRS = [("project", "plain"), ("project", "hand_keras"), ("hand_keras", "plain")]


def run(args) -> dict:
    leaf_counts = (10, 100) if args.quick else (10, 100, 1000)
    rounds = args.rounds or (1 if args.quick else 3)
    out = {"rounds": rounds, "leaves": {}}
    for n in leaf_counts:
        params = W.many_leaves_params(n)
        flat = jax.tree.leaves(params)
        keras = W.keras_steps(params) if W.keras_available() else {}
        names = [*VARIANTS, *keras]
        times: dict[str, list[dict]] = {}
        for r in range(rounds):
            for i, name in enumerate(names if r % 2 == 0 else names[::-1]):
                lr = W.LEARNING_RATE * (1 + 1e-3 * (len(names) * r + i) + 1e-6 * n)
                if name in keras:
                    step, trainable, opt_vars = keras[name]
                    timed, _ = T.compile_time(W.jit_step(step), trainable, opt_vars, flat)
                else:
                    step, tx = W.optax_steps(lr)[name]
                    timed, _ = T.compile_time(W.jit_step(step), params, tx.init(params), params)
                times.setdefault(name, []).append(timed)
        cpu = {name: np.array([t["total_cpu_s"] for t in ts]) for name, ts in times.items()}
        out["leaves"][str(n)] = {
            "total_cpu_s": {name: float(np.median(c)) for name, c in cpu.items()},
            "total_wall_s": {
                name: float(np.median([t["total_s"] for t in ts])) for name, ts in times.items()
            },
            "ratios": {f"{a}/{b}": T.ratio_stats(cpu[a], cpu[b]) for a, b in PAIRS},
        }
    return out


def report(result: dict) -> list[str]:
    lines = [
        f"trace + compile of the optimizer step, {result['rounds']} interleaved round(s);"
        " CPU s per variant, ratios median [min-max]"
    ]
    for n, entry in result["leaves"].items():
        cells = "  ".join(f"{k} {v:.2f}" for k, v in entry["total_cpu_s"].items())
        lines.append(f"  {n:>5} leaves: {cells}")
        for key, val in entry["ratios"].items():
            lines.append(f"         {key:24s} {T.fmt(val):>20s}")
    return lines
