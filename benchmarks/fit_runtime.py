"""Whole training steps at run time: our jitted Linen step against Keras's `fit()`.

    python benchmarks/run.py --only fit_runtime [--quick]

Per model (`_fit.py`: a convnet on 28x28x1, batch 128, and the transformer
LM of `_models.py`, 4 blocks, `--quick` 1), four variants, interleaved:
plain Adam and Adam + `project` (our step, compiled, donated), and Keras 3's
`fit()` of the same architecture without and with the same constraints as
layer arguments. A round is `steps` steps of one variant after one untimed
step; its figure is seconds per step. Ratios are taken within a round.
Needs flax and keras.
"""

from __future__ import annotations

import functools
import time

import jax

from benchmarks import _fit as F
from benchmarks import _models as M
from benchmarks import _timing as T


def run(args) -> dict:
    n_blocks = 1 if args.quick else 4
    models = {
        "cnn": (F.flax_cnn, F.keras_cnn, F.cnn_data, F.CNN_BATCH),
        f"lm{n_blocks}": (
            lambda: M.lm(n_blocks),
            lambda constrained: F.keras_lm(n_blocks, constrained),
            F.lm_data,
            M.BATCH,
        ),
    }
    steps = {"cnn": 4 if args.quick else 12, f"lm{n_blocks}": 2 if args.quick else 8}
    reps = args.reps or (2 if args.quick else 10)
    out = {"reps": reps, "models": {}}
    for model, (make_flax, make_keras, data, batch) in models.items():
        out["models"][model] = measure(make_flax, make_keras, data, batch, steps[model], reps)
    return out


def measure(make_flax, make_keras, data, batch: int, steps: int, reps: int) -> dict:
    """One model: the four variants, interleaved."""
    params, flax_batch, loss = make_flax()
    runners = {}
    for name, (step, tx) in F.flax_steps(loss).items():
        runners[name] = F.flax_round_runner(step, tx, params, flax_batch)
    x, y = data((steps + 1) * batch)
    keras_models = {}
    for name, constrained in (("keras_plain", False), ("keras_constrained", True)):
        keras_models[name] = F.keras_compile(make_keras(constrained))
        runners[name] = F.keras_round_runner(keras_models[name], x, y, batch)
    shapes = F.constrained_shapes(params, keras_models["keras_constrained"])
    if shapes["ours"] != shapes["keras"]:
        raise RuntimeError(f"the two sides constrain different leaves: {shapes}")
    compile_s = {}
    for name, (compile_, _, _) in runners.items():
        w0 = time.perf_counter()
        compile_()
        compile_s[name] = time.perf_counter() - w0
    times = T.interleaved_rounds(
        {name: functools.partial(run, steps) for name, (_, run, _) in runners.items()}, reps
    )
    pairs = [
        ("project", "plain"),
        ("keras_constrained", "keras_plain"),
        ("project", "keras_constrained"),
        ("plain", "keras_plain"),
    ]
    return {
        "batch": batch,
        "steps_per_round": steps,
        "params": int(sum(w.size for w in jax.tree.leaves(params))),
        "constrained": {k: len(v) for k, v in shapes["ours"].items()},
        "warmup_s": compile_s,
        # Largest violation per label after the timed steps: 0 where constrained.
        "violations_after": {name: runner[2]() for name, runner in runners.items()},
        "times": T.summary(times),
        "ratios": T.ratios(times, pairs),
    }


def report(result: dict) -> list[str]:
    lines = [
        f"whole training step, run time, {result['reps']} interleaved rounds; ratio median"
        " [min-max], CPU time (wall time); ms per step CPU / wall:"
    ]
    for model, entry in result["models"].items():
        lines.append(
            f"  {model} ({entry['params'] / 1e6:.2f}M params, batch {entry['batch']},"
            f" {entry['steps_per_round']} steps a round; constrained leaves"
            f" {entry['constrained']}):"
        )
        for key, val in entry["ratios"].items():
            lines.append(f"    {key:32s} {T.fmt(val['cpu']):>20s}   ({T.fmt(val['wall'])})")
        cells = "  ".join(
            f"{name} {t['cpu']['median_ms']:.1f}/{t['wall']['median_ms']:.1f}"
            for name, t in entry["times"].items()
        )
        lines.append(f"    {cells}")
        after = "  ".join(
            f"{name} " + "/".join(f"{v:.2g}" for v in by.values())
            for name, by in entry["violations_after"].items()
        )
        lines.append(f"    largest violation after the steps (bias/kernel): {after}")
    return lines
