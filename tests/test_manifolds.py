"""Manifolds: `oc.Sphere` and `oc.tangent`.

Two known problems solved by Riemannian gradient descent built from the
library, `chain(tangent(c), sgd(lr), project(c))`, against closed-form
answers computed by NumPy (float64):

* the top eigenvector of a symmetric matrix (maximise `wᵀAw` on the unit
  sphere), against `numpy.linalg.eigh`;
* orthogonal Procrustes on the Stiefel manifold (minimise `‖A W - B‖` with
  `WᵀW = I`), against `U Vᵀ` from the SVD of `AᵀB`.

The number of steps and the tolerances come from the convergence rates
(derived in each test), not from runs. Then unit tests of the tangent maps
(orthogonal to `w`, skew `WᵀV`, zero sums, cones), the wrappers, low
precision, the errors, and `Sphere("init")`'s state.
"""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import EPS32, assert_close_ulps, norm_ulps, reference_axes, ulps

import optax_constraints as oc


def _np(x):
    return np.asarray(jnp.asarray(x).astype(jnp.float32), np.float64)


def _normal(shape, seed, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


def _unit_norms(w, axis):
    return np.sqrt(np.sum(np.square(w), axis=reference_axes(axis, w.ndim), keepdims=True))


def _polar(a):
    u, _, vt = np.linalg.svd(a, full_matrices=False)
    return u @ vt


# --- known problems -------------------------------------------------------------


def _riemannian_sgd(constraint, loss, w0, lr, steps):
    tx = optax.chain(oc.tangent(constraint), optax.sgd(lr), oc.project(constraint))
    params = {"w": jnp.asarray(w0, jnp.float32)}
    state = tx.init(params)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def run(params, state):
        def step(carry, _):
            params, state = carry
            grads = jax.grad(loss)(params)
            updates, state = tx.update(grads, state, params)
            return (optax.apply_updates(params, updates), state), None

        return jax.lax.scan(step, (params, state), None, length=steps)[0]

    chex.clear_trace_counter()
    return _np(run(params, state)[0]["w"])


def test_riemannian_sgd_finds_the_top_eigenvector():
    n = 12
    b = np.random.default_rng(0).normal(size=(n, n))
    a = (b + b.T) / 2
    lam, vecs = np.linalg.eigh(a)  # ascending
    top, gap, spread = vecs[:, -1], lam[-1] - lam[-2], lam[-1] - lam[0]
    w0 = np.random.default_rng(1).normal(size=n)
    w0 /= np.linalg.norm(w0)

    # One step, w <- normalize(w + lr * 2 (A w - rho w)) with rho = wᵀAw, is a
    # power-iteration step with M = (1 - 2 lr rho) I + 2 lr A: each
    # eigencomponent i scales by 1 + 2 lr (lam_i - rho). With 2 lr * spread < 1
    # all factors are positive, and the ratio of any other component to the
    # top one shrinks by at most r = 1 - 2 lr gap / (1 + 2 lr spread) per
    # step (worst case rho = lam_min), so tan(angle) <= tan(angle_0) r^k.
    lr = 0.4 / spread
    r = 1 - 2 * lr * gap / (1 + 2 * lr * spread)
    cos0 = abs(w0 @ top)
    target = 1e-4
    steps = math.ceil(math.log(target * cos0 / math.sqrt(1 - cos0**2)) / math.log(r))
    # Rounding: each step perturbs w by about (n + 8) float32 roundings (Aw, the
    # tangent's inner product and the norm), which the contraction damps to at
    # most that divided by (1 - r).
    floor = (n + 8) * EPS32 / (1 - r)

    a32 = jnp.asarray(a, jnp.float32)
    w = _riemannian_sgd(oc.Sphere(), lambda p: -(p["w"] @ a32 @ p["w"]), w0, lr, steps)

    assert abs(np.linalg.norm(w) - 1) <= ulps(1.0, norm_ulps(n))
    w = w * np.sign(w @ top)  # eigenvectors are defined up to sign
    # ‖w - v‖ = 2 sin(angle / 2) <= angle <= tan(angle).
    np.testing.assert_allclose(w, top, rtol=0, atol=target + floor)
    # The Rayleigh quotient is second order in the angle.
    assert abs(w @ a @ w - lam[-1]) <= spread * (target + floor) ** 2 + ulps(spread, 2 * n)


@pytest.mark.parametrize("wide", [False, True], ids=["tall", "wide"])
def test_riemannian_sgd_solves_orthogonal_procrustes(wide):
    m, n, p = 10, 6, 3
    rng = np.random.default_rng(2)
    a = np.linalg.qr(rng.normal(size=(m, n)))[0]  # orthonormal columns: AᵀA = I
    b = rng.normal(size=(m, p))
    c = a.T @ b
    u, sigma, vt = np.linalg.svd(c, full_matrices=False)
    best = u @ vt  # the closed form: argmin over WᵀW = I of ‖A W - B‖

    # With AᵀA = I, ‖AW - B‖² = p + ‖B‖² - 2 tr(WᵀC): the Riemannian gradient
    # is -2 (C - W sym(WᵀC)) and the Riemannian Hessian at the optimum has
    # its eigenvalues in [2 sigma_min, 2 sigma_max] of C (Edelman, Arias &
    # Smith 1998, section 4.7), so with lr = 1 / (2 sigma_max) gradient
    # descent with a retraction contracts near the optimum by
    # r = 1 - sigma_min / sigma_max per step. From a random start the first
    # steps are slower: we give it the local count three times over.
    lr = 1 / (2 * sigma[0])
    r = 1 - sigma[-1] / sigma[0]
    target = 1e-4
    steps = 3 * math.ceil(math.log(target / (2 * math.sqrt(p))) / math.log(r))
    # Rounding: Newton-free SVD polar factor (backward stable, about n eps)
    # and the products, damped by the contraction.
    floor = 4 * (m + n) * EPS32 / (1 - r)

    a32, b32 = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    w0 = _polar(rng.normal(size=(n, p)))
    if wide:  # the kernel is stored (p, n): a wide (fan_in, out) view, W Wᵀ = I
        w = _riemannian_sgd(
            oc.Orthogonal(),
            lambda q: jnp.sum((a32 @ q["w"].T - b32) ** 2),
            w0.T,
            lr,
            steps,
        ).T
    else:
        w = _riemannian_sgd(
            oc.Orthogonal(), lambda q: jnp.sum((a32 @ q["w"] - b32) ** 2), w0, lr, steps
        )
    np.testing.assert_allclose(w, best, rtol=0, atol=target + floor)


# --- the tangent maps -----------------------------------------------------------


def _tangent(constraint, w, u):
    tx = oc.tangent(constraint)
    params = {"w": w}
    out, _ = tx.update({"w": u}, tx.init(params), params)
    return out["w"]


@pytest.mark.parametrize(
    "shape,axis",
    [((6, 4), 0), ((6, 4), -1), ((3, 3, 2, 5), "fan_in"), ((3, 4, 5), (0, 2)), ((7,), None)],
    ids=str,
)
@pytest.mark.parametrize("cls", [oc.Sphere, oc.UnitNorm])
def test_sphere_tangent_is_orthogonal_to_each_unit(cls, shape, axis):
    w = cls(axis=axis)(_normal(shape, 0))
    u = _normal(shape, 1)
    v = _np(_tangent(cls(axis=axis), w, u))
    axes = reference_axes(axis, len(shape))
    n = math.prod(shape[a] for a in axes)
    w64, u64 = _np(w), _np(u)
    inner = np.sum(v * w64, axis=axes)
    # <v, w> = <u, w> - <u, w> ‖w‖² / ‖w‖²: rounding of two sums of n terms.
    bound = ulps(np.sqrt(np.sum(u64**2, axis=axes)), 4 * norm_ulps(n))
    assert np.all(np.abs(inner) <= bound)
    # It is the orthogonal projection: u minus a multiple of w, per unit.
    expected = u64 - np.sum(u64 * w64, axis=axes, keepdims=True) * w64 / np.sum(
        w64**2, axis=axes, keepdims=True
    )
    assert_close_ulps(v, expected, 4 * norm_ulps(n), scale=np.max(np.abs(u64)))


def test_sphere_tangent_leaves_a_zero_unit_alone():
    w = jnp.array([[1.0, 0.0], [0.0, 0.0]])
    u = jnp.array([[2.0, 5.0], [3.0, -7.0]])
    v = _tangent(oc.Sphere(), w, u)
    np.testing.assert_array_equal(_np(v), [[0.0, 5.0], [3.0, -7.0]])


@pytest.mark.parametrize("shape", [(8, 3), (3, 8), (5, 5), (3, 3, 2, 5)], ids=str)
def test_orthogonal_tangent_is_skew(shape):
    w = oc.Orthogonal()(_normal(shape, 0))
    v = _np(_tangent(oc.Orthogonal(), w, _normal(shape, 1)))
    a, b = _np(w).reshape(-1, shape[-1]), v.reshape(-1, shape[-1])
    if a.shape[0] < a.shape[1]:  # wide: orthonormal rows, the condition on Wᵀ
        a, b = a.T, b.T
    skew = a.T @ b + b.T @ a
    # W is orthonormal to float32 rounding (an SVD: about n eps); the products
    # add n roundings each.
    n = a.shape[0]
    assert np.max(np.abs(skew)) <= ulps(np.max(np.abs(b)), 16 * n)


def test_simplex_and_center_around_tangents_sum_to_zero():
    u = _normal((5, 4), 1)
    v = _np(_tangent(oc.Simplex(axis=0), oc.Simplex(axis=0)(_normal((5, 4), 0)), u))
    assert np.all(np.abs(v.sum(axis=0)) <= ulps(np.abs(_np(u)).sum(axis=0), 2 * 5))
    v = _np(_tangent(oc.CenterAround(0.5), _normal((5, 4), 0), u))
    assert abs(v.sum()) <= ulps(np.abs(_np(u)).sum(), 2 * 20)
    # Only the mean moved: the differences between entries are kept.
    assert_close_ulps(v - v[0, 0], _np(u) - _np(u)[0, 0], 4, scale=np.max(np.abs(_np(u))))


def test_max_norm_tangent_cone():
    c = oc.MaxNorm(1.0)
    # Column 0 on the boundary (after the projection: Keras's epsilon puts it
    # just inside), column 1 inside.
    w = c(jnp.array([[3.0, 0.3], [4.0, 0.4]]))
    out_and_in = jnp.array([[0.6, 0.6], [0.8, 0.8]])  # column 0: outward
    v = _np(_tangent(c, w, out_and_in))
    np.testing.assert_allclose(v[:, 0], [0.0, 0.0], atol=ulps(1.0, 8))  # u was radial
    np.testing.assert_array_equal(v[:, 1], _np(out_and_in)[:, 1])  # inside: unchanged
    # Outward with a tangential part: only the radial part goes.
    u = jnp.array([[1.0, 0.0], [0.0, 0.0]])
    v = _np(_tangent(c, w, u))
    radial = 0.6 * np.array([0.6, 0.8])
    np.testing.assert_allclose(v[:, 0], [1.0, 0.0] - radial, atol=ulps(1.0, 8))
    # Inward on the boundary: kept.
    np.testing.assert_array_equal(_np(_tangent(c, w, -out_and_in)), -_np(out_and_in))


def test_min_max_norm_tangent_cone_of_the_shell():
    c = oc.MinMaxNorm(1.0, 2.0)
    # Unit norms 1 (inner sphere), 2 (outer sphere), 1.5 (inside).
    w = c(jnp.array([[0.6, 1.2, 0.9], [0.8, 1.6, 1.2]]))
    radial = _np(w) / np.linalg.norm(_np(w), axis=0)
    for sign in (1.0, -1.0):
        v = _np(_tangent(c, w, jnp.asarray(sign * radial, jnp.float32)))
        blocked = [sign < 0, sign > 0, False]  # inward at the inner, outward at the outer
        for k in range(3):
            if blocked[k]:
                np.testing.assert_allclose(v[:, k], 0.0, atol=ulps(1.0, 8))
            else:
                np.testing.assert_allclose(v[:, k], sign * radial[:, k], atol=ulps(1.0, 2))


def test_non_neg_and_clip_tangent_cones():
    w = jnp.array([0.0, 0.0, 0.5, 1.0, 1.0])
    u = jnp.array([-1.0, 2.0, -3.0, 4.0, -5.0])
    np.testing.assert_array_equal(_np(_tangent(oc.NonNeg(), w, u)), [0.0, 2.0, -3.0, 4.0, -5.0])
    np.testing.assert_array_equal(
        _np(_tangent(oc.Clip(0.0, 1.0), w, u)), [0.0, 2.0, -3.0, 0.0, -5.0]
    )


@pytest.mark.parametrize(
    "inner",
    [oc.Sphere(axis="fan_in"), oc.UnitNorm(axis=1), oc.Orthogonal(), oc.Simplex(), oc.NonNeg()],
    ids=repr,
)
def test_stacked_and_output_first_tangent_per_copy(inner):
    w = _normal((3, 6, 4), 0)
    u = _normal((3, 6, 4), 1)
    w = oc.Stacked(inner)(w)
    got = _np(_tangent(oc.Stacked(inner), w, u))
    expected = np.stack([_np(inner.tangent(w[k], u[k])) for k in range(3)])
    assert_close_ulps(got, expected, 4 * norm_ulps(6), scale=np.max(np.abs(_np(u))))
    # OutputFirst: the tangent of the moved leaf, moved back.
    w2, u2 = jnp.moveaxis(w[0], -1, 0), jnp.moveaxis(u[0], -1, 0)  # (out, in)
    got = _np(_tangent(oc.OutputFirst(inner), w2, u2))
    assert_close_ulps(
        got, np.moveaxis(expected[0], -1, 0), 4 * norm_ulps(6), scale=np.max(np.abs(_np(u)))
    )


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_tangent_keeps_low_precision_dtypes_and_computes_in_float32(dtype):
    w = oc.Sphere()(_normal((16, 4), 0, dtype))
    u = _normal((16, 4), 1, dtype)
    v = _tangent(oc.Sphere(), w, u)
    assert v.dtype == dtype
    reference = _np(oc.Sphere().tangent(w.astype(jnp.float32), u.astype(jnp.float32)))
    # float32 computation, rounded once to the dtype: half an ulp of the dtype.
    eps = float(jnp.finfo(dtype).eps)
    np.testing.assert_allclose(_np(v), reference, rtol=eps / 2, atol=ulps(1.0, 4 * 18))


def test_unconstrained_leaves_pass_through_and_labels_route_as_in_project():
    params = {"dense": {"kernel": oc.Sphere()(_normal((4, 3), 0)), "bias": _normal((3,), 1)}}
    updates = jax.tree.map(lambda p: jnp.ones_like(p), params)
    tx = oc.tangent({"k": oc.Sphere()}, oc.label_by_path({"**/kernel": "k"}))
    out, state = jax.jit(tx.update)(updates, tx.init(params), params)
    np.testing.assert_array_equal(_np(out["dense"]["bias"]), np.ones(3))
    assert int(state.count) == 1
    # Labels are checked as project checks them.
    with pytest.raises(ValueError, match="not a key of constraints"):
        oc.tangent({"x": oc.Sphere()}, oc.label_by_path({"**/kernel": "k"})).init(params)
    with pytest.raises(ValueError, match="params"):
        tx.update(updates, tx.init(params))


def test_a_constraint_without_a_tangent_fails_at_init_naming_the_leaf():
    params = {"enc": {"kernel": jnp.ones((2, 4, 3))}}
    for c in (oc.L1Ball(1.0), oc.FunctionConstraint(jnp.tanh), oc.Stacked(oc.SpectralNorm())):
        with pytest.raises(ValueError, match=r"enc/kernel.*\(2, 4, 3\).*tangent\(self, w, u\)"):
            oc.tangent(c).init(params)


def test_tangent_evaluates_schedules_at_its_count():
    c = oc.MaxNorm(optax.piecewise_constant_schedule(1.0, {1: 2.0}))
    w = {"w": jnp.array([[0.6], [0.8]])}  # on the boundary of the first bound only
    u = {"w": jnp.array([[0.6], [0.8]])}
    tx = oc.tangent(c)
    state = tx.init(w)
    first, state = tx.update(u, state, w)
    second, _ = tx.update(u, state, w)
    np.testing.assert_allclose(_np(first["w"]), 0.0, atol=ulps(1.0, 8))
    np.testing.assert_array_equal(_np(second["w"]), _np(u["w"]))


def test_tangent_param_specs_not_supported_yet():
    with pytest.raises(NotImplementedError, match="param_specs"):
        oc.tangent(oc.Sphere(), param_specs={})


# --- Sphere ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape,axis", [((6, 4), 0), ((3, 3, 2, 5), "fan_in"), ((5, 4), None)], ids=str
)
@pytest.mark.parametrize("radius", [1.0, 0.25, 3.0])
def test_sphere_is_the_exact_projection(shape, axis, radius):
    w = _normal(shape, 0)
    out = _np(oc.Sphere(radius, axis=axis)(w))
    w64 = _np(w)
    n = _unit_norms(w64, axis)
    k = norm_ulps(int(np.prod([shape[a] for a in reference_axes(axis, len(shape))])))
    assert_close_ulps(out, w64 * radius / n, k)
    assert_close_ulps(_unit_norms(out, axis), np.full_like(n, radius), k)


