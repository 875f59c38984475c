"""The sphere: each unit rescaled to a given norm, exactly."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from optax_constraints.projections._axis import AxisSpec
from optax_constraints.projections._norms import AxisName, projection, unit_norms


@projection
def sphere(
    w: jax.Array,
    radius: jax.typing.ArrayLike = 1.0,
    axis: AxisSpec = 0,
    axis_name: AxisName = None,
) -> jax.Array:
    """Rescales each unit onto the sphere of `radius`: the exact projection.

    .. math:: w' = w \\cdot \\frac{r}{\\|w\\|}

    the norm taken over `axis`, with no epsilon (unlike `unit_norm`). An
    all-zero unit has no nearest point on the sphere: it stays zero (as does
    one whose sum of squares underflows), with a zero gradient, not NaN.

    Args:
      w: the weights.
      radius: the norm of every unit (a number, or an array or tracer that
        broadcasts against the per-unit norms).
      axis: axes of one unit: int, tuple/list, negative, `None` or `"fan_in"`.
      axis_name: inside `jax.shard_map`, the mesh axes splitting the unit's
        axes (see `unit_norms`).

    >>> import jax.numpy as jnp
    >>> from optax_constraints.projections import sphere
    >>> sphere(jnp.array([[3.0, 0.0], [4.0, 0.0]]), radius=2.0)
    Array([[1.2, 0. ],
           [1.6, 0. ]], dtype=float32)

    References:
      Absil, Mahony & Sepulchre, Optimization Algorithms on Matrix Manifolds,
      2008 (example 4.1.1). Loshchilov et al., nGPT, ICLR 2025.
    """
    norms = unit_norms(w, axis, axis_name)
    zero = norms == 0
    # Both branches are finite at a zero unit, so the gradient is too; NaN stays NaN.
    return w * jnp.where(zero, 0, radius / jnp.where(zero, 1, norms))
