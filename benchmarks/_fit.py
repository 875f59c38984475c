"""Whole training steps at run time: our jitted Linen step against Keras's `fit()`.

For the `fit_runtime` section of `run.py`. Two architectures, each built
twice, as a Flax Linen module and as a Keras 3 functional model:

* `cnn`: the Keras MNIST convnet on 28x28x1 images, batch 128:
  Conv 32 3x3 relu, max-pool 2, Conv 64 3x3 relu, max-pool 2, Dense 128
  relu, Dense 10 (`VALID` padding, as Keras's default);
* `lm(n_blocks)`: the pre-LayerNorm transformer LM of `_models.py` (d = 256,
  4 heads, MLP 4d with tanh-approximated GELU, vocabulary 512, sequence 64,
  batch 8), built from `Embedding`, `LayerNormalization`,
  `MultiHeadAttention(use_causal_mask=True)` and `Dense` layers.

The constraints are those of `_models.py`: on our side, the path rules
`MaxNorm(3, axis="fan_in")` on every `kernel` and `NonNeg` on every `bias`
(the LayerNorm biases included); on Keras's side the same sets by layer
arguments: `kernel_constraint=MaxNorm(3, axis=<every axis but the last>)`,
`bias_constraint=NonNeg()`, `beta_constraint=NonNeg()`. `constrained_shapes`
lists both sides' constrained leaves so that they can be compared.

A round times `steps` consecutive training steps of one variant, after one
step that is not timed, and returns seconds per step (CPU time of the process
and wall time). Ours: the compiled step (parameters and optimizer state
donated), synchronised after every step. Keras: one `model.fit(epochs=1)`
over a NumPy dataset of exactly `steps + 1` batches, the clock read in
`on_train_batch_end` after waiting for the step's outputs, so that neither
the compilation (done in a warm-up `fit`) nor `fit`'s per-call setup is
timed. The batch-to-batch time includes what `fit` does for every batch
(slicing the NumPy arrays and copying the batch to the device, the loss
tracker, the callbacks); ours is given its batch on the device.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import jax
import numpy as np
import optax

from benchmarks import _models as M

CNN_BATCH = 128
LEARNING_RATE = 1e-3


# -- Flax Linen --------------------------------------------------------------


def flax_cnn(batch: int = CNN_BATCH):
    """(params, (images, labels), loss) for the convnet, random data."""
    import flax.linen as nn  # lazily: flax is an optional dependency

    class CNN(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Conv(32, (3, 3), padding="VALID")(x))
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
            x = nn.relu(nn.Conv(64, (3, 3), padding="VALID")(x))
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
            x = x.reshape((x.shape[0], -1))
            x = nn.relu(nn.Dense(128)(x))
            return nn.Dense(10)(x)

    model = CNN()
    images, labels = cnn_data(batch, seed=0)
    params = model.init(jax.random.key(1), images)["params"]

    def loss(params, batch):
        x, y = batch
        logits = model.apply({"params": params}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return params, (jax.numpy.asarray(images), jax.numpy.asarray(labels)), loss


def cnn_data(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`n` random 28x28x1 float32 images in [0, 1) and int32 labels in [0, 10)."""
    rng = np.random.default_rng(seed)
    return (
        rng.random((n, 28, 28, 1), dtype=np.float32),
        rng.integers(0, 10, (n,), dtype=np.int32),
    )


