"""The `Constraint` base class: Keras's surface plus the optional hooks `project` calls."""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any, ClassVar, Self, TypeGuard

import jax
import jax.numpy as jnp

from optax_constraints.projections import compute_dtype

PyTree = Any


def is_python_number(value) -> TypeGuard[float]:
    """True for concrete Python/NumPy real numbers (not arrays, tracers, callables)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_schedule(value) -> bool:
    """True for a hyper-parameter given as a schedule (a callable of the step)."""
    return callable(value) and not isinstance(value, jax.Array)


def as_float(w) -> jax.Array:
    """`w` as an array in its compute dtype (float32 for bfloat16/float16)."""
    w = jnp.asarray(w)
    return w.astype(compute_dtype(w.dtype))


def _hashable(value):
    if isinstance(value, list | tuple):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    try:
        hash(value)
    except TypeError:
        return ("id", id(value))
    if isinstance(value, jax.Array):  # arrays hash by identity, never by value
        return ("id", id(value))
    return value


class Constraint:
    """Base class for weight constraints: a projection `w -> w'` (the base is the identity).

    Subclass it and override `__call__` (and `get_config` if the constructor
    takes arguments), exactly as with `keras.constraints.Constraint`. Instances
    are hashable and equal when their class and config are, so they can be
    static arguments to `jax.jit`. The other methods are optional hooks that
    `project`, `tangent`, `Stacked`, `shard_map` support and `routing_report` call.

    >>> import jax.numpy as jnp
    >>> import optax_constraints as oc
    >>> class CenterAround(oc.Constraint):
    ...     def __init__(self, ref_value):
    ...         self.ref_value = ref_value
    ...     def __call__(self, w):
    ...         return w - jnp.mean(w) + self.ref_value
    ...     def get_config(self):
    ...         return {"ref_value": self.ref_value}
    >>> CenterAround.from_config({"ref_value": 1.0})(jnp.array([0.0, 2.0]))
    Array([0., 2.], dtype=float32)
    """

    #: Names of constructor arguments that may be Optax schedules.
    schedulable: tuple[str, ...] = ()
    #: The attributes the base `get_config` writes (tuples as lists, as in Keras).
    _config_keys: ClassVar[tuple[str, ...]] = ()
    #: True when the projection acts on each entry on its own (`NonNeg`, `Clip`).
    elementwise: ClassVar[bool] = False
    #: Set by `oc.register` on the class it decorates ("package>Name").
    _registered_name: ClassVar[str]

    def __call__(self, w: jax.Array) -> jax.Array:
        """Projects `w`."""
        return w

    def get_config(self) -> dict[str, Any]:
        """The constructor arguments, as a JSON-friendly dict."""
        config = {k: getattr(self, k) for k in self._config_keys}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Self:
        """Rebuilds a constraint from `get_config()`'s output."""
        return cls(**config)

    def check_leaf(self, shape: tuple[int, ...], dtype) -> None:
        """Raises `ValueError` (reason only) if a leaf cannot take this constraint."""

    def init_state(self, w: jax.Array) -> PyTree:
        """Per-leaf state kept by `project` across steps; `None` = stateless."""

    def apply(self, w: jax.Array, state: PyTree, step: jax.Array) -> tuple[jax.Array, PyTree]:
        """Projects `w` at optimizer step `step` given its state: `(w', state')`."""
        return self.at_step(step)(w), state

    def project_update(
        self, param: jax.Array, update: jax.Array, state: PyTree, step: jax.Array
    ) -> tuple[jax.Array, PyTree]:
        """The update `u'` with `param + u' == apply(param + update)` up to rounding."""
        dtype = compute_dtype(param.dtype)
        param_c = param.astype(dtype)
        target, state = self.apply(param_c + update.astype(dtype), state, step)
        return (target - param_c).astype(update.dtype), state

    def tangent(self, w: jax.Array, u: jax.Array) -> jax.Array:
        """The update `u` projected onto the tangent space (or cone) of the set at `w`."""
        raise NotImplementedError(f"{self!r} defines no tangent space (Constraint.tangent)")

    def on_leaf_axes(self, axes: tuple[int, ...], ndim: int) -> Constraint | None:
        """This constraint on each sub-array over `axes` of an `ndim`-d leaf (the other
        axes index copies), as one stateless constraint on the leaf, or `None`."""
        return self if self.elementwise else None

    def on_shards(self, spec: tuple[tuple[str, ...], ...]) -> Constraint | None:
        """This constraint on the local block of a leaf inside `jax.shard_map`, or `None`.

        `spec` gives, per axis of the leaf, the mesh axes that split it; with
        `None`, `project` gathers the leaf and keeps its block of the result.
        """
        return self if self.elementwise else None

    def describe_leaf(self, shape: tuple[int, ...]) -> str:
        """How this constraint sees a leaf of `shape`, for `routing_report`."""
        return "elementwise" if self.elementwise else f"whole {tuple(shape)}"

    def violation(self, w: jax.Array) -> jax.Array:
        """How far `w` is from feasible: `max |w - C(w)|` (0 when feasible)."""
        w = jnp.asarray(w)
        dtype = compute_dtype(w.dtype)
        return jnp.max(jnp.abs(self(w).astype(dtype) - w.astype(dtype)), initial=0.0)

    def at_step(self, step) -> Self:
        """This constraint with every schedule evaluated at `step` (`self` if none).

        >>> import optax
        >>> import optax_constraints as oc
        >>> c = oc.MaxNorm(optax.linear_schedule(4.0, 1.0, 10))
        >>> float(c.at_step(10).max_value)
        1.0
        """
        config = self.get_config()
        scheduled = {k: config[k](step) for k in self.schedulable if is_schedule(config.get(k))}
        if not scheduled:
            return self
        return type(self).from_config({**config, **scheduled})

    def _key(self):
        return (type(self), _hashable(self.get_config()))

    def __eq__(self, other):
        if not isinstance(other, Constraint):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self):
        return hash(self._key())

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


