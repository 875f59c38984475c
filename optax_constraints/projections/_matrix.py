"""Projections that see a kernel `(*fan_in_axes, out)` as its `(fan_in, out)` matrix."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from optax_constraints.projections._norms import projection, safe_div
from optax_constraints.projections._sharding import (
    explicit_spec,
    gathered,
    laid_out,
    on_mesh_of,
    sharded_like,
)


def check_iters(name: str, value, low: int, *, owner: str = "", low_name: str = "") -> None:
    """Raises `ValueError` unless `value` is a Python int (not a bool) `>= low`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        where = f"{owner}: " if owner else ""
        raise ValueError(
            f"{where}{name} must be an int >= {low_name or low}; got {name}={value!r}."
        )


def _kernel(w) -> jax.Array:
    w = jnp.asarray(w)
    if w.ndim < 2:
        raise ValueError(
            f"a matrix constraint needs an array with at least 2 dimensions, viewed as"
            f" (fan_in, out) = (prod(shape[:-1]), shape[-1]); this one has shape"
            f" {tuple(w.shape)}. Leave 1-D leaves (biases, norm scales) unconstrained or"
            " give them an elementwise or norm constraint"
        )
    return w


def _peak_scaled(x):
    """`x / max|x|` (so `x * x` stays in range) and the scale, a constant for derivatives."""
    peak = jax.lax.stop_gradient(jnp.max(jnp.abs(x)))
    scale = jnp.where(peak > 0, peak, 1)
    return x / scale, scale


def matrix_view(w: jax.Array) -> jax.Array:
    """`w` as its `(fan_in, out) = (prod(shape[:-1]), shape[-1])` matrix, gathered if sharded.

    >>> matrix_view(jnp.zeros((3, 3, 4, 8))).shape
    (36, 8)
    """
    w = _kernel(w)
    return gathered(w).reshape((math.prod(w.shape[:-1]), w.shape[-1]))


# -- spectral functions U f(S) V^T, differentiated by divided differences (Lewis
# 1996) so the derivative stays finite where singular values coincide.


def _spectral_parts(a, c, kind):
    """SVD of a tall `a` and, for `kind`, f(s), f'(s) and lim f(s)/s at 0."""
    u, s, vt = jnp.linalg.svd(a, full_matrices=False)
    if kind == "clip":
        f = jnp.minimum(s, c)
        fprime = (s <= c).astype(s.dtype)
        f_at_zero = (c > 0).astype(s.dtype)  # lim f(s)/s as s -> 0+
    else:  # "polar": f = 1 (the polar factor U V^T)
        f = jnp.ones_like(s)
        fprime = jnp.zeros_like(s)
        f_at_zero = jnp.zeros((), s.dtype)  # undefined there; the derivative is taken as 0
    return u, s, vt, f, fprime, f_at_zero


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _spectral_map(a, c, kind):
    u, s, vt, f, _, _ = _spectral_parts(a, c, kind)
    out = (u * f) @ vt
    if kind == "clip":  # a feasible matrix comes back bit for bit
        out = jnp.where(s[0] <= c, a, out)
    return out


@_spectral_map.defjvp
def _spectral_map_jvp(kind, primals, tangents):
    a, c = primals
    da, dc = tangents
    u, s, vt, f, fprime, f_at_zero = _spectral_parts(a, c, kind)
    v = vt.T
    out = (u * f) @ vt
    # In the singular bases, da = U A V^T + (I - U U^T) da.
    a_in = u.T @ da @ v
    sym, anti = (a_in + a_in.T) / 2, (a_in - a_in.T) / 2
    si, sj = s[:, None], s[None, :]
    fi, fj = f[:, None], f[None, :]
    d_sym = safe_div(fi - fj, si - sj, fprime[:, None] * jnp.ones_like(sj))
    d_anti = safe_div(fi + fj, si + sj, f_at_zero)
    ratio = safe_div(f, s, f_at_zero)  # f(s) / s
    inner = d_sym * sym + d_anti * anti
    if kind == "clip":
        inner = inner + jnp.diag((s > c).astype(s.dtype) * dc)
    d_out = u @ inner @ vt + ((da @ v - u @ a_in) * ratio) @ vt
    if kind == "clip":
        feasible = s[0] <= c
        out = jnp.where(feasible, a, out)
        d_out = jnp.where(feasible, da, d_out)
    return out, d_out


