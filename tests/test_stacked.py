"""`oc.Stacked` and `oc.OutputFirst`: one constraint per copy, output-first layouts.

The reference for every check is a Python loop over the copies calling the
wrapped constraint on each copy (or on the moved array, for `OutputFirst`),
never our own wrapped output. Both paths run the same float32 formulas on
the same values, so they agree to the last bit or two: the tolerance is
2 ulp of each copy's largest entry (a sum may be associated differently
when its axes are a slice of a bigger array).
"""

from __future__ import annotations

import itertools
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import exported_constraint_classes, norm_ulps, rescaled_norm_rtol
from helpers import ulps as ulps_of

import optax_constraints as oc
from benchmarks import _traffic


@oc.register(package="test_stacked")
class Shrink(oc.Constraint):
    """A custom constraint with a hyper-parameter (registered, serializable)."""

    def __init__(self, factor=0.5):
        self.factor = factor

    def __call__(self, w):
        return w * self.factor - jnp.mean(w)

    def get_config(self):
        return {"factor": self.factor}


# Every built-in constraint, with axes that differ on a stacked leaf, plus
# a custom subclass and a plain function.
INNER = [
    oc.MaxNorm(1.0, axis="fan_in"),
    oc.MaxNorm(1.0, axis=0),
    oc.MaxNorm(2.0, axis=-1),
    oc.MinMaxNorm(0.5, 1.0, rate=0.7, axis="fan_in"),
    oc.UnitNorm(axis=(0, 1)),
    oc.Sphere(2.0, axis="fan_in"),
    oc.NonNeg(),
    oc.Clip(-0.5, 0.5),
    oc.CenterAround(0.2),
    oc.L1Ball(1.0, axis="fan_in"),
    oc.Simplex(axis=-1),
    oc.SpectralNorm(1.0),
    oc.SpectralNorm(1.0, method="svd"),
    oc.Orthogonal(),
    oc.Orthogonal(method="newton_schulz"),
    Shrink(0.25),
    oc.FunctionConstraint(jnp.tanh),
]
WRAPPERS = (oc.Stacked, oc.OutputFirst)
EPS32 = float(np.finfo(np.float32).eps)

# (leaf shape, stack_axis): every copy is (5, 3), in different places.
LAYOUTS = [
    ((4, 5, 3), 0),
    ((5, 3, 4), -1),
    ((2, 5, 3, 3), (0, 2)),
    ((2, 5, 3, 3), [2, 0]),
    ((3, 5, 2, 3), (0, -2)),
]


def _kernel(shape, seed=0, dtype=jnp.float32):
    return jnp.asarray(2.0 * np.random.default_rng(seed).normal(size=shape) + 0.5, dtype)


def _np(x):
    return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


def _stack_axes(shape, stack_axis):
    axes = (stack_axis,) if isinstance(stack_axis, int) else tuple(stack_axis)
    return tuple(sorted(a % len(shape) for a in axes))


def _copies(shape, stack_axis):
    """Index tuples selecting each copy of a leaf (a loop, written here)."""
    stacked = _stack_axes(shape, stack_axis)
    for idx in itertools.product(*[range(shape[a]) for a in stacked]):
        where = [slice(None)] * len(shape)
        for a, i in zip(stacked, idx):
            where[a] = i
        yield tuple(where)


def per_copy_loop(fn, w, stack_axis):
    """`fn` applied to each copy of `w` on its own, in a Python loop."""
    out = np.zeros(w.shape, np.float64)
    for where in _copies(w.shape, stack_axis):
        out[where] = _np(fn(w[where]))
    return out


def violation_slack(inner, copies) -> float:
    """Both sides' rounding of a violation computed from each copy's `n` entries.

    Sums over a copy (`2 * norm_ulps(n)`: a vmapped and a looped program may
    order them differently), at the magnitude of what is summed: the squares
    for `Orthogonal`'s Gram matrix, the norm (plus a bound of at most 2)
    otherwise; the largest over the copies.
    """
    sumsq = max(float(np.sum(_np(copy) ** 2)) for copy in copies)
    scale = sumsq if isinstance(inner, oc.Orthogonal) else np.sqrt(sumsq) + 2.0
    return ulps_of(scale, 2 * norm_ulps(np.size(copies[0])))


