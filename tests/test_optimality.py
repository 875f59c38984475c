"""The projections are the *nearest* feasible points, against math and numpy.

* Convex sets: `P(w)` is the Euclidean projection of `w` onto a closed
  convex set `C` exactly when `P(w)` is in `C` and the variational inequality
  `<w - P(w), z - P(w)> <= 0` holds for every `z` in `C`. Feasible `z` are
  made in numpy from each set's definition, anywhere in the set and in a small
  neighbourhood of `P(w)` (which probes every direction along the boundary).
* `SpectralNorm` / `Orthogonal` against `numpy.linalg.svd` (float64).
* `l1_ball` / `simplex` against a numpy reference that finds the threshold by
  bisection.

Tolerances: the projections run in float32 (unit roundoff 6e-8); the
inequality is checked on the cosine of the angle between `w - P` and `z - P`
(dimensionless), which float32 rounding of `P` moves by about
`n * 6e-8 * |w| / |z - P| ~ 2e-5` for the nearest samples here (|z - P| ~ 0.05
per entry); we allow 1e-4, while a wrong projection gives cosines of 0.1 or more. Keras's `1e-7`
epsilon puts `MaxNorm`'s result `1e-7 / norm` inside the sphere, far below
that. Element comparisons are bounds in float32 ulps (`helpers.ulps`): the
rounded operations each result goes through, times the conditioning of the
map where it is not 1-Lipschitz (the polar factor), plus the truncation
error of an iteration computed from its own recurrence in float64.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close_ulps, norm_ulps, reference_axes, ulps

import optax_constraints as oc
from optax_constraints import projections as P

COS_TOL = 1e-4
RNG = np.random.default_rng


def per_unit(w, axis, fn):
    """Applies `fn` to each unit (the slice over `axis`) of a numpy array."""
    axes = reference_axes(axis, w.ndim)
    rest = [a for a in range(w.ndim) if a not in axes]
    moved = np.transpose(w, rest + list(axes))
    flat = moved.reshape(int(np.prod(moved.shape[: len(rest)])), -1)
    out = np.stack([fn(row) for row in flat]).reshape(moved.shape)
    return np.transpose(out, np.argsort(rest + list(axes)))


# -- each set's "restore" map: any point -> a feasible point (not the projection,
# except where that is trivial), written from the definition of the set. It is
# also a membership test: restore(p) == p exactly when p is feasible.


def scale_into_ball(m, axis):
    def restore(z):
        return per_unit(z, axis, lambda r: r * min(1.0, m / max(np.linalg.norm(r), 1e-30)))

    return restore


def scale_into_l1_ball(m, axis):
    def restore(z):
        return per_unit(z, axis, lambda r: r * min(1.0, m / max(np.abs(r).sum(), 1e-30)))

    return restore


def normalize_onto_simplex(s, axis):
    def restore(z):
        return per_unit(z, axis, lambda r: np.abs(r) * s / max(np.abs(r).sum(), 1e-30))

    return restore


def box(lo, hi):
    return lambda z: np.clip(z, lo, hi)


def recenter(ref):
    return lambda z: z - z.mean() + ref


def scale_into_spectral_ball(m):
    def restore(z):
        sigma = np.linalg.norm(z.reshape(-1, z.shape[-1]), 2)
        return z * min(1.0, m / max(sigma, 1e-30))

    return restore


def unit_size(constraint, shape) -> int:
    """Entries in one unit of `constraint` (the whole array without an `axis`)."""
    axes = reference_axes(getattr(constraint, "axis", None), len(shape))
    return int(np.prod([shape[a] for a in axes]))


def feasibility_slack(constraint, w, p) -> float:
    """How far float32 rounding may leave `P(w)` outside the set, per entry.

    The restore maps rescale a unit by its excess (or shift it by its mean
    error), so `|restore(p) - p|` is that relative excess times `max|p|`:
    * a norm ball: the unit's norm carries `norm_ulps(n)` roundings;
    * the L1 ball and simplex: after the shift by the unit's max, every active
      entry lies in `[-m, 0]`, so the threshold is off by `norm_ulps(n)` ulps
      of `m` and the `n` outputs' sum by `n` times that;
    * the spectral ball: the SVD's backward error (one Householder reflection
      per row and column, relative to sigma_max(w), so sigma_max(w) / m of the
      bound) and the product `U min(S, m) V^T`;
    * the mean of `CenterAround`: a sum over `n` entries of `w`, two roundings more;
    * `NonNeg`, `Clip`: 0 (they select an entry or the bound, exactly).
    """
    n = unit_size(constraint, w.shape)
    if isinstance(constraint, (oc.NonNeg, oc.Clip)):
        return 0.0
    if isinstance(constraint, (oc.L1Ball, oc.Simplex)):
        return ulps(p, n * norm_ulps(n))
    if isinstance(constraint, oc.CenterAround):
        return ulps(w, norm_ulps(n))
    if isinstance(constraint, oc.SpectralNorm):
        rows, cols = int(np.prod(w.shape[:-1])), w.shape[-1]
        sigma = np.linalg.norm(w.reshape(rows, cols), 2)
        return ulps(p, norm_ulps(rows + cols) * sigma / constraint.max_value)
    return ulps(p, norm_ulps(n))


CONVEX = [
    (oc.MaxNorm(1.0), scale_into_ball(1.0, 0), (6, 5)),
    (oc.MaxNorm(2.0, axis="fan_in"), scale_into_ball(2.0, "fan_in"), (3, 3, 2, 4)),
    (oc.L1Ball(1.0), scale_into_l1_ball(1.0, 0), (6, 5)),
    (oc.L1Ball(2.0, axis="fan_in"), scale_into_l1_ball(2.0, "fan_in"), (3, 3, 2, 4)),
    (oc.L1Ball(3.0, axis=None), scale_into_l1_ball(3.0, None), (6, 5)),
    (oc.Simplex(), normalize_onto_simplex(1.0, 0), (6, 5)),
    (oc.Simplex(2.0, axis=(0, 1)), normalize_onto_simplex(2.0, (0, 1)), (3, 3, 4)),
    (oc.NonNeg(), np.abs, (6, 5)),
    (oc.Clip(-0.5, 0.5), box(-0.5, 0.5), (6, 5)),
    (oc.CenterAround(0.3), recenter(0.3), (6, 5)),
    (oc.SpectralNorm(1.0, method="svd"), scale_into_spectral_ball(1.0), (6, 4)),
    (oc.SpectralNorm(1.0, method="svd"), scale_into_spectral_ball(1.0), (3, 3, 2, 4)),
]


@pytest.mark.parametrize(
    "constraint,restore,shape", CONVEX, ids=[f"{c!r}-{s}" for c, _, s in CONVEX]
)
def test_variational_inequality(constraint, restore, shape):
    rng = RNG(0)
    w = np.asarray(jnp.asarray(3.0 * rng.normal(size=shape) + 0.5, jnp.float32), np.float64)
    p = np.asarray(constraint(jnp.asarray(w, jnp.float32)), np.float64)
    d = w - p
    assert np.linalg.norm(d) > 0.1, "the test point should be outside the set"
    # P(w) is feasible, up to its rounding.
    np.testing.assert_allclose(restore(p), p, rtol=0, atol=feasibility_slack(constraint, w, p))
    # p is the exact projection P* up to float32 rounding: each entry comes from
    # sums over at most w.size entries (norm_ulps of max|w|), so a feasible z
    # may be nearer to w than p by |p - P*| <= sqrt(size) times that.
    nearer_by = np.sqrt(w.size) * ulps(w, norm_ulps(w.size))
    # Feasible z: far (anywhere in the set), and near P(w), which probes every
    # direction along the boundary at P(w), where a wrong answer shows.
    far = [restore(rng.uniform(0.1, 3.0) * rng.normal(size=shape)) for _ in range(100)]
    near = [restore(p + 0.05 * rng.normal(size=shape)) for _ in range(200)]
    worst = -np.inf
    for z in far + near:
        gap = z - p
        cos = np.sum(d * gap) / (np.linalg.norm(d) * np.linalg.norm(gap) + 1e-30)
        worst = max(worst, cos)
        # Equivalently: no sampled feasible point is nearer to w.
        assert np.linalg.norm(w - z) >= np.linalg.norm(d) - nearer_by
    assert worst <= COS_TOL, f"<w - P(w), z - P(w)> > 0 (cosine {worst:.3g})"


# -- SVD-based constraints against numpy ---------------------------------------


def _np_svd(w):
    a = w.reshape(-1, w.shape[-1]).astype(np.float64)
    return np.linalg.svd(a, full_matrices=False)


MATRIX_SHAPES = [(6, 4), (4, 6), (3, 3, 2, 4), (16, 16)]


@pytest.mark.parametrize("shape", MATRIX_SHAPES)
@pytest.mark.parametrize("max_value", [0.5, 2.0])
def test_spectral_norm_svd_matches_numpy(shape, max_value):
    w = np.asarray(jnp.asarray(RNG(1).normal(size=shape), jnp.float32), np.float64)
    u, s, vt = _np_svd(w)
    expected = ((u * np.minimum(s, max_value)) @ vt).reshape(shape)
    got = np.asarray(oc.SpectralNorm(max_value, method="svd")(jnp.asarray(w, jnp.float32)))
    # The projection is 1-Lipschitz: its error is the float32 SVD's backward
    # error (a Householder reflection per row and column, relative to sigma_max)
    # plus the sums of U min(S, m) V^T.
    rows, cols = int(np.prod(shape[:-1])), shape[-1]
    assert_close_ulps(got, expected, norm_ulps(rows + cols), scale=s[0])


@pytest.mark.parametrize("shape", MATRIX_SHAPES)
def test_spectral_norm_power_call_matches_numpy(shape):
    # Called directly, the power method rescales by the exact sigma_max.
    w = np.asarray(jnp.asarray(RNG(2).normal(size=shape), jnp.float32), np.float64)
    sigma = _np_svd(w)[1][0]
    expected = w * min(1.0, 0.5 / sigma)
    got = np.asarray(oc.SpectralNorm(0.5)(jnp.asarray(w, jnp.float32)))
    # sigma from a float32 SVD is off by its backward error (Weyl: a reflection
    # per row and column, relative to sigma); then a division and a product.
    rows = int(np.prod(shape[:-1]))
    assert_close_ulps(got, expected, norm_ulps(rows + shape[-1]))


def test_spectral_norm_inside_is_returned_exactly():
    w = jnp.asarray(RNG(3).normal(size=(5, 3)), jnp.float32)
    big = float(np.linalg.norm(np.asarray(w), 2)) * 1.01
    np.testing.assert_array_equal(oc.SpectralNorm(big, method="svd")(w), w)
    np.testing.assert_array_equal(oc.SpectralNorm(big)(w), w)


@pytest.mark.parametrize("shape", MATRIX_SHAPES)
@pytest.mark.parametrize("method", ["svd", "newton_schulz"])
def test_orthogonal_matches_numpy_polar_factor(shape, method):
    # Gaussian kernels; the square 16x16 one has condition number ~ 30, the
    # Newton–Schulz default (25 iterations) converges for condition up to ~2000.
    w = np.asarray(jnp.asarray(RNG(4).normal(size=shape), jnp.float32), np.float64)
    u, s, vt = _np_svd(w)
    expected = (u @ vt).reshape(shape)
    got = np.asarray(oc.Orthogonal(method)(jnp.asarray(w, jnp.float32)))
    rows, cols = int(np.prod(shape[:-1])), shape[-1]
    if method == "svd":
        # The polar factor's condition number is at most sigma_max / sigma_min
        # (Higham 2008, thm 8.9), times the SVD's backward error (see above).
        assert_close_ulps(got, expected, s[0] / s[-1] * norm_ulps(rows + cols), scale=1.0)
    else:
        # The iteration's truncation error (its scalar recurrence on the singular
        # values, in float64) plus each iteration's rounding of X (1.5 I - G / 2),
        # sums over the smaller side, which later iterations need not undo.
        slack = newton_schulz_truncation(w, P.NEWTON_SCHULZ_ITERS)
        slack += ulps(1.0, P.NEWTON_SCHULZ_ITERS * norm_ulps(min(rows, cols)))
        np.testing.assert_allclose(got, expected, rtol=0, atol=slack)


def newton_schulz_truncation(w, num_iters) -> float:
    """`max |X_k - U V^T|` of exact Newton–Schulz: its map on the singular values.

    `X_0 = W / b` with `orthogonal_newton_schulz`'s bound `b` (written here
    from its docstring); each singular value follows `s -> 1.5 s - 0.5 s^3`.
    """
    a = np.asarray(w, np.float64).reshape(-1, w.shape[-1])
    gram = a.T @ a if a.shape[0] >= a.shape[1] else a @ a.T
    b = np.sqrt(min(np.trace(gram), np.abs(gram).sum(axis=1).max()))
    s = np.linalg.svd(a, compute_uv=False) / b
    for _ in range(num_iters):
        s = 1.5 * s - 0.5 * s**3
    return float(np.abs(1.0 - s).max())


def test_newton_schulz_error_shrinks_with_iterations():
    # Linear phase (factor ~1.5 per step on small singular values), then quadratic.
    w = RNG(5).normal(size=(32, 16))
    w = np.asarray(jnp.asarray(w, jnp.float32), np.float64)  # the input the iteration sees
    u, _, vt = np.linalg.svd(w, full_matrices=False)
    errors = [
        np.abs(
            np.asarray(P.orthogonal_newton_schulz(jnp.asarray(w, jnp.float32), k)) - u @ vt
        ).max()
        for k in (2, 4, 6, 8, 12)
    ]
    assert all(a > b for a, b in itertools.pairwise(errors[:-1])), errors
    # After 12 iterations: the recurrence's own error plus 12 roundings of X G-sums.
    assert errors[-1] <= newton_schulz_truncation(w, 12) + ulps(1.0, 12 * norm_ulps(16)), errors


def test_power_iteration_converges_to_numpy_sigma():
    # A spectral gap of 2 (s2/s1 = 0.5): the sigma error shrinks like 0.25^k.
    rng = RNG(6)
    q1, _ = np.linalg.qr(rng.normal(size=(8, 4)))
    q2, _ = np.linalg.qr(rng.normal(size=(4, 4)))
    a = jnp.asarray((q1 * np.array([4.0, 2.0, 1.0, 0.5])) @ q2.T, jnp.float32)
    u0 = jnp.ones(4) / 2
    errors = [abs(float(P.power_iteration(a, u0, k)[0]) - 4.0) for k in (1, 3, 6, 12)]
    assert all(e >= 0 for e in errors)
    # The float64 iteration's own error after 12 steps, plus float32 rounding:
    # the direction's rounding is contracted by s2/s1 = 0.5 per iteration (so
    # at most twice one iteration's), sigma's is that of its last products.
    exact = power_iteration_float64(np.asarray(a, np.float64), np.ones(4) / 2, 12)
    rounding = ulps(4.0, 2 * norm_ulps(a.size))
    assert errors[-1] <= abs(exact - 4.0) + rounding, errors
    assert errors[0] > errors[1] > errors[2], errors
    sigma, u, v = P.power_iteration(a, u0, 30)
    assert float(sigma) <= 4.0 + rounding  # a lower bound, up to rounding
    # A unit vector's direction, after 30 contractions by 0.5: rounding only.
    np.testing.assert_allclose(abs(np.asarray(u) @ q2[:, 0]), 1.0, atol=rounding / 4.0)
    np.testing.assert_allclose(abs(np.asarray(v) @ q1[:, 0]), 1.0, atol=rounding / 4.0)


def power_iteration_float64(a, u, num_iters) -> float:
    """`power_iteration`'s sigma, written here in float64 (the exact iteration)."""
    for _ in range(num_iters):
        v = a @ u / np.linalg.norm(a @ u)
        u = a.T @ v / np.linalg.norm(a.T @ v)
    return float(v @ a @ u)


