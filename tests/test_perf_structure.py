"""What makes `project` cheap, checked structurally (no timings).

XLA's `compiled.memory_analysis()` and the lowered program are deterministic,
so these tests pin the properties `docs/performance.md` explains, on the
reference workload of `benchmarks/run.py` (eight Dense kernels 1536x1536,
four Conv kernels 3x3x256x256, biases; Adam; params and state donated):

* the step's peak memory is within 5% of plain Adam's, and its temporary
  buffers are far from one copy of the constrained kernels (the projections
  run in groups, `_InGroups`);
* the hand-written step with our constraints updates the donated buffers in
  place (overflow-safe `unit_norms` without a branch or a shared broadcast);
* the step moves no more memory than the hand-written step with the same
  constraints, and at most four passes over the parameters more than plain
  Adam (`benchmarks/_traffic.py` counts the bytes its kernels read and write);
* NonNeg on every leaf costs what `optax.keep_params_nonnegative` costs;
* ordering changes no bit of the result.

Shapes are abstract (`jax.ShapeDtypeStruct`): nothing is allocated or run
for the large workload.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_constraints as oc
from benchmarks import _traffic
from optax_constraints import _transform
from optax_constraints.constraints import _base

MB = 2**20
RULES = {"dense*/kernel": "dense", "conv*/kernel": "conv", "**/bias": "bias"}
CONSTRAINTS = {
    "dense": oc.MaxNorm(3.0, axis=0),
    "conv": oc.MaxNorm(3.0, axis=(0, 1, 2)),
    "bias": oc.NonNeg(),
}


def reference_shapes() -> dict:
    f32 = jnp.float32
    params = {}
    for i in range(8):
        params[f"dense{i}"] = {
            "kernel": jax.ShapeDtypeStruct((1536, 1536), f32),
            "bias": jax.ShapeDtypeStruct((1536,), f32),
        }
    for i in range(4):
        params[f"conv{i}"] = {
            "kernel": jax.ShapeDtypeStruct((3, 3, 256, 256), f32),
            "bias": jax.ShapeDtypeStruct((256,), f32),
        }
    return params


def compiled_step(tx, params, *, then=None):
    """`tx` then `apply_updates` (then `then(params)`), jitted with donation."""

    def step(p, s, g):
        u, s = tx.update(g, s, p)
        p = optax.apply_updates(p, u)
        return (p if then is None else then(p)), s

    state = jax.eval_shape(tx.init, params)
    return jax.jit(step, donate_argnums=(0, 1)).lower(params, state, params).compile()


def memory(compiled) -> dict[str, int]:
    """Temporaries, peak memory and bytes moved per step (deterministic)."""
    m = compiled.memory_analysis()
    peak = (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        - m.alias_size_in_bytes
        + m.temp_size_in_bytes
    )
    return {"temp": m.temp_size_in_bytes, "peak": peak, "moved": _traffic.bytes_moved(compiled)}


@pytest.fixture(scope="module")
def reference():
    params = reference_shapes()
    labels = oc.label_by_path(RULES)
    adam = optax.adam(1e-3)

    def hand(p):
        return jax.tree.map(lambda w, label: CONSTRAINTS[label](w), p, labels(p))

    return {
        "params": params,
        "plain": memory(compiled_step(adam, params)),
        "project": memory(
            compiled_step(optax.chain(adam, oc.project(CONSTRAINTS, labels)), params)
        ),
        "hand": memory(compiled_step(adam, params, then=hand)),
    }


def test_project_peak_memory_within_5_percent_of_plain_adam(reference):
    assert reference["project"]["peak"] <= 1.05 * reference["plain"]["peak"]


def test_project_temporaries_are_one_group_not_every_kernel(reference):
    kernels = [
        x
        for k, x in jax.tree_util.tree_leaves_with_path(reference["params"])
        if "kernel" in jax.tree_util.keystr(k)
    ]
    all_kernels = sum(int(np.prod(x.shape)) * 4 for x in kernels)
    largest = max(int(np.prod(x.shape)) * 4 for x in kernels)
    # Unordered, XLA:CPU keeps p + u of every kernel alive at once (~85 MB).
    assert reference["project"]["temp"] <= max(largest, _transform.GROUP_BYTES) + 1 * MB
    assert reference["project"]["temp"] < all_kernels / 4


def passes(reference, name) -> float:
    """Bytes the step moves, in passes over the (float32) parameters."""
    param_bytes = sum(int(np.prod(x.shape)) * 4 for x in jax.tree.leaves(reference["params"]))
    return reference[name]["moved"] / param_bytes


def test_traffic_counter_on_plain_adam(reference):
    # The counter's own check. At least m, v, g, p read and m, v, p written
    # (7 passes); XLA:CPU today: 10 (g read by the m and v kernels, m and v
    # read again by the p kernel), the figure docs/performance.md explains.
    assert 7 - 0.01 <= passes(reference, "plain") <= 10 + 0.01


def test_project_moves_no_more_memory_than_the_hand_written_step(reference):
    assert passes(reference, "project") <= passes(reference, "hand") + 0.01


def test_project_adds_at_most_four_passes_to_plain_adam(reference):
    # The norms read q = p + u once; the last kernel reads q and p again and
    # writes p' (update space needs p there, the hand-written step does not):
    # docs/performance.md.
    assert passes(reference, "project") <= passes(reference, "plain") + 4.01


def test_every_k_steps_keeps_temporaries_to_one_leaf_at_a_time(reference):
    # One `cond` over the whole tree made XLA materialise every leaf's update
    # at once (90 MB, page-faulted on every step: slower than projecting every
    # step). Per-leaf conditions, ordered like the projections, keep one.
    labels = oc.label_by_path(RULES)
    tx = optax.chain(optax.adam(1e-3), oc.project(CONSTRAINTS, labels, every_k_steps=4))
    got = memory(compiled_step(tx, reference["params"]))
    largest = 1536 * 1536 * 4
    assert got["temp"] <= 2 * max(largest, _transform.GROUP_BYTES) + 1 * MB
    assert got["moved"] <= reference["project"]["moved"]


def _apply_constraints_step(params):
    labels = oc.label_by_path(RULES)
    return memory(
        compiled_step(
            optax.adam(1e-3), params, then=lambda p: oc.apply_constraints(p, CONSTRAINTS, labels)
        )
    )


def test_apply_constraints_after_the_update_runs_in_place_in_float32(reference):
    got = _apply_constraints_step(reference["params"])
    assert got["temp"] <= 1 * MB
    assert got["moved"] <= reference["hand"]["moved"]


def test_apply_constraints_orders_bfloat16_leaves_in_groups(reference):
    # Low-precision leaves project through float32 copies; unordered, XLA:CPU
    # made all of them at once (81 MB on this workload).
    params = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16), reference["params"]
    )
    got = _apply_constraints_step(params)
    largest = 1536 * 1536 * 4  # one float32 copy of a Dense kernel
    assert got["temp"] <= 2 * max(largest, _transform.GROUP_BYTES) + 1 * MB


def test_hand_written_step_with_our_constraints_runs_in_place(reference):
    # apply_updates, then tree_map(constraint): XLA writes p + u into the
    # donated buffer and rescales it there; the overflow-safe norms must not
    # add a buffer (no lax.cond, no broadcast shared between leaves).
    assert reference["hand"]["temp"] <= 1 * MB
    assert reference["hand"]["peak"] <= reference["plain"]["peak"] + 1 * MB


@pytest.mark.parametrize("constraint", [oc.NonNeg(), oc.Clip(-0.1, 0.1)])
def test_elementwise_constraints_fuse_into_adams_last_pass(reference, constraint):
    tx = optax.chain(optax.adam(1e-3), oc.project(constraint))
    got = memory(compiled_step(tx, reference["params"]))
    assert got["temp"] <= 64 * 1024
    assert passes({**reference, "c": got}, "c") <= passes(reference, "plain") + 0.01


def test_nonneg_everywhere_costs_what_keep_params_nonnegative_costs():
    params = reference_shapes()
    adam = optax.adam(1e-3)
    ours = memory(compiled_step(optax.chain(adam, oc.project(oc.NonNeg())), params))
    optax_own = memory(compiled_step(optax.chain(adam, optax.keep_params_nonnegative()), params))
    assert ours["temp"] <= optax_own["temp"] + 64 * 1024
    assert ours["peak"] <= optax_own["peak"] + 64 * 1024
    assert ours["moved"] <= optax_own["moved"] + 64 * 1024


# -- ordering is exact -----------------------------------------


def _problem():
    # Leaves of at least `ORDERED_SIZE` elements take part in the ordering.
    keys = iter(jax.random.split(jax.random.key(0), 32))
    params, updates = {}, {}
    for i in range(4):
        params[f"dense{i}"] = {
            "kernel": jax.random.normal(next(keys), (256, 320)),
            "bias": jax.random.normal(next(keys), (320,)),
        }
    params["conv0"] = {
        "kernel": jax.random.normal(next(keys), (3, 3, 64, 128)) * 0.2,
        "bias": jax.random.normal(next(keys), (128,)),
    }
    params["dense_small"] = {
        "kernel": jax.random.normal(next(keys), (16, 8)),
        "bias": jax.random.normal(next(keys), (8,)),
    }
    for name, layer in params.items():
        updates[name] = {k: jax.random.normal(next(keys), v.shape) * 0.5 for k, v in layer.items()}
    return params, updates


def _updates(params, updates):
    tx = oc.project(CONSTRAINTS, oc.label_by_path(RULES))
    new, _ = jax.jit(tx.update)(updates, tx.init(params), params)
    return new


def _bits(tree):
    unsigned = {2: np.uint16, 4: np.uint32}
    return [np.asarray(x).view(unsigned[x.dtype.itemsize]) for x in jax.tree.leaves(tree)]


@pytest.mark.parametrize(
    "settings",
    [
        {"GROUP_BYTES": 1},  # every leaf its own group: ordered one by one
        {"GROUP_BYTES": 2**62},  # one group: no ordering
        {"ORDERED_SIZE": 1},  # the small leaves too
    ],
)
def test_ordering_changes_no_bit(monkeypatch, settings):
    params, updates = _problem()
    default = _updates(params, updates)
    for name, value in settings.items():
        monkeypatch.setattr(_transform, name, value)
    other = _updates(params, updates)
    for a, b in zip(_bits(default), _bits(other), strict=True):
        np.testing.assert_array_equal(a, b)


def test_ordering_apply_constraints_changes_no_bit(monkeypatch):
    params, _ = _problem()
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    labels = oc.label_by_path(RULES)

    def projected():
        return jax.jit(lambda p: oc.apply_constraints(p, CONSTRAINTS, labels))(params)

    default = projected()
    monkeypatch.setattr(_transform, "GROUP_BYTES", 1)
    one_by_one = projected()
    monkeypatch.setattr(_transform, "ORDERED_SIZE", 2**62)
    unordered = projected()
    for a, b, c in zip(_bits(default), _bits(one_by_one), _bits(unordered), strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)


def test_ordered_update_equals_each_constraints_own_project_update():
    params, updates = _problem()
    got = _updates(params, updates)
    for name, layer in params.items():
        for leaf, p in layer.items():
            label = "bias" if leaf == "bias" else "conv" if name.startswith("conv") else "dense"
            c = CONSTRAINTS[label]
            want, _ = jax.jit(lambda p, u, c=c: c.project_update(p, u, None, 0))(
                p, updates[name][leaf]
            )
            np.testing.assert_array_equal(_bits(want)[0], _bits(got[name][leaf])[0])


@pytest.mark.parametrize("constraint", [oc.MaxNorm(2.0), oc.UnitNorm(), oc.MinMaxNorm(0.5, 1.0)])
def test_branching_norms_of_large_leaves_match_branch_free_ones(monkeypatch, constraint):
    # Large leaves (`BRANCH_SIZE`) re-sum overflowed units under a lax.cond in
    # update space; small ones and direct calls always sum twice. Same bits.
    keys = jax.random.split(jax.random.key(1), 2)
    p = jax.random.normal(keys[0], (256, 320))
    u = jax.random.normal(keys[1], (256, 320)) * 0.1
    u = u.at[:, 3].set(1e30).at[5, 7].set(-3e29)  # two units whose squares overflow

    def new_params():
        return p + jax.jit(lambda p, u: constraint.project_update(p, u, None, 0)[0])(p, u)

    branching = new_params()
    monkeypatch.setattr(_base, "BRANCH_SIZE", 2**62)
    branch_free = new_params()
    np.testing.assert_array_equal(_bits(branching)[0], _bits(branch_free)[0])
    assert bool(jnp.all(jnp.isfinite(branching)))
    norms = np.linalg.norm(np.asarray(branching, np.float64), axis=0)
    assert norms[3] == pytest.approx(2.0 if isinstance(constraint, oc.MaxNorm) else 1.0, rel=1e-5)


def _whole_step_kernels(widths) -> dict[str, int]:
    """Kernels of a whole training step (forward, backward, Adam, apply) of a tanh MLP."""
    params = {
        f"l{i}": {"kernel": jnp.full((a, b), 0.01), "bias": jnp.zeros(b)}
        for i, (a, b) in enumerate(itertools.pairwise(widths))
    }

    def loss(p, x):
        for i in range(len(widths) - 1):
            x = jnp.tanh(x @ p[f"l{i}"]["kernel"] + p[f"l{i}"]["bias"])
        return jnp.sum(x * x)

    labels = oc.label_by_path({"**/kernel": "kernel", "**/bias": "bias"})
    constraints = {"kernel": oc.MaxNorm(3.0, axis="fan_in"), "bias": oc.NonNeg()}

    def keras_formula(w, label):  # Keras 3's MaxNorm and NonNeg, no overflow handling
        if label == "bias":
            return jnp.maximum(w, 0)
        norms = jnp.sqrt(jnp.sum(jnp.square(w), axis=0, keepdims=True))
        return w * (jnp.clip(norms, 0, 3.0) / (1e-7 + norms))

    adam = optax.adam(1e-3)

    def with_tx(tx):
        def step(p, s, x):
            updates, s = tx.update(jax.grad(loss)(p, x), s, p)
            return optax.apply_updates(p, updates), s

        return step

    def hand(p, s, x):
        updates, s = adam.update(jax.grad(loss)(p, x), s, p)
        p = optax.apply_updates(p, updates)
        return jax.tree.map(keras_formula, p, labels(p)), s

    projected = optax.chain(adam, oc.project(constraints, labels))
    x = jnp.ones((8, widths[0]))
    steps = {"plain": (with_tx(adam), adam), "project": (with_tx(projected), projected)}
    steps["hand"] = (hand, adam)
    return {
        name: _traffic.kernel_count(jax.jit(f).lower(params, tx.init(params), x).compile())
        for name, (f, tx) in steps.items()
    }


@pytest.mark.parametrize("widths", [[64] * 5, [256] * 5, [64, 64, 256, 256, 256, 64]])
def test_whole_step_kernels_are_the_keras_formulas_plus_overflow_safety(widths):
    # Compile time tracks the kernel count (docs/performance.md, section 10).
    # Against the hand-written Keras formula (no overflow safety), `project`
    # may add per kernel leaf only its overflow-safe second sum: on a small
    # leaf that sum itself (1 kernel); on a large one (>= 2**16 elements) the
    # predicate and the conditional that skip it, and the ordering anchor (3);
    # plus 2 for the whole step (the step counter).
    counts = _whole_step_kernels(widths)
    large = sum(a * b >= _base.BRANCH_SIZE for a, b in itertools.pairwise(widths))
    small = len(widths) - 1 - large
    assert counts["hand"] > counts["plain"]
    assert counts["project"] <= counts["hand"] + small + 3 * large + 2
