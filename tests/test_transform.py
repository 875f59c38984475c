"""`oc.project`, `oc.apply_constraints`, `oc.constraint_violations`: the contract.

Reference values come from NumPy or plain arithmetic; errors are checked for
the moment they are raised (construction or `init`) and for what they name.
"""

import functools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import EPS32, norm_ulps, rescaled_norm_rtol, ulps

import optax_constraints as oc


def make_params(seed=0, scale=2.0):
    rng = np.random.default_rng(seed)

    def arr(*shape):
        return jnp.asarray(rng.standard_normal(shape) * scale, jnp.float32)

    return {
        "dense": {"kernel": arr(5, 4), "bias": arr(4)},
        "conv": {"kernel": arr(3, 3, 2, 4), "bias": arr(4)},
    }


def sgd_like_updates(seed=1, scale=1.0):
    return make_params(seed, scale)


ALL_KERNELS = {"dense": {"kernel": "c", "bias": None}, "conv": {"kernel": "c", "bias": None}}
EVERYTHING = "c"

# (constraint, labels): every class, with the leaves its axis fits.
CONSTRAINT_CASES = {
    "max_norm": (oc.MaxNorm(1.0), ALL_KERNELS),
    "max_norm_fan_in": (oc.MaxNorm(1.0, axis="fan_in"), ALL_KERNELS),
    "min_max_norm": (oc.MinMaxNorm(0.5, 1.5), ALL_KERNELS),
    "min_max_norm_rate": (oc.MinMaxNorm(0.5, 1.5, rate=0.3, axis=-1), EVERYTHING),
    "unit_norm": (oc.UnitNorm(axis=None), EVERYTHING),
    "unit_norm_fan_in": (oc.UnitNorm(axis="fan_in"), ALL_KERNELS),
    "non_neg": (oc.NonNeg(), EVERYTHING),
    "clip": (oc.Clip(-0.5, 0.5), EVERYTHING),
    "center_around": (oc.CenterAround(0.25), EVERYTHING),
    "base_identity": (oc.Constraint(), EVERYTHING),
    "function": (jnp.tanh, EVERYTHING),
}


# --- update semantics ---------------------------------------------------------


def test_unconstrained_updates_come_back_untouched():
    params, updates = make_params(), sgd_like_updates()
    tx = oc.project({"k": oc.MaxNorm(1.0)}, {"dense": {"kernel": "k", "bias": None}, "conv": None})
    out, _ = tx.update(updates, tx.init(params), params)
    for path in (("dense", "bias"), ("conv", "kernel"), ("conv", "bias")):
        a, b = out[path[0]][path[1]], updates[path[0]][path[1]]
        assert a is b  # the very same array object
    assert not np.array_equal(out["dense"]["kernel"], updates["dense"]["kernel"])

    jitted, _ = jax.jit(tx.update)(updates, tx.init(params), params)
    for path in (("dense", "bias"), ("conv", "kernel"), ("conv", "bias")):
        a, b = jitted[path[0]][path[1]], updates[path[0]][path[1]]
        np.testing.assert_array_equal(np.asarray(a).view(np.int32), np.asarray(b).view(np.int32))


def _assert_close_in_ulps(actual, expected, params, n_ulps=4):
    """|actual - expected| within n ulps of the largest magnitude involved.

    `p + (C(p + u) - p)` rounds twice at the scale of `p`, so the bound is in
    ulps of `max(|p|, |C(p + u)|)`, not of the result alone.
    """
    actual, expected, params = (np.asarray(x, np.float32) for x in (actual, expected, params))
    scale = np.maximum(np.abs(params), np.abs(expected))
    np.testing.assert_array_less(np.abs(actual - expected), n_ulps * np.spacing(scale) + 1e-30)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("name", list(CONSTRAINT_CASES))