class FunctionConstraint(Constraint):
    """Wraps a callable `w -> w` as a `Constraint` (`project` does it for plain functions).

    >>> import jax.numpy as jnp
    >>> import optax_constraints as oc
    >>> oc.FunctionConstraint(jnp.abs)(jnp.array([-1.0, 2.0]))
    Array([1., 2.], dtype=float32)
    """

    _config_keys = ("fn",)

    def __init__(self, fn: Callable[[jax.Array], jax.Array]):
        if not callable(fn):
            raise TypeError(f"FunctionConstraint needs a callable w -> w; got {fn!r}.")
        self.fn = fn

    def __call__(self, w):
        return self.fn(w)

    def __repr__(self):
        return f"FunctionConstraint({getattr(self.fn, '__name__', self.fn)!r})"


def check_number(name: str, value, *, low=None, high=None, owner: str = "") -> None:
    """Validates a Python-number hyper-parameter; arrays, tracers and schedules pass."""
    if is_schedule(value) or (hasattr(value, "dtype") and not is_python_number(value)):
        return
    if not is_python_number(value):
        raise TypeError(
            f"{owner}: {name} must be a number, a JAX array or an Optax schedule;"
            f" got {value!r} of type {type(value).__name__}."
        )
    if value != value:
        raise ValueError(f"{owner}: {name} must not be NaN; got {name}={value!r}.")
    if low is not None and value < low:
        raise ValueError(f"{owner}: {name} must be >= {low}; got {name}={value!r}.")
    if high is not None and value > high:
        raise ValueError(f"{owner}: {name} must be <= {high}; got {name}={value!r}.")


def check_order(owner: str, low, high) -> None:
    """Raises if Python numbers `low` (min_value) > `high` (max_value)."""
    if is_python_number(low) and is_python_number(high) and low > high:
        raise ValueError(
            f"{owner}: min_value must be <= max_value; got min_value={low!r}, max_value={high!r}."
        )
