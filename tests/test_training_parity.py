"""End to end: Keras `model.fit()` with constraints == Flax + Optax + `oc.project`.

Keras projects every constrained variable right after each optimizer step.
The same models, written in Flax Linen, start from Keras's initial weights
and train on the same full batch with the same loss and plain SGD chained
with `oc.project(...)`; after 25 steps every weight must agree. Each test
also trains without constraints to show that the constraints bind.

How close is close enough comes from the arithmetic, not from one machine:
Keras and Flax run the same float32 operations in different orders (and
XLA's CPU kernels round differently on Intel and AMD), and each step feeds
its rounding into the next. The same Flax loop run in float64 is the exact
trajectory; our float32 run's distance from it is the rounding envelope of
this problem on this machine, grown over the 25 steps. Keras's float32 run
is subject to the same envelope, so the two float32 runs may differ by the
two distances added: the tolerance is `ENVELOPE` times ours (Keras's own
distance allowed up to `ENVELOPE - 1` times ours), plus a few ulps of the
values. A wrong formula (epsilon, axis, clipping, order of projection and
update) moves a weight by far more than that.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import keras
import numpy as np
import optax

import optax_constraints as oc

STEPS = 25
LEARNING_RATE = 0.1
ENVELOPE = 4  # |keras - exact| <= 3 |ours - exact|, added to |ours - exact|
ULPS = 4  # final rounding of each weight, in units of its float32 spacing
EPS32 = float(np.finfo(np.float32).eps)


def norm_slack(w) -> float:
    """Relative float32 error of a projected unit norm: the sum of squares over
    the unit's `n` entries, the square root and the rescaling (n + 2 roundings)."""
    return (np.prod(np.shape(w)[:-1]) + 2) * EPS32


def dataset(input_shape, n=32, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, *input_shape)).astype(np.float32)
    mix = rng.standard_normal((int(np.prod(input_shape)), 3)).astype(np.float32)
    # Large targets push the weights to grow, so the norm bounds bind.
    y = (3.0 * np.tanh(x.reshape(n, -1) @ mix) + 2.0).astype(np.float32)
    return x, y


def fit_keras(model, x, y):
    """Keras's own loop: whole-dataset batches, no shuffling, plain SGD, MSE."""
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=LEARNING_RATE), loss="mse")
    initial = [np.array(w) for w in model.get_weights()]
    model.fit(x, y, batch_size=len(x), epochs=STEPS, shuffle=False, verbose=0)
    return initial, [np.array(w) for w in model.get_weights()]


def fit_flax(module, params, tx, x, y):
    """`STEPS` full-batch steps, in the dtype of `params` and `x`."""

    def loss_fn(p):
        return jnp.mean((module.apply(p, x) - y) ** 2)  # Keras "mse", mean over all

    @jax.jit
    def step(p, state):
        grads = jax.grad(loss_fn)(p)
        updates, state = tx.update(grads, state, p)
        return optax.apply_updates(p, updates), state

    state = tx.init(params)
    for _ in range(STEPS):
        params, state = step(params, state)
    return params


def column_norms(w):
    w = np.asarray(w, np.float64)
    return np.sqrt(np.sum(w * w, axis=tuple(range(w.ndim - 1))))


def fit_flax_exact(module, params, tx, x, y):
    """The same loop in float64: the exact trajectory, up to float64 rounding."""
    with jax.enable_x64(True):
        params64 = jax.tree.map(lambda w: jnp.asarray(np.asarray(w, np.float64)), params)
        out = fit_flax(module, params64, tx, np.asarray(x, np.float64), np.asarray(y, np.float64))
        return jax.tree.map(lambda w: np.asarray(w, np.float64), out)


def leaf(flax_params, path):
    node = flax_params["params"]
    for key in path.split("/"):
        node = node[key]
    return np.asarray(node, np.float64)


def assert_tree_close(ours, exact, expected: dict):
    """Keras's weights are within the rounding envelope of ours (module docstring)."""
    for path, value in expected.items():
        ours_w, exact_w = leaf(ours, path), leaf(exact, path)
        value = np.asarray(value, np.float64)
        # float64 is exact next to float32: its distance from ours is float32's.
        drift = np.abs(ours_w - exact_w).max()
        assert drift < 1e-3 * np.abs(exact_w).max(), f"{path}: the float32 run left the exact one"
        spacing = np.spacing(np.abs(value).astype(np.float32)).astype(np.float64)
        tol = ENVELOPE * drift + ULPS * spacing
        gap = np.abs(ours_w - value)
        worst = np.unravel_index(np.argmax(gap - tol), gap.shape)
        assert np.all(gap <= tol), (
            f"{path} {list(worst)}: ours {ours_w[worst]!r} vs Keras {value[worst]!r}; gap"
            f" {gap[worst]:.3g} > tolerance {tol[worst]:.3g} ({ENVELOPE} x float32 drift"
            f" {drift:.3g} + {ULPS} ulp)"
        )


# --- Dense: 8 -> 16 (relu) -> 3 ----------------------------------------------


class DenseNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(16)(x))
        return nn.Dense(3)(x)


DENSE_MAX = 0.9
DENSE_MIN_MAX = (0.5, 1.0, 0.5)  # min_value, max_value, rate


def keras_dense_model():
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(
                16,
                activation="relu",
                kernel_constraint=keras.constraints.MaxNorm(DENSE_MAX),
                bias_constraint=keras.constraints.NonNeg(),
            ),
            keras.layers.Dense(
                3,
                kernel_constraint=keras.constraints.MinMaxNorm(*DENSE_MIN_MAX),
                bias_constraint=keras.constraints.NonNeg(),
            ),
        ]
    )


