"""Constraints on a kernel's singular values: `SpectralNorm` and `Orthogonal`.

Both see a kernel `(*fan_in_axes, out)` as the `(fan_in, out)` matrix
`(prod(shape[:-1]), shape[-1])` (see `optax_constraints.projections.matrix_view`)
and reject leaves with fewer than 2 dimensions when `project` is initialised.
The power method and Newton–Schulz contract the kernel in place, so a
sharded kernel stays sharded; the SVDs (`method="svd"`, and the exact
`sigma_max` of direct calls and `violation`) gather the one kernel.
"""

# Hyper-parameters are `HyperParam` (value or schedule) in the signatures and
# values after `at_step`, which the types cannot say:
# pyright: reportArgumentType=false

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from optax_constraints import projections as P
from optax_constraints._typing import HyperParam, OrthogonalMethod, SpectralMethod
from optax_constraints.constraints._base import Constraint, check_number
from optax_constraints.projections._matrix import check_iters, gram


def _check_method(owner, method, methods):
    if method not in methods:
        raise ValueError(
            f"{owner}: method must be one of {', '.join(map(repr, methods))}; got"
            f" method={method!r}."
        )


def _check_matrix(owner, shape):
    if len(shape) < 2:
        raise ValueError(
            f"{owner} needs a kernel with at least 2 dimensions (it is viewed as the"
            f" (fan_in, out) matrix (prod(shape[:-1]), shape[-1])), got shape"
            f" {tuple(shape)}; leave 1-D leaves such as biases unconstrained (label"
            " None) or give them an elementwise or norm constraint"
        )


def _computed(w):
    w = jnp.asarray(w)
    return w.astype(P.compute_dtype(w.dtype))


def _matrix(w):
    return P.matrix_view(_computed(w))


def _describe_matrix(shape):
    return f"{(math.prod(shape[:-1]), shape[-1])} matrix"


def _sigma_max(w2d):
    """Largest singular value, exact (an SVD without vectors)."""
    return jnp.linalg.svd(w2d, compute_uv=False)[0]


