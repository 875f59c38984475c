"""Constraints on the `(fan_in, out)` matrix view of a kernel: `SpectralNorm`, `Orthogonal`."""

# Hyper-parameters are values after `at_step`, which the types cannot say:
# pyright: reportArgumentType=false

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from optax_constraints import projections as P
from optax_constraints._typing import HyperParam, OrthogonalMethod, SpectralMethod
from optax_constraints.constraints._base import Constraint, as_float, check_number
from optax_constraints.projections._matrix import check_iters, gram


def _sigma_max(w):
    """Largest singular value of the matrix view, exact (an SVD without vectors)."""
    return jnp.linalg.svd(P.matrix_view(as_float(w)), compute_uv=False)[0]


class _MatrixConstraint(Constraint):
    """A constraint on the `(prod(shape[:-1]), shape[-1])` matrix view of a kernel."""

    methods: tuple[str, ...]

    def _check_method(self, method):
        if method not in self.methods:
            raise ValueError(
                f"{type(self).__name__}: method must be one of"
                f" {', '.join(map(repr, self.methods))}; got method={method!r}."
            )

    def check_leaf(self, shape, dtype):
        if len(shape) < 2:
            raise ValueError(
                f"{type(self).__name__} needs a kernel with at least 2 dimensions (it is"
                " viewed as the (fan_in, out) matrix (prod(shape[:-1]), shape[-1])), got"
                f" shape {tuple(shape)}; leave 1-D leaves such as biases unconstrained"
                " (label None) or give them an elementwise or norm constraint"
            )

    def describe_leaf(self, shape):
        return f"{(math.prod(shape[:-1]), shape[-1])} matrix"


class SpectralNorm(_MatrixConstraint):
    """Caps the largest singular value (the spectral norm) of a kernel.

    Keeps :math:`\\sigma_{\\max}(W) \\le m` for the `(fan_in, out)` matrix view
    :math:`W`. `method="power"` (spectral normalization) rescales to
    :math:`W \\min(1, m/\\hat\\sigma)` with :math:`\\hat\\sigma` from power
    iteration, whose vector is kept in `project`'s state (an estimate, not a
    certificate; direct calls use the exact :math:`\\sigma_{\\max}`).
    `method="svd"` is the exact projection :math:`U \\min(\\Sigma, m) V^\\top`.

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
    """

    schedulable = ("max_value",)
    _config_keys = ("max_value", "method", "num_iters", "max_iters")
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
        self._check_method(method)
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
        return P.spectral_rescale(w, c.max_value, _sigma_max(w))

    def init_state(self, w):
        """The power-iteration vector `u` (shape `(out,)`); `None` for `"svd"`."""
        if self.method != "power":
            return None
        w = as_float(w)
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
            as_float(w), jax.lax.stop_gradient(state), self.num_iters, self._max_iters()
        )
        return P.spectral_rescale(w, c.max_value, sigma), u

    def violation(self, w):
        """How far the largest singular value exceeds `max_value` (exact, by SVD)."""
        c = self.at_step(0)
        return jnp.maximum(_sigma_max(w) - c.max_value, 0)


class Orthogonal(_MatrixConstraint):
    """Keeps a kernel semi-orthogonal: orthonormal columns (or rows).

    The `(fan_in, out)` matrix view :math:`W = U \\Sigma V^\\top` becomes its
    polar factor :math:`U V^\\top`, the nearest matrix with :math:`W^\\top W =
    I` (:math:`W W^\\top = I` when `fan_in < out`): exactly (`"svd"`) or by at
    most `num_iters` Newton–Schulz iterations (`"newton_schulz"`).

    Args:
      method: `"svd"` or `"newton_schulz"`.
      num_iters: Newton–Schulz iterations (method `"newton_schulz"` only).

    >>> import jax.numpy as jnp
    >>> import numpy as np
    >>> import optax_constraints as oc
    >>> w = oc.Orthogonal()(jnp.array([[2.0, 1.0], [0.0, 1.0], [1.0, 0.0]]))
    >>> bool(np.allclose(w.T @ w, np.eye(2), atol=1e-5))
    True
    """

    methods = ("svd", "newton_schulz")
    _config_keys = ("method", "num_iters")

    def __init__(self, method: OrthogonalMethod = "svd", num_iters: int = P.NEWTON_SCHULZ_ITERS):
        self._check_method(method)
        check_iters("num_iters", num_iters, 1, owner="Orthogonal")
        self.method = method
        self.num_iters = num_iters

    def __call__(self, w):
        if self.method == "svd":
            return P.orthogonal_svd(w)
        return P.orthogonal_newton_schulz(w, self.num_iters)

    def apply(self, w, state, step):
        # In `project` the kernel is one step away from orthogonal: Newton–Schulz
        # stops once converged. Direct calls keep the fixed count.
        if self.method == "newton_schulz":
            return P.orthogonal_newton_schulz(w, self.num_iters, stop_early=True), state
        return self(w), state

    def violation(self, w):
        """`max |G - I|` for the smaller Gram matrix `G` of the `(fan_in, out)` view."""
        g, eye = gram(as_float(w))
        return jnp.max(jnp.abs(g - eye))

    def tangent(self, w, u):
        """The Stiefel tangent space at the `(fan_in, out)` view: `U - W sym(WᵀU)`."""
        return P.stiefel_tangent(w, u)
