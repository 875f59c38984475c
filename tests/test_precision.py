"""Low precision: dtypes are kept, and the norm bounds hold to a measured rounding.

Each case draws many units (columns of a `(fan_in, units)` kernel) with chosen
norms, takes one `project` step through `optax.apply_updates`, and compares
the unit norms of the new parameters (measured in float64) with the exact
projection computed in float64 with Keras's formulas. The figures in
`docs/precision.md` come from running this file as a script:

    KERAS_BACKEND=jax python tests/test_precision.py

Notation: `eps = jnp.finfo(dtype).eps` (2^-7 for bfloat16, 2^-10 for float16,
2^-23 for float32); `d` is the move `C(p + u) - p` of one unit.

Bounds asserted (the rounding analysis behind them, and the largest values
measured, are in `docs/precision.md`):

* update space, bf16/fp16 params and updates (two roundings: the update, then
  `p + u'`): `|norm - exact| <= 0.51 * eps * (exact + |d|)`; for a feasible
  start and `|u| <= max_value`, MaxNorm/MinMaxNorm give
  `norm <= max_value * (1 + 1.01 * eps)`;
* update space, bf16/fp16 params with float32 updates, and
  `apply_constraints` (one rounding of the float32 projection):
  `norm <= exact * (1 + 0.51 * eps)`;
* float32: `apply_constraints` within `6 * 2^-24` relative of the exact
  projection; after `apply_updates`, `|norm - exact| <= 6 * 2^-24 * (exact + |d|)`
  and, from a feasible start with `|u| <= max_value`,
  `norm <= max_value * (1 + 8 * 2^-24)`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_constraints as oc

KERAS_EPS = 1e-7  # keras.backend.epsilon(), in every norm denominator
LOW = [jnp.bfloat16, jnp.float16]
FLOATS = [jnp.float32, jnp.bfloat16, jnp.float16]


# -- float64 references (Keras's formulas, no rounding) ----------------------


def exact_projection(name: str, w: np.ndarray, hp: dict) -> np.ndarray:
    """Keras's formula for constraint `name` on a `(fan_in, units)` array, in float64."""
    norms = np.sqrt(np.sum(w * w, axis=0, keepdims=True))
    if name == "MaxNorm":
        desired = np.clip(norms, 0, hp["max_value"])
    elif name == "UnitNorm":
        desired = np.ones_like(norms)
    else:  # MinMaxNorm
        desired = hp["rate"] * np.clip(norms, hp["min_value"], hp["max_value"])
        desired = desired + (1 - hp["rate"]) * norms
    return w * (desired / (KERAS_EPS + norms))


def make_constraint(name: str, hp: dict) -> oc.Constraint:
    return {"MaxNorm": oc.MaxNorm, "UnitNorm": oc.UnitNorm, "MinMaxNorm": oc.MinMaxNorm}[name](
        **hp, axis=0
    )


def hyper_parameters(name: str, max_value: float) -> dict:
    if name == "MaxNorm":
        return {"max_value": max_value}
    if name == "UnitNorm":
        return {}
    return {"min_value": 0.5 * max_value, "max_value": max_value, "rate": 1.0}


def columns_with_norms(rng, fan_in: int, norms: np.ndarray) -> np.ndarray:
    """Random directions, one per column, scaled to the given norms (float64)."""
    x = rng.standard_normal((fan_in, norms.size))
    return x / np.linalg.norm(x, axis=0, keepdims=True) * norms


def as_f64(x) -> np.ndarray:
    return np.asarray(jnp.asarray(x).astype(jnp.float32), np.float64)


def unit_norms64(x) -> np.ndarray:
    return np.linalg.norm(as_f64(x), axis=0)


def worst_ratio(num: np.ndarray, den: np.ndarray) -> float:
    """max(num / den); a zero denominator needs a zero numerator (ratio 0)."""
    assert np.all(num[den == 0] <= 0), "error on a unit whose exact norm is 0"
    return float(np.max(np.where(den > 0, num / np.where(den > 0, den, 1), 0)))


