"""`benchmarks/run.py --only whole_step_parts` switches off what it names.

No timing is asserted (speed lives in `benchmarks/run.py`). The section
compiles the LM's training step with `project`'s overflow conditional and
ordering switched off one at a time, by setting module constants; this
checks, at its `--quick` size, that each switch removes kernels from the
compiled step (the counts are deterministic) and that the constants are
restored afterwards, so the rest of the process sees the library as shipped.
"""

from __future__ import annotations

from benchmarks import run as R
from optax_constraints import _transform
from optax_constraints.constraints import _base


def test_whole_step_parts_switch_off_what_they_name():
    before = (_base.BRANCH_SIZE, _transform.ORDERED_SIZE)
    out = R.whole_step_parts_section(quick=True)
    assert (_base.BRANCH_SIZE, _transform.ORDERED_SIZE) == before
    kernels = {name: v["kernels"] for name, v in out["variants"].items()}
    assert kernels["plain"] < kernels["hand_keras"] < kernels["neither"], kernels
    assert kernels["neither"] < kernels["no_branch"] < kernels["project"], kernels
    assert kernels["neither"] < kernels["no_ordering"] < kernels["project"], kernels
    assert all(v["ratio"]["median"] > 0 for v in out["variants"].values())
