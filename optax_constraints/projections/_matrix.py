"""Projections that see a kernel as one matrix: spectral norm and orthogonality.

A kernel of shape `(*fan_in_axes, out)` is viewed as the matrix
`(fan_in, out) = (prod(shape[:-1]), shape[-1])`: rows index the inputs of a
unit (for a Conv kernel, every spatial position and input channel), columns
the output units. That is the matrix the layer multiplies by, so its singular
values are the layer's gains. Arrays with fewer than 2 dimensions have no such
view and raise `ValueError` (route biases and norm scales elsewhere).

Power iteration and Newton–Schulz only multiply by that matrix, so they
contract the kernel over its fan-in axes in place (`jnp.tensordot`, never a
reshape): a kernel sharded over a mesh stays sharded, and only vectors and
partial products travel (docs/multihost.md). The SVD-based projections need
the matrix itself and gather the one kernel they project when its type
shards it (`Explicit` mesh axes).

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
from optax_constraints.projections._sharding import (
    explicit_spec,
    gathered,
    laid_out,
    on_mesh_of,
    sharded_like,
)


def check_iters(name: str, value, low: int, *, owner: str = "", low_name: str = "") -> None:
    """Raises `ValueError` unless `value` is a Python int (not a bool) `>= low`.

    Every iteration count of the matrix projections and constraints is
    checked here; `owner` prefixes the message, `low_name` names the bound
    when it is another argument.

    >>> check_iters("num_iters", 3, 1)
    >>> check_iters("num_iters", 0, 1, owner="Orthogonal")
    Traceback (most recent call last):
    ValueError: Orthogonal: num_iters must be an int >= 1; got num_iters=0.
    """
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


def matrix_view(w: jax.Array) -> jax.Array:
    """`w` reshaped to `(fan_in, out) = (prod(shape[:-1]), shape[-1])`.

    Raises `ValueError` for arrays with fewer than 2 dimensions. A kernel
    sharded over `Explicit` mesh axes is gathered first (the view has no
    sharding JAX can express); `Auto` axes are the compiler's business.
    Only the SVD-based projections use it.

    >>> import jax.numpy as jnp
    >>> matrix_view(jnp.zeros((3, 3, 4, 8))).shape
    (36, 8)
    """
    w = _kernel(w)
    return gathered(w).reshape((math.prod(w.shape[:-1]), w.shape[-1]))


def _tall(fn):
    """Runs `fn` on the matrix view, transposed so rows >= columns, and reshapes back.

    The result has `w`'s sharding again (the view may have gathered it).
    """

    @functools.wraps(fn)
    def wrapper(w, *args, **kwargs):
        w = _kernel(w)
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
    \\cdot \\min(\\text{fan\\_in}, \\text{out}))`. The SVD needs the whole
    matrix: a kernel sharded over a mesh is gathered (this one kernel, inside
    the projection) and the result is laid out like the input again.

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
    directions. Like `spectral_norm_svd`, it gathers a sharded kernel;
    `orthogonal_newton_schulz` does not.

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
    Near-orthogonal kernels reach it in 5-6 iterations, ill-conditioned
    square Gaussian ones in about 25 (docs/performance.md has the measured
    errors).

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
    check_iters("num_iters", num_iters, 0)
    w = _kernel(w)
    return sharded_like(_newton_schulz(w, num_iters, bool(stop_early)), w)


SETTLED = 1e-3
"""`max |X^T X - I|` below which `stop_early` Newton–Schulz runs its last iterations."""

FINAL_ITERS = 3
"""Iterations after `SETTLED`: 1e-3 -> 1e-6 -> 1e-12 -> below float32 resolution."""


def gram(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The Gram matrix of the smaller side of `x`'s `(fan_in, out)` view, and its identity.

    `W^T W` (shape `(out, out)`) when `fan_in >= out`, else `W W^T` (shape
    `(*fan_in_axes, *fan_in_axes)`), contracted over the other side's axes of
    the kernel itself. A kernel sharded over `Explicit` mesh axes is gathered
    only over those that split the smaller side (the Gram pairs each of its
    indices with every other); the contracted side stays split and its
    partial products are summed. The result's first half of axes is whole,
    its second half split like `x`'s smaller side.

    >>> import jax.numpy as jnp
    >>> g, eye = gram(jnp.ones((3, 3, 2, 4)))
    >>> g.shape, eye.shape
    ((4, 4), (4, 4))
    """
    x = _kernel(x)
    layout = _Layout(x)
    g = layout.gram(x, layout.whole_short(x))
    return g, jnp.eye(math.isqrt(g.size), dtype=g.dtype).reshape(g.shape)


class _Layout:
    """Which side of a kernel a Gram matrix keeps, and where each product lives.

    `long` are the axes summed over (the larger side of the `(fan_in, out)`
    view), `short` the axes kept. `spec` is the kernel's `PartitionSpec`
    entries (all `None` unless its type shards it).
    """

    def __init__(self, x):
        k = x.ndim - 1
        fan = tuple(range(k))
        tall = math.prod(x.shape[:-1]) >= x.shape[-1]
        self.long, self.short = (fan, (k,)) if tall else ((k,), fan)
        self.tall = tall
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
        """`X M` (tall) or `M X` (wide), for a symmetric `M` laid out like a Gram: split like `x`."""
        out = on_mesh_of(self.like, self.spec)
        if self.tall:
            return jnp.tensordot(xs, m, (self.short, self.half), out_sharding=out)
        return jnp.tensordot(m, xs, (self.half, self.short), out_sharding=out)