def test_apply_updates_equals_constraint_of_the_step(name, jit):
    constraint, labels = CONSTRAINT_CASES[name]
    params, updates = make_params(), sgd_like_updates()
    tx = oc.project({"c": constraint}, labels)
    update = jax.jit(tx.update) if jit else tx.update
    new_updates, _ = update(updates, tx.init(params), params)
    got = optax.apply_updates(params, new_updates)
    want = oc.apply_constraints(jax.tree.map(jnp.add, params, updates), {"c": constraint}, labels)
    for g, w, p in zip(jax.tree.leaves(got), jax.tree.leaves(want), jax.tree.leaves(params)):
        assert g.dtype == w.dtype == p.dtype
        _assert_close_in_ulps(g, w, p)


def test_non_neg_is_exact_after_apply_updates():
    params = {"w": jnp.asarray([0.3, 1e-8, 2.0, 0.1, 5.0], jnp.float32)}
    updates = {"w": jnp.asarray([-0.3, -1e-8 * 1.0000001, -2.5, 0.2, -4.9999995], jnp.float32)}
    tx = oc.project(oc.NonNeg())
    new_updates, _ = tx.update(updates, tx.init(params), params)
    got = np.asarray(optax.apply_updates(params, new_updates)["w"])
    assert (got >= 0).all() and not np.signbit(got).any()
    # Where p + u > 0 the update passes through, so the float32 sum is the
    # reference bit for bit; elsewhere p + (-p) is exactly 0.
    want = np.maximum(np.asarray(params["w"]) + np.asarray(updates["w"]), np.float32(0))
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_leaves_keep_their_dtype(dtype):
    params = {"k": jnp.asarray([[3.0, 0.1], [4.0, 0.2]], dtype)}
    updates = {"k": jnp.asarray([[0.5, 0.0], [0.5, 0.0]], dtype)}
    tx = oc.project(oc.MaxNorm(1.0))
    new_updates, _ = tx.update(updates, tx.init(params), params)
    assert new_updates["k"].dtype == dtype
    new = optax.apply_updates(params, new_updates)["k"]
    assert new.dtype == dtype
    target = np.array([[3.5, 0.1], [4.5, 0.2]]) / np.array([np.hypot(3.5, 4.5), 1.0])
    # Computed in float32, then rounded twice: the update u' to the leaf's
    # dtype (at most half an ulp of |u'|) and p + u' (half an ulp of the result).
    half_ulp = float(jnp.finfo(dtype).eps) / 2
    move = np.abs(target - np.array([[3.0, 0.1], [4.0, 0.2]])).max()
    atol = half_ulp * (move + np.abs(target).max())
    np.testing.assert_allclose(np.asarray(new, np.float32), target, rtol=0, atol=atol)


def test_missing_params_raise_optax_message():
    params = make_params()
    tx = oc.project(oc.NonNeg())
    state = tx.init(params)
    assert "params" in oc.NO_PARAMS_MSG
    with pytest.raises(ValueError, match=re.escape(oc.NO_PARAMS_MSG)):
        tx.update(params, state)
    from optax._src import base

    if hasattr(base, "NO_PARAMS_MSG"):
        assert base.NO_PARAMS_MSG == oc.NO_PARAMS_MSG


# --- errors at init -------------------------------------------------------------


def test_label_missing_from_constraints_fails_at_init():
    params = make_params()
    labels = {"dense": {"kernel": "kernal", "bias": "bias"}, "conv": None}
    tx = oc.project({"kernel": oc.MaxNorm(1.0), "bias": oc.NonNeg()}, labels)  # no error yet
    with pytest.raises(ValueError) as err:
        tx.init(params)
    msg = str(err.value)
    assert "dense/kernel" in msg
    assert "'kernal'" in msg  # the labels used ...
    assert "'kernel'" in msg and "'bias'" in msg  # ... and the constraints' keys


def test_labels_tree_missing_a_leaf_fails_at_init():
    params = make_params()
    tx = oc.project({"k": oc.MaxNorm(1.0)}, {"dense": {"kernel": "k"}, "conv": None})
    with pytest.raises(ValueError, match="dense/bias"):
        tx.init(params)


