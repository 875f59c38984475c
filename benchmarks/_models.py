"""Whole training steps of real models, for the `whole_step` and `fit_runtime` sections.

Each model is a Flax Linen module with a loss; `whole_steps` builds, per
variant, one jitted step `(params, opt_state, batch) -> (params, opt_state,
loss)`: forward, backward, Adam, apply. The constraints are the usual
rules: `MaxNorm(axis="fan_in")` on every kernel, `NonNeg` on every bias.

* `lm(n_blocks)`: a pre-LayerNorm transformer language model, d = 256,
  4 heads, MLP 4d, vocabulary 512, sequence 64, batch 8;
* `mlp(100)`: 100 Dense layers of width 64;
* `lm(n_blocks, scan=True)`: the LM with its blocks under `nn.scan` (one set
  of stacked kernels, shape `(n_blocks, ...)`), constrained through
  `oc.Stacked` (`whole_steps(..., stacked=True)`).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

import optax_constraints as oc

MAX_VALUE = 3.0
RULES = {"**/kernel": "kernel", "**/bias": "bias"}
CONSTRAINTS = {"kernel": oc.MaxNorm(MAX_VALUE, axis="fan_in"), "bias": oc.NonNeg()}
STACKED_RULES = {"ScanScanBlock_0/**/kernel": "stacked", **RULES}
STACKED_CONSTRAINTS = {"stacked": oc.Stacked(CONSTRAINTS["kernel"]), **CONSTRAINTS}
VOCAB, SEQ, BATCH, D = 512, 64, 8, 256


def _modules():
    import flax.linen as nn  # lazily: flax is an optional dependency

    class Block(nn.Module):
        d: int = D

        @nn.compact
        def __call__(self, x):
            h = nn.LayerNorm()(x)
            h = nn.MultiHeadDotProductAttention(num_heads=4)(
                h, h, mask=nn.make_causal_mask(x[..., 0])
            )
            x = x + h
            h = nn.LayerNorm()(x)
            h = nn.Dense(4 * self.d)(h)
            h = nn.Dense(self.d)(nn.gelu(h))
            return x + h

    class ScanBlock(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            return Block()(x), None

    class LM(nn.Module):
        n_blocks: int
        scan: bool = False

        @nn.compact
        def __call__(self, tokens):
            x = nn.Embed(VOCAB, D)(tokens)
            if self.scan:
                blocks = nn.scan(
                    ScanBlock,
                    variable_axes={"params": 0},
                    split_rngs={"params": True},
                    length=self.n_blocks,
                )
                x, _ = blocks()(x, None)
            else:
                for _ in range(self.n_blocks):
                    x = Block()(x)
            return nn.Dense(VOCAB)(nn.LayerNorm()(x))

    class MLP(nn.Module):
        n_layers: int
        width: int = 64

        @nn.compact
        def __call__(self, x):
            for _ in range(self.n_layers - 1):
                x = nn.relu(nn.Dense(self.width)(x))
            return nn.Dense(10)(x)

    return LM, MLP


def lm(n_blocks: int, scan: bool = False):
    """(module, params, batch, loss) for the language model."""
    LM, _ = _modules()
    model = LM(n_blocks, scan)
    tokens = jax.random.randint(jax.random.key(0), (BATCH, SEQ + 1), 0, VOCAB)
    params = model.init(jax.random.key(1), tokens[:, :-1])["params"]

    def loss(params, tokens):
        logits = model.apply({"params": params}, tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    return params, tokens, loss


def mlp(n_layers: int = 100, width: int = 64):
    """(params, batch, loss) for the deep MLP."""
    _, MLP = _modules()
    model = MLP(n_layers, width)
    x = jax.random.normal(jax.random.key(0), (128, width))
    y = jax.random.randint(jax.random.key(2), (128,), 0, 10)
    params = model.init(jax.random.key(1), x)["params"]

    def loss(params, batch):
        x, y = batch
        logits = model.apply({"params": params}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return params, (x, y), loss


def _keras_formula(w, label):
    """Keras 3's MaxNorm / NonNeg, term for term (no overflow handling)."""
    if label == "bias":
        return jnp.maximum(w, 0)
    # "stacked": the layer axis 0 is not part of a unit.
    axes = tuple(range(1 if label == "stacked" else 0, w.ndim - 1))
    norms = jnp.sqrt(jnp.sum(jnp.square(w), axis=axes, keepdims=True))
    return w * (jnp.clip(norms, 0, MAX_VALUE) / (1e-7 + norms))


def whole_steps(
    loss: Callable, learning_rate: float, *, stacked: bool = False
) -> dict[str, tuple[Callable, object]]:
    """name -> (step, optimizer whose `init` makes the state).

    `step(params, opt_state, batch) -> (params, opt_state, loss)`. With
    `stacked`, the scanned blocks' kernels are constrained per layer.
    """
    adam = optax.adam(learning_rate)
    rules, constraints = (STACKED_RULES, STACKED_CONSTRAINTS) if stacked else (RULES, CONSTRAINTS)
    labels = oc.label_by_path(rules, allow_unmatched=True)
    projected = optax.chain(adam, oc.project(constraints, labels))

    def with_tx(tx):
        def step(params, state, batch):
            value, grads = jax.value_and_grad(loss)(params, batch)
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state, value

        return step

    def hand_keras(params, state, batch):
        value, grads = jax.value_and_grad(loss)(params, batch)
        updates, state = adam.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        return jax.tree.map(_keras_formula, params, labels(params)), state, value

    return {
        "plain": (with_tx(adam), adam),
        "project": (with_tx(projected), projected),
        "hand_keras": (hand_keras, adam),
    }
