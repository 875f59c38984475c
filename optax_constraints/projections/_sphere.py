"""The sphere: each unit rescaled to a given norm, exactly."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from optax_constraints.projections._axis import AxisSpec
from optax_constraints.projections._norms import projection, unit_norms


@projection
def sphere(w: jax.Array, radius: jax.typing.ArrayLike = 1.0, axis: AxisSpec = 0) -> jax.Array:
    """Rescales each unit onto the sphere of `radius`: the exact projection.

    .. math:: w' = w \\cdot \\frac{r}{\\|w\\|}

    the norm taken over `axis`, with no epsilon (unlike `unit_norm`, Keras's
    formula, whose result is `1e-7 / ‖w‖` short of the sphere). An all-zero
    unit has no nearest point on the sphere (every point is equally near):
    it stays zero, as does a unit whose sum of squares underflows to zero in
    the compute dtype. The gradient there is zero, not NaN.

    Args:
      w: the weights.
      radius: the norm of every unit (a number, or an array or tracer that
        broadcasts against the per-unit norms, shape `w.shape` with the
        `axis` dimensions set to 1).
      axis: axes of one unit: int, tuple/list, negative, `None` or `"fan_in"`.

    Returns:
      The projected weights, same shape and dtype (bfloat16/float16 are
      computed in float32 and rounded once).

    >>> import jax.numpy as jnp
    >>> from optax_constraints.projections import sphere
    >>> sphere(jnp.array([[3.0, 0.0], [4.0, 0.0]]), radius=2.0)
    Array([[1.2, 0. ],
           [1.6, 0. ]], dtype=float32)

    References:
      Absil, Mahony & Sepulchre, Optimization Algorithms on Matrix Manifolds,
      Princeton University Press, 2008 (example 4.1.1: the projective
      retraction on the sphere). Loshchilov, Hsieh, Sun & Ginsburg, nGPT:
      Normalized Transformer with Representation Learning on the
      Hypersphere, ICLR 2025.
    """
    norms = unit_norms(w, axis)
    zero = norms == 0
    # Both branches of the `where` are finite at a zero unit, so the gradient
    # is too; a NaN norm stays NaN (the unit shows it, nothing is repaired).
    return w * jnp.where(zero, 0, radius / jnp.where(zero, 1, norms))