@pytest.mark.parametrize("fn", ["spectral_norm_svd", "orthogonal_svd"])
def test_svd_gradients_match_generic_autodiff(fn):
    # Where singular values are distinct, JAX's own SVD derivative is correct:
    # our divided-difference JVP (finite everywhere) must agree with it there.
    rng = RNG(7)
    w = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)
    cot = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)

    def generic(a):
        u, s, vt = jnp.linalg.svd(a, full_matrices=False)
        f = jnp.minimum(s, 1.0) if fn == "spectral_norm_svd" else jnp.ones_like(s)
        return (u * f) @ vt

    ours = getattr(P, fn) if fn == "orthogonal_svd" else (lambda a: P.spectral_norm_svd(a, 1.0))
    g_ours = jax.grad(lambda a: jnp.sum(ours(a) * cot))(w)
    g_generic = jax.grad(lambda a: jnp.sum(generic(a) * cot))(w)
    # Both derivatives divide by gaps between singular values (and by the
    # smallest one): the SVD's backward error, a reflection per row and column
    # relative to sigma_max, moves them by that times sigma_max / gap.
    s = np.linalg.svd(np.asarray(w, np.float64), compute_uv=False)
    gap = min(np.diff(-s).min(), s[-1])
    slack = ulps(np.abs(np.asarray(g_generic)).max(), s[0] / gap * norm_ulps(6 + 4))
    np.testing.assert_allclose(g_ours, g_generic, rtol=0, atol=slack)
    g_wide = jax.grad(lambda a: jnp.sum(ours(a.T) * cot.T))(w)  # the transposed view
    np.testing.assert_allclose(g_wide, g_generic, rtol=0, atol=slack)


