"""End to end: jitted Flax training with `oc.project` routed by `label_by_path`.

Linen through `TrainState.apply_gradients`, NNX through
`nnx.Optimizer(model, tx, wrt=nnx.Param)` inside `nnx.jit`. Each constrained
run goes in lockstep with a plain `optax.adam` run fed the *same* gradients,
so:

* constrained leaves must satisfy their constraint after every step
  (`NonNeg` exactly, norms to the float32 rounding of the projection in
  update space: `projected_norm_rtol`), and after the first step equal the Keras
  formula applied to the plain run's leaf (`assert_projected`);
* unconstrained leaves (LayerNorm scale and bias) must equal the plain run's
  bit for bit: Adam is per-leaf, so any change the projection made to an
  unconstrained update (or to the optimizer state) would show up there.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from flax.training import train_state
from helpers import EPS32, KERAS_EPSILON, norm_ulps, projected_norm_rtol

import optax_constraints as oc

VOCAB, CLASSES, STEPS, LR = 12, 4, 6, 0.05
KERNEL_MAX, EMBED_MAX = 0.5, 0.5
ADAM_STEP = LR * 0.1 / np.sqrt(0.001 * (1 - 0.9**2 / 0.999))
"""The most Adam (b1 = 0.9, b2 = 0.999) moves an entry in one step: Cauchy-Schwarz on
its two moving averages, |m| <= (1 - b1) / sqrt((1 - b2)(1 - b1^2 / b2)) sqrt(v);
the bias corrections only shrink it."""


def batch():
    k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
    images = jax.random.normal(k1, (16, 6, 6, 3))
    tokens = jax.random.randint(k2, (16, 5), 0, VOCAB)
    targets = jax.random.randint(k3, (16,), 0, CLASSES)
    return images, tokens, targets


def cross_entropy(logits, targets):
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def fan_in_norms(kernel):
    kernel = np.asarray(kernel, np.float64)
    return np.sqrt(np.sum(kernel**2, axis=tuple(range(kernel.ndim - 1))))


def row_norms(table):
    return np.sqrt(np.sum(np.asarray(table, np.float64) ** 2, axis=1))


def keras_max_norm(w, max_value, axis):
    w = np.asarray(w, np.float32)
    norms = np.sqrt(np.sum(w * w, axis=axis, keepdims=True))
    return w * (np.clip(norms, 0, max_value) / (np.float32(1e-7) + norms))


def keras_unit_norm(w, axis):
    w = np.asarray(w, np.float32)
    return w / (np.float32(1e-7) + np.sqrt(np.sum(w * w, axis=axis, keepdims=True)))


def smallest_norm_before(before, axes):
    """A lower bound on the units' norms after one Adam step from `before`."""
    n = int(np.prod([before.shape[a] for a in axes]))
    norms = np.sqrt(np.sum(np.asarray(before, np.float64) ** 2, axis=axes))
    return max(norms.min() - np.sqrt(n) * ADAM_STEP, KERAS_EPSILON)


def assert_projected(actual, expected, before, axes):
    """`actual` (our update-space projection) against `expected` (Keras's formula).

    Each side's rounding of the same formula (`2 * norm_ulps(n)` of each
    entry), then `p + u'` with `p = before`, the leaf before the step, and
    `u' = expected - p`: an ulp of `|u'|` and of the result.
    """
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    n = int(np.prod([expected.shape[a] for a in axes]))
    move = np.abs(expected - np.asarray(before, np.float64))
    tol = EPS32 * (2 * norm_ulps(n) * np.abs(expected) + move + np.abs(expected))
    excess = np.abs(actual - expected) - tol
    i = np.unravel_index(np.argmax(excess), excess.shape)
    assert excess.max() <= 0, (
        f"off by {excess.max():.3g} more than the rounding allows at {i}: actual {actual[i]!r},"
        f" expected {expected[i]!r}, before {np.asarray(before)[i]!r}, tol {tol[i]!r}"
    )


def fan_in_axes(kernel):
    return tuple(range(np.ndim(kernel) - 1))


def assert_feasible(kernels, biases, embedding, embed_check, previous):
    for name, kernel in kernels.items():
        norms = fan_in_norms(kernel)
        rtol = projected_norm_rtol(kernel, previous[name], fan_in_axes(kernel), KERNEL_MAX)
        assert np.all(norms <= KERNEL_MAX * (1 + rtol)), (name, norms.max())
    for name, bias in biases.items():
        assert float(jnp.min(bias)) >= 0.0, name  # exact: no element below zero, ever
    embed_check(row_norms(embedding))


# --- (a) Linen + TrainState -----------------------------------------------------------


