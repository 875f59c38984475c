"""How close is `SpectralNorm`'s power method to sigma_max? Accuracy, not time.

    python -m benchmarks.power_method

Two tables (float32, CPU or any device; deterministic seeds):

* cold starts: `power_iteration_until_settled` from 20 random unit vectors on
  matrices with chosen spectra, its relative error against NumPy's float64
  sigma_max and the iterations it ran (the figures quoted in its docstring);
* training: the largest sigma_max / bound over the steps of `sgd(0.1)` (and
  Adam) least squares, A 200x64 Gaussian, W 64x32, with the default
  (`max_iters` 100) and with one iteration per step (`max_iters=1`, the
  behaviour before the settling loop), and the iterations per step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_constraints as oc
from optax_constraints import projections as P


def _spectrum(rng, m, n, s):
    q1, _ = np.linalg.qr(rng.normal(size=(m, len(s))))
    q2, _ = np.linalg.qr(rng.normal(size=(n, len(s))))
    return (q1 * np.asarray(s)) @ q2.T


def cold_starts(seeds: int = 20) -> list[tuple]:
    rng = np.random.default_rng(0)
    cases = {
        "Gaussian 64x32": rng.normal(size=(64, 32)),
        "Gaussian 384x384": rng.normal(size=(384, 384)),
        "Gaussian 1024x256": rng.normal(size=(1024, 256)),
        "Gaussian 1024x1024": rng.normal(size=(1024, 1024)),
        "s1 = s2 (degenerate)": _spectrum(rng, 64, 32, [1, 1, *np.linspace(0.9, 0.1, 30)]),
        "s2/s1 = 0.999": _spectrum(rng, 64, 32, [1, 0.999, *np.linspace(0.9, 0.1, 30)]),
        "s2/s1 = 0.99": _spectrum(rng, 64, 32, [1, 0.99, *np.linspace(0.9, 0.1, 30)]),
        "s2/s1 = 0.95": _spectrum(rng, 64, 32, [1, 0.95, *np.linspace(0.9, 0.1, 30)]),
        "32 values in [0.98, 1]": _spectrum(rng, 64, 32, np.linspace(1, 0.98, 32)),
        "8 values in [0.97, 1]": _spectrum(
            rng, 64, 32, [*np.linspace(1, 0.97, 8), *np.linspace(0.5, 0.1, 24)]
        ),
    }
    settle = jax.jit(P.power_iteration_until_settled, static_argnums=(2, 3))
    rows = []
    for name, w in cases.items():
        true = np.linalg.norm(w, 2)
        w = jnp.asarray(w, jnp.float32)
        errors, iters = [], []
        for seed in range(seeds):
            u = jax.random.normal(jax.random.key(seed), (w.shape[1],))
            sigma, _, _, k = settle(w, u / jnp.linalg.norm(u), 1, P.POWER_MAX_ITERS)
            errors.append(1 - float(sigma) / true)
            iters.append(int(k))
        rows.append((name, max(errors), float(np.median(errors)), max(iters), np.median(iters)))
    return rows


def training(constraint, opt, start: str, steps: int = 300) -> tuple[float, int, list[int]]:
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.normal(size=(200, 64)), jnp.float32)
    y = a @ jnp.asarray(rng.normal(size=(64, 32)), jnp.float32)
    w0 = np.zeros((64, 32)) if start == "zeros" else rng.normal(size=(64, 32)) / 8
    params = {"w": jnp.asarray(w0, jnp.float32)}

    def loss(p):
        return 0.5 * jnp.sum((a @ p["w"] - y) ** 2) / 200

    tx = optax.chain(opt, oc.project(constraint))
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        grads = jax.grad(loss)(params)
        # The kernel the power method sees: the params moved by the optimizer.
        moved = params["w"] + opt.update(grads, state[0], params)[0]["w"]
        iters = P.power_iteration_until_settled(
            P.matrix_view(moved),
            state[1].constraint_states["w"],
            constraint.num_iters,
            constraint._max_iters(),
        )[3]
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, iters

    sigmas, iters = [], []
    for _ in range(steps):
        params, state, k = step(params, state)
        iters.append(int(k))
        sigmas.append(float(np.linalg.norm(np.asarray(params["w"], np.float64), 2)))
    return max(sigmas), int(np.argmax(sigmas)) + 1, iters


def main() -> None:
    print("cold starts (20 random unit vectors, float32, max_iters 100)")
    print(f"{'matrix':24s} {'max rel. error':>14s} {'median':>9s} {'iters max':>9s} {'median':>7s}")
    for name, worst, median, kmax, kmed in cold_starts():
        print(f"{name:24s} {worst:14.2e} {median:9.2e} {kmax:9d} {kmed:7.1f}")
    print()
    print("least squares, A 200x64, W 64x32, SpectralNorm(1.0): max over 300 steps of sigma_max")
    print(
        f"{'optimizer':12s} {'start':6s} {'max_iters':>9s} {'max sigma':>10s} {'at step':>7s}"
        f" {'iters/step mean':>15s} {'max':>4s} {'after step 50':>13s}"
    )
    for opt_name, opt in (("sgd(0.1)", optax.sgd(0.1)), ("adam(0.01)", optax.adam(0.01))):
        for start in ("zeros", "small"):
            for max_iters in (None, 1):
                c = oc.SpectralNorm(1.0, max_iters=max_iters)
                peak, at, iters = training(c, opt, start)
                print(
                    f"{opt_name:12s} {start:6s} {max_iters or 100!s:>9s} {peak:10.5f} {at:7d}"
                    f" {np.mean(iters):15.2f} {max(iters):4d} {np.mean(iters[50:]):13.2f}"
                )


if __name__ == "__main__":
    main()
