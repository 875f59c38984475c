"""How much does `oc.project` cost? One command, one process, side by side.

    python benchmarks/run.py                       # the default sections, full sizes
    python benchmarks/run.py --quick               # the same at smoke-test sizes
    python benchmarks/run.py --only whole_step     # one section (or a comma list)
    python benchmarks/run.py --list                # the sections
    python benchmarks/run.py --only compile --rounds 5 --reps 10   # more rounds

Every section compares variants measured in the same process, interleaved
(`_timing.py`): `project` against plain Adam and against the loop a user
would write by hand ("apply_updates, then the constraint on every leaf").
It prints its table and the run writes one JSON file to `benchmarks/results/`
(`--out` elsewhere): `<machine>-<date>[-quick][-<sections>].json`.

A section is a module of this folder, registered in `SECTIONS` by one line.
It has `run(args) -> dict` (JSON-able; it reads `args.quick`, `args.rounds`
and `args.reps`, the last two None unless given) and
`report(result) -> list[str]`, or, for a standalone script, `main(argv)`
(called with `["--quick"]` under `--quick`; a dict it returns is recorded).
Modules are imported only when their section runs, so one that is missing
or broken does not stop the others.

On a GPU machine, `benchmarks/gpu.sh` runs the optimizer-step, compile and
whole-step sections and writes one file (docs/performance.md).
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.metadata
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")
ROOT = Path(__file__).resolve().parents[1]
# Run as a script, Python puts benchmarks/ first on the path; the sections
# are imported as `benchmarks.<name>` from the repository root instead.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]
sys.path.insert(0, str(ROOT))

# name -> module (imported when the section runs). One line registers a section.
SECTIONS = {
    "step": "benchmarks.step",  # optimizer step: time, memory, traffic
    "memory": "benchmarks.memory",  # compiled memory, traffic and kernels (no clock)
    "compile": "benchmarks.compile",  # trace + compile at 10 / 100 / 1000 leaves
    "whole_step": "benchmarks.whole_step",  # whole training steps: compile and run time
    "every_k": "benchmarks.every_k",
    "bfloat16": "benchmarks.bfloat16",
    "stacked": "benchmarks.stacked",
    "matrix": "benchmarks.matrix",
    "fit_runtime": "benchmarks.fit_runtime",  # against Keras's fit()
    "sharded": "benchmarks.sharded",  # 8 simulated devices, Auto and Explicit meshes
    "matrix_split": "benchmarks.matrix_split",  # standalone: main(argv)
    "manifold": "benchmarks.manifold",  # standalone: main(argv)
}
# What `run.py` without `--only` runs (the others: `--only <name>`).
DEFAULT = ("step", "memory", "compile", "whole_step", "every_k", "bfloat16", "stacked", "matrix")


def load(name: str):
    """The module of a registered section."""
    return importlib.import_module(SECTIONS[name])


def run_section(name: str, args: argparse.Namespace) -> tuple[dict, list[str]]:
    """(result, report lines) of one section."""
    module = load(name)
    if hasattr(module, "run"):
        result = module.run(args)
        return result, module.report(result)
    returned = module.main(["--quick"] if args.quick else [])
    result = returned if isinstance(returned, dict) else {"returned": repr(returned)}
    return result, []


def environment(command: list[str]) -> dict:
    import jax

    versions = {}
    for package in ("jax", "jaxlib", "optax", "flax", "keras"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "machine": f"{platform.node() or 'host'}-{jax.default_backend()}-{os.cpu_count()}cpu",
        "cpu": platform.processor() or platform.machine(),
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "device_kind": jax.devices()[0].device_kind,
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "command": " ".join(["python", "benchmarks/run.py", *command]),
        "versions": versions,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: fewer rounds, sizes")
    parser.add_argument("--only", help="sections to run, comma-separated (see --list)")
    parser.add_argument("--rounds", type=int, help="trace + compile rounds (compile, whole_step)")
    parser.add_argument("--reps", type=int, help="timed rounds of the compiled steps")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--list", action="store_true", help="list the sections and exit")
    args = parser.parse_args(argv)
    if args.list:
        for name, module in SECTIONS.items():
            print(f"{name:14s} {module}{'  (default)' if name in DEFAULT else ''}")
        return {}
    names = args.only.split(",") if args.only else list(DEFAULT)
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {unknown}; known: {', '.join(SECTIONS)}")

    started = time.perf_counter()
    results = environment(sys.argv[1:] if argv is None else argv)
    results["mode"] = "quick" if args.quick else "full"
    results["sections"] = {}
    print(
        f"optax_constraints benchmark - {results['machine']} ({results['device_kind']})"
        f" - {results['date']} - jax {results['versions']['jax']} - {results['mode']}",
        flush=True,
    )
    stem = f"{results['machine']}-{datetime.date.today().isoformat()}"
    stem += "-quick" if args.quick else ""
    stem += f"-{'-'.join(names)}" if args.only else ""
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{stem}.json"
    failed = []
    for name in names:
        print(f"\n== {name} ==", flush=True)
        t0 = time.perf_counter()
        try:
            result, lines = run_section(name, args)
        except Exception:  # one broken section must not lose the others' figures
            traceback.print_exc()
            failed.append(name)
            results["sections"][name] = {"error": traceback.format_exc(limit=3)}
            continue
        result["seconds"] = time.perf_counter() - t0
        results["sections"][name] = result
        print("\n".join(lines), flush=True)
        results["seconds"] = time.perf_counter() - started
        path.write_text(json.dumps(results, indent=1))  # after each section: a cut run keeps them
    results["seconds"] = time.perf_counter() - started
    path.write_text(json.dumps(results, indent=1))
    print(f"\nwrote {path} ({results['seconds']:.0f} s)")
    if failed:
        raise SystemExit(f"sections failed: {', '.join(failed)}")
    return results


if __name__ == "__main__":
    main()
