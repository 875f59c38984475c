"""Type aliases for the public signatures (annotations only; nothing imports
these at run time except as names)."""

from collections.abc import Callable
from typing import Any, Literal

from jax.typing import ArrayLike

#: A constraint's hyper-parameter: a number, an array or tracer (e.g. from
#: `optax.inject_hyperparams`), or an Optax schedule `step -> value`.
HyperParam = ArrayLike | Callable[[Any], Any]
SpectralMethod = Literal["power", "svd"]
OrthogonalMethod = Literal["svd", "newton_schulz"]