class SpectralNorm(Constraint):
    """Caps the largest singular value (the spectral norm) of a kernel.

    The kernel is viewed as the `(fan_in, out)` matrix :math:`W` the layer
    multiplies by; the constraint keeps :math:`\\sigma_{\\max}(W) \\le m`, so
    the layer is :math:`m`-Lipschitz (for a Conv kernel this bounds the
    matrix of one patch, the usual spectral-normalization surrogate).

    Two methods:

    * `method="power"` (default; spectral normalization, Miyato et al. 2018):
      :math:`W \\leftarrow W \\min(1, m/\\hat\\sigma)` with
      :math:`\\hat\\sigma` from power iteration. The iteration vector `u`
      (length `out`, float32 for low-precision kernels) is kept in
      `project`'s state (`ProjectState.constraint_states`, keyed by the
      leaf's path) and carried from step to step. Each step runs at least
      `num_iters` iterations and continues until the estimate has settled
      (`projections.power_iteration_until_settled`: relative residual below
      `POWER_SETTLED` = 1e-2), at most `max_iters` (default 100). While the
      weights move slowly that is one iteration per step (two matrix-vector
      products); after a large step, as many as `u` needs to catch up.
      `init_state` starts `u` from a fixed pseudo-random unit vector
      (`PRNGKey(0)`) iterated the same way on the initial kernel.
      :math:`\\hat\\sigma \\le \\sigma_{\\max}` always, so the result can
      exceed the bound, by the estimate's error (docs/performance.md has
      the measured overshoot; clustered top singular values are the worst
      case). This is an estimate, not a certificate: a top
      singular direction `u` is (numerically) orthogonal to goes unseen.
      When the bound must hold as a guarantee (a Lipschitz certificate),
      use `method="svd"`. `max_iters=num_iters` restores a fixed count.
      All singular values shrink by the same factor: feasible, cheap, but not
      the nearest feasible kernel.
    * `method="svd"`: the exact Euclidean projection
      :math:`U \\min(\\Sigma, m) V^\\top` (`projections.spectral_norm_svd`);
      only the singular values above :math:`m` move. Stateless; one SVD per
      step, which gathers a sharded kernel (the power method contracts it
      where it lies).

    Called directly (`constraint(w)`, `oc.apply_constraints`), the power
    method has no state to carry and uses the exact :math:`\\sigma_{\\max}`
    (from an SVD) instead, so `SpectralNorm()(w)` is always feasible.

    Args:
      max_value: the bound :math:`m \\ge 0` (number, array or schedule).
      method: `"power"` or `"svd"`.
      num_iters: the fewest power iterations per step (method `"power"` only).
      max_iters: the most power iterations per step (>= `num_iters`;
        `None`: `max(num_iters, projections.POWER_MAX_ITERS)`).

    >>> import jax.numpy as jnp
    >>> import numpy as np
    >>> import optax_constraints as oc
    >>> w = jnp.array([[3.0, 0.0], [0.0, 0.5]])
    >>> np.asarray(oc.SpectralNorm(1.0)(w)).tolist()  # rescales everything
    [[1.0, 0.0], [0.0, 0.1666666716337204]]
    >>> np.asarray(oc.SpectralNorm(1.0, method="svd")(w)).tolist()  # clips sigma
    [[1.0, 0.0], [0.0, 0.5]]

    References:
      Miyato, Kataoka, Koyama & Yoshida, Spectral Normalization for Generative
      Adversarial Networks, ICLR 2018.
      Gouk, Frank, Pfahringer & Cree, Regularisation of neural networks by
      enforcing Lipschitz continuity, Machine Learning 110, 2021 (projection
      after each step, `w * min(1, m / sigma)`).
    """

    schedulable = ("max_value",)
    methods = ("power", "svd")
    warm_start_iters = 20

    def __init__(
        self,
        max_value: HyperParam = 1.0,
        method: SpectralMethod = "power",
        num_iters: int = 1,
        max_iters: int | None = None,
    ):
        check_number("max_value", max_value, low=0, owner="SpectralNorm")
        _check_method("SpectralNorm", method, self.methods)
        check_iters("num_iters", num_iters, 1, owner="SpectralNorm")
        if max_iters is not None:
            check_iters(
                "max_iters", max_iters, num_iters, owner="SpectralNorm", low_name="num_iters"
            )
        self.max_value = max_value
        self.method = method
        self.num_iters = num_iters
        self.max_iters = max_iters

    def _max_iters(self):
        return max(self.num_iters, P.POWER_MAX_ITERS) if self.max_iters is None else self.max_iters

    def __call__(self, w):
        c = self.at_step(0)
        if self.method == "svd":
            return P.spectral_norm_svd(w, c.max_value)
        return P.spectral_rescale(w, c.max_value, _sigma_max(_matrix(w)))

    def get_config(self):
        return {
            "max_value": self.max_value,
            "method": self.method,
            "num_iters": self.num_iters,
            "max_iters": self.max_iters,
        }

    def check_leaf(self, shape, dtype):
        _check_matrix("SpectralNorm", shape)

    def describe_leaf(self, shape):
        return _describe_matrix(shape)

    def init_state(self, w):
        """The power-iteration vector `u` (shape `(out,)`); `None` for `"svd"`."""
        if self.method != "power":
            return None
        w = _computed(w)
        u = jax.random.normal(jax.random.PRNGKey(0), (w.shape[-1],), w.dtype)
        iters = max(self.warm_start_iters, self._max_iters())
        _, u, _, _ = P.power_iteration_until_settled(
            w, u / jnp.linalg.norm(u), self.warm_start_iters, iters
        )
        return u

    def apply(self, w, state, step):
        c = self.at_step(step)
        if self.method != "power":
            return P.spectral_norm_svd(w, c.max_value), state
        sigma, u, _, _ = P.power_iteration_until_settled(
            _computed(w), jax.lax.stop_gradient(state), self.num_iters, self._max_iters()
        )
        return P.spectral_rescale(w, c.max_value, sigma), u

    def violation(self, w):
        """How far the largest singular value exceeds `max_value` (exact, by SVD)."""
        c = self.at_step(0)
        return jnp.maximum(_sigma_max(_matrix(w)) - c.max_value, 0)


