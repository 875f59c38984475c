"""The Optax glue: `project` (a `GradientTransformation`) and `apply_constraints`."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_constraints._project_state import constraint_states, leaf_violation, project_leaf
from optax_constraints._routing import Constraints, Route, normalize, route
from optax_constraints.constraints._base import update_and_target
from optax_constraints.projections import compute_dtype
from optax_constraints.projections._sharding import shard_counts

PyTree = Any

NO_PARAMS_MSG = (
    optax.NO_PARAMS_MSG  # pyright: ignore[reportAttributeAccessIssue]  (newer optax only)
    if hasattr(optax, "NO_PARAMS_MSG")
    else (
        "You are using a transformation that requires the current value of"
        " parameters, but you are not passing `params` when calling `update`."
    )
)


class ProjectState(NamedTuple):
    """State of `project`.

    Attributes:
      count: number of `update` calls so far (int32); schedules read it.
      constraint_states: per-leaf state of stateful constraints, keyed by the
        leaf's "/"-joined path (empty when every constraint is stateless).

    >>> import jax.numpy as jnp
    >>> import optax_constraints as oc
    >>> params = {"dense": {"kernel": jnp.ones((4, 3))}}
    >>> state = oc.project(oc.SpectralNorm(1.0)).init(params)
    >>> int(state.count), list(state.constraint_states)
    (0, ['dense/kernel'])
    >>> oc.project(oc.MaxNorm(1.0)).init(params).constraint_states
    {}
    """

    count: jax.Array  # pyright: ignore[reportIncompatibleMethodOverride]  (as in optax's states)
    constraint_states: dict[str, PyTree]


def project(
    constraints: Constraints,
    param_labels: PyTree | None = None,
    *,
    every_k_steps: int = 1,
) -> optax.GradientTransformation:
    """Projects the parameters onto their constraints after each update.

    `update(updates, state, params)` returns `u'` such that
    `optax.apply_updates(params, u')` equals `C(params + updates)` (up to
    rounding) for every constrained leaf, where `C` is the leaf's constraint;
    unconstrained leaves' updates come back untouched. This is what Keras's
    `fit()` does with `kernel_constraint=...`, expressed as an update, so it
    chains with any Optax optimizer. **Put it last in `optax.chain`**: anything
    after it changes the update and can leave the feasible set.

    Args:
      constraints: mapping label -> constraint (an `oc.Constraint`, a name or
        config `oc.get` accepts, any callable `w -> w`, or `None`). A single
        constraint with `param_labels=None` applies to every leaf.
      param_labels: pytree of labels with the params' structure (or a prefix
        of it; `None` leaves are unconstrained), or a callable
        `params -> labels` such as `oc.label_by_path(...)`.
      every_k_steps: project on the k-th, 2k-th, ... update (counting from 1)
        and pass updates through unchanged otherwise.

    Returns:
      An `optax.GradientTransformation` with state `ProjectState`.

    Labels are checked once, in `init`: a label missing from `constraints`, a
    labels tree that does not fit, an axis out of range or a non-float leaf
    raise `ValueError` naming the leaf's path and shape.

    Inside `optax.MultiSteps` the projection lands only on the steps that emit
    an update (Keras projects after every micro-batch step).

    >>> import jax.numpy as jnp
    >>> import numpy as np
    >>> import optax
    >>> import optax_constraints as oc
    >>> params = {"kernel": jnp.array([[3.0], [4.0]]), "bias": jnp.array([-1.0])}
    >>> tx = optax.chain(
    ...     optax.sgd(0.1),
    ...     oc.project({"k": oc.MaxNorm(1.0), "b": oc.NonNeg()},
    ...                {"kernel": "k", "bias": "b"}),
    ... )
    >>> state = tx.init(params)
    >>> grads = {"kernel": jnp.zeros((2, 1)), "bias": jnp.ones(1)}
    >>> updates, state = tx.update(grads, state, params)
    >>> new = optax.apply_updates(params, updates)
    >>> np.asarray(new["kernel"], np.float64).round(4).tolist(), new["bias"].tolist()
    ([[0.6], [0.8]], [0.0])
    """
    mapping, labels = normalize(constraints, param_labels)
    if not (isinstance(every_k_steps, int) and every_k_steps >= 1):
        raise ValueError(f"project: every_k_steps must be an int >= 1; got {every_k_steps!r}.")

    def init_fn(params):
        routes = route(params, mapping, labels, check=True)
        states = {}
        for r in routes:
            if r.constraint is not None:
                s = r.constraint.init_state(jnp.asarray(r.leaf.value))
                if s is not None:
                    states[r.leaf.path_str] = s
        return ProjectState(jnp.zeros([], jnp.int32), states)

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError(NO_PARAMS_MSG)
        routes = [r for r in route(params, mapping, labels, check=False) if r.constraint]
        flat_updates, treedef = jax.tree.flatten(updates)
        flat_params = jax.tree.leaves(params)
        if len(flat_updates) != len(flat_params):
            raise ValueError(
                f"project: updates have {len(flat_updates)} leaves but params have"
                f" {len(flat_params)}; pass the same structure for both."
            )

        due = None if every_k_steps == 1 else (state.count + 1) % every_k_steps == 0
        flat_updates, states = _project_leaves(
            routes, flat_params, flat_updates, dict(state.constraint_states), state.count, due
        )
        new_count: jax.Array = optax.safe_int32_increment(state.count)  # pyright: ignore[reportAssignmentType]  (an int32 Array)
        return jax.tree.unflatten(treedef, flat_updates), ProjectState(new_count, states)

    return optax.GradientTransformation(init_fn, update_fn)


GROUP_BYTES = 4 * 2**20
"""Bytes of targets that `project` projects concurrently (see `_InGroups`)."""

ORDERED_SIZE = 2**16
"""Leaves with fewer elements are left to XLA's schedule (see `_InGroups`)."""