@functools.partial(jax.jit, static_argnames="name")
def _one_step(p, u, hp, name):
    """One `project` step: the new parameters.

    The hyper-parameters are traced (as under `inject_hyperparams`), so one
    compilation serves every `max_value`.
    """
    constraint = make_constraint(name, hp)
    tx = oc.project(constraint)
    projected, _ = tx.update(u, tx.init(p), p)
    return optax.apply_updates(p, projected)


@functools.partial(jax.jit, static_argnames="name")
def _apply_constraints(w, hp, name):
    # Its own jit: fused with the step that makes `w`, XLA may skip rounding
    # `w` to bf16 before the projection reads it (excess precision).
    return oc.apply_constraints(w, make_constraint(name, hp))


def measure(
    name: str,
    param_dtype,
    update_dtype,
    fan_in: int,
    *,
    regime: str,
    max_value: float = 2.0,
    units: int = 4096,
    seed: int = 0,
) -> dict[str, float]:
    """One batch of units: the rounding of one `project` step, in units of `eps`.

    `regime="train"`: parameter norms in [0.5, 0.99] * bound and steps no
    longer than `bound` (`bound` = `max_value`, or 1 for UnitNorm); `"far"`:
    norms from 0.01 to 100 * bound and steps up to 10 * bound.

    Returns the largest, over units, of
      `update_c`: (norm - bound) / (eps * bound) after `apply_updates`, where
        `bound` is the largest feasible norm (`max_value`; 1 for UnitNorm):
        how far the result overshoots the constraint;
      `move_c`: |norm - exact| / (eps * (exact + |d|) + 2 * floor) after
        `apply_updates`;
      `direct_c`: |norm - exact| / (eps * exact + floor) for
        `apply_constraints` on the parameters plain training reaches (`p + u`
        rounded to the param dtype).
    `floor = smallest_subnormal * sqrt(fan_in)` accounts for subnormal
    entries, whose rounding error is absolute, not relative (it matters for
    float16 only: its subnormals start below 6.1e-5).
    """
    rng = np.random.default_rng(seed)
    bound = 1.0 if name == "UnitNorm" else max_value  # the largest feasible norm
    if regime == "train":
        p_norms = rng.uniform(0.5, 0.99, units) * bound
        u_norms = rng.uniform(0.0, 1.0, units) * bound
    else:
        p_norms = np.exp(rng.uniform(np.log(1e-2), np.log(100.0), units)) * bound
        u_norms = np.exp(rng.uniform(np.log(1e-3), np.log(10.0), units)) * bound
    p = jnp.asarray(columns_with_norms(rng, fan_in, p_norms), jnp.float32).astype(param_dtype)
    u = jnp.asarray(columns_with_norms(rng, fan_in, u_norms), jnp.float32).astype(update_dtype)
    hp = hyper_parameters(name, max_value)
    hp_traced = {k: jnp.float32(v) for k, v in hp.items()}
    new = _one_step(p, u, hp_traced, name)
    plain = optax.apply_updates(p, u)  # where plain training lands
    direct = _apply_constraints(plain, hp_traced, name)
    assert new.dtype == direct.dtype == jnp.dtype(param_dtype)
    eps = float(jnp.finfo(param_dtype).eps)

    p64 = as_f64(p)
    target = exact_projection(name, p64 + as_f64(u), hp)  # C(p + u), exactly
    exact = np.linalg.norm(target, axis=0)
    move = np.linalg.norm(target - p64, axis=0)
    norms = unit_norms64(new)
    target_direct = exact_projection(name, as_f64(plain), hp)
    exact_direct = np.linalg.norm(target_direct, axis=0)
    direct_norms = unit_norms64(direct)
    floor = float(jnp.finfo(param_dtype).smallest_subnormal) * np.sqrt(fan_in)
    return {
        "update_c": float(np.max(norms - bound) / (eps * bound)),
        "move_c": worst_ratio(np.abs(norms - exact), eps * (exact + move) + 2 * floor),
        "direct_c": worst_ratio(np.abs(direct_norms - exact_direct), eps * exact_direct + floor),
    }


