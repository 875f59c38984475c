"""Helpers shared by several test modules.

Hypothesis profiles, the classes under test, and the float32 rounding bounds
the tolerances are built from (`ulps` and the functions after it).
"""

import inspect
import json
import os
import re
import subprocess
import sys

import numpy as np
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


EPS32 = float(np.finfo(np.float32).eps)
"""float32 machine epsilon, 2**-23: the spacing of float32 numbers in [1, 2)."""


def ulps(scale, k: float, dtype=np.float32) -> float:
    """`k` units of `dtype`'s epsilon at the magnitude `scale`: `k * eps * max|scale|`.

    The rounding bound every float tolerance in the suite is built from. In
    the standard model of floating-point arithmetic each rounded operation
    returns `x (1 + d)` with `|d| <= u = eps / 2`, so a value formed by `k`
    rounded operations on operands of magnitude at most `s` is off by at most
    `gamma_k s ~ k u s` (Higham, Accuracy and Stability of Numerical
    Algorithms, 2nd ed., section 3.1), whatever the order of the operations:
    the bound holds for the sums that XLA vectorizes differently on Intel
    and AMD. Counting `k * eps` (twice `gamma_k`) leaves room for a final
    rounding on each side of the comparison. A norm over `n` terms and a
    rescaling by it, for example, is `n + 2` roundings (`norm_ulps`). The
    caller counts `k` from the computation, never from an observed error.

    >>> ulps(2.0, 4) == 8 * EPS32
    True
    """
    return float(k) * float(np.finfo(dtype).eps) * float(np.max(np.abs(scale), initial=0.0))


def norm_ulps(n: int) -> int:
    """Roundings in a unit's norm over `n` entries and a rescaling by it: `n + 2`.

    `n` products and `n - 1` additions (the sum of squares: relative error
    `gamma_n`), the square root (halves that, adds one) and the division and
    product of the rescaling (two more), so `n + 2` bounds the relative error
    of a projected norm with room to spare (see `ulps`).

    >>> norm_ulps(16)
    18
    """
    return int(n) + 2


KERAS_EPSILON = 1e-7
"""Keras's `backend.epsilon()`, added to the norm in the norm constraints' denominators."""


def rescaled_norm_rtol(n: int, smallest_norm: float) -> float:
    """Relative error of a unit's norm that MaxNorm/MinMaxNorm/UnitNorm set to a target.

    The `norm_ulps(n)` roundings of the norm and the rescaling, plus Keras's
    epsilon: `w * t / (1e-7 + |w|)` has norm `t |w| / (|w| + 1e-7)`, short of
    `t` by less than `1e-7 / |w|` relative. `smallest_norm` is a lower bound
    on the units' norms before the projection (for a binding MaxNorm, the bound).

    >>> rescaled_norm_rtol(2, 1.0) == 4 * EPS32 + 1e-7
    True
    """
    return norm_ulps(n) * EPS32 + KERAS_EPSILON / float(smallest_norm)


def update_form_error(after, before):
    """Per entry, the rounding `project` adds by returning `u' = C(p + u) - p`.

    `optax.apply_updates` then forms `p + u'`: two float32 roundings, an ulp of
    `|u'| = |after - before|` and one of `|after|`, where `before` is `p`, the
    leaf before the step (not the moved point `p + u`).

    >>> float(update_form_error(np.float32(1.0), np.float32(3.0))) == 3 * EPS32
    True
    """
    after, before = np.asarray(after, np.float64), np.asarray(before, np.float64)
    return EPS32 * (np.abs(after - before) + np.abs(after))


def projected_norm_rtol(after, before, axes, target, smallest=None):
    """Relative error allowed for each unit norm that a projection set to `target`.

    The rescaling's rounding and Keras's epsilon (`rescaled_norm_rtol`;
    `smallest` bounds the units' norms before the projection, by default
    `target`, as for a binding MaxNorm), plus, through `project`, the step's
    `update_form_error` in 2-norm over the unit (`before`: the leaf before the
    step; `None` for `apply_constraints`, which returns C(w) itself). `axes`:
    the unit's axes of `after` (an int or a tuple). One value per unit where
    `before` or `smallest` is one.

    >>> w = np.ones((4, 3), np.float32)
    >>> projected_norm_rtol(w, None, 0, 1.0) == rescaled_norm_rtol(4, 1.0)
    True
    >>> projected_norm_rtol(w, w, 0, 1.0).shape
    (3,)
    """
    axes = tuple(int(a) for a in np.atleast_1d(axes))
    n = int(np.prod([np.shape(after)[a] for a in axes]))
    rtol = rescaled_norm_rtol(n, target if smallest is None else smallest)
    if before is not None:
        rtol = rtol + np.sqrt(np.sum(update_form_error(after, before) ** 2, axis=axes)) / target
    return rtol