def test_sphere_is_the_nearest_point_on_the_sphere():
    # ‖w - C(w)‖ <= ‖w - s‖ for every s on the sphere (per unit), checked
    # against many random points of the sphere, in float64 after the fact.
    w = _normal((5, 3), 0)
    out = _np(oc.Sphere(2.0)(w))
    w64 = _np(w)
    best = np.linalg.norm(w64 - out, axis=0)
    s = np.random.default_rng(3).normal(size=(1000, 5, 3))
    s = 2.0 * s / np.linalg.norm(s, axis=1, keepdims=True)
    others = np.linalg.norm(w64 - s, axis=1)
    assert np.all(best <= others.min(axis=0) + ulps(np.linalg.norm(w64, axis=0), 8))


def test_sphere_zero_unit_stays_zero_with_finite_gradient():
    w = jnp.array([[0.0, 3.0], [0.0, 4.0]])
    out = oc.Sphere(2.0)(w)
    np.testing.assert_array_equal(_np(out)[:, 0], [0.0, 0.0])
    g = jax.grad(lambda w: jnp.sum(oc.Sphere(2.0)(w) * jnp.arange(4.0).reshape(2, 2)))(w)
    assert np.all(np.isfinite(_np(g)))
    np.testing.assert_array_equal(_np(g)[:, 0], [0.0, 0.0])


