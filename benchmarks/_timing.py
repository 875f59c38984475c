"""Side-by-side timing: interleaved repetitions in one process, per-round ratios.

Every variant keeps its own (donated) buffers and is called once per round;
the order alternates between rounds so that no variant always runs right
after the same neighbour. A ratio is taken within each round (variant time
divided by the baseline's time in the same round) and summarised over the
rounds by its median and min-max, so that slow drifts in machine load cancel.

Two clocks: wall time (`perf_counter`) and the process's CPU time
(`process_time`, all threads). On a shared machine the wall clock also counts
time spent waiting for a core; CPU time does not, so its ratios are the
steadier figure there. Both are reported.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import jax
import numpy as np


def interleaved(
    runs: dict[str, tuple[Callable, tuple]], reps: int, warmup: int = 2
) -> dict[str, dict[str, np.ndarray]]:
    """Times `step(*carry, *extra)` for every variant, round by round.

    Args:
      runs: name -> (step, (carry..., extra)); `step(*carry, extra)` returns
        the new carry (a tuple), so donated buffers are threaded through.
      reps: rounds.

    Returns:
      name -> {"wall": seconds per round, "cpu": seconds per round}.
    """
    state = {name: list(args) for name, (_, args) in runs.items()}

    def call(name):
        step, _ = runs[name]
        *carry, extra = state[name]
        carry = step(*carry, extra)
        jax.block_until_ready(carry)
        state[name] = [*carry, extra]

    for name in runs:
        for _ in range(warmup):
            call(name)
    times = {name: {"wall": [], "cpu": []} for name in runs}
    names = list(runs)
    for r in range(reps):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            w0, c0 = time.perf_counter(), time.process_time()
            call(name)
            times[name]["cpu"].append(time.process_time() - c0)
            times[name]["wall"].append(time.perf_counter() - w0)
    return {n: {k: np.asarray(v) for k, v in t.items()} for n, t in times.items()}


def ratio_stats(numer: np.ndarray, denom: np.ndarray) -> dict[str, float]:
    """Median and min-max of the per-round ratios `numer[r] / denom[r]`."""
    ratios = np.asarray(numer) / np.asarray(denom)
    return {
        "median": float(np.median(ratios)),
        "min": float(ratios.min()),
        "max": float(ratios.max()),
    }


def time_stats(seconds: np.ndarray) -> dict[str, float]:
    seconds = np.asarray(seconds)
    return {
        "median_ms": float(np.median(seconds) * 1e3),
        "min_ms": float(seconds.min() * 1e3),
        "max_ms": float(seconds.max() * 1e3),
    }


def interleaved_rounds(
    rounds: dict[str, Callable[[], tuple[float, float]]], reps: int
) -> dict[str, dict[str, np.ndarray]]:
    """Like `interleaved`, for variants that time themselves.

    `rounds[name]()` runs one round of that variant and returns its own
    (CPU seconds, wall seconds), e.g. per step over several steps. The order
    alternates between rounds, as in `interleaved`; warm-up is the caller's.

    Returns:
      name -> {"wall": seconds per round, "cpu": seconds per round}.
    """
    times = {name: {"wall": [], "cpu": []} for name in rounds}
    names = list(rounds)
    for r in range(reps):
        for name in names if r % 2 == 0 else names[::-1]:
            cpu, wall = rounds[name]()
            times[name]["cpu"].append(cpu)
            times[name]["wall"].append(wall)
    return {n: {k: np.asarray(v) for k, v in t.items()} for n, t in times.items()}


def summary(times: dict[str, dict[str, np.ndarray]]) -> dict:
    """`time_stats` of both clocks for every variant of `interleaved`'s result."""
    return {n: {c: time_stats(t[c]) for c in ("cpu", "wall")} for n, t in times.items()}


def ratios(times: dict[str, dict[str, np.ndarray]], pairs: Iterable[tuple[str, str]]) -> dict:
    """`"a/b"` -> `ratio_stats` of both clocks, for the pairs present in `times`."""
    return {
        f"{a}/{b}": {c: ratio_stats(times[a][c], times[b][c]) for c in ("cpu", "wall")}
        for a, b in pairs
        if a in times and b in times
    }


def compile_time(jitted, *args) -> tuple[dict, object]:
    """Trace (lower) and XLA compile times of `jitted(*args)`, and the compiled program."""
    w0, c0 = time.perf_counter(), time.process_time()
    lowered = jitted.lower(*args)
    w1, c1 = time.perf_counter(), time.process_time()
    compiled = lowered.compile()
    w2, c2 = time.perf_counter(), time.process_time()
    figures = {
        "trace_s": w1 - w0,
        "compile_s": w2 - w1,
        "total_s": w2 - w0,
        "trace_cpu_s": c1 - c0,
        "total_cpu_s": c2 - c0,
    }
    return figures, compiled


def fmt(stats: dict) -> str:
    """`median [min-max]` of a `ratio_stats` result."""
    return f"{stats['median']:.3f} [{stats['min']:.2f}-{stats['max']:.2f}]"