class LinenNet(nn.Module):
    @nn.compact
    def __call__(self, images, tokens):
        h = nn.relu(nn.Conv(6, (3, 3))(images)).mean(axis=(1, 2))  # Conv_0
        h = h + nn.Embed(VOCAB, 6)(tokens).mean(axis=1)  # Embed_0
        h = nn.LayerNorm()(h)  # LayerNorm_0
        h = nn.relu(nn.Dense(16)(h))  # Dense_0
        return nn.Dense(CLASSES)(h)  # Dense_1


LINEN_KERNELS = ("Conv_0", "Dense_0", "Dense_1")


def test_linen_train_state_lockstep():
    images, tokens, targets = batch()
    model = LinenNet()
    params = model.init(jax.random.key(0), images, tokens)["params"]
    constraints = {
        "kernel": oc.MaxNorm(KERNEL_MAX, axis="fan_in"),
        "bias": oc.NonNeg(),
        "embedding": oc.UnitNorm(axis=1),  # per token
    }
    labels = oc.label_by_path(
        {
            "LayerNorm_*/**": None,  # before "**/bias": LayerNorm's bias stays free
            "**/kernel": "kernel",
            "**/bias": "bias",
            "**/embedding": "embedding",
        }
    )
    constrained = train_state.TrainState.create(
        apply_fn=model.apply,
        params=params,
        tx=optax.chain(optax.adam(LR), oc.project(constraints, labels)),
    )
    plain = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=optax.adam(LR))
    traces = []

    @jax.jit
    def step(constrained, plain):
        traces.append(1)

        def loss(p):
            return cross_entropy(constrained.apply_fn({"params": p}, images, tokens), targets)

        grads = jax.grad(loss)(constrained.params)
        return constrained.apply_gradients(grads=grads), plain.apply_gradients(grads=grads)

    previous = params
    for i in range(STEPS):
        constrained, plain = step(constrained, plain)
        c, p = constrained.params, plain.params
        if i == 0:  # one step from the same params: constrained = C(plain)
            for name in LINEN_KERNELS:
                kernel = np.asarray(p[name]["kernel"])
                expected = keras_max_norm(kernel, KERNEL_MAX, fan_in_axes(kernel))
                old = previous[name]["kernel"]
                assert_projected(c[name]["kernel"], expected, old, fan_in_axes(kernel))
                np.testing.assert_array_equal(c[name]["bias"], np.maximum(p[name]["bias"], 0))
            table = p["Embed_0"]["embedding"]
            expected = keras_unit_norm(table, 1)
            old = previous["Embed_0"]["embedding"]
            assert_projected(c["Embed_0"]["embedding"], expected, old, (1,))
        old_table = previous["Embed_0"]["embedding"]
        embed_rtol = projected_norm_rtol(
            c["Embed_0"]["embedding"], old_table, (1,), 1.0, smallest_norm_before(old_table, (1,))
        )
        assert_feasible(
            {n: c[n]["kernel"] for n in LINEN_KERNELS},
            {n: c[n]["bias"] for n in LINEN_KERNELS},
            c["Embed_0"]["embedding"],
            lambda norms, rtol=embed_rtol: np.testing.assert_array_less(np.abs(norms - 1.0), rtol),
            {n: previous[n]["kernel"] for n in LINEN_KERNELS},
        )
        last, previous = previous, c
        # Unconstrained leaves: exactly what plain Adam gives with the same gradients.
        for leaf in ("scale", "bias"):
            np.testing.assert_array_equal(c["LayerNorm_0"][leaf], p["LayerNorm_0"][leaf])
        # ... and so is Adam's state (chain(adam, project) state: (adam's, project's)).
        np.testing.assert_array_equal(
            constrained.opt_state[0][0].nu["LayerNorm_0"]["scale"],
            plain.opt_state[0].nu["LayerNorm_0"]["scale"],
        )

    assert len(traces) == 1  # no retracing across steps
    c, p, init = constrained.params, plain.params, params
    # The checks above had teeth: training moved the free leaves, a misrouted
    # NonNeg would have clipped LayerNorm's bias, and the constraints were active.
    assert not np.array_equal(c["LayerNorm_0"]["scale"], init["LayerNorm_0"]["scale"])
    assert float(jnp.min(p["LayerNorm_0"]["bias"])) < 0
    assert float(jnp.min(p["Dense_0"]["bias"])) < 0  # NonNeg binds on Dense biases
    for name in LINEN_KERNELS:
        assert fan_in_norms(p[name]["kernel"]).max() > KERNEL_MAX * 1.1  # MaxNorm binds
        kernel = c[name]["kernel"]
        rtol = projected_norm_rtol(
            kernel, last[name]["kernel"], fan_in_axes(kernel), KERNEL_MAX
        ).max()
        np.testing.assert_allclose(fan_in_norms(kernel).max(), KERNEL_MAX, rtol=rtol)


