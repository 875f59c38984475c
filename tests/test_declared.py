"""`oc.declared`: constraints declared where the model is defined, trained end to end.

Every path trains a small model with the declared constraints and checks,
after each step, that the constraints hold (norms against a float64 NumPy
reference, `NonNeg` exactly). Where the same model can be constrained by
path rules (`label_by_path`), the declared run must equal the rule run bit
for bit: the two routes must project the same leaves with the same
constraints. The Keras loop is compared with Keras's own `fit()`.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import keras
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state
from helpers import EPS32, norm_ulps, projected_norm_rtol, ulps, update_form_error

import optax_constraints as oc

# UnitNorm in training only: its bound (`projected_norm_rtol` with `smallest`)
# needs the moved point's norm, which the loops here do not see.
NORM_RTOL = 1e-5
LR = 0.1


def norms(w, axis):
    w = np.asarray(w, np.float64)
    return np.sqrt(np.sum(w * w, axis=axis))


def fan_in_norms(w):
    return norms(w, tuple(range(np.ndim(w) - 1)))


def assert_trees_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# Flax 0.12 warns that Variable hooks (oc.constraint_metadata's) are deprecated,
# whenever a variable carrying them is made or copied (nnx.Optimizer copies).
pytestmark = pytest.mark.filterwarnings("ignore:Variable hooks are deprecated")


# --- NNX -------------------------------------------------------------------------

KMAX, EMAX = 0.5, 0.6
VOCAB = 10


class NNXNet(nnx.Module):
    """Every NNX way of declaring: *_metadata, with_metadata, a hand-made Param."""

    def __init__(self, rngs):
        self.embed = nnx.Embed(
            VOCAB, 6, embedding_metadata={"constraint": oc.MaxNorm(EMAX, axis=1)}, rngs=rngs
        )
        self.hidden = nnx.Linear(
            6,
            16,
            kernel_metadata={"constraint": oc.MaxNorm(KMAX, axis="fan_in")},
            bias_metadata={"constraint": oc.NonNeg()},
            rngs=rngs,
        )
        self.norm = nnx.LayerNorm(16, rngs=rngs)  # declares nothing
        self.head = nnx.Linear(
            16,
            4,
            kernel_init=nnx.with_metadata(
                nnx.initializers.lecun_normal(), constraint=oc.UnitNorm()
            ),
            rngs=rngs,
        )
        self.gate = nnx.Param(-jnp.ones(4), constraint="non_neg")  # by hand, by name

    def __call__(self, tokens):
        h = self.embed(tokens).mean(axis=1)
        return self.head(self.norm(nnx.relu(self.hidden(h)))) * (1 + self.gate[...])


NNX_DECLARED = {
    "embed/embedding": oc.MaxNorm(EMAX, axis=1),
    "hidden/kernel": oc.MaxNorm(KMAX, axis="fan_in"),
    "hidden/bias": oc.NonNeg(),
    "head/kernel": oc.UnitNorm(),
    "gate": oc.NonNeg(),
}


def nnx_data():
    k1, k2 = jax.random.split(jax.random.key(1))
    return jax.random.randint(k1, (16, 5), 0, VOCAB), jax.random.randint(k2, (16,), 0, 4)


def train_nnx(model, tx, steps=6, check=None):
    tokens, targets = nnx_data()
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
        def loss(m):
            logits = m(tokens)
            return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

        optimizer.update(model, nnx.grad(loss)(model))

    for _ in range(steps):
        before = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        step(model, optimizer)
        if check is not None:
            check(nnx.to_pure_dict(nnx.state(model, nnx.Param)), before)
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def check_nnx_feasible(p, before):
    hidden, embed = p["hidden"]["kernel"], p["embed"]["embedding"]
    rtol = projected_norm_rtol(hidden, before["hidden"]["kernel"], 0, KMAX)
    assert np.all(fan_in_norms(hidden) <= KMAX * (1 + rtol))
    np.testing.assert_allclose(fan_in_norms(p["head"]["kernel"]), 1.0, rtol=NORM_RTOL)
    rtol = projected_norm_rtol(embed, before["embed"]["embedding"], 1, EMAX)
    assert np.all(norms(embed, 1) <= EMAX * (1 + rtol))
    assert np.min(p["hidden"]["bias"]) >= 0 and np.min(p["gate"]) >= 0  # exact


def test_nnx_declared_reads_every_form():
    constraints, labels = oc.declared(NNXNet(nnx.Rngs(0)))
    assert constraints == NNX_DECLARED
    assert len(labels.labels) == 5
    # The same from the state, wrapped (Param leaves) and plain.
    state = nnx.state(NNXNet(nnx.Rngs(0)), nnx.Param)
    assert oc.declared(state)[0] == NNX_DECLARED
    plain = labels(nnx.to_pure_dict(state))
    wrapped = labels(state)
    assert plain["hidden"]["kernel"] == "hidden/kernel" and plain["norm"]["scale"] is None
    assert nnx.to_pure_dict(wrapped) == plain


def test_nnx_optimizer_trains_with_declared_constraints():
    model = NNXNet(nnx.Rngs(0))
    free_model, rule_model = nnx.clone(model), nnx.clone(model)
    tx = optax.chain(optax.adam(LR), oc.project(*oc.declared(model)))
    ours = train_nnx(model, tx, check=check_nnx_feasible)
    # The same constraints routed by path rules: bit-identical training.
    rules = oc.label_by_path({k: k for k in NNX_DECLARED})
    rule_tx = optax.chain(optax.adam(LR), oc.project(NNX_DECLARED, rules))
    assert_trees_equal(ours, train_nnx(rule_model, rule_tx))
    # The constraints bind: without them every bound is broken.
    free = train_nnx(free_model, optax.adam(LR))
    assert fan_in_norms(free["hidden"]["kernel"]).max() > KMAX * 1.1
    assert np.abs(fan_in_norms(free["head"]["kernel"]) - 1).max() > 1e-2
    assert norms(free["embed"]["embedding"], 1).max() > EMAX * 1.1
    assert np.min(free["gate"]) < 0 and np.min(free["hidden"]["bias"]) < 0
    # The undeclared LayerNorm trained freely and equals nothing projected.
    assert not np.array_equal(ours["norm"]["scale"], np.ones(16))


def test_nnx_report_and_violations_fit_wrapped_and_plain_state():
    model = NNXNet(nnx.Rngs(0))
    constraints, labels = oc.declared(model)
    state = nnx.state(model, nnx.Param)
    report = oc.routing_report(state, constraints, labels)
    assert report == oc.routing_report(nnx.to_pure_dict(state), constraints, labels)
    assert "'hidden/kernel'" in report and "UnitNorm(axis=0)" in report
    assert report.splitlines()[-1].startswith("8 leaves, 5 constrained")
    violations = oc.constraint_violations(state, constraints, labels)
    assert set(violations) == set(NNX_DECLARED)
    assert float(violations["gate"]) == 1.0  # the hand-made gate starts at -1
    fixed = oc.apply_constraints(nnx.to_pure_dict(state), constraints, labels)
    after = oc.constraint_violations(fixed, constraints, labels)
    assert max(float(v) for v in after.values()) <= 4 * EPS32


def test_nnx_wrt_without_a_declared_leaf_names_it():
    model = NNXNet(nnx.Rngs(0))
    constraints, labels = oc.declared(model)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    del params["gate"]
    with pytest.raises(ValueError, match=r"'gate' declares a constraint.*nnx\.state"):
        oc.project(constraints, labels).init(params)


# --- Linen: with_constraint, TrainState, with_partitioning -------------------------

lecun = nn.initializers.lecun_normal()


class LinenNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        k = oc.with_constraint(nn.with_partitioning(lecun, (None, "model")), oc.MaxNorm(KMAX))
        x = nn.relu(
            nn.Dense(
                16, kernel_init=k, bias_init=oc.with_constraint(nn.initializers.zeros, "non_neg")
            )(x)
        )
        x = nn.LayerNorm()(x)
        return nn.Dense(3, kernel_init=oc.with_constraint(lecun, oc.UnitNorm()))(x)


def linen_data():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 8)).astype(np.float32)
    return x, (3 * np.tanh(x @ rng.standard_normal((8, 3))) + 2).astype(np.float32)


def train_linen(params, tx, steps=8, check=None):
    x, y = linen_data()
    state = train_state.TrainState.create(apply_fn=LinenNet().apply, params=params, tx=tx)

    @jax.jit
    def step(state):
        grads = jax.grad(lambda p: jnp.mean((state.apply_fn({"params": p}, x) - y) ** 2))(
            state.params
        )
        return state.apply_gradients(grads=grads)

    for _ in range(steps):
        before = nn.unbox(state.params)
        state = step(state)
        if check is not None:
            check(nn.unbox(state.params), before)
    return nn.unbox(state.params)


def check_linen_feasible(p, before):
    kernel = p["Dense_0"]["kernel"]
    rtol = projected_norm_rtol(kernel, before["Dense_0"]["kernel"], 0, KMAX)
    assert np.all(fan_in_norms(kernel) <= KMAX * (1 + rtol))
    assert np.min(p["Dense_0"]["bias"]) >= 0
    np.testing.assert_allclose(fan_in_norms(p["Dense_1"]["kernel"]), 1.0, rtol=NORM_RTOL)


LINEN_DECLARED = {
    "Dense_0/kernel": oc.MaxNorm(KMAX),
    "Dense_0/bias": oc.NonNeg(),
    "Dense_1/kernel": oc.UnitNorm(),
}


@pytest.mark.parametrize("boxed", [True, False], ids=["boxed", "unboxed"])
def test_linen_train_state_with_declared_constraints(boxed):
    boxed_params = LinenNet().init(jax.random.key(0), jnp.ones((1, 8)))["params"]
    constraints, labels = oc.declared(boxed_params)
    assert constraints == LINEN_DECLARED
    # with_partitioning inside still gives the sharding names.
    assert nn.get_partition_spec(boxed_params)["Dense_0"]["kernel"] == jax.P(None, "model")
    params = boxed_params if boxed else nn.unbox(boxed_params)
    tx = optax.chain(optax.sgd(LR), oc.project(constraints, labels))
    ours = train_linen(params, tx, check=check_linen_feasible)
    rules = oc.label_by_path({k: k for k in LINEN_DECLARED})
    rule_run = train_linen(
        nn.unbox(boxed_params), optax.chain(optax.sgd(LR), oc.project(LINEN_DECLARED, rules))
    )
    assert_trees_equal(ours, rule_run)
    free = train_linen(nn.unbox(boxed_params), optax.sgd(LR))
    assert fan_in_norms(free["Dense_0"]["kernel"]).max() > KMAX * 1.1
    assert np.min(free["Dense_0"]["bias"]) < 0
    report = oc.routing_report(params, constraints, labels)
    assert "'Dense_1/kernel'" in report and report.splitlines()[-1].startswith("6 leaves, 3")


def test_box_is_a_pytree_node_keeping_its_constraint():
    params = LinenNet().init(jax.random.key(0), jnp.ones((1, 8)))["params"]
    doubled = jax.tree.map(lambda w: 2 * w, params)
    assert oc.declared(doubled)[0] == LINEN_DECLARED
    np.testing.assert_array_equal(
        nn.unbox(doubled)["Dense_1"]["kernel"], 2 * nn.unbox(params)["Dense_1"]["kernel"]
    )
    rebuilt = jax.tree.unflatten(jax.tree.structure(params), jax.tree.leaves(params))
    assert oc.declared(rebuilt)[0] == LINEN_DECLARED


def test_with_constraint_rejects_bad_input():
    with pytest.raises(TypeError, match="initializer"):
        oc.with_constraint(oc.MaxNorm(1.0), lecun)
    with pytest.raises(ValueError, match="with_constraint"):
        oc.with_constraint(lecun, "no_such_constraint")


# --- Stacking: nn.scan / nn.vmap, nnx.vmap / nnx.scan ------------------------------

LAYERS, WIDTH = 3, 6
SMAX = 0.7


class Block(nn.Module):
    inner_partitioning: bool = False

    @nn.compact
    def __call__(self, x, _):
        if self.inner_partitioning:  # the order that cannot see the scan's axis
            init = nn.with_partitioning(
                oc.with_constraint(lecun, oc.MaxNorm(SMAX, axis="fan_in")), (None, None)
            )
        else:
            init = oc.with_constraint(
                nn.with_partitioning(lecun, (None, None)), oc.MaxNorm(SMAX, axis="fan_in")
            )
        bias = oc.with_constraint(nn.initializers.zeros, oc.NonNeg())
        return jnp.tanh(nn.Dense(WIDTH, kernel_init=init, bias_init=bias)(x)), None


class ScanNet(nn.Module):
    inner_partitioning: bool = False

    @nn.compact
    def __call__(self, x):
        scan = nn.scan(
            Block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=LAYERS,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        x, _ = scan(self.inner_partitioning)(x, None)
        return nn.Dense(2)(x)


def stacked_data():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((32, WIDTH)).astype(np.float32)
    return x, (4 * np.tanh(x[:, :2] * 3) + 2).astype(np.float32)


def test_nn_scan_makes_declared_constraints_per_layer():
    x, y = stacked_data()
    model = ScanNet()
    params = model.init(jax.random.key(0), x)["params"]
    constraints, labels = oc.declared(params)
    kernel, bias = "ScanBlock_0/Dense_0/kernel", "ScanBlock_0/Dense_0/bias"
    assert constraints == {
        kernel: oc.Stacked(oc.MaxNorm(SMAX, axis="fan_in"), stack_axis=0),
        bias: oc.Stacked(oc.NonNeg(), stack_axis=0),
    }

    def run(tx, params):
        @jax.jit
        def step(p, s):
            g = jax.grad(lambda p: jnp.mean((model.apply({"params": p}, x) - y) ** 2))(p)
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s

        s = tx.init(params)
        for _ in range(10):
            old = nn.unbox(params)["ScanBlock_0"]["Dense_0"]["kernel"]
            params, s = step(params, s)
            p = nn.unbox(params)["ScanBlock_0"]["Dense_0"]
            if tx is not free_tx:  # per layer, per unit: the norm over that layer's inputs
                rtol[0] = projected_norm_rtol(p["kernel"], old, 1, SMAX)
                assert np.all(norms(p["kernel"], 1) <= SMAX * (1 + rtol[0]))
                assert np.min(p["bias"]) >= 0
        return nn.unbox(params)

    rtol = [None]  # the last constrained step's, for the check below

    free_tx = optax.adam(LR)
    ours = run(optax.chain(optax.adam(LR), oc.project(constraints, labels)), params)
    free = run(free_tx, nn.unbox(params))
    free_k = free["ScanBlock_0"]["Dense_0"]["kernel"]
    assert norms(free_k, 1).max() > SMAX * 1.1  # the bound binds ...
    # ... and a single MaxNorm over (layers, in) would be a different constraint:
    # some layer's unit would stay far below the bound where ours reaches it.
    per_layer = norms(ours["ScanBlock_0"]["Dense_0"]["kernel"], 1)
    np.testing.assert_allclose(per_layer.max(axis=1), SMAX, rtol=rtol[0].max())


def test_nn_scan_with_partitioning_outside_is_a_clear_error():
    params = ScanNet(inner_partitioning=True).init(jax.random.key(0), jnp.ones((1, WIDTH)))[
        "params"
    ]
    with pytest.raises(ValueError, match=r"Put oc\.with_constraint outermost"):
        oc.declared(params)


def test_nn_vmap_stacks_and_remove_axis_unstacks():
    class Ensemble(nn.Module):
        @nn.compact
        def __call__(self, x):
            vmapped = nn.vmap(
                nn.Dense,
                variable_axes={"params": 1},
                split_rngs={"params": True},
                in_axes=None,
                out_axes=0,
                axis_size=4,
            )
            return vmapped(3, kernel_init=oc.with_constraint(lecun, oc.UnitNorm()))(x)

    params = Ensemble().init(jax.random.key(0), jnp.ones((2, 5)))["params"]
    (c,) = oc.declared(params)[0].values()
    assert c == oc.Stacked(oc.UnitNorm(), stack_axis=1)
    box = params["VmapDense_0"]["kernel"]
    member = box.replace(value=box.value[:, 0])  # what nn.vmap hands one member
    assert oc.declared({"k": member.remove_axis(1, {})})[0] == {"k": oc.UnitNorm()}
    with pytest.raises(ValueError, match="reverse order"):
        box.remove_axis(0, {})
    projected = oc.apply_constraints(params, *oc.declared(params))
    kernel = nn.unbox(projected)["VmapDense_0"]["kernel"]  # (in, members, out)
    smallest = norms(nn.unbox(params)["VmapDense_0"]["kernel"], 0).min()
    rtol = projected_norm_rtol(kernel, None, 0, 1.0, smallest)
    np.testing.assert_allclose(norms(kernel, 0), 1.0, rtol=rtol)  # per member, per unit


class NNXBlock(nnx.Module):
    def __init__(self, rngs):
        self.lin = nnx.Linear(
            WIDTH,
            WIDTH,
            kernel_metadata=oc.constraint_metadata(oc.MaxNorm(SMAX, axis="fan_in")),
            bias_metadata=oc.constraint_metadata(oc.NonNeg()),
            rngs=rngs,
        )

    def __call__(self, x):
        return jnp.tanh(self.lin(x))


class NNXStack(nnx.Module):
    def __init__(self, rngs):
        @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make(key):
            return NNXBlock(nnx.Rngs(key))

        self.blocks = make(jax.random.split(rngs.params(), LAYERS))
        self.head = nnx.Linear(WIDTH, 2, rngs=rngs)

    def __call__(self, x):
        @nnx.scan(
            in_axes=(nnx.Carry, 0),
            out_axes=nnx.Carry,
            transform_metadata={nnx.PARTITION_NAME: "layers"},
        )
        def forward(x, block):
            return block(x)

        return self.head(forward(x, self.blocks))


def test_nnx_vmap_and_scan_make_declared_constraints_per_layer():
    x, y = stacked_data()
    model = NNXStack(nnx.Rngs(0))
    constraints, labels = oc.declared(model)
    assert constraints == {
        "blocks/lin/kernel": oc.Stacked(oc.MaxNorm(SMAX, axis="fan_in"), stack_axis=0),
        "blocks/lin/bias": oc.Stacked(oc.NonNeg(), stack_axis=0),
    }
    free_model = nnx.clone(model)
    optimizer = nnx.Optimizer(
        model, optax.chain(optax.adam(LR), oc.project(constraints, labels)), wrt=nnx.Param
    )
    free_optimizer = nnx.Optimizer(free_model, optax.adam(LR), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
        loss = lambda m: jnp.mean((m(x) - y) ** 2)  # noqa: E731
        optimizer.update(model, nnx.grad(loss)(model))

    for _ in range(10):
        old = np.asarray(model.blocks.lin.kernel[...])
        step(model, optimizer)
        step(free_model, free_optimizer)
        kernel = np.asarray(model.blocks.lin.kernel[...])  # (layers, in, out)
        rtol = projected_norm_rtol(kernel, old, 1, SMAX)
        assert np.all(norms(kernel, 1) <= SMAX * (1 + rtol))
        assert np.min(model.blocks.lin.bias[...]) >= 0
    # nnx.scan's remove/add axis left the declaration stacked once, not twice.
    assert oc.declared(model)[0] == constraints
    assert norms(free_model.blocks.lin.kernel[...], 1).max() > SMAX * 1.1
    np.testing.assert_allclose(norms(kernel, 1).max(axis=1), SMAX, rtol=rtol.max())


# --- Keras model, JAX/Optax loop == Keras fit() ----------------------------------

KERAS_STEPS = 10


def keras_model():
    keras.utils.set_random_seed(0)
    C = keras.constraints
    return keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(
                16, "relu", kernel_constraint=C.MaxNorm(0.9), bias_constraint=C.NonNeg()
            ),
            keras.layers.Dense(
                8,
                "tanh",
                kernel_constraint=C.MinMaxNorm(0.5, 1.0, 0.5),
                bias_constraint=C.NonNeg(),
            ),
            keras.layers.Dense(3, kernel_constraint=C.UnitNorm()),
        ]
    )


def values(variables):
    return [np.asarray(v.value) for v in variables]


def optax_loop(model, tx, x, y):
    """The Keras guide's custom JAX loop, with an Optax optimizer."""
    loss_fn = keras.losses.MeanSquaredError()
    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]

    @jax.jit
    def step(trainable, non_trainable, opt_state):
        def loss(trainable):
            y_pred, non_trainable_out = model.stateless_call(trainable, non_trainable, x)
            return loss_fn(y, y_pred), non_trainable_out

        grads, non_trainable = jax.grad(loss, has_aux=True)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), non_trainable, opt_state

    opt_state, history = tx.init(trainable), []
    for _ in range(KERAS_STEPS):
        trainable, non_trainable, opt_state = step(trainable, non_trainable, opt_state)
        history.append([np.asarray(w) for w in trainable])
    return history