def assert_close_ulps(actual, expected, dtype=jnp.float32, ulps=2):
    """|actual - expected| <= `ulps` ulp of the expected array's largest entry."""
    actual, expected = _np(actual), _np(expected)
    scale = max(np.max(np.abs(expected)), np.finfo(np.float32).tiny)
    tol = ulps * float(np.spacing(np.float32(scale))) if dtype == jnp.float32 else 0
    np.testing.assert_allclose(actual, expected, rtol=0, atol=tol)


def test_every_builtin_constraint_is_covered():
    covered = {type(c) for c in INNER}
    builtin = {cls for cls in exported_constraint_classes() if cls not in WRAPPERS}
    assert builtin <= covered, builtin - covered


# --- per copy, directly ---------------------------------------------------------


@pytest.mark.parametrize("shape,stack_axis", LAYOUTS, ids=str)
@pytest.mark.parametrize("inner", INNER, ids=repr)
def test_each_copy_gets_the_constraint_on_its_own(inner, shape, stack_axis):
    w = _kernel(shape)
    c = oc.Stacked(inner, stack_axis=stack_axis)
    c.check_leaf(shape, w.dtype)
    expected = per_copy_loop(inner, w, stack_axis)
    assert_close_ulps(c(w), expected)
    assert_close_ulps(jax.jit(c)(w), expected)
    # The violation is the worst copy's.
    worst = max(float(inner.violation(w[where])) for where in _copies(shape, stack_axis))
    slack = violation_slack(inner, [w[where] for where in _copies(shape, stack_axis)])
    np.testing.assert_allclose(float(c.violation(w)), worst, rtol=0, atol=slack)


@pytest.mark.parametrize("inner", [oc.MaxNorm(1.0, axis="fan_in"), oc.Orthogonal()], ids=repr)
def test_without_stacked_the_stack_is_one_array(inner):
    # The mistake Stacked exists to stop: the stacked kernel is not per layer.
    w = _kernel((4, 5, 3))
    assert np.max(np.abs(_np(inner(w)) - per_copy_loop(inner, w, 0))) > 0.1


def test_copies_in_bfloat16_are_computed_in_float32():
    inner = oc.MaxNorm(1.0, axis="fan_in")
    w = _kernel((4, 5, 3), dtype=jnp.bfloat16)
    out = oc.Stacked(inner)(w)
    assert out.dtype == jnp.bfloat16
    expected = per_copy_loop(lambda x: inner(x.astype(jnp.float32)), w, 0)
    # One rounding of the float32 result to bfloat16: half a bf16 ulp.
    np.testing.assert_allclose(_np(out), expected, rtol=2.0**-8, atol=0)


# --- state --------------------------------------------------------------------


def test_spectral_norm_power_keeps_one_state_per_copy():
    inner = oc.SpectralNorm(1.0, num_iters=2)
    c = oc.Stacked(inner)
    w = _kernel((4, 5, 3))
    state = c.init_state(w)
    assert state.shape == (4, 3)
    expected_state = np.stack([_np(inner.init_state(w[i])) for i in range(4)])
    assert_close_ulps(state, expected_state)
    out, new_state = jax.jit(c.apply)(w, state, jnp.int32(3))
    for i in range(4):
        out_i, state_i = inner.apply(w[i], state[i], 3)
        assert_close_ulps(out[i], out_i)
        assert_close_ulps(new_state[i], state_i)


def test_several_stack_axes_stack_the_state_in_leaf_axis_order():
    inner = oc.SpectralNorm(1.0)
    w = _kernel((2, 5, 3, 3))  # copies (5, 3) along axes 0 and 2
    state = oc.Stacked(inner, stack_axis=(2, 0)).init_state(w)
    assert state.shape == (2, 3, 3)
    for i, j in itertools.product(range(2), range(3)):
        assert_close_ulps(state[i, j], inner.init_state(w[i, :, j]))