def test_sphere_and_its_tangent_leave_a_nan_unit_nan():
    # Nothing is repaired silently (docs/nonfinite.md): a NaN unit shows it.
    w = jnp.array([[jnp.nan, 3.0], [1.0, 4.0]])
    out = _np(oc.Sphere()(w))
    assert np.isnan(out[:, 0]).all() and np.isfinite(out[:, 1]).all()
    v = _np(oc.Sphere().tangent(w, jnp.ones((2, 2))))
    assert np.isnan(v[:, 0]).all() and np.isfinite(v[:, 1]).all()


def test_sphere_radius_array_and_schedule():
    w = _normal((6, 3), 0)
    radius = jnp.array([[1.0, 2.0, 3.0]])
    assert_close_ulps(_unit_norms(_np(oc.Sphere(radius)(w)), 0)[0], [1.0, 2.0, 3.0], 8)
    c = oc.Sphere(optax.linear_schedule(1.0, 3.0, 10))
    out = oc.apply_constraints({"w": w}, c, step=10)
    assert_close_ulps(_unit_norms(_np(out["w"]), 0)[0], [3.0] * 3, 8)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: oc.Sphere(0.0), "radius must be > 0"),
        (lambda: oc.Sphere(-1.0), "radius must be > 0"),
        (lambda: oc.Sphere("initial"), "'init'"),
        (lambda: oc.Sphere(axis="rows"), "axis must be"),
    ],
)
def test_sphere_bad_arguments_fail_at_construction(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_sphere_init_state_is_per_unit_and_checkpointable():
    params = {"a": _normal((6, 4), 0) * 3.0, "b": _normal((4,), 1)}
    c = oc.Sphere("init")
    tx = optax.chain(optax.adam(0.1), oc.project({"s": c}, {"a": "s", "b": None}))
    state = tx.init(params)
    radii = state[1].constraint_states["a"]
    assert radii.shape == (1, 4) and radii.dtype == jnp.float32
    assert_close_ulps(_np(radii), _unit_norms(_np(params["a"]), 0), norm_ulps(6))
    # A checkpoint is a pytree of arrays: round-trip it through NumPy.
    leaves, treedef = jax.tree.flatten(state)
    assert all(isinstance(x, jax.Array) for x in leaves)
    restored = jax.tree.unflatten(treedef, [np.asarray(x) for x in leaves])

    step = jax.jit(tx.update)
    for s in (state, restored):
        updates, s2 = step(jax.tree.map(jnp.ones_like, params), s, params)
        new = optax.apply_updates(params, updates)
        # Each unit keeps its initial norm (within rounding of the move).
        moved = np.max(np.abs(_np(updates["a"])))
        assert_close_ulps(_unit_norms(_np(new["a"]), 0), _np(radii), norm_ulps(6) + 4 * (1 + moved))
        np.testing.assert_array_equal(_np(s2[1].constraint_states["a"]), _np(radii))


def test_sphere_init_under_stacked_keeps_one_set_of_radii_per_copy():
    w = _normal((3, 5, 4), 0) * jnp.array([1.0, 2.0, 3.0])[:, None, None]
    c = oc.Stacked(oc.Sphere("init", axis="fan_in"))
    state = oc.project(c).init({"w": w})
    radii = state.constraint_states["w"]
    assert radii.shape == (3, 1, 4)
    expected = np.stack([_unit_norms(_np(w[k]), "fan_in") for k in range(3)])
    assert_close_ulps(_np(radii), expected, norm_ulps(5))


def test_apply_constraints_and_violations_take_the_state():
    params = {"w": _normal((6, 4), 0) * 2.0}
    c = oc.Sphere("init")
    opt = optax.chain(optax.sgd(0.1), oc.project(c))
    opt_state = opt.init(params)
    radii = _np(opt_state[1].constraint_states["w"])
    scaled = {"w": params["w"] * 3.0}
    for state in (opt_state, opt_state[1]):  # the optimizer state or its ProjectState
        out = oc.apply_constraints(scaled, c, state=state)
        assert_close_ulps(_unit_norms(_np(out["w"]), 0), radii, 2 * norm_ulps(6))
        v = float(oc.constraint_violations(scaled, c, state=state)["__all__"])
        # max |w - C(w)| with C(w) = w / 3: two thirds of the largest entry.
        assert_close_ulps(v, 2 / 3 * np.max(np.abs(_np(scaled["w"]))), 8)
        assert float(oc.constraint_violations(out, c, state=state)["__all__"]) <= ulps(
            np.max(np.abs(_np(out["w"]))), 8
        )
    # The same measure as a Sphere with those radii given.
    np.testing.assert_allclose(
        float(oc.constraint_violations(scaled, c, state=opt_state)["__all__"]),
        float(oc.constraint_violations(scaled, oc.Sphere(jnp.asarray(radii)))["__all__"]),
        rtol=0,
        atol=ulps(np.max(np.abs(_np(scaled["w"]))), 8),
    )
    # Without the state: a clear error naming the leaf and the fix.
    for fn in (oc.apply_constraints, oc.constraint_violations):
        with pytest.raises(ValueError, match=r"state=.*'w' \(shape \(6, 4\)\)"):
            fn(params, c)
    with pytest.raises(ValueError, match="no entry for this leaf"):
        oc.apply_constraints(params, c, state=oc.project(oc.MaxNorm()).init(params))
    with pytest.raises(ValueError, match=r"no oc\.ProjectState"):
        oc.apply_constraints(params, c, state=optax.sgd(0.1).init(params))
    with pytest.raises(ValueError, match="state="):
        c(params["w"])


def test_sphere_routing_report_and_registry():
    report = oc.routing_report({"k": jnp.ones((3, 3, 2, 8))}, oc.Sphere(axis="fan_in"))
    assert "Sphere(radius=1.0, axis='fan_in')" in report and "8 units of 18" in report
    for c in (oc.Sphere(2.0, axis=[0, 1]), oc.Sphere("init"), oc.Stacked(oc.Sphere("init"))):
        assert oc.deserialize(oc.serialize(c)) == c and hash(oc.get(oc.serialize(c))) == hash(c)
    assert isinstance(oc.get("sphere"), oc.Sphere)


def test_manifold_benchmark_runs_at_its_quick_size():
    from benchmarks import manifold

    report = manifold.main(["--quick", "--reps", "2"])
    names = {"adam_project", "adam_tangent_project", "hand_ngpt"}
    assert {f"{n} / adam" for n in names} <= set(report["ratios"])
    assert all(r["cpu"]["median"] > 0 for r in report["ratios"].values())


# --- every constraint with a tangent: the shared properties -----------------------

NO_TANGENT = (oc.L1Ball, oc.SpectralNorm)
"""Classes without a tangent hook (`oc.tangent` rejects them at `init`)."""

TANGENT_EXAMPLES = {
    "MinMaxNorm": [oc.MinMaxNorm(0.5, 1.0, axis="fan_in")],
    "Sphere": [oc.Sphere(2.0, axis="fan_in"), oc.Sphere(axis=None)],
    "Clip": [oc.Clip(-0.5, 0.5)],
}


def _with_tangent():
    from helpers import constraint_instances

    return [
        c
        for c in constraint_instances(TANGENT_EXAMPLES)
        if not isinstance(c, NO_TANGENT)
        and not (
            isinstance(c, oc.Stacked | oc.OutputFirst) and isinstance(c.constraint, NO_TANGENT)
        )
    ]


def test_which_constraints_have_a_tangent():
    from helpers import exported_constraint_classes

    w = jnp.ones((4, 3))
    for cls in exported_constraint_classes():
        if cls in NO_TANGENT:
            with pytest.raises(NotImplementedError):
                cls().tangent(w, w)
        else:
            assert cls().tangent(w, w).shape == w.shape


@pytest.mark.parametrize("constraint", _with_tangent(), ids=repr)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: jnp.dtype(d).name)
def test_tangent_properties(constraint, dtype):
    shape = (6, 4)
    w = constraint(_normal(shape, 0, dtype) * 2.0 + 0.5)  # feasible, some units on bounds
    u = _normal(shape, 1, dtype)
    v = _tangent(constraint, w, u)
    assert v.shape == shape and v.dtype == dtype
    v64, u64 = _np(v), _np(u)
    eps = float(jnp.finfo(dtype).eps)
    scale = np.max(np.abs(u64))
    # jit equals eager (up to float32 rounding in a different fusion).
    np.testing.assert_allclose(
        _np(jax.jit(constraint.tangent)(w, u)), v64, rtol=0, atol=eps * scale * 8
    )
    # A projection (onto a subspace or a cone): applying it again changes nothing.
    again = _np(_tangent(constraint, w, v))
    np.testing.assert_allclose(again, v64, rtol=0, atol=ulps(scale, 64) + eps * scale)
    # It never lengthens the update.
    assert np.linalg.norm(v64) <= np.linalg.norm(u64) * (1 + 64 * EPS32) + eps * scale


@pytest.mark.parametrize(
    "constraint",
    [c for c in _with_tangent() if not isinstance(c, oc.Simplex)],
    ids=repr,
)
def test_a_step_along_the_tangent_leaves_the_set_only_to_second_order(constraint):
    # dist(w + t v, set) = O(t²) for a tangent vector v (first order for a
    # generic u). Simplex is left out: its tangent is the sum-zero plane, and
    # its non-negativity faces are left to the projection.
    w = constraint(_normal((6, 4), 0) * 2.0 + 0.5)
    v = _tangent(constraint, w, _normal((6, 4), 1))

    def distance(t):
        moved = w + t * v
        return np.linalg.norm(_np(constraint(moved)) - _np(moved))

    t = 0.05
    # Halving t divides a second-order distance by 4; 2.5 leaves room for the
    # third-order terms. Below the floor (rounding of w + t v and of C) the
    # distance is noise.
    floor = ulps(np.linalg.norm(_np(w)), 64)
    assert distance(t / 2) <= distance(t) / 2.5 + floor
    assert distance(t) <= 10 * t**2 * np.linalg.norm(_np(v)) ** 2 + floor