def test_labels_tree_with_an_extra_path_fails_at_init():
    params = make_params()
    labels = {"dense": {"kernel": "k", "bias": None, "scale": "k"}, "conv": None}
    tx = oc.project({"k": oc.MaxNorm(1.0)}, labels)
    with pytest.raises(ValueError, match="dense/scale"):
        tx.init(params)


def test_axis_out_of_range_fails_at_init_naming_path_and_shape():
    params = make_params()
    tx = oc.project({"k": oc.MaxNorm(1.0, axis=2)}, {"dense": "k", "conv": None})
    with pytest.raises(ValueError) as err:
        tx.init(params)
    msg = str(err.value)
    assert "dense/" in msg
    assert "(5, 4)" in msg or "(4,)" in msg


def test_fan_in_on_a_vector_fails_at_init():
    params = make_params()
    tx = oc.project(oc.MaxNorm(1.0, axis="fan_in"))
    with pytest.raises(ValueError, match=re.escape("(4,)")):
        tx.init(params)


def test_non_float_leaf_with_a_constraint_fails_at_init():
    params = {"w": jnp.ones((3,)), "step": jnp.arange(3, dtype=jnp.int32)}
    tx = oc.project(oc.NonNeg())
    with pytest.raises(ValueError, match="step"):
        tx.init(params)
    # Labelled None, the integer leaf is fine.
    tx = oc.project({"nn": oc.NonNeg()}, {"w": "nn", "step": None})
    tx.init(params)


# --- construction -------------------------------------------------------------


BAD_CONSTRUCTIONS = {
    "negative max_value": lambda: oc.MaxNorm(-1.0),
    "negative MinMaxNorm max_value": lambda: oc.MinMaxNorm(0.0, -1.0),
    "negative min_value": lambda: oc.MinMaxNorm(-0.5, 1.0),
    "min > max": lambda: oc.MinMaxNorm(2.0, 1.0),
    "rate > 1": lambda: oc.MinMaxNorm(rate=1.5),
    "rate < 0": lambda: oc.MinMaxNorm(rate=-0.1),
    "nan max_value": lambda: oc.MaxNorm(float("nan")),
    "axis 'foo'": lambda: oc.MaxNorm(axis="foo"),
    "axis 1.5": lambda: oc.UnitNorm(axis=1.5),
    "axis (0, 0)": lambda: oc.MinMaxNorm(axis=(0, 0)),
    "axis True": lambda: oc.MaxNorm(axis=True),
    "axis [0, 'a']": lambda: oc.UnitNorm(axis=[0, "a"]),
    "Clip min > max": lambda: oc.Clip(1.0, -1.0),
}


@pytest.mark.parametrize("name", list(BAD_CONSTRUCTIONS))
def test_bad_hyper_parameters_fail_at_construction(name):
    with pytest.raises(ValueError):
        BAD_CONSTRUCTIONS[name]()


def test_every_k_steps_must_be_a_positive_int():
    for bad in (0, -1, 1.5, "2"):
        with pytest.raises(ValueError):
            oc.project(oc.NonNeg(), every_k_steps=bad)


def test_traced_hyper_parameters_pass_construction():
    w = jnp.asarray([[3.0, 0.3], [4.0, 0.4]])
    c = oc.MaxNorm(jnp.asarray(1.0))
    # Each entry is rescaled like its unit's norm; the inside unit (norm 0.5)
    # shrinks by Keras's epsilon, 1e-7 / 0.5.
    rtol = rescaled_norm_rtol(2, 0.5)
    np.testing.assert_allclose(c(w), [[0.6, 0.3], [0.8, 0.4]], rtol=rtol)
    oc.MinMaxNorm(jnp.asarray(0.1), jnp.asarray(2.0), jnp.asarray(0.5))

    @jax.jit
    def under_jit(w, max_value, min_value, rate):
        a = oc.MaxNorm(max_value)(w)
        b = oc.MinMaxNorm(min_value, max_value, rate)(w)
        return a, b

    a, b = under_jit(w, 1.0, 0.9, 0.5)
    np.testing.assert_allclose(a, [[0.6, 0.3], [0.8, 0.4]], rtol=rtol)
    # rate 0.5: the norm moves halfway, 5 -> 3 and 0.5 -> 0.7 (the rate's two
    # products and one sum are three roundings more).
    np.testing.assert_allclose(
        np.linalg.norm(np.asarray(b, np.float64), axis=0),
        [0.5 * 1.0 + 0.5 * 5.0, 0.5 * 0.9 + 0.5 * 0.5],
        rtol=rtol + 3 * EPS32,
    )