# --- (b) NNX + nnx.Optimizer ------------------------------------------------------------


class NNXNet(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(3, 6, (3, 3), rngs=rngs)
        self.embed = nnx.Embed(VOCAB, 6, rngs=rngs)
        self.norm = nnx.LayerNorm(6, rngs=rngs)
        self.hidden = nnx.Linear(6, 16, rngs=rngs)
        self.head = nnx.Linear(16, CLASSES, rngs=rngs)

    def __call__(self, images, tokens):
        h = nnx.relu(self.conv(images)).mean(axis=(1, 2)) + self.embed(tokens).mean(axis=1)
        return self.head(nnx.relu(self.hidden(self.norm(h))))


NNX_KERNELS = ("conv", "hidden", "head")


def test_nnx_optimizer_lockstep():
    images, tokens, targets = batch()
    model = NNXNet(nnx.Rngs(0))
    plain_model = nnx.clone(model)
    init = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    constraints = {
        "kernel": oc.MaxNorm(KERNEL_MAX, axis="fan_in"),
        "bias": oc.NonNeg(),
        "embedding": oc.MaxNorm(EMBED_MAX, axis=1),  # per token
    }
    labels = oc.label_by_path(
        {"norm/**": None, "**/kernel": "kernel", "**/bias": "bias", "**/embedding": "embedding"}
    )
    tx = optax.chain(optax.adam(LR), oc.project(constraints, labels))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)  # tx.init sees Param leaves
    plain_optimizer = nnx.Optimizer(plain_model, optax.adam(LR), wrt=nnx.Param)
    traces = []

    @nnx.jit
    def step(model, optimizer, plain_model, plain_optimizer):
        traces.append(1)

        def loss(m):
            return cross_entropy(m(images, tokens), targets)

        grads = nnx.grad(loss)(model)
        optimizer.update(model, grads)  # tx.update sees plain arrays
        plain_optimizer.update(plain_model, grads)

    previous = init
    for i in range(STEPS):
        step(model, optimizer, plain_model, plain_optimizer)
        c = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        p = nnx.to_pure_dict(nnx.state(plain_model, nnx.Param))
        if i == 0:
            for name in NNX_KERNELS:
                kernel = np.asarray(p[name]["kernel"])
                expected = keras_max_norm(kernel, KERNEL_MAX, fan_in_axes(kernel))
                old = previous[name]["kernel"]
                assert_projected(c[name]["kernel"], expected, old, fan_in_axes(kernel))
                np.testing.assert_array_equal(c[name]["bias"], np.maximum(p[name]["bias"], 0))
            table = p["embed"]["embedding"]
            expected = keras_max_norm(table, EMBED_MAX, 1)
            old = previous["embed"]["embedding"]
            assert_projected(c["embed"]["embedding"], expected, old, (1,))
        embed_rtol = projected_norm_rtol(
            c["embed"]["embedding"], previous["embed"]["embedding"], (1,), EMBED_MAX
        )
        assert_feasible(
            {n: c[n]["kernel"] for n in NNX_KERNELS},
            {n: c[n]["bias"] for n in NNX_KERNELS},
            c["embed"]["embedding"],
            lambda norms, rtol=embed_rtol: np.testing.assert_array_less(
                norms, EMBED_MAX * (1 + rtol)
            ),
            {n: previous[n]["kernel"] for n in NNX_KERNELS},
        )
        last, previous = previous, c
        for leaf in ("scale", "bias"):
            np.testing.assert_array_equal(c["norm"][leaf], p["norm"][leaf])

    assert len(traces) == 1
    assert int(optimizer.step[...]) == STEPS
    c = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    p = nnx.to_pure_dict(nnx.state(plain_model, nnx.Param))
    assert not np.array_equal(c["norm"]["scale"], init["norm"]["scale"])
    assert float(jnp.min(p["norm"]["bias"])) < 0
    assert float(jnp.min(p["hidden"]["bias"])) < 0
    assert row_norms(p["embed"]["embedding"]).max() > EMBED_MAX * 1.1
    table = c["embed"]["embedding"]
    rtol = projected_norm_rtol(table, last["embed"]["embedding"], (1,), EMBED_MAX).max()
    np.testing.assert_allclose(row_norms(table).max(), EMBED_MAX, rtol=rtol)
    for name in NNX_KERNELS:
        assert fan_in_norms(p[name]["kernel"]).max() > KERNEL_MAX * 1.1
        kernel = c[name]["kernel"]
        rtol = projected_norm_rtol(
            kernel, last[name]["kernel"], fan_in_axes(kernel), KERNEL_MAX
        ).max()
        np.testing.assert_allclose(fan_in_norms(kernel).max(), KERNEL_MAX, rtol=rtol)
