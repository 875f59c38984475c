"""Whole training steps of real models: trace + compile time and run time.

    python benchmarks/run.py --only whole_step [--quick] [--rounds N] [--reps N]

A step is forward, backward, Adam and apply (`_models.whole_steps`), for a
Linen transformer LM with 4 and 8 blocks, a 100-layer MLP and the 4-block LM
with its blocks under `nn.scan` (constrained through `oc.Stacked`);
`--quick`: a 1-block LM and a 10-layer MLP. Three variants: `plain` Adam,
Adam + `project`, and `hand_keras`, the loop a user writes by hand
("apply_updates, then tree_map(Keras's formula)").

* Compile: each round traces and compiles every variant once, after
  `jax.clear_caches()` and with its own learning rate (no cache answers, as
  in a fresh process); the order alternates between rounds, one untimed
  compile comes first. CPU time of the process.
* Run: the compiled steps of the last round (params and state donated),
  interleaved (`_timing.interleaved`), CPU and wall time.

Ratios are taken within a round.
"""

from __future__ import annotations

import jax
import numpy as np

from benchmarks import _models as M
from benchmarks import _timing as T

VARIANTS = ("plain", "project", "hand_keras")
PAIRS = [("project", "plain"), ("project", "hand_keras"), ("hand_keras", "plain")]


def models(quick: bool) -> dict:
    if quick:
        return {"lm1": lambda: M.lm(1), "mlp10": lambda: M.mlp(10)}
    return {
        "lm4": lambda: M.lm(4),
        "lm8": lambda: M.lm(8),
        "mlp100": lambda: M.mlp(100),
        "scan_lm4": lambda: M.lm(4, scan=True),
    }


def measure(make_model, rounds: int, run_reps: int, *, stacked: bool = False) -> dict:
    """Compile and run times of one model's step, every variant, interleaved."""
    params, batch, loss = make_model()
    step, tx = M.whole_steps(loss, 1e-3)["plain"]
    T.compile_time(jax.jit(step), params, tx.init(params), batch)  # untimed: the first
    compile_times: dict[str, list[dict]] = {}
    compiled, optimizers = {}, {}
    for r in range(rounds):
        for i, name in enumerate(VARIANTS if r % 2 == 0 else VARIANTS[::-1]):
            jax.clear_caches()
            lr = 1e-3 * (1 + 1e-4 * (10 * r + i))
            step, tx = M.whole_steps(loss, lr, stacked=stacked)[name]
            jitted = jax.jit(step, donate_argnums=(0, 1))
            state = tx.init(params)
            timed, compiled[name] = T.compile_time(jitted, params, state, batch)
            compile_times.setdefault(name, []).append(timed)
            optimizers[name] = tx
    cpu = {n: np.array([t["total_cpu_s"] for t in ts]) for n, ts in compile_times.items()}

    runs = {}
    for name, fn in compiled.items():
        p = jax.tree.map(jax.numpy.copy, params)
        runs[name] = (lambda p, s, b, fn=fn: fn(p, s, b)[:2], (p, optimizers[name].init(p), batch))
    times = T.interleaved(runs, run_reps)
    return {
        "leaves": len(jax.tree.leaves(params)),
        "params": int(sum(x.size for x in jax.tree.leaves(params))),
        "compile_cpu_s": {n: float(np.median(c)) for n, c in cpu.items()},
        "compile_ratios": {f"{a}/{b}": T.ratio_stats(cpu[a], cpu[b]) for a, b in PAIRS},
        "run": T.summary(times),
        "ratios": T.ratios(times, PAIRS),
    }


def run(args) -> dict:
    rounds = args.rounds or (1 if args.quick else 5)
    run_reps = args.reps or (5 if args.quick else 20)
    return {
        "rounds": rounds,
        "run_reps": run_reps,
        "models": {
            name: measure(make, rounds, run_reps, stacked=name.startswith("scan"))
            for name, make in models(args.quick).items()
        },
    }


def report(result: dict) -> list[str]:
    lines = [
        f"whole training step; trace + compile: {result['rounds']} interleaved round(s), CPU"
        f" time; run: {result['run_reps']} rounds, CPU time (wall); ratio median [min-max]"
    ]
    for model, e in result["models"].items():
        secs = "  ".join(f"{k} {v:.2f} s" for k, v in e["compile_cpu_s"].items())
        ms = "  ".join(f"{k} {v['wall']['median_ms']:.1f} ms" for k, v in e["run"].items())
        lines.append(f"  {model} ({e['leaves']} leaves, {e['params'] / 1e6:.2f}M params)")
        lines.append(f"    compile: {secs}")
        lines.append(f"    run:     {ms}")
        for key in e["compile_ratios"]:
            run_ratio = e["ratios"][key]
            lines.append(
                f"    {key:22s} compile {T.fmt(e['compile_ratios'][key]):>20s}"
                f"   run {T.fmt(run_ratio['cpu']):>20s} ({T.fmt(run_ratio['wall'])})"
            )
    return lines
