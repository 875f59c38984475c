"""Constraint objects: hyper-parameters bound to a projection, Keras-style."""

from optax_constraints.constraints._base import Constraint as Constraint
from optax_constraints.constraints._base import FunctionConstraint as FunctionConstraint
from optax_constraints.constraints._basic import CenterAround as CenterAround
from optax_constraints.constraints._basic import Clip as Clip
from optax_constraints.constraints._basic import MaxNorm as MaxNorm
from optax_constraints.constraints._basic import MinMaxNorm as MinMaxNorm
from optax_constraints.constraints._basic import NonNeg as NonNeg
from optax_constraints.constraints._basic import UnitNorm as UnitNorm
from optax_constraints.constraints._basic import max_norm as max_norm
from optax_constraints.constraints._basic import min_max_norm as min_max_norm
from optax_constraints.constraints._basic import non_neg as non_neg
from optax_constraints.constraints._basic import unit_norm as unit_norm
from optax_constraints.constraints._matrix import Orthogonal as Orthogonal
from optax_constraints.constraints._matrix import SpectralNorm as SpectralNorm
from optax_constraints.constraints._registry import _add_builtin
from optax_constraints.constraints._registry import deserialize as deserialize
from optax_constraints.constraints._registry import get as get
from optax_constraints.constraints._registry import register as register
from optax_constraints.constraints._registry import serialize as serialize
from optax_constraints.constraints._registry import valid_names as valid_names
from optax_constraints.constraints._simplex import L1Ball as L1Ball
from optax_constraints.constraints._simplex import Simplex as Simplex
from optax_constraints.constraints._sphere import Sphere as Sphere
from optax_constraints.constraints._stacked import OutputFirst as OutputFirst
from optax_constraints.constraints._stacked import Stacked as Stacked

# Every constraint class exported here (but the function wrapper) is a built-in name.
for _cls in [v for v in dict(globals()).values() if isinstance(v, type)]:
    if issubclass(_cls, Constraint) and _cls is not FunctionConstraint:
        _add_builtin(_cls)
del _cls
