"""Train a Flax MLP on scikit-learn's digits with Keras-style constraints.

The main job of the README: a dropout network with max-norm on every kernel
(Srivastava et al., 2014) and non-negative biases on the hidden layers, trained
with `optax.chain(optax.adam(...), oc.project(...))`, then checked: every
hidden unit's incoming-weight norm is at most the bound, every constrained
bias is non-negative, and the classifier is accurate on held-out digits.

Run: python examples/train_digits.py [--epochs 30]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax.training import train_state
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import optax_constraints as oc

MAX_NORM = 2.0


class MLP(nn.Module):
    hidden: int = 512
    dropout: float = 0.3

    @nn.compact
    def __call__(self, x, *, train: bool):
        for i in range(2):
            x = nn.Dense(self.hidden, name=f"hidden_{i}")(x)
            x = nn.relu(x)
            x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return nn.Dense(10, name="out")(x)


def load_data(seed: int):
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int32)
    return train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)


def main(epochs: int = 30, batch_size: int = 64, seed: int = 0) -> dict:
    x_train, x_test, y_train, y_test = load_data(seed)
    model = MLP()
    rng = jax.random.PRNGKey(seed)
    params = model.init(rng, jnp.ones((1, 64)), train=False)["params"]

    # Which leaf gets which constraint: glob rules over "/"-joined key paths.
    labels = oc.label_by_path({"**/kernel": "max_norm", "hidden_*/bias": "non_neg"})
    constraints = {
        "max_norm": oc.MaxNorm(MAX_NORM, axis="fan_in"),  # per output unit
        "non_neg": oc.NonNeg(),
    }
    print(oc.routing_report(params, constraints, labels), end="\n\n")

    params = oc.apply_constraints(params, constraints, labels)  # start feasible
    # A large learning rate is what max-norm makes safe (the paper's point).
    tx = optax.chain(optax.adam(3e-3), oc.project(constraints, labels))
    state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)

    @jax.jit
    def train_step(state, x, y, key):
        def loss_fn(params):
            logits = state.apply_fn({"params": params}, x, train=True, rngs={"dropout": key})
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(grads=grads), loss

    @jax.jit
    def accuracy(params, x, y):
        logits = model.apply({"params": params}, x, train=False)
        return jnp.mean(jnp.argmax(logits, -1) == y)

    violations = jax.jit(lambda p: oc.constraint_violations(p, constraints, labels))
    order_rng = np.random.default_rng(seed)
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        order = order_rng.permutation(len(x_train))
        for i in range(0, len(order) - batch_size + 1, batch_size):
            idx = order[i : i + batch_size]
            rng, key = jax.random.split(rng)
            state, loss = train_step(state, x_train[idx], y_train[idx], key)
        if epoch % 5 == 0 or epoch == epochs:
            acc = float(accuracy(state.params, x_test, y_test))
            worst = {k: f"{float(v):.1e}" for k, v in violations(state.params).items()}
            print(
                f"epoch {epoch:3d}  loss {float(loss):.4f}  test acc {acc:.4f}  violations {worst}"
            )
    elapsed = time.perf_counter() - start

    # Show that the constraints hold on the trained model.
    print(f"\nper-layer largest incoming-weight norm (bound {MAX_NORM:.1f}):")
    norms = {}
    for name, layer in state.params.items():
        n = jnp.sqrt(jnp.sum(layer["kernel"] ** 2, axis=0))
        norms[name] = float(n.max())
        print(f"  {name:9s} max {float(n.max()):.6f}  mean {float(n.mean()):.4f}")
    min_bias = min(float(state.params[f"hidden_{i}"]["bias"].min()) for i in range(2))
    print(f"smallest hidden bias: {min_bias:.6f} (constrained non-negative)")
    acc = float(accuracy(state.params, x_test, y_test))
    print(f"test accuracy {acc:.4f} after {epochs} epochs in {elapsed:.1f}s")

    assert all(v <= MAX_NORM * (1 + 1e-6) for v in norms.values()), norms
    assert min_bias >= 0.0, min_bias
    assert acc > 0.9, acc
    print("OK: every constraint holds after training.")
    return {"accuracy": acc, "max_norms": norms, "min_bias": min_bias}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    main(epochs=args.epochs, seed=args.seed)
