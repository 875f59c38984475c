"""What `axis` may be (the axes of one unit), and how it resolves against one array."""

from __future__ import annotations

import operator
from collections.abc import Sequence

FAN_IN = "fan_in"

AxisSpec = int | Sequence[int] | str | None
"""An int, a tuple/list of ints (negative allowed), `None` (all axes) or `"fan_in"`."""

AXIS_HELP = (
    "axis must be an int, a tuple or list of distinct ints (negative ints count"
    " from the end), None (all axes) or 'fan_in' (every axis but the last)"
)


def _as_int(value) -> int | None:
    try:
        return None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        return None


def canonical_axis(axis: AxisSpec) -> int | tuple[int, ...] | str | None:
    """Validates `axis` without knowing an array; lists become tuples (hashable).

    >>> canonical_axis([0, 1])
    (0, 1)
    """
    if axis is None or (isinstance(axis, str) and axis == FAN_IN):
        return axis
    as_int = _as_int(axis)
    if as_int is not None:
        return as_int
    if isinstance(axis, (tuple, list)):
        ints = tuple(_as_int(a) for a in axis)
        if any(a is None for a in ints):
            raise ValueError(f"{AXIS_HELP}; got axis={axis!r}.")
        if len(set(ints)) != len(ints):
            raise ValueError(f"axis has a repeated entry: axis={axis!r}. {AXIS_HELP}.")
        return ints  # pyright: ignore[reportReturnType]  (no None: checked above)
    raise ValueError(f"{AXIS_HELP}; got axis={axis!r}.")


def resolve_axis(axis: AxisSpec, ndim: int) -> tuple[int, ...]:
    """Sorted non-negative axes that `axis` names for an `ndim` array (`ValueError` if invalid).

    >>> resolve_axis("fan_in", 4)
    (0, 1, 2)
    """
    axis = canonical_axis(axis)
    if axis is None:
        return tuple(range(ndim))
    if isinstance(axis, str):  # "fan_in"
        if ndim < 2:
            raise ValueError(
                f"axis='fan_in' needs an array with at least 2 dimensions (fan-in"
                f" axes, then the output axis); this one has {ndim}. Use axis=None"
                " to take the norm over the whole array, or route this leaf to"
                " another constraint."
            )
        return tuple(range(ndim - 1))
    return in_range(axis, ndim)


def in_range(axis: int | tuple[int, ...], ndim: int, name: str = "axis") -> tuple[int, ...]:
    """Int axes as sorted non-negative ones; `ValueError` (calling them `name`) if invalid."""
    axes = (axis,) if isinstance(axis, int) else axis
    for a in axes:
        if not -ndim <= a < ndim:
            if not ndim:
                hint = "; use axis=None" if name == "axis" else ""
                raise ValueError(f"{name} {a} is out of range for a 0-d array{hint}")
            raise ValueError(
                f"{name} {a} is out of range for an array with {ndim} dimension(s)"
                f" (valid: {-ndim}..{ndim - 1})"
            )
    out = sorted(a % ndim for a in axes)
    if len(set(out)) != len(out):
        raise ValueError(f"{name}={axis!r} names the same dimension twice for ndim={ndim}")
    return tuple(out)