@projection
def spectral_norm_svd(w: jax.Array, max_value: jax.typing.ArrayLike = 1.0) -> jax.Array:
    """Euclidean projection onto the spectral-norm ball `{W : sigma_max(W) <= m}`.

    With the SVD of the `(fan_in, out)` view :math:`W = U \\Sigma V^\\top`,
    :math:`P(W) = U \\min(\\Sigma, m) V^\\top`. A kernel inside the ball comes
    back bit for bit; a sharded one is gathered for the SVD. Gradients stay
    finite where singular values coincide.

    >>> from optax_constraints.projections import spectral_norm_svd
    >>> spectral_norm_svd(jnp.array([[3.0, 0.0], [0.0, 0.5]]), max_value=1.0)
    Array([[1. , 0. ],
           [0. , 0.5]], dtype=float32)
    """
    return on_tall_view(lambda a: _spectral_map(a, jnp.asarray(max_value, a.dtype), "clip"), w)


@projection
def orthogonal_svd(w: jax.Array) -> jax.Array:
    """The nearest semi-orthogonal matrix: the polar factor `U V^T` of the `(fan_in, out)` view.

    It minimises :math:`\\|W - Q\\|_F` over :math:`Q` with orthonormal columns
    (rows when `fan_in < out`); for a rank-deficient `W`, the SVD's choice.
    Gathers a sharded kernel, unlike `orthogonal_newton_schulz`.

    >>> from optax_constraints.projections import orthogonal_svd
    >>> orthogonal_svd(jnp.array([[3.0, 0.0], [0.0, 0.5]]))
    Array([[1., 0.],
           [0., 1.]], dtype=float32)
    """
    return on_tall_view(lambda a: _spectral_map(a, jnp.zeros((), a.dtype), "polar"), w)


def on_tall_view(fn, *arrays):
    """`fn` on the arrays' matrix views, all transposed if the first is wide; like the last."""
    views = [matrix_view(x) for x in arrays]
    wide = views[0].shape[0] < views[0].shape[1]
    out = fn(*(v.T if wide else v for v in views))
    return sharded_like((out.T if wide else out).reshape(arrays[-1].shape), arrays[-1])


NEWTON_SCHULZ_ITERS = 25
"""Default iteration count of `orthogonal_newton_schulz`."""


@projection
def orthogonal_newton_schulz(
    w: jax.Array, num_iters: int = NEWTON_SCHULZ_ITERS, stop_early: bool = False
) -> jax.Array:
    """The polar factor `U V^T` by the cubic Newton–Schulz iteration (no SVD).

    On the `(fan_in, out)` view, transposed to be tall, :math:`X_0 = W / b`,
    :math:`X_{k+1} = \\tfrac32 X_k - \\tfrac12 X_k X_k^\\top X_k`, with
    :math:`b^2 = \\min(\\operatorname{tr} G, \\max_i \\sum_j |G_{ij}|) \\ge
    \\sigma_{\\max}(W)^2`, :math:`G = W^\\top W`. About 5-6 iterations reach
    float32 accuracy for a near-orthogonal kernel, about 25 for an
    ill-conditioned one; a rank-deficient `W` converges to a partial isometry.

    Args:
      w: kernel with at least 2 dimensions.
      num_iters: number of iterations (a Python int), the most with `stop_early`.
      stop_early: stop 3 iterations after :math:`\\max |X_k^\\top X_k - I| \\le
        10^{-3}` (a `lax.cond` skips the rest).

    >>> from optax_constraints.projections import orthogonal_newton_schulz
    >>> orthogonal_newton_schulz(jnp.array([[3.0, 0.0], [0.0, 0.5]]))
    Array([[1., 0.],
           [0., 1.]], dtype=float32)
    """
    check_iters("num_iters", num_iters, 0)
    w = _kernel(w)
    x, _ = _peak_scaled(w)  # the polar factor ignores scale
    layout = _Layout(x)
    g, eye = gram(x)
    # G is symmetric: Gershgorin's row sums may run over its first half of axes.
    bound_sq = jnp.minimum(jnp.sum(x * x), jnp.max(jnp.sum(jnp.abs(g), axis=layout.half)))
    positive = bound_sq > 0
    # An all-zero kernel stays zero (and its gradient finite).
    x = x * jnp.where(positive, jax.lax.rsqrt(jnp.where(positive, bound_sq, 1)), 0)

    def iteration(x):
        # X (1.5 I - G / 2), or (1.5 I - G / 2) X for a wide view.
        xs = layout.whole_short(x)
        g = layout.gram(x, xs)
        return layout.times(xs, 1.5 * eye - 0.5 * g), g

    def settling_step(_, carry):
        # A `cond` in a fixed-length loop, not a `while_loop`: reverse mode works.
        def step(x, left):
            x_new, g = iteration(x)
            settled = jnp.max(jnp.abs(g - eye)) <= SETTLED
            return x_new, jnp.where(settled, jnp.minimum(left, FINAL_ITERS), left) - 1

        return jax.lax.cond(carry[1] > 0, lambda c: step(*c), lambda c: c, carry)

    if stop_early:
        x, _ = jax.lax.fori_loop(0, num_iters, settling_step, (x, jnp.int32(num_iters)))
    else:
        x = jax.lax.fori_loop(0, num_iters, lambda _, x: iteration(x)[0], x)
    return sharded_like(x, w)


