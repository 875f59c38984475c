"""The reference workload and the optimizer steps that the step-level sections compare.

Adam on about 21M parameters: eight Dense kernels 1536x1536 and four Conv
kernels 3x3x256x256, each with a bias; per-unit MaxNorm on the kernels
(`axis=0` for Dense, `(0, 1, 2)` for Conv), NonNeg on the biases. Every step
is jitted with the parameters and the optimizer state donated; the gradients
are passed in (not donated), as in a training loop whose gradients come from
another program.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

import optax_constraints as oc

MAX_VALUE = 3.0
LEARNING_RATE = 1e-3

RULES = {"dense*/kernel": "dense_kernel", "conv*/kernel": "conv_kernel", "**/bias": "bias"}
CONSTRAINTS = {
    "dense_kernel": oc.MaxNorm(MAX_VALUE, axis=0),
    "conv_kernel": oc.MaxNorm(MAX_VALUE, axis=(0, 1, 2)),
    "bias": oc.NonNeg(),
}
# The same axes for the Keras-formula baseline and for Keras itself.
KERAS_AXES = {"dense_kernel": 0, "conv_kernel": (0, 1, 2)}


def reference_params(dense=(8, 1536), conv=(4, 256), seed=0) -> dict:
    """`{"dense{i}": {kernel, bias}, "conv{i}": {kernel, bias}}`, float32."""
    (n_dense, width), (n_conv, channels) = dense, conv
    keys = iter(jax.random.split(jax.random.key(seed), n_dense + n_conv))
    params = {}
    for i in range(n_dense):
        kernel = jax.random.normal(next(keys), (width, width)) * 0.05
        params[f"dense{i}"] = {"kernel": kernel, "bias": jnp.full((width,), 0.01)}
    for i in range(n_conv):
        kernel = jax.random.normal(next(keys), (3, 3, channels, channels)) * 0.05
        params[f"conv{i}"] = {"kernel": kernel, "bias": jnp.full((channels,), 0.01)}
    return params


def many_leaves_params(n_leaves: int, width: int = 64) -> dict:
    """`n_leaves / 2` Dense layers `(width, width)` + bias: the compile-time workload."""
    return {
        f"dense{i}": {"kernel": jnp.ones((width, width)), "bias": jnp.zeros((width,))}
        for i in range(n_leaves // 2)
    }


def gradients(params, seed=1) -> dict:
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(
        treedef, [jax.random.normal(k, x.shape) * 1e-2 for k, x in zip(keys, leaves, strict=True)]
    )


def labels_of(params):
    return oc.label_by_path(RULES, allow_unmatched=True)(params)


# -- steps: (params, opt_state, grads) -> (params, opt_state) --------------


def _keras_max_norm(w, axis):
    # Keras 3's MaxNorm, term for term (no overflow handling).
    norms = jnp.sqrt(jnp.sum(jnp.square(w), axis=axis, keepdims=True))
    return w * (jnp.clip(norms, 0, MAX_VALUE) / (1e-7 + norms))


def step_with(tx) -> Callable:
    """`(params, state, grads) -> (params, state)`: `tx.update`, then `apply_updates`."""

    def step(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    return step


def optax_steps(learning_rate: float = LEARNING_RATE) -> dict[str, tuple[Callable, object]]:
    """name -> (step, optimizer whose `init` builds the state)."""
    adam = optax.adam(learning_rate)
    projected = optax.chain(
        adam, oc.project(CONSTRAINTS, oc.label_by_path(RULES, allow_unmatched=True))
    )

    projected_every4 = optax.chain(
        adam,
        oc.project(CONSTRAINTS, oc.label_by_path(RULES, allow_unmatched=True), every_k_steps=4),
    )

    def hand_oc(p, s, g):
        u, s = adam.update(g, s, p)
        p = optax.apply_updates(p, u)
        return jax.tree.map(lambda w, label: CONSTRAINTS[label](w), p, labels_of(p)), s

    def hand_keras(p, s, g):  # what a user writes: apply_updates, then Keras's formula
        u, s = adam.update(g, s, p)
        p = optax.apply_updates(p, u)

        def project(w, label):
            if label == "bias":
                return jnp.maximum(w, 0)
            return _keras_max_norm(w, KERAS_AXES[label])

        return jax.tree.map(project, p, labels_of(p)), s

    return {
        "plain": (step_with(adam), adam),
        "project": (step_with(projected), projected),
        "project_every4": (step_with(projected_every4), projected_every4),
        "hand_oc": (hand_oc, adam),
        "hand_keras": (hand_keras, adam),
    }


def nonneg_steps(learning_rate: float = LEARNING_RATE) -> dict[str, tuple[Callable, object]]:
    """NonNeg on every leaf: `oc.project` against `optax.keep_params_nonnegative`."""
    adam = optax.adam(learning_rate)
    ours = optax.chain(adam, oc.project(oc.NonNeg()))
    theirs = optax.chain(adam, optax.keep_params_nonnegative())

    return {"nonneg_project": (step_with(ours), ours), "keep_nonneg": (step_with(theirs), theirs)}


def jit_step(step: Callable) -> Callable:
    """The step jitted with params and optimizer state donated (a fresh cache)."""
    return jax.jit(functools.partial(step), donate_argnums=(0, 1))


def compiled_run(step: Callable, tx, params, grads) -> tuple[Callable, tuple]:
    """(compiled step, (params copy, state, grads)): one entry of `_timing.interleaved`."""
    p = jax.tree.map(jnp.copy, params)
    s = tx.init(p)
    return jit_step(step).lower(p, s, grads).compile(), (p, s, grads)


def keras_available() -> bool:
    """Whether Keras 3 can be imported (the Keras rows are skipped without it)."""
    try:
        import keras  # noqa: F401
    except ImportError:
        return False
    return True


# -- Keras 3 (JAX backend): Adam `stateless_apply` with variable constraints --


def keras_steps(params) -> dict[str, tuple[Callable, list, list]]:
    """name -> (step, trainable values, optimizer values) for Keras's own Adam.

    `"keras_constrained"` sets the same constraints on the Keras variables;
    Keras projects them after the update inside `stateless_apply`.
    """
    import keras  # imported late: KERAS_BACKEND must be set first (run.py does)

    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    labels = jax.tree.leaves(labels_of(params))
    keras_constraint = {
        "dense_kernel": keras.constraints.MaxNorm(MAX_VALUE, axis=0),
        "conv_kernel": keras.constraints.MaxNorm(MAX_VALUE, axis=[0, 1, 2]),
        "bias": keras.constraints.NonNeg(),
    }
    out = {}
    for name, constrained in (("keras_plain", False), ("keras_constrained", True)):
        variables = []
        for i, ((_, value), label) in enumerate(zip(leaves, labels, strict=True)):
            variable = keras.Variable(jnp.copy(value), name=f"v{i}")
            if constrained:  # what `kernel_constraint=` / `bias_constraint=` do in a layer
                variable.constraint = keras_constraint[label]
            variables.append(variable)
        optimizer = keras.optimizers.Adam(LEARNING_RATE)
        optimizer.build(variables)

        def step(trainable, opt_vars, grads, optimizer=optimizer):
            return optimizer.stateless_apply(opt_vars, grads, trainable)

        out[name] = (step, [v.value for v in variables], [v.value for v in optimizer.variables])
    return out