def _project_leaves(routes, flat_params, flat_u, states, count, due=None):
    """Every routed leaf's projected update, in groups (see `_InGroups`).

    With `due` (a traced bool, `every_k_steps`), updates pass through
    unchanged unless `due`: large leaves each under their own `lax.cond`, in
    the same ordered groups; small leaves under one `lax.cond` together; the
    update forms that constraints define themselves (`project_update`:
    NonNeg, Clip; elementwise) computed every step and selected. One
    `cond` over the whole tree would make XLA materialise every leaf's update
    at once, and the page faults of that buffer would cost more than the
    projection saved (docs/performance.md).
    """
    flat_u = list(flat_u)
    order = _InGroups()
    small = []
    for r in routes:
        i, key, c = r.leaf.index, r.leaf.path_str, r.constraint
        p, state = flat_params[i], states.get(key)
        if c.has_update_form:
            # The constraint's own update form (NonNeg, Clip): elementwise,
            # nothing to order.
            new_u, new_state = c.project_update(p, flat_u[i], state, count)
            if due is not None:
                new_u, new_state = _where(due, (new_u, new_state), (flat_u[i], state))
        elif due is not None and p.size < ORDERED_SIZE:
            small.append(r)
            continue
        else:
            update = order.after_previous_group(flat_u[i])

            def projected(operands, c=c, p=p):
                u, s = operands
                new_u, s, target = update_and_target(c, p, u, s, count)
                return new_u, s, target if due is None else new_u

            if due is None:
                new_u, new_state, anchor = projected((update, state))
            else:
                new_u, new_state, anchor = jax.lax.cond(
                    due, projected, lambda ops: (*ops, ops[0]), (update, state)
                )
            order.add(anchor)
        flat_u[i] = new_u
        if key in states:
            states[key] = new_state
    if small:

        def projected_small(operands):
            updates, small_states = operands
            out_u, out_s = [], []
            for r, u, s in zip(small, updates, small_states, strict=True):
                new_u, s, _ = update_and_target(
                    r.constraint, flat_params[r.leaf.index], u, s, count
                )
                out_u.append(new_u)
                out_s.append(s)
            return out_u, out_s

        operands = (
            [flat_u[r.leaf.index] for r in small],
            [states.get(r.leaf.path_str) for r in small],
        )
        out_u, out_s = jax.lax.cond(due, projected_small, lambda ops: ops, operands)
        for r, new_u, new_state in zip(small, out_u, out_s, strict=True):
            flat_u[r.leaf.index] = new_u
            if r.leaf.path_str in states:
                states[r.leaf.path_str] = new_state
    return flat_u, states