# -- dtypes ------------------------------------------------------------------


CONSTRAINTS = [
    oc.MaxNorm(1.0),
    oc.MaxNorm(2.0, axis="fan_in"),
    oc.UnitNorm(),
    oc.MinMaxNorm(0.5, 1.0),
    oc.NonNeg(),
    oc.Clip(-0.1, 0.1),
]


@pytest.mark.parametrize("constraint", CONSTRAINTS, ids=repr)
@pytest.mark.parametrize("param_dtype", FLOATS, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("update_dtype", ["same", jnp.float32], ids=["same", "f32-updates"])
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_dtypes_are_kept(constraint, param_dtype, update_dtype, jit):
    update_dtype = param_dtype if update_dtype == "same" else update_dtype
    k1, k2 = jax.random.split(jax.random.key(0))
    params = {"w": jax.random.normal(k1, (5, 3)).astype(param_dtype)}
    grads = {"w": jax.random.normal(k2, (5, 3)).astype(update_dtype)}
    tx = optax.chain(optax.sgd(0.5), oc.project(constraint))
    state = tx.init(params)
    update = jax.jit(tx.update) if jit else tx.update
    updates, _ = update(grads, state, params)
    new = optax.apply_updates(params, updates)
    assert new["w"].dtype == jnp.dtype(param_dtype)
    assert updates["w"].dtype == jnp.dtype(update_dtype)  # projection keeps the update dtype
    constrained = (
        jax.jit(oc.apply_constraints, static_argnums=1) if jit else oc.apply_constraints
    )(params, constraint)
    assert constrained["w"].dtype == jnp.dtype(param_dtype)
    assert bool(jnp.all(jnp.isfinite(new["w"].astype(jnp.float32))))


@pytest.mark.parametrize("dtype", LOW, ids=lambda d: jnp.dtype(d).name)
def test_low_precision_is_computed_in_float32_and_rounded_once(dtype):
    # apply_constraints on a bf16/fp16 leaf equals the float32 projection of the
    # same values, rounded once to the leaf's dtype.
    w = jax.random.normal(jax.random.key(1), (64, 32)).astype(dtype) * 3
    for constraint in [oc.MaxNorm(1.5), oc.UnitNorm(), oc.MinMaxNorm(0.5, 1.0, rate=0.7)]:
        got = oc.apply_constraints(w, constraint)
        in_f32 = constraint(w.astype(jnp.float32)).astype(dtype)
        np.testing.assert_array_equal(as_f64(got), as_f64(in_f32))


# -- bounds ------------------------------------------------------------------


FAN_INS = [1, 2, 3, 8, 64, 512]


@pytest.mark.parametrize("dtype", LOW, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("name", ["MaxNorm", "UnitNorm", "MinMaxNorm"])
@pytest.mark.parametrize("regime", ["train", "far"])
def test_low_precision_bounds(dtype, name, regime):
    worst = {"update_c": -np.inf, "move_c": 0.0, "direct_c": 0.0}
    for i, fan_in in enumerate(FAN_INS):
        for max_value in [1.0] if name == "UnitNorm" else [1.0, 3.7]:
            m = measure(name, dtype, dtype, fan_in, regime=regime, max_value=max_value, seed=i)
            worst = {k: max(worst[k], m[k]) for k in worst}
    # Two roundings (u' = fl(C(p+u) - p), then fl(p + u')): at most half an eps
    # of |C(p+u)| plus half an eps of the move, per unit.
    assert worst["move_c"] <= 0.51, worst
    # apply_constraints rounds the float32 projection once: half an eps.
    assert worst["direct_c"] <= 0.51, worst
    if name != "UnitNorm" and regime == "train":
        # Feasible start, |u| <= max_value: a unit that lands on the cap moved
        # by |d| <= |u| (projection onto a ball is non-expansive), so the cap
        # is exceeded by at most one eps.
        assert worst["update_c"] <= 1.01, worst


@pytest.mark.parametrize("dtype", LOW, ids=lambda d: jnp.dtype(d).name)
def test_mixed_precision_updates_round_once(dtype):
    # bf16/fp16 params with float32 updates: the projected update stays in
    # float32, so apply_updates rounds C(p + u) once, as apply_constraints does.
    for i, fan_in in enumerate(FAN_INS):
        for regime in ["train", "far"]:
            m = measure("MaxNorm", dtype, jnp.float32, fan_in, regime=regime, seed=i)
            assert m["update_c"] <= 0.51, (fan_in, regime, m)
            assert m["direct_c"] <= 0.51, (fan_in, regime, m)


@pytest.mark.parametrize("name", ["MaxNorm", "UnitNorm", "MinMaxNorm"])
def test_float32_bounds(name):
    # Figures in units of 2**-24 (= eps / 2, float32's unit roundoff); the
    # largest measured by `_report` are in the comments.
    for i, fan_in in enumerate([*FAN_INS, 4096]):
        units = 512 if fan_in == 4096 else 2048
        for max_value in [1.0] if name == "UnitNorm" else [2.0, 1e-3, 1e3]:
            for regime in ["train", "far"]:
                m = measure(
                    name, jnp.float32, jnp.float32, fan_in, regime=regime,
                    max_value=max_value, seed=i, units=units,
                )  # fmt: skip
                # apply_constraints: the float32 formula itself (sum of squares,
                # sqrt, divide, multiply) is within 6 * 2**-24 of exact (4.0 measured).
                assert 2 * m["direct_c"] <= 6.0, (fan_in, max_value, regime, m)
                # After apply_updates, plus two roundings: 3.5 measured.
                assert 2 * m["move_c"] <= 6.0, (fan_in, max_value, regime, m)
                if name != "UnitNorm" and regime == "train":
                    # Feasible start, |u| <= max_value:
                    # norm <= max_value * (1 + 8 * 2**-24) (3.6 measured).
                    assert 2 * m["update_c"] <= 8.0, (fan_in, max_value, regime, m)


# -- the measurement behind docs/precision.md --------------------------------


def _report(units: int = 16384) -> None:  # pragma: no cover - run by hand
    rows = [("constraint", "params", "updates", "regime", "update_c", "move_c", "direct_c")]
    settings = [
        (jnp.float32, jnp.float32),
        (jnp.bfloat16, jnp.bfloat16),
        (jnp.bfloat16, jnp.float32),
        (jnp.float16, jnp.float16),
        (jnp.float16, jnp.float32),
    ]
    for name in ["MaxNorm", "UnitNorm", "MinMaxNorm"]:
        for pd, ud in settings:
            for regime in ["train", "far"]:
                worst = {"update_c": -np.inf, "move_c": 0.0, "direct_c": 0.0}
                for seed, fan_in in enumerate([1, 2, 3, 8, 64, 512, 4096]):
                    # float16 keeps its entries normal (6e-5 .. 6e4) only for moderate norms.
                    max_values = (
                        [1.0, 2.0, 3.7] if pd == jnp.float16 else [1.0, 2.0, 3.7, 1e-3, 1e3]
                    )
                    if name == "UnitNorm":
                        max_values = [1.0]  # UnitNorm has no max_value
                    for max_value in max_values:
                        m = measure(
                            name,
                            pd,
                            ud,
                            fan_in,
                            regime=regime,
                            max_value=max_value,
                            units=units if fan_in < 4096 else units // 8,
                            seed=seed,
                        )
                        worst = {k: max(worst[k], m[k]) for k in worst}
                rows.append(
                    (
                        name,
                        jnp.dtype(pd).name,
                        jnp.dtype(ud).name,
                        regime,
                        *(f"{worst[k]:.3f}" for k in ("update_c", "move_c", "direct_c")),
                    )
                )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print(" | ".join(c.ljust(w) for c, w in zip(r, widths)))


if __name__ == "__main__":
    _report()