def test_inject_hyperparams_drives_a_traced_bound():
    def make(max_value):
        return optax.chain(optax.sgd(0.0), oc.project(oc.MaxNorm(max_value)))

    tx = optax.inject_hyperparams(make)(max_value=2.0)
    params = {"k": jnp.asarray([[3.0], [4.0]])}
    state = tx.init(params)
    updates, state = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, params), state, params)
    params = optax.apply_updates(params, updates)
    norm = np.linalg.norm(np.asarray(params["k"], np.float64))
    np.testing.assert_allclose(norm, 2.0, rtol=rescaled_norm_rtol(2, 5.0))


# --- value semantics ------------------------------------------------------------


def test_constraints_are_hashable_and_equal_by_config():
    assert oc.MaxNorm(2.0, axis=[0, 1]) == oc.MaxNorm(2.0, axis=(0, 1))
    assert hash(oc.MaxNorm(2.0, axis=[0, 1])) == hash(oc.MaxNorm(2.0, axis=(0, 1)))
    assert oc.MaxNorm(2.0) != oc.MaxNorm(3.0)
    assert oc.MaxNorm(1.0) != oc.MinMaxNorm(0.0, 1.0)
    assert oc.NonNeg() == oc.NonNeg() and hash(oc.NonNeg()) == hash(oc.NonNeg())
    assert oc.UnitNorm(axis=0) != oc.UnitNorm(axis=1)
    assert oc.MaxNorm(2.0, axis=0) == oc.MaxNorm(2.0, axis=(0,))
    assert hash(oc.Simplex(axis=1)) == hash(oc.Simplex(axis=[1]))
    assert oc.MaxNorm(2.0, axis=0).get_config()["axis"] == 0  # the user's form
    assert len({oc.MaxNorm(2.0), oc.MaxNorm(2.0), oc.UnitNorm(), oc.UnitNorm()}) == 2


def test_constraints_are_static_args_to_jit_without_retracing():
    chex.clear_trace_counter()

    @functools.partial(jax.jit, static_argnums=1)
    @chex.assert_max_traces(n=1)
    def apply(w, constraint):
        return constraint(w)

    w = jnp.ones((3, 2)) * 2.0
    apply(w, oc.MaxNorm(1.0, axis=[0]))
    apply(w, oc.MaxNorm(1.0, axis=(0,)))  # a new but equal object: cache hit
    with pytest.raises(AssertionError):
        apply(w, oc.MaxNorm(0.5, axis=[0]))  # a new config retraces


def test_project_step_does_not_retrace():
    chex.clear_trace_counter()
    tx = optax.chain(
        optax.adam(1e-2),
        oc.project(
            {"k": oc.MaxNorm(1.0, axis="fan_in"), "b": oc.NonNeg()},
            oc.label_by_path({"**/kernel": "k", "**/bias": "b"}),
        ),
    )

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    params = make_params()
    state = tx.init(params)
    for seed in range(4):
        params, state = step(params, state, sgd_like_updates(seed))
    assert int(state[1].count) == 4


