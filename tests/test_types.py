"""Pyright (pinned in the test extra) rejects wrong calls of the public API.

CI runs `pyright` on the package and tests/typecheck_usage.py (correct calls,
0 errors). Here each line of `WRONG` is a wrong call, and pyright must report
an error on exactly those lines: the signatures are precise enough to check a
user's code.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

WRONG = textwrap.dedent(
    """
    import jax.numpy as jnp
    import optax_constraints as oc

    oc.project(1, 2, every_k_steps="x")
    oc.project({"k": oc.MaxNorm(2.0)}, {"w": "k"}, every_k_steps=2.5)
    oc.MaxNorm(2.0, axis=1.5)
    oc.SpectralNorm(1.0, method="powr")
    oc.Orthogonal(method="qr")
    oc.label_by_path(["**/kernel"])
    oc.projections.max_norm(jnp.ones(3), 2.0, axis=[0.5])
    oc.serialize("max_norm")
    """
)


def _pyright() -> str:
    exe = shutil.which("pyright", path=str(Path(sys.executable).parent)) or shutil.which("pyright")
    assert exe, "pyright is not installed: pip install -e '.[test]' (it is pinned there)"
    return exe


def test_pyright_rejects_wrong_calls(tmp_path):
    (tmp_path / "wrong.py").write_text(WRONG)
    (tmp_path / "pyrightconfig.json").write_text(
        json.dumps({"extraPaths": [str(ROOT)], "typeCheckingMode": "basic"})
    )
    proc = subprocess.run(
        [_pyright(), "--outputjson", "--pythonpath", sys.executable, "wrong.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    report = json.loads(proc.stdout)
    flagged = {
        d["range"]["start"]["line"]
        for d in report["generalDiagnostics"]
        if d["severity"] == "error"
    }
    lines = WRONG.splitlines()
    wrong = {i for i, line in enumerate(lines) if line.startswith("oc.")}
    missed = sorted(lines[i] for i in wrong - flagged)
    assert not missed, f"pyright accepted these wrong calls: {missed}"
    extra = sorted(lines[i] for i in flagged - wrong)
    assert not extra, f"pyright flagged correct lines: {extra}\n{proc.stdout[-3000:]}"
