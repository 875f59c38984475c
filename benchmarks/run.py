"""How much does `oc.project` cost? One command, one process, side by side.

    python benchmarks/run.py            # full: a few minutes on a 2-core CPU
    python benchmarks/run.py --quick    # smoke run: fewer rounds, smaller sizes

Prints a table of ratios (median and min-max over interleaved rounds, see
`_timing.py`), and writes `benchmarks/results/<machine>-<date>.json` and a PNG
plot next to it. Sections:

* step: one jitted, donated Adam step on the reference workload (`_workload.py`)
  with `oc.project`, against plain Adam, against the hand-written
  "apply_updates, then tree_map(constraint)" step (with our constraints and
  with Keras's formula), against Keras 3's own Adam `stateless_apply` with
  the same constraints on its variables, and NonNeg on every leaf against
  `optax.keep_params_nonnegative`;
* formulations (full mode, or `--formulations`): the alternatives that
  `project` and `unit_norms` do not use (`_variants.py`);
* memory: `compiled.memory_analysis()` of each step (deterministic);
* compile: trace + compile time of the step at 10, 100 and 1000 leaves;
* matrix: SpectralNorm (power iteration vs SVD) and Orthogonal
  (Newton-Schulz vs SVD), time per step and accuracy;
* stacked: `oc.Stacked` on one `(layers, in, out)` leaf against the same
  layers as separate leaves, step time and trace + compile time.
* whole_step: trace + compile of whole training steps (forward, backward,
  Adam, apply) of a Linen transformer LM, a 100-layer MLP and a scan-over-
  layers LM (`_models.py`), plain / `project` / hand-written.
* whole_step_parts (`--only` only): the same on the LM with `project`'s
  mechanisms (overflow branch, ordering) switched off one at a time.
* fit_runtime: run time of whole training steps, a convnet on 28x28x1 and
  the transformer LM (`_fit.py`): our jitted Linen step, plain and with
  `project`, against Keras 3's `fit()` without and with the same constraints.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import importlib.metadata
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import optax_constraints as oc  # noqa: E402
from benchmarks import _timing as T  # noqa: E402
from benchmarks import _traffic as TR  # noqa: E402
from benchmarks import _variants as V  # noqa: E402
from benchmarks import _workload as W  # noqa: E402

MB = 2**20


def _optax_run(step, tx, params, grads, compile_in=None):
    """(compiled step, (params copy, state, grads)) ready for `T.interleaved`."""
    p = jax.tree.map(jnp.copy, params)
    s = tx.init(p)
    if compile_in is None:
        compiled = W.jit_step(step).lower(p, s, grads).compile()
    else:
        with compile_in():
            compiled = W.jit_step(step).lower(p, s, grads).compile()
    return compiled, (p, s, grads)


def _memory(compiled, param_bytes: int) -> dict[str, float]:
    """`memory_analysis` figures, and the traffic in passes over the parameters."""
    m = compiled.memory_analysis()
    peak = (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        - m.alias_size_in_bytes
        + m.temp_size_in_bytes
    )
    return {
        "temp_mb": m.temp_size_in_bytes / MB,
        "argument_mb": m.argument_size_in_bytes / MB,
        "output_mb": m.output_size_in_bytes / MB,
        "alias_mb": m.alias_size_in_bytes / MB,
        "peak_mb": peak / MB,
        "passes": TR.bytes_moved(compiled) / param_bytes,
    }


# -- step --------------------------------------------------------------------


def step_section(quick: bool, formulations: bool) -> dict:
    dense, conv = ((8, 1536), (4, 256)) if not quick else ((4, 768), (2, 128))
    params = W.reference_params(dense, conv)
    grads = W.gradients(params)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))

    runs, memory = {}, {}
    for name, (step, tx) in {**W.optax_steps(), **W.nonneg_steps()}.items():
        compiled, args = _optax_run(step, tx, params, grads)
        runs[name], memory[name] = (compiled, args), _memory(compiled, param_bytes)
    if formulations:
        compiled, args = _optax_run(*W.optax_steps()["project"], params, grads, V.unordered)
        runs["project_unordered"], memory["project_unordered"] = (
            (compiled, args),
            _memory(compiled, param_bytes),
        )
        for label, norms in V.NORMS.items():
            for kind, make in (("hand", V.hand_step), ("update", V.update_step)):
                compiled, args = _optax_run(*make(norms), params, grads)
                name = f"{kind}_norms_{label}"
                runs[name], memory[name] = (compiled, args), _memory(compiled, param_bytes)
    flat_grads = jax.tree.leaves(grads)
    for name, (step, trainable, opt_vars) in W.keras_steps(params).items():
        compiled = W.jit_step(step).lower(trainable, opt_vars, flat_grads).compile()
        runs[name] = (compiled, (trainable, opt_vars, flat_grads))
        memory[name] = _memory(compiled, param_bytes)

    reps = 6 if quick else 40
    times = T.interleaved(runs, reps)
    out = {
        "n_params": int(n_params),
        "reps": reps,
        "memory": memory,
        "times": {n: {c: T.time_stats(t[c]) for c in ("cpu", "wall")} for n, t in times.items()},
        "ratios": {},
    }

    def ratio(a, b, clock):
        return T.ratio_stats(times[a][clock], times[b][clock])

    pairs = {
        "project/plain": ("project", "plain"),
        "project/hand_oc": ("project", "hand_oc"),
        "project/hand_keras": ("project", "hand_keras"),
        "hand_oc/plain": ("hand_oc", "plain"),
        "hand_keras/plain": ("hand_keras", "plain"),
        "naive/plain": ("naive", "plain"),
        "nonneg_project/keep_nonneg": ("nonneg_project", "keep_nonneg"),
        "keras_constrained/keras_plain": ("keras_constrained", "keras_plain"),
        "keras_plain/plain": ("keras_plain", "plain"),
    }
    pairs.update(
        {f"{n}/plain": (n, "plain") for n in runs if n != "plain" and f"{n}/plain" not in pairs}
    )
    for key, (a, b) in pairs.items():
        out["ratios"][key] = {c: ratio(a, b, c) for c in ("cpu", "wall")}
    return out


# -- compile -----------------------------------------------------------------


def compile_section(quick: bool) -> dict:
    sizes = (10, 100) if quick else (10, 100, 1000)
    out = {}
    for n in sizes:
        params = W.many_leaves_params(n)
        out[n] = {}
        # A learning rate unique to each measurement: no cache can answer.
        for name in ("plain", "project", "hand_oc", "hand_keras"):
            lr = W.LEARNING_RATE * (1 + 1e-3 * len(out[n]) + 1e-6 * n)
            step, tx = W.optax_steps(lr)[name]
            out[n][name] = _compile_time(W.jit_step(step), params, tx.init(params), params)
        flat = jax.tree.leaves(params)
        for name, (step, trainable, opt_vars) in W.keras_steps(params).items():
            out[n][name] = _compile_time(W.jit_step(step), trainable, opt_vars, flat)
    return out


def _compile_time(jitted, *args) -> dict:
    w0, c0 = time.perf_counter(), time.process_time()
    lowered = jitted.lower(*args)
    w1, c1 = time.perf_counter(), time.process_time()
    compiled = lowered.compile()
    w2, c2 = time.perf_counter(), time.process_time()
    return {
        "trace_s": w1 - w0,
        "compile_s": w2 - w1,
        "total_s": w2 - w0,
        "trace_cpu_s": c1 - c0,
        "total_cpu_s": c2 - c0,
        "kernels": TR.kernel_count(compiled),
    }


# -- whole training steps of real models -------------------------------------


def _whole_step_compiles(make_model, variants: dict, rounds: int, *, stacked=False) -> dict:
    """Trace + compile of one model's training step per variant, interleaved.

    `variants`: name -> (a step of `_models.whole_steps`, {(module, name):
    value} constants set while that variant is traced and compiled). The
    order alternates between rounds; each measurement has its own learning
    rate (no cache answers) and comes after `jax.clear_caches()`, so every
    variant traces all its programs, `project`'s inner ones too, as a fresh
    process does; one untimed compile comes first. Ratios are to the first
    variant, within a round.
    """
    from benchmarks import _models as M

    params, batch, loss = make_model()
    step, tx = M.whole_steps(loss, 1e-3)["plain"]
    _compile_time(jax.jit(step), params, tx.init(params), batch)  # untimed: the process's first
    names = list(variants)
    times: dict[str, list] = {}
    for r in range(rounds):
        for i, name in enumerate(names if r % 2 == 0 else names[::-1]):
            base, settings = variants[name]
            jax.clear_caches()
            saved = {key: getattr(*key) for key in settings}
            try:
                for (module, attr), value in settings.items():
                    setattr(module, attr, value)
                lr = 1e-3 * (1 + 1e-4 * (10 * r + i))
                step, tx = M.whole_steps(loss, lr, stacked=stacked)[base]
                timed = _compile_time(jax.jit(step), params, tx.init(params), batch)
            finally:
                for (module, attr), value in saved.items():
                    setattr(module, attr, value)
            times.setdefault(name, []).append(timed)
    first = np.array([t["total_cpu_s"] for t in times[names[0]]])
    entry = {"leaves": len(jax.tree.leaves(params)), "variants": {}}
    for name, ts in times.items():
        total = np.array([t["total_cpu_s"] for t in ts])
        entry["variants"][name] = {
            "trace_cpu_s": float(np.median([t["trace_cpu_s"] for t in ts])),
            "total_cpu_s": T.time_stats(total),
            "kernels": ts[0]["kernels"],
            "ratio": T.ratio_stats(total, first),
        }
    return entry


def whole_step_section(quick: bool) -> dict:
    """Trace + compile of a whole training step (forward, backward, Adam, apply).

    Models from `_models.py`; variants plain Adam, `project` and the
    hand-written "apply_updates, then tree_map(Keras's formula)", measured
    by `_whole_step_compiles`. Ratios to plain are taken within a round.
    """
    from benchmarks import _models as M

    models = {
        "lm4": lambda: M.lm(4),
        "lm8": lambda: M.lm(8),
        "mlp100": lambda: M.mlp(100),
        "scan_lm4": lambda: M.lm(4, scan=True),
    }
    if quick:
        models = {k: models[k] for k in ("lm4", "mlp100")}
    rounds = 1 if quick else 5
    variants = {name: (name, {}) for name in ("plain", "project", "hand_keras")}
    return {
        "rounds": rounds,
        "models": {
            model: _whole_step_compiles(make, variants, rounds, stacked=model.startswith("scan"))
            for model, make in models.items()
        },
    }


WHOLE_STEP_PARTS_OFF = 2**62
"""A size no leaf reaches: a `*_SIZE` constant set to it switches its mechanism off."""


def whole_step_parts_section(quick: bool) -> dict:
    """Where `project`'s trace + compile time over the hand-written formula goes.

    The 4-block LM of `whole_step` (2 blocks with `quick`), with `project`'s
    mechanisms switched off one at a time by setting their module constants
    to a size no leaf reaches: `no_branch` (`BRANCH_SIZE`: the overflow-safe
    second sum branch-free on every leaf, as on small leaves), `no_ordering`
    (`ORDERED_SIZE`: XLA's own schedule for every leaf), `neither`; plus plain
    Adam and the hand-written Keras formula, which has no overflow safety.
    Measured as `whole_step` is (`_whole_step_compiles`). The switched-off
    variants change no result (tests/test_perf_structure.py), only the
    optimizer step's passes (no branch) and temporaries (no ordering).
    """
    from benchmarks import _models as M
    from optax_constraints import _transform
    from optax_constraints.constraints import _base

    off = WHOLE_STEP_PARTS_OFF
    variants = {
        "plain": ("plain", {}),
        "project": ("project", {}),
        "no_branch": ("project", {(_base, "BRANCH_SIZE"): off}),
        "no_ordering": ("project", {(_transform, "ORDERED_SIZE"): off}),
        "neither": ("project", {(_base, "BRANCH_SIZE"): off, (_transform, "ORDERED_SIZE"): off}),
        "hand_keras": ("hand_keras", {}),
    }
    n_blocks = 2 if quick else 4
    rounds = 1 if quick else 5
    entry = _whole_step_compiles(lambda: M.lm(n_blocks), variants, rounds)
    return {"model": f"lm{n_blocks}", "rounds": rounds, **entry}


# -- whole training steps at run time, against Keras's fit() -----------------


def fit_runtime_section(quick: bool) -> dict:
    """Run time of a whole training step: ours (a jitted Linen step) and Keras's `fit()`.

    Per model (`_fit.py`: a convnet on 28x28x1, batch 128, and the
    transformer LM of `_models.py`), four variants, interleaved: plain Adam
    and Adam + `project` (our step, compiled, donated), and Keras 3's `fit()`
    of the same architecture without and with the same constraints as layer
    arguments. A round is `steps` steps of one variant after one untimed
    step; its figure is seconds per step. Ratios are taken within a round.
    """
    from benchmarks import _fit as F
    from benchmarks import _models as M

    n_blocks = 2 if quick else 4
    models = {
        "cnn": (F.flax_cnn, F.keras_cnn, F.cnn_data, F.CNN_BATCH),
        f"lm{n_blocks}": (
            lambda: M.lm(n_blocks),
            lambda constrained: F.keras_lm(n_blocks, constrained),
            F.lm_data,
            M.BATCH,
        ),
    }
    steps = {"cnn": 8 if quick else 12, f"lm{n_blocks}": 4 if quick else 8}
    reps = 4 if quick else 10
    out = {"reps": reps, "models": {}}
    for model, (make_flax, make_keras, data, batch) in models.items():
        out["models"][model] = fit_runtime_model(
            make_flax, make_keras, data, batch, steps[model], reps
        )
    return out


def fit_runtime_model(make_flax, make_keras, data, batch: int, steps: int, reps: int) -> dict:
    """One model of `fit_runtime_section`; small sizes make it a smoke test."""
    from benchmarks import _fit as F

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
    pairs = {
        "project/plain": ("project", "plain"),
        "keras_constrained/keras_plain": ("keras_constrained", "keras_plain"),
        "project/keras_constrained": ("project", "keras_constrained"),
        "plain/keras_plain": ("plain", "keras_plain"),
    }
    return {
        "batch": batch,
        "steps_per_round": steps,
        "params": int(sum(w.size for w in jax.tree.leaves(params))),
        "constrained": {k: len(v) for k, v in shapes["ours"].items()},
        "warmup_s": compile_s,
        # Largest violation per label after the timed steps: 0 where constrained.
        "violations_after": {name: runner[2]() for name, runner in runners.items()},
        "times": {n: {c: T.time_stats(t[c]) for c in ("cpu", "wall")} for n, t in times.items()},
        "ratios": {
            key: {c: T.ratio_stats(times[a][c], times[b][c]) for c in ("cpu", "wall")}
            for key, (a, b) in pairs.items()
        },
    }


# -- every_k_steps -----------------------------------------------------------


def every_k_section(quick: bool) -> dict:
    """`project(..., every_k_steps=k)`: mean step time over rounds / plain Adam's.

    Only 1 in k steps projects, so the mean over many rounds (a multiple of
    k) is the figure that matters; the median is a step that does not project
    and the maximum one that does.
    """
    dense, conv = ((8, 1536), (4, 256)) if not quick else ((4, 768), (2, 128))
    params = W.reference_params(dense, conv)
    grads = W.gradients(params)
    adam = optax.adam(W.LEARNING_RATE)
    labels = oc.label_by_path(W.RULES, allow_unmatched=True)
    txs = {"plain": adam, "project": optax.chain(adam, oc.project(W.CONSTRAINTS, labels))}
    for k in (4, 16):
        txs[f"every_{k}"] = optax.chain(adam, oc.project(W.CONSTRAINTS, labels, every_k_steps=k))
    runs = {}
    for name, tx in txs.items():
        runs[name] = _optax_run(W.step_with(tx), tx, params, grads)
    reps = 16 if quick else 48
    times = T.interleaved(runs, reps, warmup=0)
    plain = times["plain"]["cpu"]
    return {
        "reps": reps,
        "ratios": {
            name: {
                "mean": float(t["cpu"].mean() / plain.mean()),
                **T.ratio_stats(t["cpu"], plain),
            }
            for name, t in times.items()
            if name != "plain"
        },
    }


# -- stacked leaves ----------------------------------------------------------


def stacked_section(quick: bool) -> dict:
    """`oc.Stacked` on one `(layers, in, out)` leaf vs the layers as separate leaves.

    Same constraint per layer, same Adam: the stacked step should cost what
    the separate leaves cost (step time and trace + compile time), for a norm
    constraint (translated axes, no vmap) and for the vmapped matrix ones.
    """
    layers, n = (4, 256) if quick else (8, 512)
    key = jax.random.key(0)
    stacked = {"kernel": jax.random.normal(key, (layers, n, n)) * 0.05}
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
            s = tx.init(p)
            compile_s[f"{name}/{layout}"] = _compile_time(W.jit_step(W.step_with(tx)), p, s, g)
            runs[f"{name}/{layout}"] = _optax_run(W.step_with(tx), tx, params, g)
    reps = 8 if quick else 24
    times = T.interleaved(runs, reps)
    return {
        "layers": layers,
        "n": n,
        "reps": reps,
        "ratios": {
            name: T.ratio_stats(times[f"{name}/stacked"]["cpu"], times[f"{name}/separate"]["cpu"])
            for name in inners
        },
        "compile_ratio": {
            name: compile_s[f"{name}/stacked"]["total_cpu_s"]
            / compile_s[f"{name}/separate"]["total_cpu_s"]
            for name in inners
        },
    }


# -- bfloat16 parameters -----------------------------------------------------


def bfloat16_section(quick: bool) -> dict:
    """The reference workload in bfloat16: projections compute in float32.

    Rows: `project`, the hand-written loop with our constraints, and the same
    loop through `oc.apply_constraints` (which orders low-precision leaves
    in groups like `project`).
    """
    dense, conv = ((8, 1536), (4, 256)) if not quick else ((4, 768), (2, 128))
    to_bf16 = functools.partial(jax.tree.map, lambda x: x.astype(jnp.bfloat16))
    params = to_bf16(W.reference_params(dense, conv))
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
    runs, memory = {}, {}
    for name, (step, tx) in variants.items():
        compiled, args = _optax_run(step, tx, params, grads)
        runs[name], memory[name] = (compiled, args), _memory(compiled, param_bytes)
    reps = 6 if quick else 24
    times = T.interleaved(runs, reps)
    return {
        "reps": reps,
        "memory": memory,
        "ratios": {
            name: T.ratio_stats(t["cpu"], times["plain"]["cpu"])
            for name, t in times.items()
            if name != "plain"
        },
    }


# -- matrix constraints ------------------------------------------------------


def _sigma_max(w) -> float:
    a = np.asarray(w, np.float64)
    return float(np.linalg.norm(a.reshape(-1, a.shape[-1]), 2))


def matrix_section(quick: bool) -> dict:
    if not (hasattr(oc, "SpectralNorm") and hasattr(oc, "Orthogonal")):
        print("matrix: oc.SpectralNorm / oc.Orthogonal not available, section skipped")
        return {"skipped": True}
    n, width = (2, 128) if quick else (4, 384)
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

    runs["plain"] = _optax_run(W.step_with(adam), adam, params, grads)
    for name, c in constraints.items():
        tx = optax.chain(adam, oc.project(c))
        step = W.step_with(tx)
        runs[name] = _optax_run(step, tx, params, grads)
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

    reps = 4 if quick else 10
    times = T.interleaved(runs, reps, warmup=1)
    return {
        "kernels": f"{n} x ({width}, {width})",
        "ratios": {
            f"{k}/plain": {
                c: T.ratio_stats(times[k][c], times["plain"][c]) for c in ("cpu", "wall")
            }
            for k in constraints
        },
        "times": {k: {c: T.time_stats(t[c]) for c in ("cpu", "wall")} for k, t in times.items()},
        "accuracy": accuracy,
    }


# -- report ------------------------------------------------------------------


def _fmt(stats: dict) -> str:
    return f"{stats['median']:.3f} [{stats['min']:.2f}-{stats['max']:.2f}]"


def report(results: dict, only: bool = False) -> list[str]:
    if only:  # one section run alone
        header = f"optax_constraints benchmark - {results['machine']} - {results['date']}"
        return [header, *_section_lines(results)]
    step, mem = results["step"], results["step"]["memory"]
    r = step["ratios"]
    lines = [
        f"optax_constraints benchmark - {results['machine']} - {results['date']}"
        f" - jax {results['versions']['jax']} ({results['backend']}) - mode {results['mode']}",
        f"reference workload: {step['n_params'] / 1e6:.1f}M params, Adam, donated;"
        f" {step['reps']} interleaved rounds; ratio median [min-max] per round",
        "",
        f"{'goal':52s} {'target':>8s}  {'CPU time':>20s}  {'wall time':>20s}",
    ]

    def row(label, key, target):
        lines.append(
            f"{label:52s} {target:>8s}  {_fmt(r[key]['cpu']):>20s}  {_fmt(r[key]['wall']):>20s}"
        )

    row("project step / plain Adam step", "project/plain", "<= 1.10")
    row("project / hand-written (apply, tree_map oc constraint)", "project/hand_oc", "<= 1.00")
    row("project / hand-written (Keras's formula, unsafe)", "project/hand_keras", "<= 1.00")
    row(
        "NonNeg every leaf / optax.keep_params_nonnegative", "nonneg_project/keep_nonneg", "<= 1.02"
    )
    row("constraint overhead, ours: project / plain Adam", "project/plain", "< Keras")
    row("constraint overhead, Keras: constrained / plain", "keras_constrained/keras_plain", "")
    peak = mem["project"]["peak_mb"] / mem["plain"]["peak_mb"]
    lines.append(
        f"{'peak memory of the step / plain (memory_analysis)':52s} {'<= 1.05':>8s}  {peak:>20.3f}"
        f"  temp {mem['project']['temp_mb']:.1f} MB vs {mem['plain']['temp_mb']:.1f} MB"
    )
    comp = results["compile"]
    for n, by in comp.items():
        ratio = by["project"]["total_s"] / by["plain"]["total_s"]
        ratio_cpu = by["project"]["total_cpu_s"] / by["plain"]["total_cpu_s"]
        per_leaf = 1e3 * by["project"]["total_s"] / int(n)
        lines.append(
            f"{f'trace+compile, {n} leaves: project / plain':52s} {'<= 1.2':>8s}  {ratio_cpu:>20.3f}"
            f"  {ratio:>20.3f}  ({per_leaf:.1f} ms/leaf)"
        )
    lines += ["", "trace+compile (s, wall) and kernels per step, by number of leaves:"]
    for n, by in comp.items():
        cells = "  ".join(f"{k} {v['total_s']:.2f}/{v['kernels']}" for k, v in by.items())
        lines.append(f"  {n:>5}: {cells}")
    lines += ["", "other rows (ratio to plain Adam, CPU time):"]
    for key, val in r.items():
        if key.endswith("/plain") and key != "project/plain":
            lines.append(f"  {key:48s} {_fmt(val['cpu']):>20s}   wall {_fmt(val['wall'])}")
    lines += [
        "",
        "per variant: step time / plain Adam (CPU time); memory traffic in passes over the",
        "parameters (_traffic.py: bytes read + written by the compiled kernels / param bytes);",
        "memory_analysis temp and peak (MB)",
    ]
    for name, m in mem.items():
        key = f"{name}/plain"
        ratio = _fmt(r[key]["cpu"]) if key in r else ("1" if name == "plain" else "-")
        lines.append(
            f"  {name:30s} {ratio:>20s}   passes {m['passes']:6.2f}"
            f"   temp {m['temp_mb']:8.2f}   peak {m['peak_mb']:8.1f}"
        )
    return lines + _section_lines(results)


def _section_lines(results: dict) -> list[str]:
    lines: list[str] = []
    every = results.get("every_k")
    if every:
        lines += ["", f"every_k_steps, {every['reps']} rounds, step / plain Adam (CPU time):"]
        for name, st in every["ratios"].items():
            lines.append(
                f"  {name:26s} mean {st['mean']:.3f}   median {st['median']:.3f}"
                f"   min-max {st['min']:.2f}-{st['max']:.2f}"
            )
    low = results.get("bfloat16")
    if low:
        lines += ["", f"bfloat16 parameters, {low['reps']} rounds, step / plain Adam (CPU time):"]
        for name, st in low["ratios"].items():
            m = low["memory"][name]
            lines.append(
                f"  {name:26s} {_fmt(st):>20s}   passes {m['passes']:5.2f}"
                f"   temp {m['temp_mb']:6.1f} MB"
            )
    stack = results.get("stacked")
    if stack:
        lines += [
            "",
            f"oc.Stacked, {stack['layers']} layers of ({stack['n']}, {stack['n']}), one stacked"
            " leaf / separate leaves (CPU time):",
        ]
        for name, st in stack["ratios"].items():
            lines.append(
                f"  {name:26s} step {_fmt(st):>20s}   trace+compile"
                f" {stack['compile_ratio'][name]:.3f}"
            )
    whole = results.get("whole_step")
    if whole:
        lines += [
            "",
            f"whole training step, trace + compile (CPU s), {whole['rounds']} interleaved rounds;"
            " ratio to plain, median [min-max]; kernels:",
        ]
        for model, entry in whole["models"].items():
            cells = "  ".join(
                f"{name} {v['total_cpu_s']['median_ms'] / 1e3:.2f} s {_fmt(v['ratio'])}"
                f" k={v['kernels']}"
                for name, v in entry["variants"].items()
            )
            lines.append(f"  {model:9s} ({entry['leaves']} leaves)  {cells}")
    parts = results.get("whole_step_parts")
    if parts:
        lines += [
            "",
            f"whole training step of {parts['model']}, trace + compile with project's"
            f" mechanisms switched off, {parts['rounds']} interleaved rounds; ratio to plain:",
        ]
        for name, v in parts["variants"].items():
            lines.append(f"  {name:12s} {_fmt(v['ratio']):>20s}  k={v['kernels']}")
    fit = results.get("fit_runtime")
    if fit:
        lines += [
            "",
            f"whole training step, run time, {fit['reps']} interleaved rounds; ratio median"
            " [min-max] per round, CPU time (wall time); ms per step CPU / wall:",
        ]
        for model, entry in fit["models"].items():
            lines.append(
                f"  {model} ({entry['params'] / 1e6:.2f}M params, batch {entry['batch']},"
                f" {entry['steps_per_round']} steps a round; constrained leaves"
                f" {entry['constrained']}):"
            )
            for key, val in entry["ratios"].items():
                lines.append(f"    {key:32s} {_fmt(val['cpu']):>20s}   ({_fmt(val['wall'])})")
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
    mat = results.get("matrix", {"skipped": True})
    if not mat.get("skipped"):
        lines += [
            "",
            f"matrix and per-unit L1/simplex constraints, {mat['kernels']} kernels,"
            " Adam step / plain Adam:",
        ]
        for key, val in mat["ratios"].items():
            name = key.split("/")[0]
            acc = ", ".join(f"{k} {v:.2e}" for k, v in mat["accuracy"][name].items())
            lines.append(f"  {name:26s} {_fmt(val['cpu']):>20s}   {acc}")
    return lines


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(19, 9))
    ratios = results["step"]["ratios"]
    keys = [k for k in ratios if k.endswith("/plain")]
    for ax, clock in ((axes[0, 0], "cpu"), (axes[0, 1], "wall")):
        med = [ratios[k][clock]["median"] for k in keys]
        lo = [m - ratios[k][clock]["min"] for m, k in zip(med, keys, strict=True)]
        hi = [ratios[k][clock]["max"] - m for m, k in zip(med, keys, strict=True)]
        ax.barh(range(len(keys)), med, xerr=[lo, hi], color="tab:blue", alpha=0.7)
        ax.axvline(1.0, color="k", lw=0.8)
        ax.axvline(1.1, color="tab:red", lw=0.8, ls="--")
        ax.set_yticks(range(len(keys)), [k.replace("/plain", "") for k in keys], fontsize=7)
        ax.set_title(f"step time / plain Adam ({clock} time, median, min-max)")
    ax = axes[0, 2]
    mem = results["step"]["memory"]
    for name, m in mem.items():
        key = f"{name}/plain"
        if key in ratios and m["temp_mb"] < 20:  # the page-faulting variants are off the line
            ax.plot(m["passes"], ratios[key]["cpu"]["median"], "o", color="tab:blue")
            ax.annotate(name, (m["passes"], ratios[key]["cpu"]["median"]), fontsize=6)
    ax.plot([10, 16], [1.0, 1.6], color="k", lw=0.8, ls=":", label="time proportional to passes")
    ax.set_xlabel("memory traffic (passes over the parameters, _traffic.py)")
    ax.set_ylabel("step time / plain Adam (CPU time)")
    ax.set_title("step time follows memory traffic (temp < 20 MB)")
    ax.legend(fontsize=7)
    comp = results["compile"]
    sizes = [int(n) for n in comp]
    for ax, field, label in (
        (axes[1, 0], "total_s", "trace + compile (s, wall)"),
        (axes[1, 1], "kernels", "kernels in the compiled step"),
    ):
        for name in comp[next(iter(comp))]:
            ax.plot(sizes, [comp[n][name][field] for n in comp], "o-", label=name)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("leaves")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
        ax.set_title(label)
    ax = axes[1, 2]
    names = list(mem)
    ax.barh(range(len(names)), [mem[n]["temp_mb"] for n in names], color="tab:orange")
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_xlabel("temp buffers (MB, memory_analysis)")
    ax.set_title("temporary memory of the step")
    fig.suptitle(f"optax_constraints - {results['machine']} - {results['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: fewer rounds, sizes")
    parser.add_argument("--formulations", action="store_true", help="also in --quick mode")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument(
        "--only",
        choices=(
            "every_k",
            "bfloat16",
            "matrix",
            "stacked",
            "whole_step",
            "whole_step_parts",
            "fit_runtime",
        ),
        help="run one section alone (written to <file>-<name>.json)",
    )
    args = parser.parse_args(argv)
    import keras

    started = time.perf_counter()
    machine = f"{platform.node() or 'host'}-{jax.default_backend()}-{os.cpu_count()}cpu"
    results = {
        "machine": machine,
        "cpu": platform.processor() or platform.machine(),
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "mode": "quick" if args.quick else "full",
        "command": " ".join(["python", "benchmarks/run.py", *(argv or sys.argv[1:])]),
        "versions": {
            "jax": jax.__version__,
            "jaxlib": importlib.metadata.version("jaxlib"),
            "optax": optax.__version__,
            "keras": keras.__version__,
        },
    }
    stem = f"{machine}-{datetime.date.today().isoformat()}" + ("-quick" if args.quick else "")
    args.out.mkdir(parents=True, exist_ok=True)
    sections = {
        "every_k": every_k_section,
        "bfloat16": bfloat16_section,
        "matrix": matrix_section,
        "stacked": stacked_section,
        "whole_step": whole_step_section,
        "whole_step_parts": whole_step_parts_section,
        "fit_runtime": fit_runtime_section,
    }
    if args.only:
        results[args.only] = sections[args.only](args.quick)
        results["seconds"] = time.perf_counter() - started
        print("\n".join(report(results, only=True)))
        path = args.out / f"{stem}-{args.only}.json"
        path.write_text(json.dumps(results, indent=1))
        print(f"\nwrote {path} ({results['seconds']:.0f} s)")
        return results
    print("step (and formulations) ...", flush=True)
    results["step"] = step_section(args.quick, args.formulations or not args.quick)
    print("compile ...", flush=True)
    results["compile"] = compile_section(args.quick)
    print("every_k_steps ...", flush=True)
    results["every_k"] = every_k_section(args.quick)
    print("bfloat16 ...", flush=True)
    results["bfloat16"] = bfloat16_section(args.quick)
    print("matrix ...", flush=True)
    results["matrix"] = matrix_section(args.quick)
    print("stacked ...", flush=True)
    results["stacked"] = stacked_section(args.quick)
    print("whole training steps (compile) ...", flush=True)
    results["whole_step"] = whole_step_section(args.quick)
    print("whole training steps (run time, against Keras's fit) ...", flush=True)
    results["fit_runtime"] = fit_runtime_section(args.quick)
    results["seconds"] = time.perf_counter() - started
    lines = report(results)
    print("\n".join(lines))
    (args.out / f"{stem}.json").write_text(json.dumps(results, indent=1))
    plot(results, args.out / f"{stem}.png")
    print(f"\nwrote {args.out / stem}.json and .png ({results['seconds']:.0f} s)")
    return results


if __name__ == "__main__":
    main()