@pytest.mark.parametrize(
    "inner", [oc.MaxNorm(1.0, axis="fan_in"), oc.NonNeg(), oc.Orthogonal()], ids=repr
)
def test_stateless_constraints_stay_stateless(inner):
    assert oc.Stacked(inner).init_state(_kernel((4, 5, 3))) is None
    params = {"w": _kernel((4, 5, 3))}
    assert oc.project(oc.Stacked(inner)).init(params).constraint_states == {}


# --- inside project ---------------------------------------------------------------


def _project_steps(constraint, params, n, **kwargs):
    tx = optax.chain(optax.sgd(0.1), oc.project({"c": constraint}, {"w": "c"}, **kwargs))
    state = tx.init(params)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), updates, state

    rng = np.random.default_rng(7)
    history = []
    for _ in range(n):
        grads = {"w": jnp.asarray(rng.normal(size=params["w"].shape), params["w"].dtype)}
        before, state_before = params, state
        params, updates, state = step(params, state, grads)
        history.append((before, grads, updates, params, state_before, state))
    return history


@pytest.fixture(autouse=True)
def _fresh_trace_counter():
    chex.clear_trace_counter()


@pytest.mark.parametrize("shape,stack_axis", LAYOUTS[:3], ids=str)
@pytest.mark.parametrize("inner", INNER, ids=repr)
def test_update_space_form_lands_on_each_copys_projection(inner, shape, stack_axis):
    c = oc.Stacked(inner, stack_axis=stack_axis)
    steps = _project_steps(c, {"w": _kernel(shape)}, 2)
    for t, (before, grads, updates, after, state_before, _) in enumerate(steps):
        moved = before["w"] - 0.1 * grads["w"]
        expected = np.zeros(shape)
        old = state_before[1].constraint_states.get("w")
        for k, where in enumerate(_copies(shape, stack_axis)):
            # A stateful copy is projected with its own state (one per copy).
            copy_state = None if old is None else old.reshape(-1, old.shape[-1])[k]
            expected[where] = _np(inner.apply(moved[where], copy_state, jnp.int32(t))[0])
        # p + u' lands within rounding of the move on C(p + u): a few ulps,
        # and for the SVD-based projections the SVD's own backward error too
        # (about n * eps * sigma_max with n <= 5 here).
        scale = np.max(np.abs(_np(updates["w"]))) + np.max(np.abs(expected))
        ulps = 16 if isinstance(inner, oc.SpectralNorm | oc.Orthogonal) else 4
        np.testing.assert_allclose(_np(after["w"]), expected, rtol=0, atol=ulps * EPS32 * scale)


def test_stacked_spectral_norm_in_project_equals_separate_leaves():
    inner = oc.SpectralNorm(1.0)
    w = _kernel((4, 5, 3))
    stacked = _project_steps(oc.Stacked(inner), {"w": w}, 3)
    rng = np.random.default_rng(7)
    grads = [rng.normal(size=w.shape).astype(np.float32) for _ in range(3)]
    for i in range(4):
        tx = optax.chain(optax.sgd(0.1), oc.project(inner))
        p = {"w": w[i]}
        s = tx.init(p)
        for t in range(3):
            u, s = tx.update({"w": jnp.asarray(grads[t][i])}, s, p)
            p = optax.apply_updates(p, u)
            _, _, _, after, _, state = stacked[t]
            assert_close_ulps(after["w"][i], p["w"], ulps=8)
            assert_close_ulps(
                state[1].constraint_states["w"][i], s[1].constraint_states["w"], ulps=8
            )


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_stacked_nonneg_is_exact_after_apply_updates(dtype):
    params = {"w": _kernel((4, 5, 3), dtype=dtype)}
    for _, _, _, after, _, _ in _project_steps(oc.Stacked(oc.NonNeg()), params, 3):
        assert after["w"].dtype == dtype
        assert np.all(_np(after["w"]) >= 0)
        assert not np.any(np.signbit(_np(after["w"])))


