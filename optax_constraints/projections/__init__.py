"""Pure projection functions: one array in, one array out, jit-, vmap- and grad-safe."""

from optax_constraints.projections._axis import FAN_IN as FAN_IN
from optax_constraints.projections._axis import AxisSpec as AxisSpec
from optax_constraints.projections._axis import canonical_axis as canonical_axis
from optax_constraints.projections._axis import resolve_axis as resolve_axis
from optax_constraints.projections._matrix import NEWTON_SCHULZ_ITERS as NEWTON_SCHULZ_ITERS
from optax_constraints.projections._matrix import POWER_MAX_ITERS as POWER_MAX_ITERS
from optax_constraints.projections._matrix import POWER_SETTLED as POWER_SETTLED
from optax_constraints.projections._matrix import matrix_view as matrix_view
from optax_constraints.projections._matrix import (
    orthogonal_newton_schulz as orthogonal_newton_schulz,
)
from optax_constraints.projections._matrix import orthogonal_svd as orthogonal_svd
from optax_constraints.projections._matrix import power_iteration as power_iteration
from optax_constraints.projections._matrix import (
    power_iteration_until_settled as power_iteration_until_settled,
)
from optax_constraints.projections._matrix import spectral_norm_svd as spectral_norm_svd
from optax_constraints.projections._matrix import spectral_rescale as spectral_rescale
from optax_constraints.projections._norms import EPSILON as EPSILON
from optax_constraints.projections._norms import center_around as center_around
from optax_constraints.projections._norms import clip as clip
from optax_constraints.projections._norms import compute_dtype as compute_dtype
from optax_constraints.projections._norms import max_norm as max_norm
from optax_constraints.projections._norms import min_max_norm as min_max_norm
from optax_constraints.projections._norms import non_neg as non_neg
from optax_constraints.projections._norms import projection as projection
from optax_constraints.projections._norms import sphere as sphere
from optax_constraints.projections._norms import unit_norm as unit_norm
from optax_constraints.projections._norms import unit_norms as unit_norms
from optax_constraints.projections._simplex import l1_ball as l1_ball
from optax_constraints.projections._simplex import simplex as simplex
from optax_constraints.projections._tangent import BOUNDARY_RTOL as BOUNDARY_RTOL
from optax_constraints.projections._tangent import ball_tangent as ball_tangent
from optax_constraints.projections._tangent import box_tangent as box_tangent
from optax_constraints.projections._tangent import sphere_tangent as sphere_tangent
from optax_constraints.projections._tangent import stiefel_tangent as stiefel_tangent
from optax_constraints.projections._tangent import sum_zero_tangent as sum_zero_tangent