def test_keras_loop_with_declared_constraints_matches_fit_step_by_step():
    x, y = linen_data()
    fitted = keras_model()
    fitted.compile(optimizer=keras.optimizers.SGD(LR), loss="mse")
    fit_history = []
    for _ in range(KERAS_STEPS):  # full batch, no shuffling: one SGD step per call
        fitted.fit(x, y, batch_size=len(x), epochs=1, shuffle=False, verbose=0)
        fit_history.append(values(fitted.trainable_variables))

    model = keras_model()
    constraints, labels = oc.declared(model.trainable_variables)
    assert sorted(map(repr, constraints.values())) == sorted(
        [
            "MaxNorm(max_value=0.9, axis=0)",
            "NonNeg()",
            "MinMaxNorm(min_value=0.5, max_value=1.0, rate=0.5, axis=0)",
            "NonNeg()",
            "UnitNorm(axis=0)",
        ]
    )
    assert all(label.endswith(("/kernel", "/bias")) for label in constraints)
    ours = optax_loop(model, optax.chain(optax.sgd(LR), oc.project(constraints, labels)), x, y)
    plain = optax_loop(keras_model(), optax.sgd(LR), x, y)

    for t, (mine, theirs) in enumerate(zip(ours, fit_history, strict=True), start=1):
        # Per step the two loops may differ by: <= 2 ulp in the constraint (the
        # Keras-parity contract), 1 ulp from writing the projection as an
        # update (p + (C(q) - p) is C(q) up to one rounding), and about 1 ulp
        # in the gradient step; the errors of earlier steps carry over and
        # grow at most by the step map's Lipschitz constant (the projections
        # are non-expansive; SGD at lr 0.1 on this MSE grows them < 2x over
        # the run). So: 8 ulps of the largest weight per step taken.
        scale = max(np.abs(w).max() for w in theirs)
        tolerance = 8 * t * EPS32 * scale
        for i, (a, b) in enumerate(zip(mine, theirs, strict=True)):
            np.testing.assert_allclose(a, b, rtol=0, atol=tolerance, err_msg=f"step {t}, var {i}")
        assert np.min(mine[1]) >= 0 and np.min(mine[3]) >= 0  # NonNeg exactly
    # Without oc.declared the Optax loop silently drops every constraint.
    final = plain[-1]
    assert fan_in_norms(final[0]).max() > 0.9 * 1.01 or np.min(final[1]) < 0
    assert np.abs(fan_in_norms(final[4]) - 1).max() > 1e-2
    assert np.abs(final[4] - fit_history[-1][4]).max() > 1e-3
    violations = oc.constraint_violations(ours[-1], constraints, labels)
    # MinMaxNorm with rate < 1 moves norms only part of the way (not a projection,
    # so it keeps a violation by design); every other constraint holds.
    del violations[next(k for k, c in constraints.items() if isinstance(c, oc.MinMaxNorm))]
    assert max(float(v) for v in violations.values()) <= 4 * EPS32


