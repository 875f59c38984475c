"""The wheel stands alone: built, installed into a fresh virtual environment
with only its runtime dependencies (jax, optax), and used there.

`test_wheel_in_fresh_venv` builds the wheel with `python -m build`, creates a
venv with `python -m venv` (no system site-packages), installs the wheel (pip
resolves jax and optax, from its cache when it can) and runs `SCRIPT` there:
one `project` step, an `oc.serialize` round trip through JSON, and checks
that neither Flax, Keras, chex nor Equinox is installed or imported. It takes
about a minute (mostly installing jaxlib); deselect it with `-m "not wheel"`.

`test_import_touches_no_framework` is the cheap check in the test venv,
where those frameworks ARE installed: importing the package must not import
them.
"""

import json
import os
import re
import subprocess
import sys
import textwrap
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FRAMEWORKS = ("flax", "keras", "chex", "equinox")

SCRIPT = textwrap.dedent(
    """
    import importlib.util, json, sys
    from pathlib import Path

    import optax_constraints as oc

    frameworks = {frameworks!r}
    imported = sorted(m for m in frameworks if m in sys.modules)
    assert not imported, f"import optax_constraints imported {{imported}}"
    installed = sorted(m for m in frameworks if importlib.util.find_spec(m) is not None)
    assert not installed, f"the fresh venv has {{installed}}: not a runtime-deps-only install"
    assert Path(oc.__file__).resolve().is_relative_to(Path(sys.prefix).resolve()), oc.__file__
    assert (Path(oc.__file__).parent / "py.typed").is_file(), "py.typed missing from the wheel"

    import jax, jax.numpy as jnp, numpy as np, optax

    params = {{"kernel": jnp.array([[3.0, 0.5], [4.0, 0.0]]), "bias": jnp.array([-1.0, 2.0])}}
    tx = optax.chain(
        optax.sgd(0.1),
        oc.project({{"k": oc.MaxNorm(1.0, axis=0), "b": oc.NonNeg()}},
                   oc.label_by_path({{"**/kernel": "k", "**/bias": "b"}})),
    )
    state = tx.init(params)
    grads = {{"kernel": jnp.zeros((2, 2)), "bias": jnp.array([1.0, 1.0])}}
    updates, state = jax.jit(tx.update)(grads, state, params)
    new = optax.apply_updates(params, updates)

    # Reference in float64 NumPy, Keras's formula (epsilon 1e-7): column 0 has
    # norm 5 -> scaled to norm 1; column 1 has norm 0.5 <= 1 -> kept; bias
    # -1.1 -> 0, 1.9 kept. Tolerance: a few float32 roundings of values up to
    # max|p| = 4 (the update form p + (C(q) - p) rounds at p's magnitude).
    w = np.array([[3.0, 0.5], [4.0, 0.0]])
    norms = np.linalg.norm(w, axis=0)
    want_kernel = w * np.minimum(norms, 1.0) / (1e-7 + norms)
    atol = 8 * np.finfo(np.float32).eps * 4.0
    np.testing.assert_allclose(np.asarray(new["kernel"], np.float64), want_kernel, rtol=0, atol=atol)
    np.testing.assert_allclose(np.asarray(new["bias"], np.float64), [0.0, 1.9], rtol=0, atol=atol)
    assert float(new["bias"].min()) >= 0.0

    config = oc.serialize(oc.MaxNorm(2.0, axis="fan_in"))
    again = oc.deserialize(json.loads(json.dumps(config)))
    assert again == oc.MaxNorm(2.0, axis="fan_in"), (config, again)

    imported = sorted(m for m in frameworks if m in sys.modules)
    assert not imported, f"using optax_constraints imported {{imported}}"
    print("WHEEL-OK", oc.__version__, jax.__version__, optax.__version__)
    """
).format(frameworks=FRAMEWORKS)


REPOSITORY = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"]["Repository"]


def _absolute_links(line: str) -> str:
    """A README line as PyPI should get it: relative links to the repository on GitHub."""
    raw = REPOSITORY.replace("https://github.com/", "https://raw.githubusercontent.com/")
    line = re.sub(r"!\[([^\]]*)\]\((?!https?://|#)([^)\s]+)\)", rf"![\1]({raw}/main/\2)", line)
    return re.sub(
        r"(?<!!)\[([^\]]*)\]\((?!https?://|#)([^)\s]+)\)", rf"[\1]({REPOSITORY}/blob/main/\2)", line
    )


def _clean_env() -> dict[str, str]:
    """The environment without anything that would point Python at this checkout."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.pop("VIRTUAL_ENV", None)
    return env


def _run(cmd, *, cwd, env, timeout=600):
    proc = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, (
        f"{' '.join(map(str, cmd))} exited {proc.returncode}\n"
        f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-4000:]}"
    )
    return proc


@pytest.mark.wheel
def test_wheel_in_fresh_venv(tmp_path):
    env = _clean_env()
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "build", "--wheel", "--outdir", dist, ROOT], cwd=tmp_path, env=env)
    wheels = sorted(dist.glob("optax_constraints-*.whl"))
    assert len(wheels) == 1, wheels
    wheel = wheels[0]

    names = zipfile.ZipFile(wheel).namelist()
    assert "optax_constraints/py.typed" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), names
    assert not any(n.startswith(("tests/", "benchmarks/", "notebooks/")) for n in names), names
    # PyPI renders the README alone: its links and images must not be relative.
    metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
    description = zipfile.ZipFile(wheel).read(metadata).decode().split("\n\n", 1)[1]
    assert description.splitlines() == [
        _absolute_links(line) for line in (ROOT / "README.md").read_text().splitlines()
    ]
    relative = re.findall(r"\]\((?!https?://|#)[^)]*\)", description)
    assert not relative, relative

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", venv], cwd=tmp_path, env=env)
    python = venv / ("Scripts" if os.name == "nt" else "bin") / "python"
    _run(
        [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", wheel],
        cwd=tmp_path,
        env=env,
    )
    script = tmp_path / "smoke.py"
    script.write_text(SCRIPT)
    # cwd=tmp_path and no PYTHONPATH: the checkout is not importable from there.
    proc = _run([python, "-I", script], cwd=tmp_path, env=env)
    assert "WHEEL-OK" in proc.stdout, proc.stdout


def test_import_touches_no_framework():
    code = (
        "import json, sys; import optax_constraints as oc;"
        f" print(json.dumps([m for m in {FRAMEWORKS!r} if m in sys.modules] + [oc.__file__]))"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = _run([sys.executable, "-c", code], cwd=ROOT, env=env, timeout=120)
    *imported, where = json.loads(proc.stdout.strip().splitlines()[-1])
    assert imported == [], f"import optax_constraints imported {imported}"
    assert Path(where).resolve().is_relative_to(ROOT), where
