"""Projections that see a kernel as one matrix: spectral norm and orthogonality.

A kernel of shape `(*fan_in_axes, out)` is viewed as the matrix
`(fan_in, out) = (prod(shape[:-1]), shape[-1])`: rows index the inputs of a
unit (for a Conv kernel, every spatial position and input channel), columns
the output units. That is the matrix the layer multiplies by, so its singular
values are the layer's gains. Arrays with fewer than 2 dimensions have no such
view and raise `ValueError` (route biases and norm scales elsewhere).

bfloat16 and float16 inputs are computed in float32 and cast back.

Gradients through the SVD-based projections use the divided-difference
formula for spectral functions (Lewis 1996; Candès, Sing-Long & Trzasko 2013)
through a custom JVP, so they stay finite where singular values coincide
(zero or rank-deficient kernels), where JAX's generic SVD derivative divides
by zero.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from optax_constraints.projections._norms import projection
from optax_constraints.projections._sharding import gathered, sharded_like


def matrix_view(w: jax.Array) -> jax.Array:
    """`w` reshaped to `(fan_in, out) = (prod(shape[:-1]), shape[-1])`.

    Raises `ValueError` for arrays with fewer than 2 dimensions. A kernel
    sharded over `Explicit` mesh axes is gathered first (the view has no
    sharding JAX can express); `Auto` axes are the compiler's business.

    >>> import jax.numpy as jnp
    >>> matrix_view(jnp.zeros((3, 3, 4, 8))).shape
    (36, 8)
    """
    w = jnp.asarray(w)
    if w.ndim < 2:
        raise ValueError(
            f"a matrix constraint needs an array with at least 2 dimensions, viewed as"
            f" (fan_in, out) = (prod(shape[:-1]), shape[-1]); this one has shape"
            f" {tuple(w.shape)}. Leave 1-D leaves (biases, norm scales) unconstrained or"
            " give them an elementwise or norm constraint"
        )
    return gathered(w).reshape((math.prod(w.shape[:-1]), w.shape[-1]))


def _tall(fn):
    """Runs `fn` on the matrix view, transposed so rows >= columns, and reshapes back.

    The result has `w`'s sharding again (the view may have gathered it).
    """

    @functools.wraps(fn)
    def wrapper(w, *args, **kwargs):
        w = jnp.asarray(w)
        a = matrix_view(w)
        wide = a.shape[0] < a.shape[1]
        out = fn(a.T if wide else a, *args, **kwargs)
        return sharded_like((out.T if wide else out).reshape(w.shape), w)

    return wrapper


# -- spectral functions U f(S) V^T with a finite derivative -----------------


def _spectral_parts(a, c, kind):
    """SVD of a tall `a` and, for the map `kind`, f(s), f'(s) and the limits needed."""
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