# -- L1 ball and simplex against a bisection reference ------------------------


def simplex_reference(v, s):
    """Projection of one vector onto {x >= 0, sum x = s}: bisection on theta."""
    lo, hi = v.min() - s / v.size - 1.0, v.max()
    for _ in range(200):
        theta = (lo + hi) / 2
        lo, hi = (theta, hi) if np.maximum(v - theta, 0).sum() > s else (lo, theta)
    return np.maximum(v - (lo + hi) / 2, 0)


def l1_reference(v, m):
    if np.abs(v).sum() <= m:
        return v
    return np.sign(v) * simplex_reference(np.abs(v), m)


AXES = [((6, 5), 0), ((6, 5), -1), ((6, 5), None), ((3, 3, 2, 4), "fan_in"), ((3, 4, 5), (0, 2))]


@pytest.mark.parametrize("shape,axis", AXES, ids=[f"{s}-{a}" for s, a in AXES])
@pytest.mark.parametrize("radius", [0.0, 0.5, 4.0])
def test_l1_ball_matches_bisection(shape, axis, radius):
    w = RNG(8).normal(size=shape) * 2
    w.reshape(-1)[:3] = w.reshape(-1)[3]  # ties
    w32 = np.asarray(jnp.asarray(w, jnp.float32), np.float64)
    expected = per_unit(w32, axis, lambda r: l1_reference(r, radius))
    got = np.asarray(P.l1_ball(jnp.asarray(w32, jnp.float32), radius, axis), np.float64)
    # Michelot's threshold is exact up to rounding: the shift by the unit's
    # max (one ulp of max|w|) puts every active entry in [-m, 0], so the
    # threshold's sum over n of them, its division and the final subtraction
    # are n + 2 roundings of at most max(|w|, m): norm_ulps(n) + 1 with the shift.
    n = unit_size(oc.L1Ball(radius, axis=axis), shape)
    assert_close_ulps(got, expected, norm_ulps(n) + 1, scale=max(np.abs(w32).max(), radius))


