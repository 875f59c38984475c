"""Formulations that `project` and `unit_norms` do *not* use, kept for comparison.

`docs/performance.md` explains the choice; `run.py --formulations` measures
them next to the library's own on the reference workload. None of these is
part of the package.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import optax

from benchmarks import _workload as W
from optax_constraints import _transform
from optax_constraints import projections as P

_K = 64  # 2**-64 brings float32 squares up to 1e30**2 back into range


def norms_keras(w, axes):
    """Keras's formula: `inf` (then zeros or NaN) when squares overflow."""
    return jnp.sqrt(jnp.sum(jnp.square(w), axis=axes, keepdims=True))


def norms_literal_scale(w, axes):
    """Second sum over `w * 2**-k` with a literal scale (the previous version).

    XLA merges the literal broadcasts of same-shaped leaves into one array,
    writes it to memory and reads it in every second sum.
    """
    sumsq = jnp.sum(jnp.square(w), axis=axes, keepdims=True)
    scaled = w * jnp.float32(2.0**-_K)
    rescaled = jnp.sum(jnp.square(scaled), axis=axes, keepdims=True)
    return jnp.where(jnp.isinf(sumsq), jnp.sqrt(rescaled) * 2.0**_K, jnp.sqrt(sumsq))


def norms_cond(w, axes):
    """One sum; a `lax.cond` runs the rescaled sum only when a unit overflowed."""
    sumsq = jnp.sum(jnp.square(w), axis=axes, keepdims=True)

    def rescaled():
        scaled = w * jnp.float32(2.0**-_K)
        again = jnp.sum(jnp.square(scaled), axis=axes, keepdims=True)
        return jnp.where(jnp.isinf(sumsq), jnp.sqrt(again) * 2.0**_K, jnp.sqrt(sumsq))

    return jax.lax.cond(jnp.any(jnp.isinf(sumsq)), rescaled, lambda: jnp.sqrt(sumsq))


def norms_computed_scale(w, axes):
    """The library's branch-free form (`unit_norms` outside `branch_on_overflow`)."""
    return P.unit_norms(w, axes)


NORMS = {
    "keras": norms_keras,
    "literal": norms_literal_scale,
    "computed": norms_computed_scale,
    "cond": norms_cond,
}


def _max_norm(w, label, norms):
    if label == "bias":
        return jnp.maximum(w, 0)
    n = norms(w, W.KERAS_AXES[label] if label == "dense_kernel" else (0, 1, 2))
    return w * (jnp.clip(n, 0, W.MAX_VALUE) / (1e-7 + n))


def hand_step(norms):
    """apply_updates, then the projection with the given norms, in one jit."""
    adam = optax.adam(W.LEARNING_RATE)

    def step(p, s, g):
        u, s = adam.update(g, s, p)
        p = optax.apply_updates(p, u)
        return jax.tree.map(lambda w, lab: _max_norm(w, lab, norms), p, W.labels_of(p)), s

    return step, adam


def update_step(norms):
    """Update space, ordered in groups like `project`, with the given norms."""
    adam = optax.adam(W.LEARNING_RATE)

    def step(p, s, g):
        u, s = adam.update(g, s, p)
        flat_p, treedef = jax.tree.flatten(p)
        flat_u, labels = jax.tree.leaves(u), jax.tree.leaves(W.labels_of(p))
        order, out = _transform._InGroups(), []
        for w, du, lab in zip(flat_p, flat_u, labels, strict=True):
            if lab == "bias":
                out.append(jnp.where(w + du <= 0, -w, du))
                continue
            target = _max_norm(w + order.after_previous_group(du), lab, norms)
            order.add(target)
            out.append(target - w)
        return optax.apply_updates(p, jax.tree.unflatten(treedef, out)), s

    return step, adam


@contextlib.contextmanager
def unordered():
    """`project` without its ordering (every leaf in one group), while tracing."""
    saved = _transform.GROUP_BYTES
    _transform.GROUP_BYTES = 2**62
    try:
        yield
    finally:
        _transform.GROUP_BYTES = saved