@pytest.mark.parametrize(
    "wrapper", [oc.Stacked, oc.OutputFirst, lambda c: oc.Stacked(oc.OutputFirst(c))]
)
@pytest.mark.parametrize("inner", [oc.NonNeg(), oc.Clip(-1.0, 1.0)], ids=repr)
def test_wrapped_elementwise_constraints_keep_their_own_update_form(wrapper, inner):
    c = wrapper(inner)
    assert c.elementwise
    p, u = _kernel((4, 5, 3)), _kernel((4, 5, 3), seed=1)
    new_u, _ = c.project_update(p, u, None, jnp.int32(0))
    own_u, _ = inner.project_update(p, u, None, jnp.int32(0))
    np.testing.assert_array_equal(np.asarray(new_u), np.asarray(own_u))
    for wrapped_norm in (oc.Stacked(oc.MaxNorm()), oc.OutputFirst(oc.Orthogonal())):
        assert not wrapped_norm.elementwise


def test_stacked_nonneg_fuses_into_adams_last_pass():
    # Stacked like the shapes of a scanned transformer, abstract (not run).
    params = {
        "kernel": jax.ShapeDtypeStruct((8, 512, 512), jnp.float32),
        "bias": jax.ShapeDtypeStruct((8, 512), jnp.float32),
    }

    def moved(tx):
        def step(p, s, g):
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s

        state = jax.eval_shape(tx.init, params)
        compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, params).compile()
        return _traffic.bytes_moved(compiled), compiled.memory_analysis().temp_size_in_bytes

    adam = optax.adam(1e-3)
    plain, _ = moved(adam)
    stacked, temp = moved(optax.chain(adam, oc.project(oc.Stacked(oc.NonNeg()))))
    flat, _ = moved(optax.chain(adam, oc.project(oc.NonNeg())))
    assert stacked <= flat * 1.001 and stacked <= plain * 1.01
    assert temp <= 64 * 1024


def test_every_k_steps_projects_stacked_leaves_only_when_due():
    inner = oc.MaxNorm(1.0, axis="fan_in")
    steps = _project_steps(oc.Stacked(inner), {"w": 3 * _kernel((4, 5, 3))}, 4, every_k_steps=2)
    for t, (before, grads, updates, after, _, _) in enumerate(steps, start=1):
        moved = before["w"] - 0.1 * grads["w"]
        if t % 2:
            np.testing.assert_array_equal(np.asarray(updates["w"]), np.asarray(-0.1 * grads["w"]))
        else:
            expected = per_copy_loop(inner, moved, 0)
            # Each side's projection rounding (units of 5), then p + u' (one ulp).
            slack = ulps_of(expected, 2 * norm_ulps(5))
            slack += ulps_of(np.abs(_np(updates["w"])).max() + np.abs(expected).max(), 1)
            np.testing.assert_allclose(_np(after["w"]), expected, rtol=0, atol=slack)


def test_schedules_of_the_wrapped_constraint_follow_the_step():
    schedule = optax.linear_schedule(3.0, 1.0, 4)
    c = oc.Stacked(oc.MaxNorm(schedule, axis="fan_in"))
    assert float(c.at_step(4).constraint.max_value) == 1.0
    steps = _project_steps(c, {"w": 5 * _kernel((4, 5, 3))}, 5)
    for t, (_, _, _, after, _, _) in enumerate(steps):
        norms = np.linalg.norm(_np(after["w"]), axis=1)  # per layer, per output unit
        bound = float(schedule(t))
        # The rescaled norm's rounding and Keras's epsilon, then p + u' (an ulp).
        rtol = rescaled_norm_rtol(5, bound) + EPS32
        assert np.max(norms) <= bound * (1 + rtol)
        assert np.max(norms) >= bound * (1 - rtol)  # it binds: the kernel is large


