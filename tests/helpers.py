"""Helpers shared by several test modules: Hypothesis profiles, the classes under test."""

import inspect
import os

from hypothesis import HealthCheck, settings

import optax_constraints as oc

settings.register_profile(
    "ci",
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
settings.register_profile(
    "dev",
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
PROFILE = PROFILE if PROFILE in ("ci", "dev") else "ci"
SCALE = 10 if PROFILE == "dev" else 1
"""Example-count multiplier: `HYPOTHESIS_PROFILE=dev` runs 10x the CI examples."""


def examples(n: int) -> settings:
    """The selected profile with `n` examples (x10 under the dev profile)."""
    return settings(settings.get_profile(PROFILE), max_examples=n * SCALE)


WRAPPERS = (oc.Stacked, oc.OutputFirst)
"""Constraints that wrap another one: built from an instance, not from hyper-parameters."""

WRAPPER_EXAMPLES = {
    # On a (rows, cols) kernel both mean one unit per row: the Stacked copies
    # are the rows; OutputFirst sees (cols, rows), whose "fan_in" is axis 0.
    "Stacked": [oc.Stacked(oc.MaxNorm(1.0, axis=0))],
    "OutputFirst": [oc.OutputFirst(oc.MaxNorm(1.0, axis="fan_in"))],
}
"""Instances of the wrappers for suites that take instances (tests/test_stacked.py
covers the wrappers around every constraint)."""


def exported_constraint_classes(*, wrappers: bool = False) -> list[type]:
    """Every `oc.Constraint` subclass exported at top level (aliases counted once).

    The wrappers (`Stacked`, `OutputFirst`) only with `wrappers=True`: they have
    no hyper-parameters of their own to draw.
    """
    found = {}
    for name in dir(oc):
        obj = getattr(oc, name)
        if (
            inspect.isclass(obj)
            and issubclass(obj, oc.Constraint)
            and obj not in (oc.Constraint, oc.FunctionConstraint)
            and (wrappers or obj not in WRAPPERS)
        ):
            found[obj.__name__] = obj
    return [found[k] for k in sorted(found)]


def constraint_instances(examples: dict, *, axis_variant=None) -> list:
    """One or more instances of every exported constraint class.

    `examples` maps a class name to instances with non-trivial
    hyper-parameters; the wrappers default to `WRAPPER_EXAMPLES`; any other
    class is taken with its defaults (so a newly exported class is covered at
    once), plus `cls(axis=axis_variant)` if given
    and the class has an `axis`, plus one instance per further `method`.
    """
    out = []
    for cls in exported_constraint_classes(wrappers=True):
        found = examples.get(cls.__name__, WRAPPER_EXAMPLES.get(cls.__name__))
        if found is None:
            found = [cls()]
            if axis_variant is not None and "axis" in inspect.signature(cls.__init__).parameters:
                found.append(cls(axis=axis_variant))
            for method in getattr(cls, "methods", ())[1:]:
                found.append(cls(method=method))
        out.extend(found)
    return out


def reference_axes(axis, ndim: int) -> tuple[int, ...]:
    """Axis spec -> sorted non-negative axes, written here, independent of the package."""
    if axis is None:
        return tuple(range(ndim))
    if axis == "fan_in":
        return tuple(range(ndim - 1))
    axis = (axis,) if isinstance(axis, int) else tuple(axis)
    return tuple(sorted(a % ndim for a in axis))