@pytest.mark.parametrize("shape,axis", AXES, ids=[f"{s}-{a}" for s, a in AXES])
@pytest.mark.parametrize("scale", [0.5, 1.0, 10.0])
def test_simplex_matches_bisection(shape, axis, scale):
    w = RNG(9).normal(size=shape) * 2
    w.reshape(-1)[:3] = w.reshape(-1)[3]  # ties
    w32 = np.asarray(jnp.asarray(w, jnp.float32), np.float64)
    expected = per_unit(w32, axis, lambda r: simplex_reference(r, scale))
    got = np.asarray(P.simplex(jnp.asarray(w32, jnp.float32), scale, axis), np.float64)
    # Michelot's threshold is exact up to rounding (see the L1 test above).
    n = unit_size(oc.Simplex(scale, axis=axis), shape)
    assert_close_ulps(got, expected, norm_ulps(n) + 1, scale=max(np.abs(w32).max(), scale))


def test_l1_ball_units_inside_are_returned_bit_for_bit():
    rng = RNG(10)
    w = rng.normal(size=(7, 3)).astype(np.float32)
    w[:, 1] *= 1e-3  # this unit is inside the ball of radius 1
    out = np.asarray(oc.L1Ball(1.0)(jnp.asarray(w)))
    np.testing.assert_array_equal(out[:, 1], w[:, 1])
    # The projected unit's L1 norm: 7 outputs, each off by the threshold's
    # norm_ulps(7) roundings of the radius (see `feasibility_slack`).
    l1 = np.abs(out[:, 0].astype(np.float64)).sum()
    assert abs(l1 - 1.0) <= ulps(1.0, 7 * norm_ulps(7)), l1