@pytest.mark.parametrize(
    "constraint",
    [
        oc.MaxNorm(2.0, axis=(0, 1)),
        oc.MinMaxNorm(0.1, 2.0, 0.5, axis=-1),
        oc.UnitNorm(axis=None),
        oc.NonNeg(),
        oc.Clip(-1.0, None),
        oc.CenterAround(0.5),
        oc.Constraint(),
    ],
    ids=repr,
)
def test_repr_is_readable_and_evaluates_back(constraint):
    text = repr(constraint)
    assert text.startswith(type(constraint).__name__ + "(")
    namespace = {name: getattr(oc, name) for name in oc.__dict__ if not name.startswith("_")}
    assert eval(text, namespace) == constraint


# --- labels ---------------------------------------------------------------------


def _projected(constraints, labels, params=None):
    params = make_params() if params is None else params
    return oc.apply_constraints(params, constraints, labels), params


def test_single_string_label_covers_the_whole_tree():
    out, params = _projected({"nn": oc.NonNeg()}, "nn")
    for got, p in zip(jax.tree.leaves(out), jax.tree.leaves(params)):
        np.testing.assert_array_equal(got, np.maximum(p, 0))


def test_dict_prefix_labels():
    out, params = _projected({"nn": oc.NonNeg()}, {"dense": "nn", "conv": None})
    np.testing.assert_array_equal(out["dense"]["kernel"], np.maximum(params["dense"]["kernel"], 0))
    np.testing.assert_array_equal(out["dense"]["bias"], np.maximum(params["dense"]["bias"], 0))
    assert out["conv"]["kernel"] is params["conv"]["kernel"]
    assert out["conv"]["bias"] is params["conv"]["bias"]


def test_callable_labels():
    def labels(params):
        return jax.tree.map(lambda x: "nn" if x.ndim == 1 else None, params)

    tx = oc.project({"nn": oc.NonNeg()}, labels)
    params = make_params()
    updates = sgd_like_updates()
    new = optax.apply_updates(params, tx.update(updates, tx.init(params), params)[0])
    for layer in ("dense", "conv"):
        assert np.min(new[layer]["bias"]) >= 0
        # Unlabelled kernels get the update untouched: the same float32 sum, exactly.
        np.testing.assert_array_equal(
            new[layer]["kernel"], params[layer]["kernel"] + updates[layer]["kernel"]
        )


def test_label_by_path_labels():
    out, params = _projected(
        {"k": oc.MaxNorm(1.0, axis="fan_in"), "b": oc.NonNeg()},
        oc.label_by_path({"**/kernel": "k", "**/bias": "b"}),
    )
    for layer in ("dense", "conv"):
        assert column_norms(out[layer]["kernel"]).max() <= 1.0 + 1e-6
        np.testing.assert_array_equal(out[layer]["bias"], np.maximum(params[layer]["bias"], 0))


def test_single_constraint_without_labels_applies_to_every_leaf():
    params, updates = make_params(), sgd_like_updates()
    tx = oc.project(oc.NonNeg())
    new = optax.apply_updates(params, tx.update(updates, tx.init(params), params)[0])
    for got, p, u in zip(jax.tree.leaves(new), jax.tree.leaves(params), jax.tree.leaves(updates)):
        assert np.min(got) >= 0
        # Exact: the update passes through where p + u > 0 (float32 sum), else -p.
        np.testing.assert_array_equal(got, np.maximum(np.asarray(p) + np.asarray(u), np.float32(0)))


def column_norms(w):
    w = np.asarray(w, np.float64)
    return np.sqrt(np.sum(w * w, axis=tuple(range(w.ndim - 1))))


# --- steps and schedules ----------------------------------------------------------


def test_every_k_steps_projects_only_on_multiples_of_k():
    k = 3
    tx = oc.project(oc.NonNeg(), every_k_steps=k)
    params = {"w": jnp.asarray([0.2])}
    state = tx.init(params)
    step = jax.jit(tx.update)
    expected = 0.2
    for i in range(1, 3 * k + 1):
        updates, state = step({"w": jnp.asarray([-1.0])}, state, params)
        params = optax.apply_updates(params, updates)
        expected = expected - 1.0
        if i % k == 0:
            expected = max(expected, 0.0)
        # At most k float32 additions since the last projection, each rounding by
        # at most an ulp of values below 3 in magnitude (0.2 included).
        atol = k * float(np.spacing(np.float32(3.0)))
        np.testing.assert_allclose(params["w"], [expected], rtol=0, atol=atol, err_msg=f"step {i}")


