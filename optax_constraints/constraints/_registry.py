"""The registry: `get`, `serialize`, `deserialize`, `register`, in Keras's dict format."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import jax.core
import numpy as np

from optax_constraints.constraints._base import Constraint, FunctionConstraint

MODULE = "optax_constraints"
_C = TypeVar("_C", bound=type[Constraint])

_BUILTINS: dict[str, type[Constraint]] = {}
_CUSTOM: dict[str, type[Constraint]] = {}


def _add_builtin(cls: type[Constraint]) -> None:
    _BUILTINS[cls.__name__] = cls
    _BUILTINS[re.sub(r"(?<!^)(?=[A-Z])", "_", cls.__name__).lower()] = cls  # snake_case


def register(package: str = "Custom", name: str | None = None) -> Callable[[_C], _C]:
    """Class decorator: makes a custom `Constraint` round-trip by name.

    Like `keras.saving.register_keras_serializable`: the class is stored under
    `"package>name"` (default: the class name), the `registered_name` that
    `serialize` writes and `get`/`deserialize` read.

    >>> import jax.numpy as jnp
    >>> import optax_constraints as oc
    >>> @oc.register(package="docs")
    ... class Halve(oc.Constraint):
    ...     def __call__(self, w):
    ...         return w / 2
    >>> oc.serialize(Halve())["registered_name"]
    'docs>Halve'
    """

    def decorator(cls: _C) -> _C:
        if not (inspect.isclass(cls) and issubclass(cls, Constraint)):
            raise TypeError(f"oc.register decorates subclasses of oc.Constraint; got {cls!r}.")
        key = f"{package}>{name or cls.__name__}"
        _CUSTOM[key] = cls
        cls._registered_name = key
        return cls

    return decorator


def valid_names() -> list[str]:
    """Every name `get` accepts, built-in and registered.

    >>> from optax_constraints.constraints import valid_names
    >>> "max_norm" in valid_names() and "MaxNorm" in valid_names()
    True
    """
    return sorted(_BUILTINS) + sorted(_CUSTOM)


def serialize(constraint: Constraint) -> dict[str, Any]:
    """A constraint as a Keras-shaped dict of plain JSON data.

    NumPy and 0-d array numbers become Python numbers. Raises `TypeError`,
    naming the hyper-parameter, for a schedule (serialize
    `constraint.at_step(step)`), a traced value, a larger array or a function.

    >>> import optax_constraints as oc
    >>> oc.serialize(oc.MaxNorm(3.0, axis=[0, 1]))
    {'module': 'optax_constraints', 'class_name': 'MaxNorm', 'config': {'max_value': 3.0, 'axis': [0, 1]}, 'registered_name': None}
    """
    if not isinstance(constraint, Constraint):
        raise TypeError(
            f"oc.serialize takes an oc.Constraint; got {constraint!r}. Wrap a plain"
            " function in a registered Constraint subclass to serialize it."
        )
    if isinstance(constraint, FunctionConstraint):
        raise TypeError(
            f"oc.serialize cannot write {constraint!r}: a wrapped function has no config"
            " to save. Subclass oc.Constraint (with get_config) and decorate it with"
            " @oc.register() to make it serializable."
        )
    cls = type(constraint)
    registered = cls.__dict__.get("_registered_name")  # not inherited by subclasses
    config = constraint.get_config()
    return {
        "module": MODULE if registered is None and cls.__name__ in _BUILTINS else cls.__module__,
        "class_name": cls.__name__,
        "config": {name: _config_value(constraint, name, v) for name, v in config.items()},
        "registered_name": registered,
    }


def _config_value(constraint: Constraint, name: str, value):
    """`value` as plain JSON data (NumPy and 0-d array numbers -> Python), or TypeError."""
    where = f"oc.serialize cannot write {type(constraint).__name__}'s {name}={value!r}"
    if value is None or (
        isinstance(value, bool | int | float | str) and not isinstance(value, np.generic)
    ):
        return value
    if isinstance(value, dict):
        return {k: _config_value(constraint, f"{name}[{k!r}]", v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_config_value(constraint, f"{name}[{i}]", v) for i, v in enumerate(value)]
    if isinstance(value, jax.core.Tracer):
        raise TypeError(
            f"{where}: it is a traced value (serialize runs under jax.jit or a transform"
            " here). Serialize the constraint outside the traced function."
        )
    if isinstance(value, np.generic | np.ndarray | jax.Array):
        if np.ndim(value) == 0 and np.asarray(value).dtype.kind in "biuf":
            return np.asarray(value).item()  # a NumPy or 0-d array number -> Python
        raise TypeError(
            f"{where}: an array of shape {np.shape(value)} (dtype"
            f" {np.asarray(value).dtype}) is not a config value; a config holds a number"
            " here. Pass a Python number to serialize the constraint."
        )
    if callable(value):
        what = "an Optax schedule" if name in constraint.schedulable else "a function"
        raise TypeError(
            f"{where}: {what} is code, not a config value. Serialize the constraint at one"
            f" step instead (oc.serialize(constraint.at_step(step)) writes the number the"
            " schedule gives there), or save the schedule's own arguments (e.g. those of"
            " optax.linear_schedule) next to the config and rebuild it after"
            " oc.deserialize."
        )
    raise TypeError(
        f"{where}: a {type(value).__name__} is not JSON data. Make get_config() return"
        " numbers, strings, None, lists and dicts (and from_config rebuild the object)."
    )


def _lookup(names: tuple[str, ...], custom_objects: dict[str, Any] | None):
    """The class under the first of `names` found (custom_objects, registered, built-in)."""
    for name in names:
        for table in (custom_objects or {}, _CUSTOM, _BUILTINS):
            if name in table:
                return table[name]
    raise ValueError(
        f"Unknown constraint {names[0]!r}. Valid names: {', '.join(valid_names())}."
        " Register a custom class with @oc.register() or pass custom_objects."
    )


def deserialize(config: dict[str, Any] | str, custom_objects: dict[str, Any] | None = None):
    """Rebuilds a constraint from `serialize`'s dict (or Keras's, or a name).

    >>> import optax_constraints as oc
    >>> oc.deserialize({"module": "keras.constraints", "class_name": "MaxNorm",
    ...                 "config": {"max_value": 3.0, "axis": 0}, "registered_name": None})
    MaxNorm(max_value=3.0, axis=0)
    """
    if isinstance(config, str):
        return _lookup((config,), custom_objects)()
    if not isinstance(config, dict) or "class_name" not in config:
        raise ValueError(
            "oc.deserialize expects a dict with a 'class_name' key (as written by"
            f" oc.serialize or keras.constraints.serialize) or a name; got {config!r}."
        )
    registered = config.get("registered_name")
    names = (registered, config["class_name"]) if registered else (config["class_name"],)
    cls = _lookup(names, custom_objects)
    inner = config.get("config") or {}
    if not isinstance(inner, dict):
        raise ValueError(
            f"oc.deserialize: 'config' must be a dict of constructor arguments; got {inner!r}."
        )
    return cls.from_config(dict(inner)) if hasattr(cls, "from_config") else cls(**inner)


def as_constraint(identifier) -> Constraint | None:
    """`get(identifier)`, with a plain callable `w -> w` wrapped in a `FunctionConstraint`."""
    obj = get(identifier)
    if obj is None or isinstance(obj, Constraint):
        return obj
    return FunctionConstraint(obj)  # pyright: ignore[reportArgumentType]  (a callable w -> w)


def get(identifier):
    """Resolves anything that names a constraint, as `keras.constraints.get` does.

    Accepts `None` (returns `None`), a snake_case or CamelCase name, a
    serialized dict, a class (instantiated with its defaults), a `Constraint`
    instance, a Keras constraint object (converted through its config) or any
    other callable (returned as is).

    >>> import optax_constraints as oc
    >>> oc.get("max_norm")
    MaxNorm(max_value=2, axis=0)
    """
    if identifier is None or isinstance(identifier, Constraint):
        return identifier
    if isinstance(identifier, (dict, str)):
        return deserialize(identifier)
    if inspect.isclass(identifier):
        if issubclass(identifier, Constraint):
            return identifier()
        if identifier.__module__.startswith("keras") and identifier.__name__ in _BUILTINS:
            return _BUILTINS[identifier.__name__]()  # a Keras class: ours, with its defaults
        raise ValueError(
            f"Could not interpret constraint identifier: {identifier!r} is not a subclass of"
            f" oc.Constraint. Valid names: {', '.join(valid_names())}."
        )
    cls = type(identifier)
    keras_object = cls.__module__.startswith("keras") and cls.__name__ in _BUILTINS
    if keras_object and hasattr(identifier, "get_config"):
        return _BUILTINS[cls.__name__].from_config(identifier.get_config())
    if callable(identifier):
        return identifier
    raise ValueError(
        f"Could not interpret constraint identifier: {identifier!r}. Valid names:"
        f" {', '.join(valid_names())}."
    )