def test_apply_constraints_and_violations_take_stacked():
    inner = oc.MaxNorm(1.0, axis="fan_in")
    params = {"w": 3 * _kernel((4, 5, 3))}
    out = oc.apply_constraints(params, oc.Stacked(inner))
    assert_close_ulps(out["w"], per_copy_loop(inner, params["w"], 0))
    v = oc.constraint_violations(params, {"k": oc.Stacked(inner)}, {"w": "k"})
    norms = np.linalg.norm(_np(params["w"]), axis=1)
    per_layer = norms.max() - 1.0
    # The float32 norm over a unit of 5, minus the bound.
    np.testing.assert_allclose(
        float(v["k"]), per_layer, rtol=0, atol=ulps_of(norms.max(), norm_ulps(5))
    )
    assert float(oc.constraint_violations(out, {"k": oc.Stacked(inner)}, {"w": "k"})["k"]) == 0


# --- bad leaves and bad arguments ----------------------------------------------------


def test_leaf_without_the_stack_axes_fails_at_init_naming_it():
    params = {"block": {"kernel": jnp.ones((4, 5, 3)), "scale": jnp.ones(())}}
    tx = oc.project(oc.Stacked(oc.NonNeg(), stack_axis=0))
    with pytest.raises(ValueError, match=r"block/scale.*\(\).*stack_axis 0 is out of range"):
        tx.init(params)


def test_copy_the_inner_constraint_rejects_fails_at_init_naming_it():
    params = {"layers": {"kernel": jnp.ones((4, 5, 3)), "bias": jnp.ones((4, 3))}}
    tx = oc.project(oc.Stacked(oc.Orthogonal()))
    with pytest.raises(ValueError, match=r"layers/bias.*\(4, 3\).*copy.*\(3,\).*2 dimensions"):
        tx.init(params)
    tx = oc.project(
        {"k": oc.Stacked(oc.MaxNorm(axis=2))}, {"layers": {"kernel": "k", "bias": None}}
    )
    with pytest.raises(ValueError, match=r"layers/kernel.*\(5, 3\).*axis 2 is out of range"):
        tx.init(params)


@pytest.mark.parametrize("bad", ["layers", [], (0, 0), 1.5, True, None])
def test_bad_stack_axis_fails_at_construction(bad):
    with pytest.raises(ValueError, match="stack_axis must be"):
        oc.Stacked(oc.NonNeg(), stack_axis=bad)


def test_stack_axes_that_coincide_on_a_leaf_fail_at_init():
    with pytest.raises(ValueError, match="same dimension twice"):
        oc.project(oc.Stacked(oc.NonNeg(), stack_axis=(0, -3))).init({"w": jnp.ones((2, 3, 4))})


@pytest.mark.parametrize("wrapper", WRAPPERS)
def test_wrapper_needs_a_constraint(wrapper):
    with pytest.raises(TypeError, match="needs the constraint"):
        wrapper(None)


# --- config, hash, equality -----------------------------------------------------------

CONFIG_CASES = [
    oc.Stacked(oc.MaxNorm(2.0, axis="fan_in")),
    oc.Stacked(oc.SpectralNorm(0.5, method="svd"), stack_axis=(0, -1)),
    oc.Stacked(Shrink(0.3), stack_axis=1),
    oc.Stacked(oc.OutputFirst(oc.MaxNorm(1.0, axis="fan_in"))),
    oc.Stacked(oc.Stacked(oc.NonNeg()), stack_axis=1),
    oc.OutputFirst(oc.Orthogonal(method="newton_schulz", num_iters=7)),
    oc.OutputFirst(Shrink()),
]


@pytest.mark.parametrize("c", CONFIG_CASES, ids=repr)
def test_config_round_trips_through_json(c):
    d = oc.serialize(c)
    assert d["class_name"] == type(c).__name__ and d["module"] == "optax_constraints"
    text = json.dumps(d)
    back = oc.deserialize(json.loads(text))
    assert type(back) is type(c) and back == c and hash(back) == hash(c)
    assert oc.get(json.loads(text)) == c
    assert type(c).from_config(c.get_config()) == c
    w = _kernel((3, 4, 5, 2))
    np.testing.assert_array_equal(np.asarray(back(w)), np.asarray(c(w)))


