"""Constraint objects: hyper-parameters bound to a projection, Keras-style.

Each class validates its hyper-parameters at construction, round-trips
through `get_config`/`from_config` and the registry, and is hashable.
"""

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

for _cls in (
    Constraint,
    MaxNorm,
    MinMaxNorm,
    NonNeg,
    UnitNorm,
    Clip,
    CenterAround,
    L1Ball,
    Simplex,
    Sphere,
    SpectralNorm,
    Orthogonal,
    Stacked,
    OutputFirst,
):
    _add_builtin(_cls)
del _cls
