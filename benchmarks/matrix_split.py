"""Many same-shape matrix leaves: every device projects all of them, or its share?

    python -m benchmarks.matrix_split [--quick] [--rounds N] [--leaves N] [--size S]

A transformer has a dozen same-shape kernels (12 blocks' `(512, 512)`
projections). Projected leaf by leaf, a replicated kernel is projected by
every device (8 copies of the same SVD or Newton–Schulz), and an SVD gathers
a sharded kernel and does the same. Distributed Muon implementations
(modded-nanogpt's, nanochat's `DistMuon`, torch's Muon `DistributedConfig`)
split instead: same-shape leaves are stacked, the stack axis is sharded over
the devices, each device projects its share, and the results are gathered
back. This module measures the two forms side by side, in one process, on 8
simulated CPU devices (a `(2, 4)` mesh `("data", "model")`):

* `per_leaf`: `[f(w) for w in leaves]` under `jit` (what `oc.project` does);
* `split`: `stack`, reshard the stack axis over both mesh axes (padding it
  to a multiple of 8 with zero kernels), `vmap(f)`, reshard back to each
  leaf's own layout, `unstack`.

for `f` = `orthogonal_newton_schulz` (a fixed iteration count, as under
`vmap`) and `orthogonal_svd`, on replicated leaves (`P()`) and on leaves
sharded `P("data", "model")`. It prints per case the median step time of
each form over interleaved rounds, their ratio, and the bytes of the
collectives in each compiled program (result sizes, from the HLO text).

Simulated devices share this machine's cores, so a step's time is the work
of all 8 devices together: the redundant form's 8 copies show up as 8 times
the work, where on real devices they run side by side and cost time only
through each device's own copy. The ratios are thus an upper bound on the
compute saving of splitting, and the collective bytes say what it costs.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

DEVICES = 8
_FLAG = f"--xla_force_host_platform_device_count={DEVICES}"


def _relaunch(argv) -> int:
    """Runs this module again in a process whose jax sees 8 CPU devices."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {_FLAG}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    cmd = [sys.executable, "-m", "benchmarks.matrix_split", *argv]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run(cmd, env=env, cwd=root, check=False).returncode