def dense_params(weights):
    k0, b0, k1, b1 = (jnp.asarray(w) for w in weights)
    return {
        "params": {"Dense_0": {"kernel": k0, "bias": b0}, "Dense_1": {"kernel": k1, "bias": b1}}
    }


def dense_projection():
    return oc.project(
        {
            "max": oc.MaxNorm(DENSE_MAX),
            "min_max": oc.MinMaxNorm(*DENSE_MIN_MAX),
            "non_neg": oc.NonNeg(),
        },
        oc.label_by_path(
            {"**/Dense_0/kernel": "max", "**/Dense_1/kernel": "min_max", "**/bias": "non_neg"}
        ),
    )


def test_dense_model_matches_keras_fit():
    x, y = dataset((8,))
    initial, final = fit_keras(keras_dense_model(), x, y)

    sgd = optax.sgd(LEARNING_RATE)
    ours = fit_flax(DenseNet(), dense_params(initial), optax.chain(sgd, dense_projection()), x, y)
    exact = fit_flax_exact(
        DenseNet(), dense_params(initial), optax.chain(sgd, dense_projection()), x, y
    )
    free = fit_flax(DenseNet(), dense_params(initial), sgd, x, y)

    # Without constraints the bounds would be broken: the projection is active.
    assert column_norms(free["params"]["Dense_0"]["kernel"]).max() > DENSE_MAX + 1e-3
    assert column_norms(free["params"]["Dense_1"]["kernel"]).max() > DENSE_MIN_MAX[1] + 1e-3
    assert np.min(free["params"]["Dense_0"]["bias"]) < -1e-3
    # Keras's result respects them, and differs from the unconstrained run.
    assert column_norms(final[0]).max() <= DENSE_MAX * (1 + norm_slack(final[0]))
    assert np.min(final[1]) >= 0 and np.min(final[3]) >= 0
    assert np.abs(final[0] - np.asarray(free["params"]["Dense_0"]["kernel"])).max() > 1e-2

    assert_tree_close(
        ours,
        exact,
        {
            "Dense_0/kernel": final[0],
            "Dense_0/bias": final[1],
            "Dense_1/kernel": final[2],
            "Dense_1/bias": final[3],
        },
    )
    assert np.min(ours["params"]["Dense_0"]["bias"]) >= 0  # exactly, not just close


# --- Conv2D: 8x8x1 -> Conv 3x3x4 (relu) -> flatten -> Dense 3 -----------------


class ConvNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3), padding="VALID")(x))  # Keras's default padding
        x = x.reshape((x.shape[0], -1))
        return nn.Dense(3)(x)


CONV_MAX = 0.5


def keras_conv_model():
    keras.utils.set_random_seed(1)
    return keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(
                4,
                3,
                activation="relu",
                kernel_constraint=keras.constraints.MaxNorm(CONV_MAX, axis=[0, 1, 2]),
                bias_constraint=keras.constraints.NonNeg(),
            ),
            keras.layers.Flatten(),
            keras.layers.Dense(3, kernel_constraint=keras.constraints.UnitNorm()),
        ]
    )


def conv_params(weights):
    k0, b0, k1, b1 = (jnp.asarray(w) for w in weights)
    return {"params": {"Conv_0": {"kernel": k0, "bias": b0}, "Dense_0": {"kernel": k1, "bias": b1}}}


def conv_projection():
    labels = {
        "params": {
            "Conv_0": {"kernel": "max", "bias": "non_neg"},
            "Dense_0": {"kernel": "unit", "bias": None},
        }
    }
    return oc.project(
        {"max": oc.MaxNorm(CONV_MAX, axis="fan_in"), "non_neg": oc.NonNeg(), "unit": oc.UnitNorm()},
        labels,
    )


def test_conv_model_matches_keras_fit():
    x, y = dataset((8, 8, 1), seed=1)
    initial, final = fit_keras(keras_conv_model(), x, y)
    assert initial[0].shape == (3, 3, 1, 4)  # same HWIO layout as Flax

    sgd = optax.sgd(LEARNING_RATE)
    ours = fit_flax(ConvNet(), conv_params(initial), optax.chain(sgd, conv_projection()), x, y)
    exact = fit_flax_exact(
        ConvNet(), conv_params(initial), optax.chain(sgd, conv_projection()), x, y
    )
    free = fit_flax(ConvNet(), conv_params(initial), sgd, x, y)

    free_norms = column_norms(free["params"]["Conv_0"]["kernel"])
    assert free_norms.max() > CONV_MAX + 1e-3
    assert np.abs(column_norms(free["params"]["Dense_0"]["kernel"]) - 1).max() > 1e-2
    assert np.min(free["params"]["Conv_0"]["bias"]) < -1e-3
    assert column_norms(final[0]).max() <= CONV_MAX * (1 + norm_slack(final[0]))
    assert np.min(final[1]) >= 0
    # UnitNorm divides by 1e-7 + norm: the norm lands 1e-7 / norm below 1.
    np.testing.assert_allclose(column_norms(final[2]), 1.0, atol=1e-7 + norm_slack(final[2]))

    assert_tree_close(
        ours,
        exact,
        {
            "Conv_0/kernel": final[0],
            "Conv_0/bias": final[1],
            "Dense_0/kernel": final[2],
            "Dense_0/bias": final[3],
        },
    )