def test_config_nests_the_wrapped_constraints_config():
    c = oc.Stacked(oc.MaxNorm(2.0, axis="fan_in"), stack_axis=(0, 1))
    assert c.get_config() == {
        "constraint": {
            "module": "optax_constraints",
            "class_name": "MaxNorm",
            "config": {"max_value": 2.0, "axis": "fan_in"},
            "registered_name": None,
        },
        "stack_axis": [0, 1],
    }
    custom = oc.serialize(oc.Stacked(Shrink()))["config"]["constraint"]
    assert custom["registered_name"] == "test_stacked>Shrink"


def test_hash_and_equality_by_config():
    a = oc.Stacked(oc.MaxNorm(2.0), stack_axis=0)
    assert a == oc.Stacked(oc.MaxNorm(2.0), stack_axis=(0,))
    assert hash(a) == hash(oc.Stacked(oc.MaxNorm(2.0), stack_axis=[0]))
    assert a == oc.Stacked("max_norm")  # MaxNorm's defaults: max_value=2, axis=0
    assert a != oc.Stacked(oc.MaxNorm(2.0), stack_axis=1)
    assert a != oc.Stacked(oc.MaxNorm(3.0))
    assert a != oc.MaxNorm(2.0)
    assert oc.OutputFirst(oc.NonNeg()) != oc.Stacked(oc.NonNeg())
    # Plain functions hash too (by identity), so jitted steps can close over them.
    assert hash(oc.Stacked(jnp.tanh)) == hash(oc.Stacked(jnp.tanh))
    assert len({a, oc.Stacked(oc.MaxNorm(2.0)), oc.OutputFirst(oc.NonNeg())}) == 2


def test_repr_reads_like_the_call():
    assert (
        repr(oc.Stacked(oc.NonNeg(), stack_axis=(0, 1))) == "Stacked(NonNeg(), stack_axis=(0, 1))"
    )
    assert repr(oc.OutputFirst(oc.UnitNorm())) == "OutputFirst(UnitNorm(axis=0))"


def test_plain_functions_wrap_but_do_not_serialize():
    c = oc.Stacked(jnp.tanh)
    w = _kernel((2, 3))
    np.testing.assert_array_equal(np.asarray(c(w)), np.asarray(jnp.tanh(w)))
    with pytest.raises(TypeError, match="cannot write"):
        oc.serialize(c)


# --- OutputFirst ------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(5, 3), (6, 2, 3, 3)], ids=str)
@pytest.mark.parametrize("inner", INNER, ids=repr)
def test_output_first_sees_the_output_axis_last(inner, shape):
    w = _kernel(shape)
    c = oc.OutputFirst(inner)
    c.check_leaf(shape, w.dtype)
    expected = np.moveaxis(_np(inner(jnp.moveaxis(w, 0, -1))), -1, 0)
    assert_close_ulps(c(w), expected)
    np.testing.assert_allclose(
        float(c.violation(w)),
        float(inner.violation(jnp.moveaxis(w, 0, -1))),
        rtol=0,
        atol=violation_slack(inner, [w]),
    )


def test_output_first_fan_in_is_per_output_unit():
    w = 3 * _kernel((8, 3, 5, 5))  # eqx.nn.Conv2d(3, 8, 5).weight: (out, in, kh, kw)
    out = _np(oc.OutputFirst(oc.MaxNorm(1.0, axis="fan_in"))(w))
    norms = np.linalg.norm(out.reshape(8, -1), axis=1)
    np.testing.assert_allclose(norms, 1.0, rtol=rescaled_norm_rtol(75, 1.0))
    w = _kernel((6, 4))
    out = _np(oc.OutputFirst(oc.Orthogonal())(w))  # (out, in), out > in: orthonormal columns
    # The SVD's U and V are orthonormal to its backward error whatever the
    # conditioning (a reflection per row and column), then U V^T's 4-term sums.
    np.testing.assert_allclose(out.T @ out, np.eye(4), rtol=0, atol=ulps_of(1.0, 2 * norm_ulps(10)))