def assert_close_ulps(actual, reference, k: float, *, scale=None, dtype=np.float32, err_msg=""):
    """Asserts `|actual - reference| <= ulps(scale, k, dtype)`, elementwise.

    With `scale=None` the bound is relative to each entry, `k * eps *
    |reference|` (for a value that is a product or quotient of rounded
    factors: a rescaled entry, a norm); give `scale` (e.g. the largest input
    magnitude) for an absolute bound where the value is a sum whose terms
    are larger than the result (a difference, a mean, a thresholded entry).
    `reference` should be independent of the code under test (NumPy in
    float64 on the same float32 inputs).

    >>> assert_close_ulps(np.float32(1.0) + EPS32, 1.0, 1)
    """
    reference = np.asarray(reference, np.float64)
    actual = np.asarray(actual, np.float64)
    eps = float(np.finfo(dtype).eps)
    if scale is None:
        np.testing.assert_allclose(actual, reference, rtol=k * eps, atol=0, err_msg=err_msg)
    else:
        np.testing.assert_allclose(
            actual, reference, rtol=0, atol=ulps(scale, k, dtype), err_msg=err_msg
        )


def central_difference_slack(f64, h, rounding):
    """How far a float32 central difference `(f(h) - f(-h)) / 2h` may be from `f'(0)`.

    Truncation, `h^2 / 6` times the largest third derivative on `[-h, h]`,
    that derivative taken from the float64 reference `f64` (the 4-point
    stencil on `[-2h, 2h]` and on `[-h, h]`; a kink inside shows up as a
    large value, so this errs on the safe side there), plus rounding: each
    float32 value is off by at most `rounding`, their difference over `2h`
    by `rounding / h`.

    >>> round(central_difference_slack(lambda t: t**3, 0.1, 0.0), 12)  # (h^2 / 6) * 6
    0.01
    """

    def third(step):
        return abs(f64(2 * step) - 2 * f64(step) + 2 * f64(-step) - f64(-2 * step)) / (2 * step**3)

    return h**2 / 6 * max(third(h), third(h / 2)) + rounding / h


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


def run_on_devices(script: str, *args: str, timeout: int = 900) -> dict:
    """Runs `script` on 8 simulated CPU devices in a subprocess; its `REPORT` JSON.

    The device count must be set before jax is imported, hence the
    subprocess. The script prints one line `REPORT<json>`; it can import this
    module (`tests/` is on its path). `args` become its `sys.argv[1:]`.
    """
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.dirname(__file__), *filter(None, [env.get("PYTHONPATH")])]
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("REPORT"))
    return json.loads(line[len("REPORT") :])


_COLLECTIVE = re.compile(
    r"=\s*(\(?[^=]*?\)?)\s+(all-gather|all-reduce|all-to-all|"
    r"collective-permute|reduce-scatter)(-start)?\("
)


def hlo_collectives(hlo: str) -> list[dict]:
    """The collectives of a compiled program's text: `{"op", "shapes"}` each.

    >>> hlo_collectives("  %a = f32[8]{0} all-reduce(f32[8]{0} %x), to_apply=%add")
    [{'op': 'all-reduce', 'shapes': [[8]]}]
    """
    found = []
    for line in hlo.splitlines():
        # Long tuple shapes carry `/*index=5*/` comments, whose "=" would cut the match.
        m = _COLLECTIVE.search(re.sub(r"/\*.*?\*/", "", line))
        if m:
            shapes = [
                [int(d) for d in dims.split(",") if d]
                for dims in re.findall(r"[a-z]+[0-9]*\[([0-9,]*)\]", m.group(1))
            ]
            found.append({"op": m.group(2), "shapes": shapes})
    return found