def test_schedule_changes_the_bound_with_the_step_count():
    schedule = optax.linear_schedule(4.0, 1.0, transition_steps=3)
    tx = oc.project(oc.MaxNorm(schedule))
    params = {"k": jnp.asarray([[3.0, 0.0], [4.0, 0.5]])}
    state = tx.init(params)
    step = jax.jit(tx.update)
    norms = np.array([5.0, 0.5])
    for count in range(6):
        updates, state = step(jax.tree.map(jnp.zeros_like, params), state, params)
        params = optax.apply_updates(params, updates)
        norms = np.minimum(norms, float(schedule(count)))
        # The unit of norm 0.5 never binds but shrinks by Keras's epsilon every
        # step: the drift of count + 1 projections (the binding one is reset).
        rtol = (count + 1) * rescaled_norm_rtol(2, 0.5)
        np.testing.assert_allclose(column_norms(params["k"]), norms, rtol=rtol)
    assert norms[0] == 1.0  # the bound really moved from 4 down to 1


# Every schedulable hyper-parameter of every class: (start, end) of a linear
# schedule over 10 steps. Start, end and midpoint are exact in float32, so the
# scheduled constraint at steps 0, 5 and 10 must act like the constant one.
SCHEDULED = {
    oc.MaxNorm: {"max_value": (4.0, 1.0)},
    oc.MinMaxNorm: {"min_value": (0.5, 1.5), "max_value": (1.0, 2.0), "rate": (1.0, 0.5)},
    oc.Clip: {"min_value": (-1.0, -0.25), "max_value": (1.0, 0.5)},
    oc.CenterAround: {"ref_value": (0.0, 1.0)},
    oc.L1Ball: {"max_value": (4.0, 1.0)},
    oc.Simplex: {"scale": (1.0, 3.0)},
    oc.SpectralNorm: {"max_value": (4.0, 1.0)},
    oc.Sphere: {"radius": (4.0, 1.0)},
}


def test_every_schedulable_class_is_covered():
    from helpers import exported_constraint_classes

    assert {c for c in exported_constraint_classes() if c.schedulable} == set(SCHEDULED)
    for cls, hyper in SCHEDULED.items():
        assert set(hyper) == set(cls.schedulable), cls


@pytest.mark.parametrize("cls", list(SCHEDULED), ids=lambda c: c.__name__)
def test_apply_constraints_and_violations_evaluate_schedules_at_step(cls):
    hyper = SCHEDULED[cls]
    scheduled = cls(**{k: optax.linear_schedule(a, b, 10) for k, (a, b) in hyper.items()})
    params = {"k": jnp.asarray(np.random.default_rng(5).normal(size=(6, 3)) * 3 + 1, jnp.float32)}
    jit_violations = jax.jit(lambda p, s: oc.constraint_violations(p, scheduled, step=s))
    for step, frac in ((None, 0.0), (0, 0.0), (5, 0.5), (10, 1.0), (jnp.asarray(5), 0.5)):
        constant = cls(**{k: a + (b - a) * frac for k, (a, b) in hyper.items()})
        want = oc.apply_constraints(params, constant)["k"]
        got = oc.apply_constraints(params, scheduled, step=step)["k"]
        # The same formula with the bound as a runtime array instead of a
        # compile-time constant: equal up to a few float32 roundings.
        atol = 8 * np.finfo(np.float32).eps * float(jnp.max(jnp.abs(want)))
        np.testing.assert_allclose(got, want, rtol=0, atol=atol, err_msg=f"step={step}")
        want_v = float(oc.constraint_violations(params, constant)["__all__"])
        assert want_v > 0, "the params should violate every bound"
        for got_v in (
            oc.constraint_violations(params, scheduled, step=step)["__all__"],
            jit_violations(params, 0 if step is None else step)["__all__"],
        ):
            scale = 8 * np.finfo(np.float32).eps * float(jnp.max(jnp.abs(params["k"])))
            np.testing.assert_allclose(float(got_v), want_v, rtol=0, atol=scale)