@pytest.mark.parametrize("inner", [oc.MaxNorm(1.0, axis="fan_in"), oc.SpectralNorm(1.0)], ids=repr)
def test_stacked_output_first_is_per_layer_per_output_unit(inner):
    w = 3 * _kernel((4, 6, 5))  # a vmapped eqx.nn.Linear(5, 6): (layers, out, in)
    c = oc.Stacked(oc.OutputFirst(inner))
    expected = np.stack([_np(oc.OutputFirst(inner)(w[i])) for i in range(4)])
    assert_close_ulps(c(w), expected)
    assert c.describe_leaf(w.shape) == (
        "4 x 6 units of 5" if isinstance(inner, oc.MaxNorm) else "4 x (5, 6) matrix"
    )
    state = c.init_state(w)
    if state is not None:
        assert state.shape == (4, 6)  # one power-iteration vector (out,) per layer


def test_output_first_norms_translate_axes_instead_of_transposing():
    w = jax.ShapeDtypeStruct((64, 32, 3, 3), jnp.float32)
    c = oc.OutputFirst(oc.MaxNorm(1.0, axis="fan_in"))
    assert "transpose" not in str(jax.make_jaxpr(c)(w))
    assert "transpose" not in str(
        jax.make_jaxpr(oc.Stacked(c))(jax.ShapeDtypeStruct((4, 8, 6), jnp.float32))
    )
    assert c.on_leaf_axes((0, 1, 2, 3), 4) == oc.MaxNorm(1.0, axis=(1, 2, 3))


def test_output_first_rejects_what_the_moved_leaf_does_not_fit():
    params = {"linear": {"weight": jnp.ones((6, 5)), "bias": jnp.ones(6)}}
    with pytest.raises(ValueError, match=r"linear/bias.*\(6,\).*2 dimensions"):
        oc.project(oc.OutputFirst(oc.SpectralNorm())).init(params)
    with pytest.raises(ValueError, match="scalar"):
        oc.OutputFirst(oc.NonNeg()).check_leaf((), jnp.float32)


# --- how the routing report shows it --------------------------------------------------------


def test_describe_leaf():
    shape = (4, 16, 16)
    assert oc.MaxNorm(axis="fan_in").describe_leaf(shape) == "16 units of 64"
    assert oc.Stacked(oc.MaxNorm(axis="fan_in")).describe_leaf(shape) == "4 x 16 units of 16"
    assert oc.Orthogonal().describe_leaf(shape) == "(64, 16) matrix"
    assert oc.Stacked(oc.Orthogonal()).describe_leaf(shape) == "4 x (16, 16) matrix"
    conv = (4, 3, 3, 8, 16)  # 4 scanned Conv layers
    assert oc.Stacked(oc.SpectralNorm(), (0, -1)).describe_leaf(conv) == "4 x 16 x (9, 8) matrix"
    assert oc.Stacked(oc.NonNeg()).describe_leaf(shape) == "elementwise"
    assert oc.Stacked(Shrink()).describe_leaf(shape) == "4 x whole (16, 16)"
    assert oc.MaxNorm(axis=None).describe_leaf((3,)) == "1 unit of 3"


def test_routing_report_shows_the_view():
    params = {"layers": {"kernel": jnp.ones((4, 16, 16)), "bias": jnp.ones((4, 16))}}
    labels = oc.label_by_path({"**/kernel": "k"})
    plain = oc.routing_report(params, {"k": oc.MaxNorm(2.0, axis="fan_in")}, labels)
    stacked = oc.routing_report(params, {"k": oc.Stacked(oc.MaxNorm(2.0, axis="fan_in"))}, labels)
    assert "16 units of 64" in plain and "4 x 16 units of 16" not in plain
    assert "4 x 16 units of 16" in stacked
