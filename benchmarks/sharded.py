"""A sharded transformer training step on 8 simulated CPU devices.

    python benchmarks/run.py --only sharded [--quick]

A small pre-LayerNorm transformer LM written in plain JAX (d = 128, 4 heads,
MLP 4d, vocabulary 256, sequence 32, batch 16, 2 blocks; `--quick`: d = 64,
1 block) on a `(2, 4)` mesh `("data", "model")`: every 2-D weight sharded
`P("data", "model")`, every 1-D one `P("model")`, the batch `P("data")`; the
forward all-gathers each weight where it is used (FSDP-style). A step is
forward, backward, Adam and apply, jitted with params and state donated.
Variants: `plain` Adam, Adam + `oc.project` (`MaxNorm(3, axis="fan_in")` on
every kernel, `NonNeg` on every bias), and `hand_keras`, the same
constraints written by hand after `apply_updates` (Keras's formula). On an
`Auto` mesh and on an `Explicit` one (`jax.make_mesh(..., axis_types=...)`,
under `jax.set_mesh`).

Per variant: collectives of the compiled step (`_traffic.collectives`: count
and bytes produced per device, by op), trace + compile time, and step time
(interleaved rounds, wall clock: the 8 devices are threads of one process).

The measurement runs in a subprocess started with
`XLA_FLAGS=--xla_force_host_platform_device_count=8` (the flag must be set
before JAX starts); `python -m benchmarks.sharded --child` is that process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("plain", "project", "hand_keras")
MAX_VALUE = 3.0


def run(args) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    command = [sys.executable, "-m", "benchmarks.sharded", "--child"]
    command += ["--quick"] if args.quick else []
    command += ["--reps", str(args.reps)] if args.reps else []
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the 8-device process failed:\n{done.stderr[-4000:]}")
    line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])


def report(result: dict) -> list[str]:
    from benchmarks import _timing as T

    lines = [
        f"sharded transformer step, {result['devices']} CPU devices, mesh {result['mesh']},"
        f" {result['params'] / 1e6:.2f}M params, {result['reps']} interleaved rounds"
    ]
    for kind, by in result["meshes"].items():
        lines.append(f"  {kind} mesh:")
        for name, v in by["variants"].items():
            if "error" in v:
                lines.append(f"    {name:11s} FAILED: {v['error']}")
                continue
            ops = ", ".join(
                f"{op} {c['count']}x {c['bytes'] / 1024:.1f} KiB"
                for op, c in sorted(v["collectives"].items())
            )
            lines.append(
                f"    {name:11s} collectives {v['collective_bytes'] / 1024:8.1f} KiB"
                f" ({ops}); compile {v['compile_s']:.2f} s; step {v['step_ms']:.2f} ms"
            )
        for key, st in by.get("ratios", {}).items():
            lines.append(f"    {key:24s} step time {T.fmt(st)}")
        for key, val in by.get("collective_ratios", {}).items():
            lines.append(f"    {key:24s} collective bytes {val:.4f}")
        for key, val in by.get("extra_collective_bytes", {}).items():
            lines.append(f"    {key:24s} collective bytes {val:+d}")
    return lines


# -- the 8-device process ------------------------------------------------------


def _model(quick: bool):
    import jax
    import jax.numpy as jnp

    d, n_blocks = (64, 1) if quick else (128, 2)
    vocab, seq, batch, heads = 256, 32, 16, 4
    keys = iter(jax.random.split(jax.random.key(0), 64))

    def dense(a, b):
        return {"kernel": jax.random.normal(next(keys), (a, b)) / a**0.5, "bias": jnp.zeros(b)}

    def norm():
        return {"scale": jnp.ones(d), "bias": jnp.zeros(d)}

    params = {"embed": {"embedding": jax.random.normal(next(keys), (vocab, d)) * 0.02}}
    for i in range(n_blocks):
        params[f"block{i}"] = {
            "ln1": norm(),
            "qkv": dense(d, 3 * d),
            "out": dense(d, d),
            "ln2": norm(),
            "mlp_in": dense(d, 4 * d),
            "mlp_out": dense(4 * d, d),
        }
    params["ln_f"] = norm()
    params["head"] = dense(d, vocab)
    tokens = jax.random.randint(next(keys), (batch, seq + 1), 0, vocab)

    def loss(params, tokens, gather):
        p = jax.tree.map(gather, params)

        def layer_norm(x, n):
            mu = x.mean(-1, keepdims=True)
            var = ((x - mu) ** 2).mean(-1, keepdims=True)
            return (x - mu) * jax.lax.rsqrt(var + 1e-6) * n["scale"] + n["bias"]

        def apply(x, layer):
            return x @ layer["kernel"] + layer["bias"]

        x = jax.nn.one_hot(tokens[:, :-1], vocab) @ p["embed"]["embedding"]
        mask = jnp.tril(jnp.ones((seq, seq), bool))
        for i in range(n_blocks):
            b = p[f"block{i}"]
            q, k, v = jnp.split(apply(layer_norm(x, b["ln1"]), b["qkv"]), 3, axis=-1)
            q, k, v = (t.reshape(batch, seq, heads, d // heads) for t in (q, k, v))
            logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / (d // heads) ** 0.5
            att = jax.nn.softmax(jnp.where(mask, logits, -1e9), axis=-1)
            h = jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(batch, seq, d)
            x = x + apply(h, b["out"])
            h = apply(jax.nn.gelu(apply(layer_norm(x, b["ln2"]), b["mlp_in"])), b["mlp_out"])
            x = x + h
        logits = apply(layer_norm(x, p["ln_f"]), p["head"])
        labels = jax.nn.one_hot(tokens[:, 1:], vocab)
        return -jnp.mean(jnp.sum(labels * jax.nn.log_softmax(logits), axis=-1))

    return params, tokens, loss


def _steps(loss, gather, learning_rate=1e-3):
    import jax
    import jax.numpy as jnp
    import optax

    import optax_constraints as oc

    labels = oc.label_by_path({"**/kernel": "kernel", "**/bias": "bias"}, allow_unmatched=True)
    constraints = {"kernel": oc.MaxNorm(MAX_VALUE, axis="fan_in"), "bias": oc.NonNeg()}
    adam = optax.adam(learning_rate)
    projected = optax.chain(adam, oc.project(constraints, labels))

    def with_tx(tx):
        def step(params, state, tokens):
            value, grads = jax.value_and_grad(loss)(params, tokens, gather)
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state, value

        return step

    def keras_formula(w, label):
        if label == "bias":
            return jnp.maximum(w, 0)
        if label == "kernel":
            norms = jnp.sqrt(jnp.sum(jnp.square(w), axis=0, keepdims=True))
            return w * (jnp.clip(norms, 0, MAX_VALUE) / (1e-7 + norms))
        return w

    def hand_keras(params, state, tokens):
        value, grads = jax.value_and_grad(loss)(params, tokens, gather)
        updates, state = adam.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        flat_labels = jax.tree.leaves(labels(params), is_leaf=lambda x: x is None)
        flat, treedef = jax.tree.flatten(params)
        projected_leaves = [keras_formula(w, lab) for w, lab in zip(flat, flat_labels, strict=True)]
        return jax.tree.unflatten(treedef, projected_leaves), state, value

    return {
        "plain": (with_tx(adam), adam),
        "project": (with_tx(projected), projected),
        "hand_keras": (hand_keras, adam),
    }


def _mesh_figures(kind: str, quick: bool, reps: int) -> dict:
    import jax
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    from benchmarks import _timing as T
    from benchmarks import _traffic as TR

    axis_type = {"auto": AxisType.Auto, "explicit": AxisType.Explicit}[kind]
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(axis_type, axis_type))
    params, tokens, loss = _model(quick)

    def spec(w):
        return P("data", "model") if w.ndim == 2 else P("model")

    if kind == "explicit":

        def gather(w):
            return jax.sharding.reshard(w, P())
    else:

        def gather(w):
            return jax.lax.with_sharding_constraint(w, NamedSharding(mesh, P()))

    out: dict = {"variants": {}}
    runs = {}
    with jax.set_mesh(mesh):
        params = jax.tree.map(lambda w: jax.device_put(w, NamedSharding(mesh, spec(w))), params)
        tokens = jax.device_put(tokens, NamedSharding(mesh, P("data", None)))
        for name, (step, tx) in _steps(loss, gather).items():
            try:
                p = jax.tree.map(jax.numpy.copy, params)
                s = tx.init(p)
                jitted = jax.jit(step, donate_argnums=(0, 1))
                timed, compiled = T.compile_time(jitted, p, s, tokens)
                found = TR.collectives(compiled.as_text())
                new_p, _, _ = compiled(jax.tree.map(jax.numpy.copy, p), tx.init(p), tokens)
                kept = all(
                    a.sharding.is_equivalent_to(b.sharding, a.ndim)
                    for a, b in zip(jax.tree.leaves(new_p), jax.tree.leaves(p), strict=True)
                )
            except Exception as e:  # a variant that does not compile on this mesh is a finding
                out["variants"][name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
                continue
            out["variants"][name] = {
                "collectives": found,
                "collective_bytes": sum(c["bytes"] for c in found.values()),
                "compile_s": timed["total_s"],
                "shardings_kept": kept,
            }
            runs[name] = (lambda p, s, b, fn=compiled: fn(p, s, b)[:2], (p, s, tokens))
        times = T.interleaved(runs, reps)
    for name, t in times.items():
        out["variants"][name]["step_ms"] = float(1e3 * sorted(t["wall"])[len(t["wall"]) // 2])
    pairs = [("project", "plain"), ("project", "hand_keras"), ("hand_keras", "plain")]
    out["ratios"] = {
        f"{a}/{b}": T.ratio_stats(times[a]["wall"], times[b]["wall"])
        for a, b in pairs
        if a in times and b in times
    }
    ok = {n: v for n, v in out["variants"].items() if "error" not in v}
    out["collective_ratios"] = {
        f"{a}/{b}": ok[a]["collective_bytes"] / ok[b]["collective_bytes"]
        for a, b in pairs
        if a in ok and b in ok and ok[b]["collective_bytes"]
    }
    if "plain" in ok:
        out["extra_collective_bytes"] = {
            f"{n} - plain": ok[n]["collective_bytes"] - ok["plain"]["collective_bytes"]
            for n in ok
            if n != "plain"
        }
    return out


def child(argv: list[str]) -> dict:
    import jax

    quick = "--quick" in argv
    given = int(argv[argv.index("--reps") + 1]) if "--reps" in argv else None
    reps = given or (4 if quick else 20)
    params, _, _ = _model(quick)
    return {
        "devices": len(jax.devices()),
        "mesh": "(2, 4) ('data', 'model')",
        "params": int(sum(x.size for x in jax.tree.leaves(params))),
        "reps": reps,
        "meshes": {kind: _mesh_figures(kind, quick, reps) for kind in ("auto", "explicit")},
    }


if __name__ == "__main__":
    if "--child" not in sys.argv:
        raise SystemExit("run it through benchmarks/run.py --only sharded")
    print("RESULT " + json.dumps(child(sys.argv[1:])))
