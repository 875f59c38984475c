"""What do `tangent` and `Sphere` cost? One Adam step on a transformer's matrices.

    python -m benchmarks.manifold [--quick | --large] [--reps N] [--out results.json]

Every matrix of a small transformer (embedding, per layer q/k/v, output,
MLP in and out) is kept on the unit sphere per unit (nGPT), in four
variants timed side by side in one process (`benchmarks._timing.interleaved`:
alternating order, a ratio per round, median and min-max over rounds):

* `adam`: plain `optax.adam`, the baseline;
* `adam_project`: `chain(adam, oc.project(Sphere))`;
* `adam_tangent_project`: `chain(adam, oc.tangent(Sphere), oc.project(Sphere))`
  (the projected update: `tangent` just before `project`);
* `hand_ngpt`: the hand-written nGPT loop: `optax.apply_updates` with Adam's
  update, then `w / ‖w‖` per unit of every matrix.

Each variant is one jitted function `(params, opt_state, grads) -> (params,
opt_state)` with donated buffers; the same gradients every step. Ratios are
against `adam` (and `hand_ngpt`), CPU time and wall time.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_constraints as oc
from benchmarks._timing import interleaved, ratio_stats, time_stats


def transformer_matrices(d_model: int, layers: int, vocab: int) -> dict:
    """The matrices of a pre-norm transformer, Flax layout `(in, out)`."""
    key = jax.random.key(0)
    shapes = {"embed": (vocab, d_model)}
    for i in range(layers):
        shapes |= {
            f"layer{i}/q": (d_model, d_model),
            f"layer{i}/k": (d_model, d_model),
            f"layer{i}/v": (d_model, d_model),
            f"layer{i}/out": (d_model, d_model),
            f"layer{i}/mlp_in": (d_model, 4 * d_model),
            f"layer{i}/mlp_out": (4 * d_model, d_model),
        }
    keys = jax.random.split(key, len(shapes))
    return {
        name: jax.random.normal(k, shape) / np.sqrt(shape[0])
        for k, (name, shape) in zip(keys, shapes.items())
    }


def unit_axis(name: str) -> int:
    """nGPT normalises along the embedding dimension: per token for the embedding,
    per output unit (over the inputs) for the other matrices."""
    return 1 if name == "embed" else 0


def variants(params: dict, lr: float = 1e-3) -> dict:
    labels = {name: name for name in params}
    spheres = {name: oc.Sphere(axis=unit_axis(name)) for name in params}
    txs = {
        "adam": optax.adam(lr),
        "adam_project": optax.chain(optax.adam(lr), oc.project(spheres, labels)),
        "adam_tangent_project": optax.chain(
            optax.adam(lr), oc.tangent(spheres, labels), oc.project(spheres, labels)
        ),
    }
    runs = {}
    for name, tx in txs.items():

        def step(p, s, g, tx=tx):
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s

        runs[name] = (jax.jit(step, donate_argnums=(0, 1)), tx.init)

    adam = optax.adam(lr)

    def hand_ngpt(p, s, g):
        u, s = adam.update(g, s, p)
        p = optax.apply_updates(p, u)
        p = {k: w / jnp.linalg.norm(w, axis=unit_axis(k), keepdims=True) for k, w in p.items()}
        return p, s

    runs["hand_ngpt"] = (jax.jit(hand_ngpt, donate_argnums=(0, 1)), adam.init)
    return runs


def measure(d_model: int, layers: int, vocab: int, reps: int) -> dict:
    params = transformer_matrices(d_model, layers, vocab)
    params = oc.apply_constraints(
        params, {k: oc.Sphere(axis=unit_axis(k)) for k in params}, {k: k for k in params}
    )
    grads = jax.tree.map(
        lambda p: jax.random.normal(jax.random.key(1), p.shape, p.dtype) * 1e-2, params
    )
    runs = {}
    for name, (step, init) in variants(params).items():
        p = jax.tree.map(jnp.copy, params)
        runs[name] = (step, (p, init(p), grads))
    times = interleaved(runs, reps)
    size = sum(int(np.prod(p.shape)) for p in params.values())
    out = {
        "config": {
            "d_model": d_model,
            "layers": layers,
            "vocab": vocab,
            "parameters": size,
            "leaves": len(params),
            "reps": reps,
        },
        "times": {n: {c: time_stats(t[c]) for c in ("cpu", "wall")} for n, t in times.items()},
        "ratios": {},
    }
    for base in ("adam", "hand_ngpt"):
        for name in times:
            if name != base:
                out["ratios"][f"{name} / {base}"] = {
                    c: ratio_stats(times[name][c], times[base][c]) for c in ("cpu", "wall")
                }
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (CI, tests)")
    parser.add_argument("--large", action="store_true", help="d_model 512, 6 layers, vocab 8192")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--out", default=None, help="write the JSON report here")
    args = parser.parse_args(argv)
    if args.quick:
        d_model, layers, vocab, reps = 64, 2, 256, args.reps or 5
    elif args.large:
        d_model, layers, vocab, reps = 512, 6, 8192, args.reps or 30
    else:
        d_model, layers, vocab, reps = 256, 4, 2048, args.reps or 30
    report = measure(d_model, layers, vocab, reps)
    report["machine"] = {
        "platform": platform.platform(),
        "device": str(jax.devices()[0].device_kind),
        "jax": jax.__version__,
        "optax": optax.__version__,
    }
    text = json.dumps(report, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    for name, r in report["ratios"].items():
        cpu, wall = r["cpu"], r["wall"]
        print(
            f"{name:38s} cpu {cpu['median']:.2f} [{cpu['min']:.2f}-{cpu['max']:.2f}]"
            f"  wall {wall['median']:.2f} [{wall['min']:.2f}-{wall['max']:.2f}]"
        )
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