class Orthogonal(Constraint):
    """Keeps a kernel semi-orthogonal: orthonormal columns (or rows).

    The kernel is viewed as the `(fan_in, out)` matrix :math:`W` and replaced
    by its polar factor :math:`U V^\\top` (from :math:`W = U \\Sigma
    V^\\top`), the nearest matrix with :math:`W^\\top W = I` when
    `fan_in >= out`, or :math:`W W^\\top = I` when `fan_in < out`. Every
    singular value becomes 1, so the layer preserves norms (an isometry onto
    its range), a common constraint for RNNs and Lipschitz networks.

    * `method="svd"` (default): exact, one SVD per step (a sharded kernel is
      gathered for it).
    * `method="newton_schulz"`: `num_iters` cubic Newton–Schulz iterations
      (matrix products only, fast on accelerators, on a sharded kernel where
      it lies), converging to the same polar factor. The default 25
      iterations reach float32 accuracy even for ill-conditioned square
      Gaussian kernels; in training the kernel stays near-orthogonal after
      the first step, where about 5 are enough, and
      `project` stops there by itself (at most `num_iters`; measured figures
      in `projections.orthogonal_newton_schulz`).

    The set is not convex; for a rank-deficient kernel the nearest point is
    not unique (`"svd"` returns one of them, `"newton_schulz"` converges to a
    partial isometry instead, e.g. zero stays zero).

    Args:
      method: `"svd"` or `"newton_schulz"`.
      num_iters: Newton–Schulz iterations (method `"newton_schulz"` only).

    >>> import jax.numpy as jnp
    >>> import numpy as np
    >>> import optax_constraints as oc
    >>> w = oc.Orthogonal()(jnp.array([[2.0, 1.0], [0.0, 1.0], [1.0, 0.0]]))
    >>> bool(np.allclose(w.T @ w, np.eye(2), atol=1e-5))
    True

    References:
      Higham, Computing the polar decomposition -- with applications, SIAM J.
      Sci. Stat. Comput. 7(4), 1986. Björck & Bowie, An iterative algorithm
      for computing the best estimate of an orthogonal matrix, SIAM J. Numer.
      Anal. 8(2), 1971. Anil, Lucas & Grosse, Sorting out Lipschitz function
      approximation, ICML 2019.
    """

    methods = ("svd", "newton_schulz")

    def __init__(self, method: OrthogonalMethod = "svd", num_iters: int = P.NEWTON_SCHULZ_ITERS):
        _check_method("Orthogonal", method, self.methods)
        check_iters("num_iters", num_iters, 1, owner="Orthogonal")
        self.method = method
        self.num_iters = num_iters

    def __call__(self, w):
        if self.method == "svd":
            return P.orthogonal_svd(w)
        return P.orthogonal_newton_schulz(w, self.num_iters)

    def apply(self, w, state, step):
        # In `project` the kernel is one step away from orthogonal after the
        # first update: Newton–Schulz stops once converged (about 5 iterations
        # instead of 25). Direct calls keep the fixed count.
        if self.method == "newton_schulz":
            return P.orthogonal_newton_schulz(w, self.num_iters, stop_early=True), state
        return self(w), state

    def get_config(self):
        return {"method": self.method, "num_iters": self.num_iters}

    def check_leaf(self, shape, dtype):
        _check_matrix("Orthogonal", shape)

    def describe_leaf(self, shape):
        return _describe_matrix(shape)

    def violation(self, w):
        """`max |G - I|` for the smaller Gram matrix `G` of the `(fan_in, out)` view."""
        g, eye = gram(_computed(w))
        return jnp.max(jnp.abs(g - eye))

    def tangent(self, w, u):
        """The Stiefel tangent space at the `(fan_in, out)` view: `U - W sym(WᵀU)`.

        Wide views (orthonormal rows) are handled transposed
        (`projections._tangent.stiefel_tangent`).
        """
        return P.stiefel_tangent(w, u)