def _safe_div(num, den, fallback):
    nonzero = den != 0
    return jnp.where(nonzero, num / jnp.where(nonzero, den, 1), fallback)


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
    # In the singular bases, da = U A V^T + (I - U U^T) da: the first part
    # moves singular values and rotates within the span, the second rotates
    # the left singular vectors out of it.
    a_in = u.T @ da @ v
    sym, anti = (a_in + a_in.T) / 2, (a_in - a_in.T) / 2
    si, sj = s[:, None], s[None, :]
    fi, fj = f[:, None], f[None, :]
    d_sym = _safe_div(fi - fj, si - sj, fprime[:, None] * jnp.ones_like(sj))
    d_anti = _safe_div(fi + fj, si + sj, f_at_zero)
    ratio = _safe_div(f, s, f_at_zero)  # f(s) / s
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

    .. math:: P(W) = U \\min(\\Sigma, m) V^\\top

    is the nearest matrix (in Frobenius norm, and in every unitarily invariant
    norm) whose largest singular value is at most :math:`m`. Singular values
    below `m` are untouched; a kernel already inside the ball is returned bit
    for bit. Cost: one thin SVD, :math:`O(\\text{fan\\_in} \\cdot \\text{out}
    \\cdot \\min(\\text{fan\\_in}, \\text{out}))`.

    Args:
      w: kernel with at least 2 dimensions (see the module docstring).
      max_value: the bound :math:`m \\ge 0` (number, array or tracer).

    Returns:
      The projected kernel, same shape and dtype.

    >>> import jax.numpy as jnp
    >>> import numpy as np
    >>> from optax_constraints.projections import spectral_norm_svd
    >>> w = jnp.array([[3.0, 0.0], [0.0, 0.5]])
    >>> np.asarray(spectral_norm_svd(w, 1.0)).round(4).tolist()
    [[1.0, 0.0], [0.0, 0.5]]

    References:
      Lewis, Derivatives of spectral functions, Math. Oper. Res. 21(3), 1996.
      Sedghi, Gupta & Long, The Singular Values of Convolutional Layers,
      ICLR 2019 (clipping singular values as a projection).
    """
    return _clip_singular_values(w, max_value)


@_tall
def _clip_singular_values(a, max_value):
    return _spectral_map(a, jnp.asarray(max_value, a.dtype), "clip")


@projection
def orthogonal_svd(w: jax.Array) -> jax.Array:
    """The nearest semi-orthogonal matrix: the polar factor `U V^T`.

    With the SVD of the `(fan_in, out)` view :math:`W = U \\Sigma V^\\top`,
    :math:`P(W) = U V^\\top` minimises :math:`\\|W - Q\\|_F` over
    :math:`Q` with orthonormal columns (when `fan_in >= out`) or orthonormal
    rows (when `fan_in < out`). The set is not convex; for a rank-deficient
    `W` the nearest point is not unique and the SVD's choice is returned (still
    semi-orthogonal); the derivative there is taken as 0 in the undetermined
    directions.

    Args:
      w: kernel with at least 2 dimensions.

    Returns:
      The semi-orthogonal kernel, same shape and dtype.

    >>> import jax.numpy as jnp
    >>> import numpy as np
    >>> from optax_constraints.projections import orthogonal_svd
    >>> q = orthogonal_svd(jnp.array([[2.0, 1.0], [0.0, 1.0], [1.0, 0.0]]))
    >>> bool(np.allclose(q.T @ q, np.eye(2), atol=1e-5))
    True

    References:
      Higham, Computing the polar decomposition -- with applications,
      SIAM J. Sci. Stat. Comput. 7(4), 1986.
    """
    return _polar_factor(w)


@_tall
def _polar_factor(a):
    return _spectral_map(a, jnp.zeros((), a.dtype), "polar")


NEWTON_SCHULZ_ITERS = 25
"""Default iteration count of `orthogonal_newton_schulz` (see its docstring)."""


@projection
def orthogonal_newton_schulz(
    w: jax.Array, num_iters: int = NEWTON_SCHULZ_ITERS, stop_early: bool = False
) -> jax.Array:
    """The polar factor `U V^T` by the cubic Newton–Schulz iteration (no SVD).

    On the `(fan_in, out)` view, transposed so that :math:`X` is tall
    (the Gram matrix :math:`X^\\top X` is then the smaller one),

    .. math::
       X_0 = W / b, \\qquad X_{k+1} = \\tfrac32 X_k - \\tfrac12 X_k X_k^\\top X_k,

    where :math:`b^2 = \\min(\\operatorname{tr} G, \\max_i \\sum_j |G_{ij}|)`,
    :math:`G = W^\\top W`, is an upper bound on :math:`\\sigma_{\\max}(W)^2`
    (Frobenius norm, and the Gershgorin bound, which is exact for an orthogonal
    `W`). Each singular value follows :math:`s \\mapsto \\tfrac32 s -
    \\tfrac12 s^3`, which maps :math:`(0, 1]` into itself and increases
    monotonically to the fixed point 1: by a factor of about 1.5 per
    iteration while small, then quadratically. So :math:`X_k \\to U V^\\top`
    with singular values approaching 1 from below, at the cost of two matrix
    products per iteration (fast on accelerators).

    Accuracy depends on :math:`s_{\\min}/b`: about
    :math:`\\log_{1.5}(b/s_{\\min}) + 5` iterations reach float32 accuracy.
    Measured in float32 on CPU (`max |X_k - U V^T|` against
    `numpy.linalg.svd` in float64):

    * near-orthogonal kernels (an orthogonal matrix plus 1% noise, the case
      in training once the constraint holds), 256x128 and 256x256: ~3e-7
      after 5-6 iterations;
    * Gaussian (Glorot-scaled) kernels 64x32, 256x128, 128x256, 512x256
      (condition number ~5): ~4e-7 after 8-10 iterations;
    * square Gaussian kernels (ill-conditioned): 64x64 (condition 170) ~5e-7
      after 18; 256x256 (850), 512x512 (1700) and 1024x1024 (2000) ~7e-7
      after 25 (5e-3 after 20).

    Hence the default of 25; with a kernel that is already near-orthogonal
    (every step after the first), `num_iters=6` is enough. For a first
    projection of a very ill-conditioned kernel use `orthogonal_svd`.

    The fixed point of a rank-deficient `W` is the partial isometry on its
    range (an all-zero kernel stays zero): use `orthogonal_svd` if such
    kernels can occur. Muon's quintic coefficients are deliberately not used:
    they trade convergence to the polar factor for speed.

    With `stop_early=True` the iteration stops once it has converged: when
    :math:`\\max |X_k^\\top X_k - I| \\le 10^{-3}`, three more iterations
    (each squares the error) reach the float32 floor, and at most `num_iters`
    run in all. A kernel one optimizer step away from orthogonal then takes
    about 5 iterations instead of 25 (`oc.project` uses this mode); the
    remaining iterations are skipped by a `lax.cond`, and derivatives are
    those of the iterations that ran.

    Args:
      w: kernel with at least 2 dimensions.
      num_iters: number of iterations (a Python int), or the most with
        `stop_early`.
      stop_early: stop once converged (see above).

    Returns:
      The (approximately) semi-orthogonal kernel, same shape and dtype.

    >>> import jax.numpy as jnp
    >>> import numpy as np
    >>> from optax_constraints.projections import orthogonal_newton_schulz
    >>> q = orthogonal_newton_schulz(jnp.array([[2.0, 1.0], [0.0, 1.0], [1.0, 0.0]]))
    >>> bool(np.allclose(q.T @ q, np.eye(2), atol=1e-5))
    True

    References:
      Higham, Functions of Matrices: Theory and Computation, SIAM 2008,
      section 8.3 (the Newton–Schulz iteration for the polar decomposition).
      Björck & Bowie, An iterative algorithm for computing the best estimate
      of an orthogonal matrix, SIAM J. Numer. Anal. 8(2), 1971.
    """
    if not (isinstance(num_iters, int) and not isinstance(num_iters, bool) and num_iters >= 0):
        raise ValueError(f"num_iters must be a Python int >= 0; got num_iters={num_iters!r}.")
    return _newton_schulz(w, num_iters, bool(stop_early))


SETTLED = 1e-3
"""`max |X^T X - I|` below which `stop_early` Newton–Schulz runs its last iterations."""

FINAL_ITERS = 3
"""Iterations after `SETTLED`: 1e-3 -> 1e-6 -> 1e-12 -> below float32 resolution."""


@_tall
def _newton_schulz(x, num_iters, stop_early=False):
    # The polar factor ignores scale: dividing by the largest entry first keeps
    # the Gram matrix in range (float32 squares overflow past ~1e19 and flush
    # to zero below ~1e-19, which made such kernels come back as zeros).
    # The scale is a constant for the derivative (exact, by scale invariance, and
    # free of the 1 / peak**2 term that overflows for tiny kernels).
    peak = jax.lax.stop_gradient(jnp.max(jnp.abs(x)))
    x = x / jnp.where(peak > 0, peak, 1)
    gram = x.T @ x
    bound_sq = jnp.minimum(jnp.trace(gram), jnp.max(jnp.sum(jnp.abs(gram), axis=1)))
    positive = bound_sq > 0
    # An all-zero kernel stays zero (and its gradient finite).
    x = x * jnp.where(positive, jax.lax.rsqrt(jnp.where(positive, bound_sq, 1)), 0)
    eye = jnp.eye(x.shape[1], dtype=x.dtype)

    def step(_, x):
        return x @ (1.5 * eye - 0.5 * (x.T @ x))

    if not stop_early:
        return jax.lax.fori_loop(0, num_iters, step, x)

    def settling_step(x, left):
        gram = x.T @ x
        settled = jnp.max(jnp.abs(gram - eye)) <= SETTLED
        left = jnp.where(settled, jnp.minimum(left, FINAL_ITERS), left)
        return x @ (1.5 * eye - 0.5 * gram), left - 1

    def maybe_step(_, carry):
        # A `cond` in a fixed-length loop rather than a `while_loop`: the
        # skipped iterations cost nothing, and reverse mode still works.
        return jax.lax.cond(carry[1] > 0, lambda c: settling_step(*c), lambda c: c, carry)

    x, _ = jax.lax.fori_loop(0, num_iters, maybe_step, (x, jnp.int32(num_iters)))
    return x


# -- power iteration ---------------------------------------------------------


def _normalize(x, fallback):
    # Scale first: x * x must neither overflow nor flush to 0. The result does not
    # depend on the scale, so its derivative is taken as constant (exactly).
    peak = jax.lax.stop_gradient(jnp.max(jnp.abs(x)))
    x = x / jnp.where(peak > 0, peak, 1)
    sumsq = jnp.sum(x * x)
    positive = sumsq > 0
    return jnp.where(positive, x * jax.lax.rsqrt(jnp.where(positive, sumsq, 1)), fallback)


def power_iteration(w2d: jax.Array, u: jax.Array, num_iters: int = 1):
    """Estimates the largest singular value of a matrix by power iteration.

    With `w2d` of shape `(m, n)` (a kernel's `(fan_in, out)` view) and a unit
    vector `u` of length `n`, each iteration computes

    .. math:: v \\leftarrow \\frac{W u}{\\|W u\\|}, \\qquad
       u \\leftarrow \\frac{W^\\top v}{\\|W^\\top v\\|}, \\qquad
       \\sigma = \\|W^\\top v\\| = v^\\top W u,

    so :math:`\\sigma \\le \\sigma_{\\max}(W)` and the error shrinks like
    :math:`(\\sigma_2/\\sigma_1)^{2k}`. Keeping `u` between calls, as in
    spectral normalization, makes one iteration per training step enough
    once the weights change slowly. A zero vector (e.g. from an all-zero
    matrix) restarts from the normalized all-ones vector, so `u` never gets
    stuck at 0.

    Args:
      w2d: a 2-D array (use `matrix_view` on kernels).
      u: current estimate of the top right singular vector, shape `(n,)`.
      num_iters: iterations to run (a Python int >= 1).

    Returns:
      `(sigma, u_new, v)`: the estimate, the updated right vector (`(n,)`)
      and the left vector (`(m,)`).

    >>> import jax.numpy as jnp
    >>> from optax_constraints.projections import power_iteration
    >>> sigma, u, v = power_iteration(jnp.array([[3.0, 0.0], [0.0, 1.0]]), jnp.ones(2), 10)
    >>> round(float(sigma), 4)
    3.0

    References:
      Miyato, Kataoka, Koyama & Yoshida, Spectral Normalization for Generative
      Adversarial Networks, ICLR 2018 (algorithm 1).
    """
    if not (isinstance(num_iters, int) and not isinstance(num_iters, bool) and num_iters >= 1):
        raise ValueError(f"num_iters must be a Python int >= 1; got num_iters={num_iters!r}.")
    w2d = jnp.asarray(w2d)
    u = jnp.asarray(u, w2d.dtype)
    ones_m = jnp.full((w2d.shape[0],), 1 / math.sqrt(max(w2d.shape[0], 1)), w2d.dtype)
    ones_n = jnp.full((w2d.shape[1],), 1 / math.sqrt(max(w2d.shape[1], 1)), w2d.dtype)

    def step(_, carry):
        u, _ = carry
        v = _normalize(w2d @ u, ones_m)
        return _normalize(w2d.T @ v, ones_n), v

    u, v = jax.lax.fori_loop(0, num_iters, step, (u, ones_m))
    sigma = v @ (w2d @ u)
    return sigma, u, v


POWER_SETTLED = 1e-2
"""Relative residual `||W^T W u - rho u|| / rho` below which the power iteration stops."""

POWER_MAX_ITERS = 100
"""Most power iterations `power_iteration_until_settled` runs per call by default."""


def _norm(x):
    # A 2-norm that neither overflows nor flushes to 0 (see `_normalize`).
    peak = jnp.max(jnp.abs(x))
    scale = jnp.where(peak > 0, peak, 1)
    return scale * jnp.sqrt(jnp.sum((x / scale) ** 2))


def power_iteration_until_settled(
    w2d: jax.Array,
    u: jax.Array,
    min_iters: int = 1,
    max_iters: int = POWER_MAX_ITERS,
    rtol: float = POWER_SETTLED,
):
    """Power iteration that runs until its estimate of `sigma_max` has settled.

    The iterations of `power_iteration`, at least `min_iters` and at most
    `max_iters`, stopping after the first one whose input `u` had a relative
    residual as an eigenvector of :math:`B = W^\\top W` below `rtol`:

    .. math:: \\|B u - \\rho u\\| \\le \\mathrm{rtol}\\, \\rho, \\qquad
       \\rho = \\|W u\\|^2,

    (computed from the products the iteration makes anyway: no extra pass).
    The returned vector is one iteration past that `u`.

    What this guarantees, and what not:

    * :math:`\\sigma \\le \\sigma_{\\max}` always (up to rounding): power
      iteration only ever underestimates, so rescaling by it can overshoot
      the bound, never undershoot it.
    * A small residual means :math:`\\rho` is within
      :math:`\\mathrm{rtol}\\,\\rho` of *an* eigenvalue of :math:`B`, in
      practice a weighted mean of the top ones the vector has not yet
      separated. A degenerate or clustered top (:math:`\\sigma_1 \\approx
      \\sigma_2`) makes the *vector* converge slowly, but not the estimate:
      every singular value in the cluster is close to :math:`\\sigma_{\\max}`.
      The error is largest for a top cluster of width about 1-2%, which the
      iteration neither resolves nor can tell from one value.
    * Not guaranteed: that the eigenvalue found is the largest. A vector with
      (numerically) no component along the top singular vector stays blind to
      it; only an SVD certifies :math:`\\sigma_{\\max}`.

    Measured in float32 (`python -m benchmarks.power_method`: cold starts
    from 20 random unit vectors, `max_iters=100`), the largest relative
    error of :math:`\\sigma`: 5.1e-4 on 64x32 Gaussian matrices, 9.2e-3 on
    384x384, 5.6e-3 on 1024x256 and 5.3e-3 on 1024x1024 ones (the edge of
    the Marchenko-Pastur bulk: many singular values near the top), 1.8e-4
    for a doubly degenerate top, 1.0e-2 for :math:`\\sigma_2/\\sigma_1 =
    0.99`, 1.2e-2 for 32 values spread over `[0.98, 1]`, 1.25e-2 for 8 over
    `[0.97, 1]` (the worst case: a cluster the iteration does not resolve).
    A warm `u` (the previous step's) settles after one iteration once
    training moves slowly, so the usual cost is that of one iteration.

    The loop runs on `stop_gradient(w2d)`; the returned `sigma = v^T W u` is
    differentiable in `w2d` with `u`, `v` fixed, which is the derivative of
    :math:`\\sigma_{\\max}` at convergence (for a simple top singular value),
    so reverse mode works although the loop is a `lax.while_loop`.

    Args:
      w2d: a 2-D array (use `matrix_view` on kernels).
      u: current estimate of the top right singular vector, shape `(n,)`.
      min_iters: iterations always run (a Python int >= 1).
      max_iters: the most iterations (a Python int >= min_iters).
      rtol: the relative residual at which the estimate counts as settled.

    Returns:
      `(sigma, u_new, v, iters)`: the estimate, the right (`(n,)`) and left
      (`(m,)`) vectors, and the number of iterations run (int32).

    >>> import jax.numpy as jnp
    >>> from optax_constraints.projections import power_iteration_until_settled
    >>> from optax_constraints.projections import power_iteration
    >>> w = jnp.array([[3.0, 0.0], [0.0, 2.9]])  # a small gap: slow to separate
    >>> u0 = jnp.ones(2) / 2**0.5
    >>> round(float(power_iteration(w, u0, 1)[0]), 4)  # one iteration
    2.9521
    >>> sigma, u, v, iters = power_iteration_until_settled(w, u0)
    >>> round(float(sigma), 2), 1 < int(iters) < 100
    (3.0, True)
    """
    for name, value, low in (("min_iters", min_iters, 1), ("max_iters", max_iters, min_iters)):
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= low):
            raise ValueError(f"{name} must be a Python int >= {low}; got {name}={value!r}.")
    w2d = jnp.asarray(w2d)
    w = jax.lax.stop_gradient(w2d)
    u = jnp.asarray(u, w.dtype)
    ones_m = jnp.full((w.shape[0],), 1 / math.sqrt(max(w.shape[0], 1)), w.dtype)
    ones_n = jnp.full((w.shape[1],), 1 / math.sqrt(max(w.shape[1], 1)), w.dtype)

    def unsettled(carry):
        _, _, iters, settled = carry
        return (iters < min_iters) | ((iters < max_iters) & ~settled)

    def one_iteration(carry):
        u, _, iters, _ = carry
        y = w @ u
        v = _normalize(y, ones_m)
        norm_y = v @ y  # ||W u||, without squaring y
        z = w.T @ v  # B u / ||W u||
        # ||B u - rho u|| / rho = ||z - ||Wu|| u|| / ||Wu||. `~(a > b)` also
        # settles a NaN kernel at once instead of iterating max_iters times.
        settled = ~(_norm(z - norm_y * u) > rtol * norm_y)
        return _normalize(z, ones_n), v, iters + 1, settled

    init = (u, ones_m, jnp.zeros([], jnp.int32), jnp.zeros([], bool))
    u, v, iters, _ = jax.lax.while_loop(unsettled, one_iteration, init)
    return v @ (w2d @ u), u, v, iters


@projection
def spectral_rescale(
    w: jax.Array, max_value: jax.typing.ArrayLike, sigma: jax.typing.ArrayLike
) -> jax.Array:
    """Scales the whole kernel down by `max(1, sigma / max_value)`.

    .. math:: w' = w \\cdot \\min\\left(1, \\frac{m}{\\sigma}\\right)

    With :math:`\\sigma` the (estimated) largest singular value, this is
    spectral normalization applied only when the bound is exceeded: every
    singular value shrinks by the same factor, so the result is feasible when
    :math:`\\sigma` is exact, but it is not the nearest feasible kernel (that
    is `spectral_norm_svd`). `sigma <= max_value` (including 0) leaves `w`
    unchanged.

    Args:
      w: the kernel (any shape).
      max_value: the bound :math:`m \\ge 0`.
      sigma: the largest singular value of `w` (or an estimate).

    Returns:
      The rescaled kernel, same shape and dtype.

    >>> import jax.numpy as jnp
    >>> from optax_constraints.projections import spectral_rescale
    >>> spectral_rescale(jnp.array([[4.0, 2.0]]), 1.0, 4.0)
    Array([[1. , 0.5]], dtype=float32)
    """
    w = jnp.asarray(w)
    sigma = jnp.asarray(sigma, w.dtype)
    over = sigma > max_value
    factor = jnp.where(over, max_value / jnp.where(over, sigma, 1), 1)
    return w * factor.astype(w.dtype)