SETTLED = 1e-3  # max |X^T X - I| after which `stop_early` runs FINAL_ITERS more
FINAL_ITERS = 3  # 1e-3 -> 1e-6 -> 1e-12 -> below float32 resolution


def gram(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`W^T W` (or `W W^T` if `fan_in < out`: the smaller side's) in place, and its identity."""
    x = _kernel(x)
    layout = _Layout(x)
    g = layout.gram(x, layout.whole_short(x))
    return g, jnp.eye(math.isqrt(g.size), dtype=g.dtype).reshape(g.shape)


class _Layout:
    """The sides a Gram matrix sums over (`long`) and keeps (`short`), and the kernel's spec."""

    def __init__(self, x):
        fan, out = tuple(range(x.ndim - 1)), (x.ndim - 1,)
        self.tall = math.prod(x.shape[:-1]) >= x.shape[-1]
        self.long, self.short = (fan, out) if self.tall else (out, fan)
        self.like = x
        self.spec = explicit_spec(x) or (None,) * x.ndim
        self.half = tuple(range(len(self.short)))

    def whole_short(self, x):
        """`x` gathered over the mesh axes that split its short side (if any)."""
        entries = tuple(None if a in self.short else e for a, e in enumerate(self.spec))
        return laid_out(x, self.like, entries)

    def gram(self, x, xs):
        """`xs^T x` summed over the long axes: first half whole, second split like `x`."""
        entries = (None,) * len(self.short) + tuple(self.spec[a] for a in self.short)
        out = on_mesh_of(self.like, entries)
        return jnp.tensordot(xs, x, (self.long, self.long), out_sharding=out)

    def times(self, xs, m):
        """`X M` (tall) or `M X` (wide) for a symmetric Gram-like `M`, split like `x`."""
        out = on_mesh_of(self.like, self.spec)
        if self.tall:
            return jnp.tensordot(xs, m, (self.short, self.half), out_sharding=out)
        return jnp.tensordot(m, xs, (self.half, self.short), out_sharding=out)


def _normalize(x, fallback):
    x, _ = _peak_scaled(x)
    sumsq = jnp.sum(x * x)
    positive = sumsq > 0
    return jnp.where(positive, x * jax.lax.rsqrt(jnp.where(positive, sumsq, 1)), fallback)


class _Products:
    """`(fan_in, out)`-view products with left (`shape[:-1]`) and right vectors, in place."""

    def __init__(self, w):
        self.w = w = _kernel(w)
        spec = explicit_spec(w) or (None,) * w.ndim
        self.fan = tuple(range(w.ndim - 1))
        self.left_spec, self.right_spec = spec[:-1], spec[-1:]
        self.ones_m = self.ones(w.shape[:-1], self.left_spec)
        self.ones_n = self.ones(w.shape[-1:], self.right_spec)

    def ones(self, shape, entries):
        """The normalized all-ones vector of `shape`, laid out as `entries` (a zero's restart)."""
        ones = jnp.full(shape, 1 / math.sqrt(max(math.prod(shape), 1)), self.w.dtype)
        return laid_out(ones, self.w, entries)

    def times(self, u):
        """`W u`: a left vector."""
        out = on_mesh_of(self.w, self.left_spec)
        return jnp.tensordot(self.w, u, 1, out_sharding=out)

    def transposed_times(self, v):
        """`W^T v`: a right vector."""
        out = on_mesh_of(self.w, self.right_spec)
        return jnp.tensordot(v, self.w, (self.fan, self.fan), out_sharding=out)

    def dot(self, v, y):
        """`v . y` for two left vectors."""
        return jnp.tensordot(v, y, len(self.fan), out_sharding=on_mesh_of(self.w, ()))

    def start(self, u):
        """`u` (any layout) as a right vector, and how to give a result `u`'s layout back."""
        u = jnp.asarray(u, self.w.dtype)
        spec = explicit_spec(u) or (None,)
        return laid_out(u, self.w, self.right_spec), lambda x: laid_out(x, self.w, spec)


def power_iteration(w2d: jax.Array, u: jax.Array, num_iters: int = 1):
    """Estimates the largest singular value of a matrix by power iteration.

    Each iteration computes :math:`v = W u / \\|W u\\|`, :math:`u = W^\\top v /
    \\|W^\\top v\\|`; :math:`\\sigma = v^\\top W u \\le \\sigma_{\\max}(W)`. Keep
    `u` between calls (one iteration per step is then enough); a zero vector
    restarts from the normalized all-ones one.

    Args:
      w2d: a matrix `(m, n)`, or a kernel `(*fan_in_axes, out)` (contracted in place).
      u: current estimate of the top right singular vector, shape `(n,)`.
      num_iters: iterations to run (a Python int >= 1).

    Returns:
      `(sigma, u_new, v)`: `u_new` laid out like `u`, `v` of shape `(m,)` (`shape[:-1]`).

    >>> from optax_constraints.projections import power_iteration
    >>> sigma, u, v = power_iteration(jnp.array([[3.0, 0.0], [0.0, 1.0]]), jnp.ones(2), 10)
    >>> round(float(sigma), 4)
    3.0
    """
    check_iters("num_iters", num_iters, 1)
    w = _Products(w2d)
    u, as_given = w.start(u)

    def step(_, carry):
        u, _ = carry
        v = _normalize(w.times(u), w.ones_m)
        return _normalize(w.transposed_times(v), w.ones_n), v

    u, v = jax.lax.fori_loop(0, num_iters, step, (u, w.ones_m))
    return w.dot(v, w.times(u)), as_given(u), v


POWER_SETTLED = 1e-2
"""Relative residual `||W^T W u - rho u|| / rho` below which the power iteration stops."""

POWER_MAX_ITERS = 100
"""Most power iterations `power_iteration_until_settled` runs per call by default."""


def power_iteration_until_settled(
    w2d: jax.Array,
    u: jax.Array,
    min_iters: int = 1,
    max_iters: int = POWER_MAX_ITERS,
    rtol: float = POWER_SETTLED,
):
    """Power iteration that runs until its estimate of `sigma_max` has settled.

    At least `min_iters`, at most `max_iters` iterations of `power_iteration`,
    stopping one after a `u` with :math:`\\|B u - \\rho u\\| \\le
    \\mathrm{rtol}\\, \\rho`, :math:`B = W^\\top W`, :math:`\\rho = \\|W
    u\\|^2`. :math:`\\sigma \\le \\sigma_{\\max}` always; only an SVD certifies
    it (docs/performance.md). The loop runs on `stop_gradient(w2d)`; `sigma =
    v^T W u` is differentiable in `w2d` with `u`, `v` fixed.

    Returns:
      `(sigma, u_new, v, iters)`, `iters` the number of iterations run (int32).

    >>> from optax_constraints.projections import power_iteration_until_settled
    >>> w = jnp.array([[3.0, 0.0], [0.0, 2.9]])  # a small gap: slow to separate
    >>> sigma, u, v, iters = power_iteration_until_settled(w, jnp.ones(2) / 2**0.5)
    >>> round(float(sigma), 2), 1 < int(iters) < 100
    (3.0, True)
    """
    check_iters("min_iters", min_iters, 1)
    check_iters("max_iters", max_iters, min_iters, low_name="min_iters")
    differentiable = _Products(w2d)
    w = _Products(jax.lax.stop_gradient(differentiable.w))
    u, as_given = w.start(u)

    def unsettled(carry):
        _, _, iters, settled = carry
        return (iters < min_iters) | ((iters < max_iters) & ~settled)

    def one_iteration(carry):
        u, _, iters, _ = carry
        y = w.times(u)
        v = _normalize(y, w.ones_m)
        norm_y = w.dot(v, y)  # ||W u||, without squaring y
        z = w.transposed_times(v)  # B u / ||W u||
        # ||B u - rho u|| / rho = ||z - ||Wu|| u|| / ||Wu||. `~(a > b)` also
        # settles a NaN kernel at once instead of iterating max_iters times.
        r, scale = _peak_scaled(z - norm_y * u)
        settled = ~(scale * jnp.sqrt(jnp.sum(r * r)) > rtol * norm_y)
        return _normalize(z, w.ones_n), v, iters + 1, settled

    init = (u, w.ones_m, jnp.zeros([], jnp.int32), jnp.zeros([], bool))
    u, v, iters, _ = jax.lax.while_loop(unsettled, one_iteration, init)
    return differentiable.dot(v, differentiable.times(u)), as_given(u), v, iters


@projection
def spectral_rescale(
    w: jax.Array, max_value: jax.typing.ArrayLike, sigma: jax.typing.ArrayLike
) -> jax.Array:
    """Scales the whole kernel by :math:`\\min(1, m / \\sigma)`, `sigma` its largest singular value.

    Feasible when `sigma` is exact, but not the nearest feasible kernel (that is
    `spectral_norm_svd`).

    >>> from optax_constraints.projections import spectral_rescale
    >>> spectral_rescale(jnp.array([[4.0, 2.0]]), max_value=1.0, sigma=4.0)
    Array([[1. , 0.5]], dtype=float32)
    """
    sigma = jnp.asarray(sigma, w.dtype)
    over = sigma > max_value
    factor = jnp.where(over, max_value / jnp.where(over, sigma, 1), 1)
    return w * factor.astype(w.dtype)