def _newton_schulz(x, num_iters, stop_early=False):
    # The polar factor ignores scale: dividing by the largest entry first keeps
    # the Gram matrix in range (float32 squares overflow past ~1e19 and flush
    # to zero below ~1e-19, which made such kernels come back as zeros).
    # The scale is a constant for the derivative (exact, by scale invariance, and
    # free of the 1 / peak**2 term that overflows for tiny kernels).
    peak = jax.lax.stop_gradient(jnp.max(jnp.abs(x)))
    x = x / jnp.where(peak > 0, peak, 1)
    layout = _Layout(x)
    g, eye = gram(x)
    # trace(G) is the squared Frobenius norm; G is symmetric, so Gershgorin's
    # row sums may run over its whole first half of axes.
    row_sums = jnp.sum(jnp.abs(g), axis=layout.half)
    bound_sq = jnp.minimum(jnp.sum(x * x), jnp.max(row_sums))
    positive = bound_sq > 0
    # An all-zero kernel stays zero (and its gradient finite).
    x = x * jnp.where(positive, jax.lax.rsqrt(jnp.where(positive, bound_sq, 1)), 0)

    def iteration(x):
        # X (1.5 I - G / 2), or (1.5 I - G / 2) X for a wide view: the Gram
        # of the smaller side, never the larger.
        xs = layout.whole_short(x)
        g = layout.gram(x, xs)
        return layout.times(xs, 1.5 * eye - 0.5 * g), g

    if not stop_early:
        return jax.lax.fori_loop(0, num_iters, lambda _, x: iteration(x)[0], x)

    def settling_step(x, left):
        x_new, g = iteration(x)
        settled = jnp.max(jnp.abs(g - eye)) <= SETTLED
        left = jnp.where(settled, jnp.minimum(left, FINAL_ITERS), left)
        return x_new, left - 1

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


class _Products:
    """Products of a kernel's `(fan_in, out)` view with vectors, contracted in place.

    A left vector has the kernel's fan-in shape `shape[:-1]`, a right one
    `(out,)`. On a kernel whose type shards it, each is laid out like the
    kernel's axes it multiplies, so the products sum partial products over
    the mesh and never move the kernel.
    """

    def __init__(self, w):
        self.w = w = _kernel(w)
        spec = explicit_spec(w) or (None,) * w.ndim
        self.fan = tuple(range(w.ndim - 1))
        self.left_spec, self.right_spec = spec[:-1], spec[-1:]

    def ones(self, shape, entries):
        """The normalized all-ones vector of `shape`, laid out as `entries`."""
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

    A kernel `(*fan_in_axes, out)` may be passed as it is: it is contracted
    over its fan-in axes in place, as its `(fan_in, out)` view would be, and
    `v` then has the fan-in shape `shape[:-1]`. Sharded kernels stay sharded
    (module docstring); `u_new` comes back laid out like `u`.

    Args:
      w2d: a matrix `(m, n)`, or a kernel with at least 2 dimensions.
      u: current estimate of the top right singular vector, shape `(n,)`.
      num_iters: iterations to run (a Python int >= 1).

    Returns:
      `(sigma, u_new, v)`: the estimate, the updated right vector (`(n,)`)
      and the left vector (`(m,)`, or `shape[:-1]` for a kernel).

    >>> import jax.numpy as jnp
    >>> from optax_constraints.projections import power_iteration
    >>> sigma, u, v = power_iteration(jnp.array([[3.0, 0.0], [0.0, 1.0]]), jnp.ones(2), 10)
    >>> round(float(sigma), 4)
    3.0

    References:
      Miyato, Kataoka, Koyama & Yoshida, Spectral Normalization for Generative
      Adversarial Networks, ICLR 2018 (algorithm 1).
    """
    check_iters("num_iters", num_iters, 1)
    w = _Products(w2d)
    u, as_given = w.start(u)
    ones_m = w.ones(w.w.shape[:-1], w.left_spec)
    ones_n = w.ones(w.w.shape[-1:], w.right_spec)

    def step(_, carry):
        u, _ = carry
        v = _normalize(w.times(u), ones_m)
        return _normalize(w.transposed_times(v), ones_n), v

    u, v = jax.lax.fori_loop(0, num_iters, step, (u, ones_m))
    return w.dot(v, w.times(u)), as_given(u), v


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

    Like `power_iteration`, it takes a kernel as it is (contracted in place).

    Args:
      w2d: a matrix `(m, n)`, or a kernel with at least 2 dimensions.
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
    check_iters("min_iters", min_iters, 1)
    check_iters("max_iters", max_iters, min_iters, low_name="min_iters")
    differentiable = _Products(w2d)
    w = _Products(jax.lax.stop_gradient(differentiable.w))
    u, as_given = w.start(u)
    ones_m = w.ones(w.w.shape[:-1], w.left_spec)
    ones_n = w.ones(w.w.shape[-1:], w.right_spec)

    def unsettled(carry):
        _, _, iters, settled = carry
        return (iters < min_iters) | ((iters < max_iters) & ~settled)

    def one_iteration(carry):
        u, _, iters, _ = carry
        y = w.times(u)
        v = _normalize(y, ones_m)
        norm_y = w.dot(v, y)  # ||W u||, without squaring y
        z = w.transposed_times(v)  # B u / ||W u||
        # ||B u - rho u|| / rho = ||z - ||Wu|| u|| / ||Wu||. `~(a > b)` also
        # settles a NaN kernel at once instead of iterating max_iters times.
        settled = ~(_norm(z - norm_y * u) > rtol * norm_y)
        return _normalize(z, ones_n), v, iters + 1, settled

    init = (u, ones_m, jnp.zeros([], jnp.int32), jnp.zeros([], bool))
    u, v, iters, _ = jax.lax.while_loop(unsettled, one_iteration, init)
    return differentiable.dot(v, differentiable.times(u)), as_given(u), v, iters


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