def test_keras_model_and_its_variables_declare_the_same():
    model = keras_model()
    assert oc.declared(model)[0] == oc.declared(model.trainable_variables)[0]
    constraints, labels = oc.declared(tuple(model.trainable_variables))
    report = oc.routing_report(values(model.trainable_variables), constraints, labels)
    assert report.splitlines()[-1] == "6 leaves, 5 constrained (304 of 307 values)"


# --- Mixing declared constraints and path rules -----------------------------------


class Mixed(nnx.Module):
    def __init__(self, rngs):
        self.a = nnx.Linear(4, 4, kernel_metadata={"constraint": oc.Orthogonal()}, rngs=rngs)
        self.b = nnx.Linear(4, 4, bias_metadata={"constraint": oc.MaxNorm(1.0)}, rngs=rngs)

    def __call__(self, x):
        return self.b(jnp.tanh(self.a(x)))


def test_mixing_declared_and_rules_trains():
    model = Mixed(nnx.Rngs(0))
    constraints, labels = oc.declared(
        model, rules={"b/bias": None, "**/bias": oc.NonNeg()}
    )  # b/bias keeps its declared MaxNorm; every other bias gets NonNeg
    assert constraints == {
        "a/kernel": oc.Orthogonal(),
        "a/bias": oc.NonNeg(),
        "b/bias": oc.MaxNorm(1.0),
    }
    optimizer = nnx.Optimizer(
        model, optax.chain(optax.sgd(0.5), oc.project(constraints, labels)), wrt=nnx.Param
    )
    x = jax.random.normal(jax.random.key(3), (8, 4))
    for _ in range(5):
        before = np.asarray(model.a.kernel[...], np.float64)
        before_bias = np.asarray(model.b.bias[...])
        grads = nnx.grad(lambda m: jnp.mean((m(x) - 3.0) ** 2))(model)
        optimizer.update(model, grads)
        k = np.asarray(model.a.kernel[...], np.float64)
        # The SVD's polar factor is orthonormal to its backward error (a
        # reflection per row and column); p + u' moves each column by its
        # update_form_error, and K^T K by twice that column's 2-norm at most.
        cols = np.sqrt(np.sum(update_form_error(k, before) ** 2, axis=0))
        slack = ulps(1.0, 2 * norm_ulps(4 + 4)) + 2 * cols.max()
        np.testing.assert_allclose(k.T @ k, np.eye(4), rtol=0, atol=slack)
        assert np.min(model.a.bias[...]) >= 0
        bias = np.asarray(model.b.bias[...])
        assert norms(bias, 0) <= 1.0 * (1 + projected_norm_rtol(bias, before_bias, 0, 1.0))