def test_simplex_of_zero_unit_is_uniform():
    out = np.asarray(oc.Simplex(3.0)(jnp.zeros((4, 2))))
    # Exact: the threshold is (0 - 3) / 4 = -0.75 and 0 - (-0.75), both representable.
    np.testing.assert_array_equal(out, np.full((4, 2), 0.75))


@pytest.mark.parametrize("name", ["simplex", "l1_ball"])
def test_simplex_and_l1_ball_derivatives_match_finite_differences(name):
    # The threshold is found by a loop; the custom JVP gives the derivative of
    # max(v - theta, 0) with theta's exact derivative. Away from ties and kinks
    # it must agree with central differences, for the weights and the radius.
    rng = RNG(11)
    w = jnp.asarray(rng.normal(size=(9, 4)), jnp.float32)
    direction = jnp.asarray(rng.normal(size=(9, 4)), jnp.float32)
    fn = getattr(P, name)
    radius = 1.5

    def f(w, radius):
        return fn(w, radius, 0)

    _, jvp_w = jax.jvp(lambda a: f(a, radius), (w,), (direction,))
    _, jvp_r = jax.jvp(lambda r: f(w, r), (jnp.float32(radius),), (jnp.float32(1.0),))
    h = 1e-3
    fd_w = (f(w + h * direction, radius) - f(w - h * direction, radius)) / (2 * h)
    fd_r = (f(w, radius + h) - f(w, radius - h)) / (2 * h)
    # f is piecewise linear, so away from kinks central differences have no
    # truncation error: only the rounding of f at both points (its threshold's
    # sums over a unit of 9, the subtraction, the rounded input) over 2h.
    scale = max(float(jnp.abs(w).max()) + h * float(jnp.abs(direction).max()), radius + h)
    fd_slack = ulps(scale, 2 * (norm_ulps(9) + 1)) / (2 * h)
    np.testing.assert_allclose(jvp_w, fd_w, rtol=0, atol=fd_slack)
    np.testing.assert_allclose(jvp_r, fd_r, rtol=0, atol=fd_slack)
    # Reverse mode, under jit and vmap, agrees with the forward mode.
    cot = jnp.asarray(rng.normal(size=(9, 4)), jnp.float32)
    grad = jax.jit(jax.grad(lambda a: jnp.sum(f(a, radius) * cot)))(w)
    # The adjoint identity, in two 36-term float32 dot products of derivatives
    # that each carry a unit's sums (gamma_n bound on sum |x_i y_i|).
    terms = float(jnp.sum(jnp.abs(grad * direction)) + jnp.sum(jnp.abs(jvp_w * cot)))
    np.testing.assert_allclose(
        jnp.sum(grad * direction),
        jnp.sum(jvp_w * cot),
        rtol=0,
        atol=ulps(terms, w.size + norm_ulps(9)),
    )
    # Batched, XLA may order the unit sums differently: each side's rounding.
    batched = jax.vmap(lambda a: f(a, radius))(jnp.stack([w, 2 * w]))
    assert_close_ulps(batched[1], f(2 * w, radius), 2 * norm_ulps(9), scale=2 * jnp.abs(w).max())