def test_scheduled_max_norm_violation_at_step_100():
    # The example: a unit of norm 3, bound 4 -> 1 over 100 steps.
    c = oc.MaxNorm(optax.linear_schedule(4.0, 1.0, 100))
    params = {"w": jnp.asarray([[3.0], [0.0]])}
    assert float(oc.constraint_violations(params, c)["__all__"]) == 0.0
    assert float(oc.constraint_violations(params, c, step=100)["__all__"]) == 2.0
    assert float(oc.constraint_violations(params, c, step=50)["__all__"]) == 0.5
    # What `project` uses on its k-th update (count k) is what step=k gives.
    state = oc.project(c).init(params)
    for _ in range(100):
        u, state = oc.project(c).update(jax.tree.map(jnp.zeros_like, params), state, params)
    params = optax.apply_updates(params, u)  # projected with the bound at step 99
    # The projection's rounding and the violation's own norm, at the bound.
    slack = ulps(float(c.at_step(99).max_value), 2 * norm_ulps(2))
    assert float(oc.constraint_violations(params, c, step=99)["__all__"]) <= slack
    np.testing.assert_allclose(float(jnp.linalg.norm(params["w"])), float(c.at_step(99).max_value))


# --- violations -------------------------------------------------------------------


def test_constraint_violations_positive_before_and_zero_after_projection():
    constraints = {
        "max": oc.MaxNorm(1.0, axis="fan_in"),
        "min_max": oc.MinMaxNorm(2.0, 3.0, axis=0),
        "unit": oc.UnitNorm(axis=None),
        "nn": oc.NonNeg(),
        "free": None,
    }
    labels = {
        "dense": {"kernel": "max", "bias": "nn"},
        "conv": {"kernel": "min_max", "bias": "unit"},
    }
    params = make_params()
    # Small conv kernels, so that MinMaxNorm's lower bound binds.
    params["conv"]["kernel"] = params["conv"]["kernel"] * 0.1
    before = oc.constraint_violations(params, constraints, labels)
    assert set(before) == {"max", "min_max", "unit", "nn"}

    kernel = np.asarray(params["dense"]["kernel"], np.float64)
    # The violation's float32 norm over a unit of 5, then a difference with 1.
    np.testing.assert_allclose(
        before["max"],
        max(column_norms(kernel).max() - 1.0, 0.0),
        rtol=0,
        atol=ulps(column_norms(kernel).max(), norm_ulps(5)),
    )
    # NonNeg's violation is max(-w): a selection and a negation, exact.
    np.testing.assert_array_equal(before["nn"], -np.min(params["dense"]["bias"]))
    for label, value in before.items():
        assert float(value) > 0, label

    violations = jax.jit(lambda p: oc.constraint_violations(p, constraints, labels))
    after = violations(oc.apply_constraints(params, constraints, labels))
    # Keras's 1e-7 in the denominator leaves a lifted norm short of its target
    # by target * 1e-7 / norm (`rescaled_norm_rtol`, with each unit's norm
    # before); the violation's own float32 norm adds norm_ulps(n) of the target.
    units = {  # label: (target, unit size, smallest norm before)
        "max": (1.0, 5, 1.0),
        "min_max": (2.0, 3, np.sqrt((np.asarray(params["conv"]["kernel"]) ** 2).sum(0)).min()),
        "unit": (1.0, 4, np.linalg.norm(np.asarray(params["conv"]["bias"]))),
    }
    for label, (target, n, smallest) in units.items():
        slack = target * rescaled_norm_rtol(n, smallest) + ulps(target, norm_ulps(n))
        assert float(after[label]) <= slack, (label, float(after[label]), slack)
    assert float(after["nn"]) == 0.0