def lm_data(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`n` random token sequences: inputs `(n, SEQ)` and next-token targets."""
    tokens = np.random.default_rng(seed).integers(0, M.VOCAB, (n, M.SEQ + 1), dtype=np.int32)
    return tokens[:, :-1], tokens[:, 1:]


def flax_steps(loss: Callable) -> dict[str, tuple[Callable, object]]:
    """`{"plain", "project"}` -> (step, optimizer) from `_models.whole_steps`."""
    steps = M.whole_steps(loss, LEARNING_RATE)
    return {name: steps[name] for name in ("plain", "project")}


def violations(params) -> dict[str, float]:
    """`oc.constraint_violations` of `_models.CONSTRAINTS` by `_models.RULES`."""
    import optax_constraints as oc

    labels = oc.label_by_path(M.RULES, allow_unmatched=True)
    found = oc.constraint_violations(params, M.CONSTRAINTS, labels)
    return {str(k): float(v) for k, v in sorted(found.items())}


def flax_round_runner(step: Callable, tx, params, batch) -> tuple[Callable, Callable, Callable]:
    """(compile, run_round, violations_now) for our jitted step.

    `run_round(steps)` -> (CPU s, wall s) per step. `compile()` lowers and
    compiles the step (params and state donated) and runs two warm-up steps;
    nothing of it is timed by `run_round`. `violations_now()`: `violations`
    of the current parameters.
    """
    state = {}

    def compile_():
        p = jax.tree.map(jax.numpy.copy, params)
        s = tx.init(p)
        compiled = jax.jit(step, donate_argnums=(0, 1)).lower(p, s, batch).compile()
        state.update(compiled=compiled, p=p, s=s)
        for _ in range(2):
            one()

    def one():
        p, s, value = state["compiled"](state["p"], state["s"], batch)
        jax.block_until_ready((p, s, value))
        state.update(p=p, s=s)

    def run_round(steps: int) -> tuple[float, float]:
        one()
        w0, c0 = time.perf_counter(), time.process_time()
        for _ in range(steps):
            one()
        return (time.process_time() - c0) / steps, (time.perf_counter() - w0) / steps

    return compile_, run_round, lambda: violations(state["p"])


# -- Keras 3 -----------------------------------------------------------------


def _keras_constraints(constrained: bool):
    import keras  # imported late: KERAS_BACKEND must be set first (run.py does)

    if not constrained:
        return lambda kernel_ndim: None, None
    non_neg = keras.constraints.NonNeg()

    def max_norm(kernel_ndim):  # axis="fan_in": every axis but the last
        return keras.constraints.MaxNorm(M.MAX_VALUE, axis=list(range(kernel_ndim - 1)))

    return max_norm, non_neg


def keras_cnn(constrained: bool):
    """The convnet as a Keras functional model (not compiled)."""
    import keras
    from keras import layers

    max_norm, non_neg = _keras_constraints(constrained)
    x = inputs = keras.Input((28, 28, 1))
    for filters in (32, 64):
        x = layers.Conv2D(
            filters, 3, activation="relu", kernel_constraint=max_norm(4), bias_constraint=non_neg
        )(x)
        x = layers.MaxPooling2D(2)(x)
    x = layers.Flatten()(x)
    x = layers.Dense(
        128, activation="relu", kernel_constraint=max_norm(2), bias_constraint=non_neg
    )(x)
    outputs = layers.Dense(10, kernel_constraint=max_norm(2), bias_constraint=non_neg)(x)
    return keras.Model(inputs, outputs)


def keras_lm(n_blocks: int, constrained: bool):
    """The `_models.lm` transformer as a Keras functional model (not compiled)."""
    import keras
    from keras import layers

    max_norm, non_neg = _keras_constraints(constrained)

    def layer_norm(x):  # Flax's LayerNorm: epsilon 1e-6, its bias matches "**/bias"
        return layers.LayerNormalization(epsilon=1e-6, beta_constraint=non_neg)(x)

    def dense(units, x, activation=None):
        return layers.Dense(
            units, activation=activation, kernel_constraint=max_norm(2), bias_constraint=non_neg
        )(x)

    def gelu(x):  # Flax's nn.gelu is the tanh approximation
        return keras.activations.gelu(x, approximate=True)

    inputs = keras.Input((M.SEQ,), dtype="int32")
    x = layers.Embedding(M.VOCAB, M.D)(inputs)
    for _ in range(n_blocks):
        h = layer_norm(x)
        h = layers.MultiHeadAttention(
            num_heads=4,
            key_dim=M.D // 4,
            kernel_constraint=max_norm(3),  # (d, heads, head_dim) and (heads, head_dim, d)
            bias_constraint=non_neg,
        )(h, h, use_causal_mask=True)
        x = layers.Add()([x, h])
        h = dense(M.D, dense(4 * M.D, layer_norm(x), activation=gelu))
        x = layers.Add()([x, h])
    outputs = dense(M.VOCAB, layer_norm(x))
    return keras.Model(inputs, outputs)


def keras_compile(model):
    import keras

    model.compile(
        optimizer=keras.optimizers.Adam(LEARNING_RATE),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def constrained_shapes(flax_params, keras_model) -> dict[str, list]:
    """Shapes of the leaves each side constrains, by constraint class name, sorted."""
    import optax_constraints as oc

    labels = oc.label_by_path(M.RULES, allow_unmatched=True)(flax_params)
    ours: dict[str, list] = {}
    flat_labels = jax.tree.leaves(labels, is_leaf=lambda x: x is None)
    for w, label in zip(jax.tree.leaves(flax_params), flat_labels, strict=True):
        if label is not None:
            ours.setdefault(type(M.CONSTRAINTS[label]).__name__, []).append(tuple(w.shape))
    theirs: dict[str, list] = {}
    for v in keras_model.trainable_variables:
        if v.constraint is not None:
            theirs.setdefault(type(v.constraint).__name__, []).append(tuple(v.shape))
    return {
        "ours": {k: sorted(v) for k, v in sorted(ours.items())},
        "keras": {k: sorted(v) for k, v in sorted(theirs.items())},
    }


def keras_round_runner(model, x: np.ndarray, y: np.ndarray, batch: int):
    """(compile, run_round, violations_now) for `model.fit` on a NumPy dataset.

    `run_round(steps)` fits one epoch of `steps + 1` batches and returns the
    time (CPU s, wall s) per step from the end of the first batch to the end
    of the last, as `on_train_batch_end` sees it after the step's outputs are
    ready. `compile()` runs one warm-up epoch of two batches (trace and XLA
    compile).
    `violations_now()`: `violations` of the model's weights, every kernel
    and bias (LayerNorm's `beta` counts as a bias) measured against the
    constraints of `_models.py`, whatever the model itself sets.
    """
    import keras

    class Clock(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.marks = []

        def on_train_batch_end(self, batch, logs=None):
            # The JAX trainer keeps the live state here during `fit`; waiting
            # for it (not only for the loss in `logs`) waits for the update.
            jax.block_until_ready(getattr(self.model, "_jax_state", None))
            self.marks.append((time.process_time(), time.perf_counter()))

    def fit(steps):
        n = (steps + 1) * batch
        clock = Clock()
        model.fit(
            x[:n], y[:n], batch_size=batch, epochs=1, shuffle=False, verbose=0, callbacks=[clock]
        )
        if len(clock.marks) != steps + 1:
            raise RuntimeError(f"fit ran {len(clock.marks)} batches, expected {steps + 1}")
        (c0, w0), (c1, w1) = clock.marks[0], clock.marks[-1]
        return (c1 - c0) / steps, (w1 - w0) / steps

    def compile_():
        fit(1)

    def violations_now():
        names = {"kernel": "kernel", "bias": "bias", "beta": "bias"}
        tree = {  # {layer path: {"kernel" | "bias": value}}, as Flax nests them
            v.path.rsplit("/", 1)[0]: {} for v in model.trainable_variables if v.name in names
        }
        for v in model.trainable_variables:
            if v.name in names:
                tree[v.path.rsplit("/", 1)[0]][names[v.name]] = v.value
        return violations(tree)

    return compile_, fit, violations_now