def test_newton_schulz_stop_early_stops_once_converged():
    # One optimizer step away from orthogonal (the case in `project` after the
    # first update) it converges in a few iterations and stops there: the
    # result is bit for bit the fixed iteration of some small count.
    keys = jax.random.split(jax.random.key(12), 3)
    q = P.orthogonal_svd(jax.random.normal(keys[0], (96, 64)))
    w = q + 1e-3 * jax.random.normal(keys[1], (96, 64))
    early = np.asarray(P.orthogonal_newton_schulz(w, 25, stop_early=True))
    counts = [
        k
        for k in range(1, 11)
        if np.array_equal(np.asarray(P.orthogonal_newton_schulz(w, k)), early)
    ]
    assert counts and counts[0] <= 8, counts
    gram = early.astype(np.float64).T @ early.astype(np.float64)
    # Converged, so only the last iteration's rounding: its 96-term Gram sum
    # (halved by the update, doubled in X^T X) and the product's own two ulps.
    assert np.abs(gram - np.eye(64)).max() <= ulps(1.0, norm_ulps(96))
    # A Gaussian kernel (condition ~100) settles later; the result is the
    # fixed iteration's up to float32 rounding.
    r = jax.random.normal(keys[2], (64, 64))
    # Each iteration past convergence multiplies by I + O(eps): the symmetric
    # error is undone by the next, the product's rounding (<= 2 ulps of the
    # entries, < 1) is not; at most 25 such iterations.
    np.testing.assert_allclose(
        np.asarray(P.orthogonal_newton_schulz(r, 25, stop_early=True)),
        np.asarray(P.orthogonal_newton_schulz(r, 25)),
        rtol=0,
        atol=ulps(1.0, 2 * P.NEWTON_SCHULZ_ITERS),
    )
    # And reverse mode works through it.
    g = jax.grad(lambda a: jnp.sum(P.orthogonal_newton_schulz(a, 25, stop_early=True) * w))(w)
    assert np.all(np.isfinite(np.asarray(g)))
