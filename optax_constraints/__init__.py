"""optax_constraints: Keras-style weight constraints for JAX and Optax.

Layers, each importing only the ones above it:

1. `projections` -- pure functions `w -> w'` (jit/vmap/grad-safe).
2. `constraints` -- Keras-compatible objects binding hyper-parameters, and
   the registry (`get`, `serialize`, `deserialize`, `register`).
3. labels -- which leaf gets which constraint (`label_by_path`, routing,
   and `declared`: constraints declared on NNX/Linen/Keras parameters).
4. transform -- `project` (an `optax.GradientTransformation`), `tangent`
   (updates onto the sets' tangent spaces), and `apply_constraints`,
   `constraint_violations`, `routing_report` on a parameter tree.

>>> import jax.numpy as jnp, optax
>>> import optax_constraints as oc
>>> tx = optax.chain(optax.adam(1e-3),
...                  oc.project({"kernel": oc.MaxNorm(3.0, axis="fan_in")},
...                             oc.label_by_path({"**/kernel": "kernel"})))
"""

from optax_constraints import projections as projections
from optax_constraints._apply import apply_constraints as apply_constraints
from optax_constraints._apply import constraint_violations as constraint_violations
from optax_constraints._apply import routing_report as routing_report
from optax_constraints._declared import DeclaredLabels as DeclaredLabels
from optax_constraints._declared import constraint_metadata as constraint_metadata
from optax_constraints._declared import declared as declared
from optax_constraints._declared import with_constraint as with_constraint
from optax_constraints._labels import glob_match as glob_match
from optax_constraints._labels import label_by_path as label_by_path
from optax_constraints._tangent import TangentState as TangentState
from optax_constraints._tangent import tangent as tangent
from optax_constraints._transform import NO_PARAMS_MSG as NO_PARAMS_MSG
from optax_constraints._transform import ProjectState as ProjectState
from optax_constraints._transform import project as project
from optax_constraints.constraints import CenterAround as CenterAround
from optax_constraints.constraints import Clip as Clip
from optax_constraints.constraints import Constraint as Constraint
from optax_constraints.constraints import FunctionConstraint as FunctionConstraint
from optax_constraints.constraints import L1Ball as L1Ball
from optax_constraints.constraints import MaxNorm as MaxNorm
from optax_constraints.constraints import MinMaxNorm as MinMaxNorm
from optax_constraints.constraints import NonNeg as NonNeg
from optax_constraints.constraints import Orthogonal as Orthogonal
from optax_constraints.constraints import OutputFirst as OutputFirst
from optax_constraints.constraints import Simplex as Simplex
from optax_constraints.constraints import SpectralNorm as SpectralNorm
from optax_constraints.constraints import Sphere as Sphere
from optax_constraints.constraints import Stacked as Stacked
from optax_constraints.constraints import UnitNorm as UnitNorm
from optax_constraints.constraints import deserialize as deserialize
from optax_constraints.constraints import get as get
from optax_constraints.constraints import max_norm as max_norm
from optax_constraints.constraints import min_max_norm as min_max_norm
from optax_constraints.constraints import non_neg as non_neg
from optax_constraints.constraints import register as register
from optax_constraints.constraints import serialize as serialize
from optax_constraints.constraints import unit_norm as unit_norm

__version__ = "0.1.0"