def test_mixing_conflict_names_the_leaf_and_prefer_decides():
    model = Mixed(nnx.Rngs(0))
    rules = {"**/kernel": oc.MaxNorm(2.0)}
    with pytest.raises(ValueError, match=r"'a/kernel'.*Orthogonal.*'\*\*/kernel'.*prefer="):
        oc.declared(model, rules=rules)
    assert oc.declared(model, rules=rules, prefer="declared")[0] == {
        "a/kernel": oc.Orthogonal(),
        "b/kernel": oc.MaxNorm(2.0),
        "b/bias": oc.MaxNorm(1.0),
    }
    assert oc.declared(model, rules=rules, prefer="rules")[0]["a/kernel"] == oc.MaxNorm(2.0)
    # The same constraint twice is no conflict.
    same = oc.declared(model, rules={"a/kernel": oc.Orthogonal()})[0]
    assert same["a/kernel"] == oc.Orthogonal()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"rules": {"**/kernal": oc.NonNeg()}}, ValueError, r"'\*\*/kernal'.*match no parameter"),
        ({"rules": {"**/bias": "no_such"}}, ValueError, "rule '\\*\\*/bias'"),
        ({"prefer": "rules"}, ValueError, "without rules"),
        ({"rules": {"**/bias": None}, "prefer": "both"}, ValueError, "prefer must be"),
    ],
)
def test_declared_misuse(kwargs, error, match):
    with pytest.raises(error, match=match):
        oc.declared(Mixed(nnx.Rngs(0)), **kwargs)


def test_undeclared_tree_constrains_nothing():
    params = {"w": jnp.ones((2, 2))}
    constraints, labels = oc.declared(params)
    assert constraints == {} and labels(params) == {"w": None}
    assert oc.apply_constraints(params, constraints, labels)["w"] is not None


def test_boxed_params_pickle_with_their_constraint():
    import pickle

    params = LinenNet().init(jax.random.key(0), jnp.ones((1, 8)))["params"]
    restored = pickle.loads(pickle.dumps(jax.device_get(params)))
    assert oc.declared(restored)[0] == LINEN_DECLARED