def _where(due, if_due, otherwise):
    return jax.tree.map(lambda a, b: jnp.where(due, a, b), if_due, otherwise)


class _InGroups:
    """Orders the projections in groups of about `GROUP_BYTES` of targets.

    A norm-type projection of `q = p + u` reads `q` twice (the norms, then the
    rescaling) and needs `p` again for `C(q) - p`, so XLA writes `q` to a
    temporary buffer. XLA:CPU's default scheduler runs the program breadth
    first, for concurrency: every leaf's `q` is computed before the first one
    is consumed, so all of them are live at once (one full copy of the
    constrained parameters, freshly mapped and page-faulted on every step).

    Here each group's updates depend on the previous group's targets through
    a scalar that is always exactly 0.0 (`u - 0.0 == u` bit for bit, `-0.0`
    and NaN included): a test on the sum of a few entries of every target in
    the group, which XLA cannot prove constant. A reduction stays a step of
    its own, one level below the rescaling pass, so a breadth-first schedule
    finishes a group's rescaling before it starts the next group's `q`, and
    the temporary buffers are reused. Memory-minimising schedulers need no
    help; on them the extra work is a few scalar operations per group.

    Leaves under `ORDERED_SIZE` elements are left out: their buffers are
    small, and every ordered leaf adds a little to XLA's compile time.
    """

    def __init__(self):
        self.group_bytes = GROUP_BYTES
        self.previous = None  # 0.0, computed from the previous group's targets
        self.corners: list[jax.Array] = []
        self.group_size = 0

    def after_previous_group(self, update: jax.Array) -> jax.Array:
        if self.previous is None or update.size < ORDERED_SIZE:
            return update
        return update - self.previous.astype(update.dtype)

    def add(self, target: jax.Array) -> None:
        if target.size < ORDERED_SIZE:
            return
        self.corners.append(jnp.sum(_corner(target), dtype=jnp.float32))
        self.group_size += target.size * target.dtype.itemsize
        if self.group_size >= self.group_bytes:
            self.previous = (jnp.asarray(sum(self.corners)) > 0).astype(jnp.float32) * 0
            self.corners, self.group_size = [], 0


