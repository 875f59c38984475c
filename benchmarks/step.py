"""The optimizer step: `project` against plain Adam and the hand-written loop.

    python benchmarks/run.py --only step [--quick]

One jitted, donated Adam step on the reference workload (`_workload.py`),
every variant timed in the same rounds (`_timing.interleaved`):

* `plain`: Adam; `project`: Adam then `oc.project`; `project_every4`: the
  same with `every_k_steps=4`;
* `hand_oc`: "apply_updates, then tree_map(constraint)" with our
  constraints; `hand_keras`: the same with Keras's formula written out;
* `nonneg_project` / `keep_nonneg`: NonNeg on every leaf through `project`
  and through `optax.keep_params_nonnegative`;
* `keras_plain` / `keras_constrained`: Keras 3's own Adam `stateless_apply`
  without and with the same constraints on its variables (skipped when
  Keras is not installed).

Per variant also `memory_analysis()` (MB) and the memory traffic in passes
over the parameters (`_traffic.py`).
"""

from __future__ import annotations

import jax

from benchmarks import _timing as T
from benchmarks import _traffic as TR
from benchmarks import _workload as W

PAIRS = [
    ("project", "plain"),
    ("project", "hand_oc"),
    ("project", "hand_keras"),
    ("hand_keras", "plain"),
    ("project_every4", "plain"),
    ("nonneg_project", "keep_nonneg"),
    ("keras_constrained", "keras_plain"),
    ("keras_plain", "plain"),
]


def sizes(quick: bool) -> tuple[tuple[int, int], tuple[int, int]]:
    """(Dense count, width), (Conv count, channels) of the reference workload."""
    return ((2, 512), (1, 64)) if quick else ((8, 1536), (4, 256))


def run(args) -> dict:
    params = W.reference_params(*sizes(args.quick))
    grads = W.gradients(params)
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    runs, memory = {}, {}
    for name, (step, tx) in {**W.optax_steps(), **W.nonneg_steps()}.items():
        runs[name] = W.compiled_run(step, tx, params, grads)
        memory[name] = TR.memory(runs[name][0], param_bytes)
    if W.keras_available():
        flat_grads = jax.tree.leaves(grads)
        for name, (step, trainable, opt_vars) in W.keras_steps(params).items():
            compiled = W.jit_step(step).lower(trainable, opt_vars, flat_grads).compile()
            runs[name] = (compiled, (trainable, opt_vars, flat_grads))
            memory[name] = TR.memory(compiled, param_bytes)
    reps = args.reps or (6 if args.quick else 40)
    times = T.interleaved(runs, reps)
    return {
        "n_params": int(sum(x.size for x in jax.tree.leaves(params))),
        "reps": reps,
        "memory": memory,
        "times": T.summary(times),
        "ratios": T.ratios(times, PAIRS),
    }


def report(result: dict) -> list[str]:
    lines = [
        f"Adam step, {result['n_params'] / 1e6:.1f}M params, donated; {result['reps']}"
        " interleaved rounds; ratio median [min-max], CPU time / wall time",
    ]
    for key, val in result["ratios"].items():
        lines.append(f"  {key:30s} {T.fmt(val['cpu']):>20s}   {T.fmt(val['wall']):>20s}")
    lines.append("  per variant: ms (wall), passes over the params, temp MB, peak MB")
    for name, m in result["memory"].items():
        ms = result["times"][name]["wall"]["median_ms"]
        lines.append(
            f"    {name:18s} {ms:9.2f} ms  passes {m['passes']:6.2f}"
            f"  temp {m['temp_mb']:8.2f}  peak {m['peak_mb']:8.1f}"
        )
    return lines
