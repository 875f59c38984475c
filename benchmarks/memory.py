"""What the compiled steps hold and move: memory, traffic, kernels (no clock).

    python benchmarks/run.py --only memory [--quick]

Read off XLA's compiled programs, so the figures are deterministic for one
jax / XLA version and change with it (which is why they are printed here and
not pinned by the tests). Shapes are abstract (`jax.ShapeDtypeStruct`):
nothing is allocated or run.

* `steps`: the optimizer steps of `step.py` on the full reference workload
  (`--quick`: the smaller one): `memory_analysis()` temp and peak (MB),
  traffic in passes over the parameters (`_traffic.bytes_moved`) and the
  number of kernels of the compiled step (`_traffic.kernel_count`);
* `bfloat16`: the same for `project` and for `oc.apply_constraints` after
  `apply_updates`, with bfloat16 parameters;
* `whole_step_kernels`: kernels of a whole training step (forward, backward,
  Adam, apply) of a tanh MLP, plain / `project` / the hand-written Keras
  formula. XLA:CPU compiles each kernel separately, so compile time follows
  this count.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import optax

import optax_constraints as oc
from benchmarks import _traffic as TR
from benchmarks import _workload as W
from benchmarks.step import sizes


def _abstract(tree, dtype=None):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype or x.dtype), tree)


def _figures(step, tx, params) -> dict:
    state = jax.eval_shape(tx.init, params)
    compiled = W.jit_step(step).lower(params, state, params).compile()
    param_bytes = sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(params))
    return {**TR.memory(compiled, param_bytes), "kernels": TR.kernel_count(compiled)}


def whole_step_kernels(widths) -> dict[str, int]:
    """Kernels of the whole training step of a tanh MLP with these layer widths."""
    params = {
        f"l{i}": {"kernel": jnp.full((a, b), 0.01), "bias": jnp.zeros(b)}
        for i, (a, b) in enumerate(itertools.pairwise(widths))
    }

    def loss(p, x):
        for i in range(len(widths) - 1):
            x = jnp.tanh(x @ p[f"l{i}"]["kernel"] + p[f"l{i}"]["bias"])
        return jnp.sum(x * x)

    labels = oc.label_by_path({"**/kernel": "kernel", "**/bias": "bias"})
    constraints = {"kernel": oc.MaxNorm(3.0, axis="fan_in"), "bias": oc.NonNeg()}

    def keras_formula(w, label):  # Keras 3's MaxNorm and NonNeg
        if label == "bias":
            return jnp.maximum(w, 0)
        norms = jnp.sqrt(jnp.sum(jnp.square(w), axis=0, keepdims=True))
        return w * (jnp.clip(norms, 0, 3.0) / (1e-7 + norms))

    adam = optax.adam(1e-3)
    projected = optax.chain(adam, oc.project(constraints, labels))

    def with_tx(tx):
        def step(p, s, x):
            updates, s = tx.update(jax.grad(loss)(p, x), s, p)
            return optax.apply_updates(p, updates), s

        return step

    def hand(p, s, x):
        updates, s = adam.update(jax.grad(loss)(p, x), s, p)
        p = optax.apply_updates(p, updates)
        return jax.tree.map(keras_formula, p, labels(p)), s

    x = jnp.ones((8, widths[0]))
    steps = {"plain": (with_tx(adam), adam), "project": (with_tx(projected), projected)}
    steps["hand_keras"] = (hand, adam)
    return {
        name: TR.kernel_count(jax.jit(f).lower(params, tx.init(params), x).compile())
        for name, (f, tx) in steps.items()
    }


def run(args) -> dict:
    # Shapes only: the full workload costs nothing to allocate, only to compile.
    params = _abstract(W.reference_params(*sizes(args.quick)))
    steps = {
        name: _figures(step, tx, params)
        for name, (step, tx) in {**W.optax_steps(), **W.nonneg_steps()}.items()
    }
    adam = optax.adam(W.LEARNING_RATE)

    def hand_apply(p, s, g):
        u, s = adam.update(g, s, p)
        return oc.apply_constraints(optax.apply_updates(p, u), W.CONSTRAINTS, W.labels_of), s

    low = _abstract(params, jnp.bfloat16)
    opt = W.optax_steps()
    bfloat16 = {
        "plain": _figures(*opt["plain"], low),
        "project": _figures(*opt["project"], low),
        "hand_apply_constraints": _figures(hand_apply, adam, low),
    }
    kernels = {
        str(widths): whole_step_kernels(widths)
        for widths in ([64] * 5, [256] * 5, [64, 64, 256, 256, 256, 64])
    }
    ratios = {
        "peak project/plain": steps["project"]["peak_mb"] / steps["plain"]["peak_mb"],
        "passes project/hand_oc": steps["project"]["passes"] / steps["hand_oc"]["passes"],
        "passes project/hand_keras": steps["project"]["passes"] / steps["hand_keras"]["passes"],
        "passes nonneg_project/keep_nonneg": steps["nonneg_project"]["passes"]
        / steps["keep_nonneg"]["passes"],
        **{
            f"whole-step kernels project/hand_keras {w}": k["project"] / k["hand_keras"]
            for w, k in kernels.items()
        },
    }
    return {"steps": steps, "bfloat16": bfloat16, "whole_step_kernels": kernels, "ratios": ratios}


def report(result: dict) -> list[str]:
    lines = ["compiled optimizer steps: passes over the params, temp MB, peak MB, kernels"]
    for group in ("steps", "bfloat16"):
        lines.append(f"  {group}:")
        for name, m in result[group].items():
            lines.append(
                f"    {name:24s} passes {m['passes']:6.2f}  temp {m['temp_mb']:8.2f}"
                f"  peak {m['peak_mb']:8.1f}  kernels {m['kernels']}"
            )
    lines.append("  whole training step of a tanh MLP, kernels (plain / project / hand_keras):")
    for widths, k in result["whole_step_kernels"].items():
        lines.append(f"    {widths:28s} {k['plain']} / {k['project']} / {k['hand_keras']}")
    lines += [f"  {key:44s} {val:.3f}" for key, val in result["ratios"].items()]
    return lines
