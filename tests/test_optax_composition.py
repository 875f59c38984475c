"""`oc.project` among its Optax neighbours.

Every test runs a constrained chain next to the plain optimizer on the same
gradients and checks two things: the constraint holds after
`optax.apply_updates` (and equals the numpy projection of `p + u`, where `u`
is the plain optimizer's update), and everything else is untouched:
unconstrained leaves and the inner optimizer's state match the plain run
bit for bit.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import EPS32, norm_ulps, projected_norm_rtol

import optax_constraints as oc

MAX = 1.0
KERAS_EPS = 1e-7


# -- numpy references (Keras's formulas) --------------------------------------


def np_max_norm(w, max_value, axis=0):
    w = np.asarray(w, np.float64)
    norms = np.sqrt(np.sum(w * w, axis=axis, keepdims=True))
    return w * (np.clip(norms, 0, max_value) / (KERAS_EPS + norms))


def np_unit_norms(w, axis=0):
    w = np.asarray(w, np.float64)
    return np.sqrt(np.sum(w * w, axis=axis))


def projected_slack(want, before, moved, *, n, k_moved=2):
    """Per entry, how far `project`'s float32 `p + u'` may be from `want = C(moved)`.

    `want` is computed in float64 from `moved = before + update`; the float32
    program rounds: the projection (`norm_ulps(n)` of each entry, units of
    `n`); the update form `p + u'` with `u' = C - p` (an ulp of `|want -
    before|` and of `|want|`); and its own `moved`, `k_moved` ulps of
    `|before| + |update|` (the update recomputed, p + u), which a
    nonexpansive C (MaxNorm, NonNeg, the identity) passes on in 2-norm over
    a unit: at most `sqrt(n)` times the largest.
    """
    want, before, moved = (np.asarray(a, np.float64) for a in (want, before, moved))
    incoming = k_moved * np.sqrt(n) * np.max(np.abs(before) + np.abs(moved - before))
    return EPS32 * (norm_ulps(n) * np.abs(want) + np.abs(want - before) + np.abs(want) + incoming)


def assert_close64(got, want, before, moved, *, n, k_moved=2):
    """`got` within `projected_slack` of `want` (see there)."""
    slack = projected_slack(want, before, moved, n=n, k_moved=k_moved)
    excess = np.abs(np.asarray(got, np.float64) - want) - slack
    assert excess.max() <= 0, f"off by {excess.max():.3g} more than float32 rounding allows"


def assert_bitwise(a, b):
    chex.assert_trees_all_equal(a, b, strict=True)


# -- shared set-up ------------------------------------------------------------


def make_params(seed=0):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    return {
        # Infeasible from the start (unit norms ~ 3 * sqrt(4) > MAX), so the
        # projection is active on the first step.
        "dense": {
            "kernel": 3.0 * jax.random.normal(k1, (4, 3)),
            "bias": jnp.full((3,), 0.05, jnp.float32),
        },
        "out": {"kernel": jax.random.normal(k2, (3, 2)), "bias": jax.random.normal(k3, (2,))},
    }


LABELS = {"dense": {"kernel": "k", "bias": "b"}, "out": {"kernel": None, "bias": None}}
CONSTRAINTS = {"k": oc.MaxNorm(MAX), "b": oc.NonNeg()}
CONSTRAINED = [("dense", "kernel"), ("dense", "bias")]
UNCONSTRAINED = [("out", "kernel"), ("out", "bias")]


def grads_sequence(n, seed=1):
    params = make_params()
    keys = jax.random.split(jax.random.key(seed), n)
    return [
        jax.tree.map(
            lambda p, k=k: jax.random.normal(jax.random.fold_in(k, p.size), p.shape), params
        )
        for k in keys
    ]


def get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def jitted_step(tx):
    @jax.jit
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step


def check_constrained_leaves(new, old, inner_updates, k_moved=2):
    """new == C(old + u) for the two constrained leaves, and C holds.

    `k_moved`: the float32 program's roundings of old + u (see `projected_slack`).
    """
    k_old = np.asarray(get(old, ("dense", "kernel")), np.float64)
    k_u = np.asarray(get(inner_updates, ("dense", "kernel")), np.float64)
    k_new = get(new, ("dense", "kernel"))
    # The kernel's units are its 4 rows' columns; the bias is elementwise.
    assert_close64(k_new, np_max_norm(k_old + k_u, MAX), k_old, k_old + k_u, n=4, k_moved=k_moved)
    assert np.all(np_unit_norms(k_new) <= MAX * (1 + 4 * 2.0**-24))
    b_old = np.asarray(get(old, ("dense", "bias")), np.float64)
    b_u = np.asarray(get(inner_updates, ("dense", "bias")), np.float64)
    b_new = get(new, ("dense", "bias"))
    assert_close64(b_new, np.maximum(b_old + b_u, 0), b_old, b_old + b_u, n=1, k_moved=k_moved)
    assert np.all(np.asarray(b_new) >= 0)


# -- optimizers ---------------------------------------------------------------

OPTIMIZERS = {
    "sgd_momentum": lambda: optax.sgd(0.1, momentum=0.9),
    "sgd_nesterov": lambda: optax.sgd(0.1, momentum=0.9, nesterov=True),
    "adam": lambda: optax.adam(0.1),
    "adamw": lambda: optax.adamw(0.1, weight_decay=0.5),
    "lion": lambda: optax.lion(0.05, weight_decay=0.5),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_optimizer_then_project(name):
    inner = OPTIMIZERS[name]()
    tx = optax.chain(inner, oc.project(CONSTRAINTS, LABELS))
    step, plain_step = jitted_step(tx), jitted_step(inner)
    params = plain = make_params()
    state, plain_state = tx.init(params), inner.init(plain)
    for grads in grads_sequence(4):
        # The plain optimizer's update at the constrained run's params (weight
        # decay in adamw/lion reads the params).
        inner_updates, _ = inner.update(grads, state[0], params)
        new, state = step(params, state, grads)
        plain, plain_state = plain_step(plain, plain_state, grads)
        check_constrained_leaves(new, params, inner_updates)
        for path in UNCONSTRAINED:
            assert_bitwise(get(new, path), get(plain, path))
        # The projection never touches the optimizer's moments.
        assert_bitwise(state[0], plain_state)
        params = new
    assert int(state[1].count) == 4


def test_adamw_decays_before_the_projection():
    # Written out by hand for the first step (numpy): Adam's first step is
    # g / (|g| + eps) per element, then adamw adds weight_decay * p, then the
    # projection acts on the decayed point: p_new = C(p - lr * (dir + wd * p)).
    lr, wd, eps = 0.1, 0.5, 1e-8
    tx = optax.chain(optax.adamw(lr, eps=eps, weight_decay=wd), oc.project(CONSTRAINTS, LABELS))
    params = make_params()
    grads = grads_sequence(1)[0]
    new, _ = jitted_step(tx)(params, tx.init(params), grads)
    p = np.asarray(params["dense"]["kernel"], np.float64)
    g = np.asarray(grads["dense"]["kernel"], np.float64)
    direction = g / (np.abs(g) + eps)
    moved = p - lr * (direction + wd * p)
    expected = np_max_norm(moved, MAX)
    # Adam's float32 direction (the moments, their bias corrections, the
    # square root, eps and the quotient: 7 roundings), the decay's product
    # and sum, lr's product and p + u: 11 ulps of |p| + |u| in `moved`.
    assert_close64(new["dense"]["kernel"], expected, p, moved, n=4, k_moved=11)
    # Decay applied after the projection would give a different point: farther
    # from ours than the rounding allows.
    after = np_max_norm(p - lr * direction, MAX) * (1 - lr * wd)
    slack = projected_slack(expected, p, moved, n=4, k_moved=11)
    assert np.any(np.abs(np.asarray(new["dense"]["kernel"], np.float64) - after) > slack)


# -- partition / multi_transform, masked ---------------------------------------


@pytest.mark.parametrize("api", ["partition", "multi_transform"])
def test_partition_with_a_frozen_part_projects_inside_one_partition(api):
    partition = getattr(optax, api)
    # "dense" trains and is constrained; "out" is frozen.
    trainable_labels = {"dense": "train", "out": "frozen"}
    train = optax.chain(
        optax.adam(0.1),
        oc.project(CONSTRAINTS, oc.label_by_path({"dense/kernel": "k", "dense/bias": "b"})),
    )
    tx = partition({"train": train, "frozen": optax.set_to_zero()}, trainable_labels)
    plain_tx = partition(
        {"train": optax.adam(0.1), "frozen": optax.set_to_zero()}, trainable_labels
    )
    step, plain_step = jitted_step(tx), jitted_step(plain_tx)
    params = plain = make_params()
    state, plain_state = tx.init(params), plain_tx.init(plain)
    frozen = params["out"]
    for grads in grads_sequence(3):
        # Same moments as the constrained run (asserted below), so this is the
        # update the constrained run projects.
        inner_updates, _ = plain_tx.update(grads, plain_state, params)
        new, state = step(params, state, grads)
        plain, plain_state = plain_step(plain, plain_state, grads)
        check_constrained_leaves(new, params, inner_updates)
        assert_bitwise(new["out"], frozen)  # frozen, exactly
        assert_bitwise(
            state.inner_states["train"].inner_state[0],
            plain_state.inner_states["train"].inner_state,
        )
        params = new


def test_project_outside_partition_still_reaches_frozen_leaves():
    # The pitfall documented in docs/composition.md: a project() placed after
    # the partition sees every leaf. Keras's MaxNorm is w * n / (1e-7 + n),
    # which moves even a feasible unit by ~1e-7 relative, so a frozen leaf
    # routed to it drifts. Label frozen leaves None (or project inside).
    params = {"train": jnp.ones((3, 2)) * 0.1, "frozen": jnp.ones((3, 2)) * 0.1}
    part = optax.partition(
        {"t": optax.sgd(0.1), "f": optax.set_to_zero()}, {"train": "t", "frozen": "f"}
    )
    everywhere = optax.chain(part, oc.project(oc.MaxNorm(MAX)))
    skip_frozen = optax.chain(
        part, oc.project({"k": oc.MaxNorm(MAX)}, {"train": "k", "frozen": None})
    )
    grads = jax.tree.map(jnp.ones_like, params)
    for tx, drifts in [(everywhere, True), (skip_frozen, False)]:
        new, _ = jitted_step(tx)(params, tx.init(params), grads)
        moved = not np.array_equal(np.asarray(new["frozen"]), np.asarray(params["frozen"]))
        assert moved == drifts


def test_masked_projects_only_the_masked_in_leaves():
    mask = {"dense": {"kernel": True, "bias": False}, "out": {"kernel": False, "bias": False}}
    tx = optax.chain(optax.adam(0.1), optax.masked(oc.project(oc.MaxNorm(MAX)), mask))
    inner = optax.adam(0.1)
    step, plain_step = jitted_step(tx), jitted_step(inner)
    params = plain = make_params()
    state, plain_state = tx.init(params), inner.init(plain)
    for grads in grads_sequence(3):
        inner_updates, _ = inner.update(grads, state[0], params)
        new, state = step(params, state, grads)
        plain, plain_state = plain_step(plain, plain_state, grads)
        k = np.asarray(params["dense"]["kernel"], np.float64)
        u = np.asarray(inner_updates["dense"]["kernel"], np.float64)
        assert_close64(new["dense"]["kernel"], np_max_norm(k + u, MAX), k, k + u, n=4)
        for path in [("dense", "bias"), *UNCONSTRAINED]:
            assert_bitwise(get(new, path), get(plain, path))
        assert_bitwise(state[0], plain_state)
        params = new
    # The out kernel was never projected: some of its units exceed MAX.
    assert np.any(np_unit_norms(params["out"]["kernel"]) > MAX)


# -- inject_hyperparams --------------------------------------------------------


def test_inject_hyperparams_drives_max_value_without_retracing():
    labels = {"dense": {"kernel": "k", "bias": None}, "out": {"kernel": "k", "bias": None}}
    tx = optax.inject_hyperparams(
        lambda learning_rate, max_value: optax.chain(
            optax.sgd(learning_rate), oc.project({"k": oc.MaxNorm(max_value)}, labels)
        )
    )(learning_rate=0.1, max_value=2.0)
    params = make_params()
    state = tx.init(params)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    chex.clear_trace_counter()
    grads_seq = grads_sequence(4)
    rtol = {}
    for grads, max_value in zip(grads_seq, [2.0, 0.5, 0.25, 0.1]):
        state.hyperparams["max_value"] = jnp.asarray(max_value, jnp.float32)
        lr = float(state.hyperparams["learning_rate"])
        old = params
        params, state = step(params, state, grads)
        for name in ["dense", "out"]:
            before = np.asarray(old[name]["kernel"], np.float64)
            moved = before - lr * np.asarray(grads[name]["kernel"], np.float64)
            expected = np_max_norm(moved, max_value)
            n = before.shape[0]
            assert_close64(params[name]["kernel"], expected, before, moved, n=n)
            after = np.asarray(params[name]["kernel"], np.float64)
            rtol[name] = projected_norm_rtol(after, before, 0, max_value).max()
            assert np.all(np_unit_norms(after) <= max_value * (1 + rtol[name]))
        # The bound really changed (it shrinks every step): some unit sits on it.
        dense_norm = np_unit_norms(params["dense"]["kernel"]).max()
        np.testing.assert_allclose(dense_norm, max_value, rtol=rtol["dense"])
    assert step._cache_size() == 1


def test_inject_hyperparams_needs_same_dtype_arrays_to_avoid_retracing():
    # The pitfall documented in docs/composition.md: assigning a Python float
    # makes the leaf weakly typed, a new jit signature; an array of the
    # hyper-parameter's dtype does not.
    tx = optax.inject_hyperparams(
        lambda learning_rate, max_value: optax.chain(
            optax.sgd(learning_rate), oc.project(oc.MaxNorm(max_value))
        )
    )(learning_rate=0.1, max_value=2.0)
    params = {"w": jnp.ones((3, 2), jnp.float32)}
    update = jax.jit(tx.update)
    state = tx.init(params)
    _, state = update(params, state, params)
    state.hyperparams["max_value"] = jnp.asarray(0.5, state.hyperparams["max_value"].dtype)
    _, state = update(params, state, params)
    assert update._cache_size() == 1
    state.hyperparams["max_value"] = 0.25  # a Python float: weak type, new trace
    _, state = update(params, state, params)
    assert update._cache_size() == 2


# -- MultiSteps ---------------------------------------------------------------


def test_multisteps_projects_only_on_emitting_steps():
    k = 3
    inner = optax.chain(optax.sgd(0.1), oc.project(CONSTRAINTS, LABELS))
    tx = optax.MultiSteps(inner, every_k_schedule=k)
    step = jitted_step(tx)
    params = make_params()
    state = tx.init(params)
    assert np.any(np_unit_norms(params["dense"]["kernel"]) > MAX)  # infeasible start
    grads_seq = grads_sequence(2 * k)
    for i, grads in enumerate(grads_seq, start=1):
        old = params
        params, state = step(params, state, grads)
        if i % k:
            # Accumulation step: MultiSteps emits zeros, nothing is projected.
            assert_bitwise(params, old)
        else:
            mean = jax.tree.map(
                lambda *g: np.mean(np.stack(g), 0, dtype=np.float64), *grads_seq[i - k : i]
            )
            sgd_updates = jax.tree.map(lambda g: -0.1 * g, mean)
            # MultiSteps averages k float32 gradients (k + 1 roundings), then
            # sgd scales by 0.1 and the step adds: k + 3 ulps of |p| + |u|.
            check_constrained_leaves(params, old, sgd_updates, k_moved=k + 3)
            for path in UNCONSTRAINED:
                before = np.asarray(get(old, path), np.float64)
                moved = before + get(sgd_updates, path)
                assert_close64(get(params, path), moved, before, moved, n=1, k_moved=k + 3)
    # The projection's own step counter only advanced on emitting steps.
    assert int(state.inner_opt_state[1].count) == 2


def test_project_outside_multisteps_projects_every_micro_step_like_keras():
    # Keras (gradient_accumulation_steps) applies constraints after every
    # micro-step. The same behaviour in Optax: project *after* MultiSteps, so
    # accumulation steps (zero updates) still project: p -> C(p).
    k = 3
    multi = optax.MultiSteps(optax.sgd(0.1), every_k_schedule=k)
    tx = optax.chain(multi.gradient_transformation(), oc.project(CONSTRAINTS, LABELS))
    step = jitted_step(tx)
    params = make_params()
    state = tx.init(params)
    old = params
    params, state = step(params, state, grads_sequence(1)[0])  # an accumulation step
    zeros = jax.tree.map(jnp.zeros_like, old)
    check_constrained_leaves(params, old, zeros)
    for path in UNCONSTRAINED:
        assert_bitwise(get(params, path), get(old, path))
    assert int(state[1].count) == 1


# -- apply_if_finite ----------------------------------------------------------


def test_apply_if_finite_skips_nan_steps_and_projects_finite_ones():
    tx = optax.apply_if_finite(
        optax.chain(optax.sgd(0.1), oc.project(CONSTRAINTS, LABELS)), max_consecutive_errors=5
    )
    step = jitted_step(tx)
    params = make_params()
    state = tx.init(params)
    good, other = grads_sequence(2)
    bad = jax.tree.map(lambda g: g.at[0].set(jnp.nan), other)

    new, state = step(params, state, bad)
    assert_bitwise(new, params)  # skipped: still the infeasible start
    assert not bool(state.last_finite)
    assert int(state.notfinite_count) == 1
    assert int(state.inner_state[1].count) == 0  # the projection did not run

    old = new
    new, state = step(new, state, good)
    assert bool(state.last_finite)
    check_constrained_leaves(new, old, jax.tree.map(lambda g: -0.1 * g, good))
    assert bool(jnp.all(jnp.isfinite(new["dense"]["kernel"])))


# -- Flax: TrainState and nnx.Optimizer ------------------------------------------


def test_flax_train_state_apply_gradients_projects():
    from flax.training import train_state

    tx = optax.chain(optax.adam(0.1), oc.project(CONSTRAINTS, LABELS))
    params = make_params()
    state = train_state.TrainState.create(apply_fn=None, params=params, tx=tx)
    grads = grads_sequence(1)[0]
    inner_updates, _ = optax.adam(0.1).update(grads, optax.adam(0.1).init(params), params)
    state = jax.jit(lambda s, g: s.apply_gradients(grads=g))(state, grads)
    check_constrained_leaves(state.params, params, inner_updates)
    assert int(state.step) == 1


def test_nnx_optimizer_projects():
    from flax import nnx

    model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    model.kernel.value = 3.0 * model.kernel.value + 1.0  # infeasible start
    tx = optax.chain(
        optax.sgd(0.1),
        oc.project(
            {"k": oc.MaxNorm(MAX), "b": oc.NonNeg()},
            oc.label_by_path({"**/kernel": "k", "**/bias": "b"}),
        ),
    )
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    x = jax.random.normal(jax.random.key(3), (8, 4))

    @nnx.jit
    def train_step(model, optimizer, x):
        grads = nnx.grad(lambda m: jnp.mean((m(x) - 1.0) ** 2))(model)
        optimizer.update(model, grads)
        return grads

    old_k = np.asarray(model.kernel.value, np.float64)
    old_b = np.asarray(model.bias.value, np.float64)
    grads = train_step(model, optimizer, x)
    gk = np.asarray(grads["kernel"].value, np.float64)
    gb = np.asarray(grads["bias"].value, np.float64)
    moved_k, moved_b = old_k - 0.1 * gk, old_b - 0.1 * gb
    assert_close64(model.kernel.value, np_max_norm(moved_k, MAX), old_k, moved_k, n=4)
    assert_close64(model.bias.value, np.maximum(moved_b, 0), old_b, moved_b, n=1)


# -- wrappers that move `project` off the end: schedule-free, lookahead ---------


def _pull_towards(seed=0):
    """Squared distance to a target of column norms ~6: it pushes against MaxNorm(2)."""
    rng = np.random.default_rng(seed)
    w0 = jnp.asarray(rng.normal(size=(8, 4)), jnp.float32)
    target = jnp.asarray(rng.normal(size=(8, 4)) * 3, jnp.float32)
    return {"w": w0}, lambda p: jnp.sum((p["w"] - target) ** 2)


# Keras's 1e-7 epsilon puts a projected norm just inside the bound; float32
# rounding of the norm and of the update adds a few ulps of 2.0.
NORM_SLACK = 2.0 * 8 * np.finfo(np.float32).eps


def _max_unit_norm(w):
    return float(np_unit_norms(w).max())


def test_schedule_free_around_project_ends_infeasible():
    # schedule_free interpolates: its base optimizer's projected step moves z,
    # and the params y (and the evaluation x) are averages with the previous
    # unprojected points. Not a placement to use (docs/composition.md).
    params, loss = _pull_towards()
    tx = optax.contrib.schedule_free(optax.chain(optax.adam(0.1), oc.project(oc.MaxNorm(2.0))), 1.0)
    state = tx.init(params)
    worst = 0.0
    for _ in range(50):
        u, state = tx.update(jax.grad(loss)(params), state, params)
        params = optax.apply_updates(params, u)
        worst = max(worst, _max_unit_norm(params["w"]))
    assert worst > 2.0 + 1e-3, worst


def test_project_after_schedule_free_constrains_the_training_params_only():
    # chain(schedule_free(...), project): the params schedule-free hands out (y,
    # where gradients are taken) are feasible after every step. Its z sequence is
    # not constrained (here it drifts far outside), so the evaluation params
    # x = schedule_free_eval_params(...) carry no guarantee: project them with
    # oc.apply_constraints before evaluating, or evaluate y.
    params, loss = _pull_towards()
    c = oc.MaxNorm(2.0)
    tx = optax.chain(optax.contrib.schedule_free(optax.adam(0.1), 1.0), oc.project(c))
    state = tx.init(params)
    for _ in range(50):
        u, state = tx.update(jax.grad(loss)(params), state, params)
        params = optax.apply_updates(params, u)
        assert _max_unit_norm(params["w"]) <= 2.0 + NORM_SLACK
    assert _max_unit_norm(state[0].z["w"]) > 4.0  # z is far outside the ball
    x = optax.contrib.schedule_free_eval_params(state[0], params)
    assert _max_unit_norm(oc.apply_constraints(x, c)["w"]) <= 2.0 + NORM_SLACK


@pytest.mark.parametrize(
    "constraint,convex",
    [(oc.MaxNorm(2.0), True), (oc.NonNeg(), True), (oc.UnitNorm(), False)],
    ids=repr,
)
def test_lookahead_slow_weights_are_feasible_exactly_for_convex_sets(constraint, convex):
    # lookahead(chain(adam, project)): the fast weights are projected; at each
    # sync the slow weights move to slow + a (fast - slow), a convex combination
    # of two feasible points. Feasible for a convex set; for UnitNorm (a sphere)
    # the combination falls inside it, and the fast weights restart from there.
    params, loss = _pull_towards()
    params = oc.apply_constraints(params, constraint)
    tx = optax.lookahead(
        optax.chain(optax.adam(0.1), oc.project(constraint)), sync_period=5, slow_step_size=0.5
    )
    lp = optax.LookaheadParams(fast=params, slow=params)
    state = tx.init(lp)
    slow, fast = [], []
    for _ in range(20):
        u, state = tx.update(jax.grad(loss)(lp.fast), state, lp)
        lp = optax.apply_updates(lp, u)
        slow.append(float(oc.constraint_violations(lp.slow, constraint)["__all__"]))
        fast.append(float(oc.constraint_violations(lp.fast, constraint)["__all__"]))
    if convex:
        # MaxNorm's violation is a norm excess: float32 rounding of norms ~2.
        assert max(slow) <= NORM_SLACK and max(fast) <= NORM_SLACK, (slow, fast)
    else:
        assert max(slow) > 0.05 and max(fast) > 0.05, (slow, fast)