def _corner(x: jax.Array) -> jax.Array:
    """A few entries at the start of `x`: the first 8 of its last axis, in general.

    Taken without flattening: flattening a sharded `x` makes XLA all-gather
    the whole parameter (tests/test_multidevice.py). An axis sharded over
    `Explicit` mesh axes keeps one entry per shard (slices must split evenly).
    """
    if not x.ndim:
        return x
    counts = shard_counts(x)
    last = min(x.shape[-1], -(-8 // counts[-1]) * counts[-1])
    return x[(*(slice(0, n) for n in counts[:-1]), slice(0, last))]


def _routes(params, constraints, param_labels) -> list[Route]:
    mapping, labels = normalize(constraints, param_labels)
    return route(params, mapping, labels, check=True)


def apply_constraints(
    params: PyTree,
    constraints: Constraints,
    param_labels: PyTree | None = None,
    *,
    step: int | jax.Array | None = None,
    state: PyTree | None = None,
) -> PyTree:
    """Projects a parameter tree directly: each constrained leaf `w` -> `C(w)`.

    Use it once on freshly initialised parameters so training starts
    feasible, or after loading a checkpoint. Low-precision leaves are projected
    in float32 and rounded once. Stateful constraints use their own exact form
    (`__call__`).

    Args:
      params: the parameter pytree.
      constraints: as for `project`.
      param_labels: as for `project`.
      step: the step at which scheduled hyper-parameters are evaluated
        (`constraint.at_step(step)`); default 0, the schedule's start. After
        loading a checkpoint, pass the optimizer's step (e.g.
        `ProjectState.count`) to project onto the bound training had reached.
      state: the optimizer state (or the `oc.ProjectState` in it), for
        constraints whose set lives in `project`'s state (`oc.Sphere("init")`:
        the per-unit norms at `init`); without it they raise `ValueError`
        naming the leaf.

    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_constraints as oc
    >>> oc.apply_constraints({"w": jnp.array([-1.0, 2.0])}, oc.NonNeg())
    {'w': Array([0., 2.], dtype=float32)}
    >>> shrinking = oc.MaxNorm(optax.linear_schedule(4.0, 1.0, 100), axis=None)
    >>> out = oc.apply_constraints({"w": jnp.array([3.0, 0.0])}, shrinking, step=100)
    >>> round(float(jnp.linalg.norm(out["w"])), 4)  # the bound at step 100
    1.0
    """
    routes = _routes(params, constraints, param_labels)
    step = 0 if step is None else step
    states = None if state is None else constraint_states(state)
    flat, treedef = jax.tree.flatten(params)
    # bfloat16/float16 leaves project through float32 temporaries: those are
    # ordered in groups like `project`'s (81 MB -> 9 MB of temporaries on the
    # benchmark's workload in bfloat16). Float32 leaves are projected in place
    # in a donated buffer, which the ordering would prevent.
    order = _InGroups()
    for r in routes:
        if r.constraint is not None:
            w = flat[r.leaf.index]
            low = compute_dtype(w.dtype) != w.dtype
            c = r.constraint.at_step(step)
            out = project_leaf(r, c, order.after_previous_group(w) if low else w, states, step)
            out = out.astype(w.dtype)
            if low:
                order.add(out)
            flat[r.leaf.index] = out
    return jax.tree.unflatten(treedef, flat)


def constraint_violations(
    params: PyTree,
    constraints: Constraints,
    param_labels: PyTree | None = None,
    *,
    step: int | jax.Array | None = None,
    state: PyTree | None = None,
) -> dict[Hashable, jax.Array]:
    """Per label, the largest violation over its leaves (0 when feasible).

    Pure and jittable: cheap enough to log every step. The measure is each
    constraint's `violation(w)`: the norm excess for `MaxNorm`, the most
    negative entry for `NonNeg`, `max |w - C(w)|` by default. It is computed
    in the leaf's compute dtype (float32 for float32 and lower precision,
    float64 for float64 leaves under `jax_enable_x64`).

    Args:
      params: the parameter pytree.
      constraints: as for `project`.
      param_labels: as for `project`.
      step: the step at which scheduled hyper-parameters are evaluated;
        default 0, the schedule's start. While training, pass the
        optimizer's step count (the value `project` used on the last update
        is `ProjectState.count - 1`).
      state: as for `apply_constraints`; a constraint that needs it is
        measured as `max |w - C(w)|`, `C` applied with its state.

    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_constraints as oc
    >>> params = {"kernel": jnp.array([[3.0], [4.0]]), "bias": jnp.array([-0.5])}
    >>> v = oc.constraint_violations(params, {"k": oc.MaxNorm(2.0), "b": oc.NonNeg()},
    ...                              {"kernel": "k", "bias": "b"})
    >>> {k: round(float(x), 3) for k, x in v.items()}
    {'b': 0.5, 'k': 3.0}
    >>> shrinking = oc.MaxNorm(optax.linear_schedule(6.0, 1.0, 100))
    >>> at = lambda s: float(oc.constraint_violations(params, shrinking, step=s)["__all__"])
    >>> at(0), at(100)
    (0.0, 4.0)
    """
    step = 0 if step is None else step
    states = None if state is None else constraint_states(state)
    out: dict[Hashable, jax.Array] = {}
    for r in _routes(params, constraints, param_labels):
        if r.constraint is None:
            continue
        w = r.leaf.value
        v = leaf_violation(r, r.constraint.at_step(step), w, states, step)
        v = jnp.asarray(v, compute_dtype(getattr(w, "dtype", jnp.float32)))
        out[r.label] = jnp.maximum(out[r.label], v) if r.label in out else v
    return dict(sorted(out.items(), key=lambda kv: repr(kv[0])))