def _collective_bytes(hlo: str) -> dict[str, int]:
    """Bytes of the results of each kind of collective in a compiled program's text."""
    import re

    op = re.compile(
        r"=\s*(\(?[^=]*?\)?)\s+(all-gather|all-reduce|all-to-all|collective-permute|"
        r"reduce-scatter)(-start)?\("
    )
    width = {"f64": 8, "s64": 8, "u64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2}
    found: dict[str, int] = {}
    for line in hlo.splitlines():
        m = op.search(line)
        if not m:
            continue
        for dtype, dims in re.findall(r"([a-z]+[0-9]*)\[([0-9,]*)\]", m.group(1)):
            n = width.get(dtype, 1)
            for d in filter(None, dims.split(",")):
                n *= int(d)
            found[m.group(2)] = found.get(m.group(2), 0) + n
    return found


def _forms(f, shardings, mesh):
    """The two jitted forms of projecting every leaf with `f`."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    n = len(shardings)
    padded = -(-n // DEVICES) * DEVICES
    split_sharding = NamedSharding(mesh, P(mesh.axis_names))

    def per_leaf(leaves):
        return [f(w) for w in leaves]

    def split(leaves):
        stack = jnp.stack([jax.sharding.reshard(w, NamedSharding(mesh, P())) for w in leaves])
        stack = jnp.pad(stack, ((0, padded - n), (0, 0), (0, 0)))
        stack = jax.sharding.reshard(stack, split_sharding)
        out = jax.vmap(f)(stack)
        out = jax.sharding.reshard(out, NamedSharding(mesh, P()))
        return [jax.sharding.reshard(out[i], s) for i, s in enumerate(shardings)]

    return {"per_leaf": jax.jit(per_leaf), "split": jax.jit(split)}


def measure(num_leaves: int, shape: tuple, rounds: int) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from optax_constraints import projections as proj

    assert len(jax.devices()) == DEVICES, jax.devices()
    mesh = jax.make_mesh((2, 4), ("data", "model"))  # Explicit axes, JAX's default
    functions = {
        "newton_schulz(6 iters)": lambda w: proj.orthogonal_newton_schulz(w, 6),
        "svd": proj.orthogonal_svd,
    }
    layouts = {"replicated P()": P(), 'sharded P("data", "model")': P("data", "model")}
    rng = np.random.default_rng(0)
    base = [
        jnp.asarray(np.linalg.qr(rng.normal(size=shape))[0] + 0.01 * rng.normal(size=shape))
        for _ in range(num_leaves)
    ]
    base = [w.astype(jnp.float32) for w in base]
    rows = []
    for fname, f in functions.items():
        for lname, spec in layouts.items():
            shardings = [NamedSharding(mesh, spec)] * num_leaves
            leaves = [jax.device_put(w, s) for w, s in zip(base, shardings)]
            forms = _forms(f, shardings, mesh)
            start = time.perf_counter()
            compiled = {k: g.lower(leaves).compile() for k, g in forms.items()}
            print(
                f"  [{fname}, {lname}: compiled in {time.perf_counter() - start:.0f} s]", flush=True
            )
            outs = {k: c(leaves) for k, c in compiled.items()}
            diff = max(
                float(jnp.max(jnp.abs(a - b))) for a, b in zip(outs["per_leaf"], outs["split"])
            )
            kept = all(o.sharding.is_equivalent_to(s, 2) for o, s in zip(outs["split"], shardings))
            times = {k: [] for k in compiled}
            for _ in range(rounds):  # interleaved, so load changes hit both forms
                for k, c in compiled.items():
                    start = time.perf_counter()
                    jax.block_until_ready(c(leaves))
                    times[k].append(time.perf_counter() - start)
            med = {k: float(np.median(v)) for k, v in times.items()}
            rows.append(
                {
                    "function": fname,
                    "layout": lname,
                    "per_leaf_ms": 1e3 * med["per_leaf"],
                    "split_ms": 1e3 * med["split"],
                    "ratio": med["per_leaf"] / med["split"],
                    "bytes": {k: _collective_bytes(c.as_text() or "") for k, c in compiled.items()},
                    "max_abs_diff": diff,
                    "split_keeps_sharding": kept,
                }
            )
    return rows


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 leaves of (64, 64), 3 rounds")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--leaves", type=int, default=None, help="number of leaves")
    parser.add_argument("--size", type=int, default=None, help="each leaf is (size, size)")
    args = parser.parse_args(argv)
    if "jax" not in sys.modules:
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}".strip()
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    if len(jax.devices()) != DEVICES:
        return _relaunch(argv)
    num_leaves, size = (8, 64) if args.quick else (12, 512)
    num_leaves, shape = args.leaves or num_leaves, (args.size or size,) * 2
    rounds = args.rounds or (3 if args.quick else 7)
    print(
        f"{num_leaves} leaves of {shape}, float32, {DEVICES} simulated CPU devices,"
        f" mesh (2, 4) Explicit; median of {rounds} interleaved rounds"
    )
    header = f"{'function':24s} {'leaves':28s} {'per leaf ms':>11s} {'split ms':>9s} {'ratio':>6s}"
    print(header + "  collective bytes (per leaf | split)   max |diff|")
    for r in measure(num_leaves, shape, rounds):
        b = r["bytes"]
        print(
            f"{r['function']:24s} {r['layout']:28s} {r['per_leaf_ms']:11.1f}"
            f" {r['split_ms']:9.1f} {r['ratio']:6.2f}  {b['per_leaf']} | {b['split']}"
            f"   {r['max_abs_diff']:.1e}{'' if r['split_keeps_sharding'] else '  (sharding lost)'}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
