"""The README's Python examples run as written."""

import re
from pathlib import Path

import jax.numpy as jnp

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_python_examples():
    assert python_blocks(), "README.md should show at least one Python example"


def test_quickstart_runs_and_constraints_hold():
    namespace: dict = {}
    exec(compile(python_blocks()[0], str(README), "exec"), namespace)
    violations = namespace["oc"].constraint_violations(
        namespace["params"], namespace["constraints"], namespace["labels"]
    )
    assert set(violations) == {"kernel", "bias"}
    assert all(float(v) <= 1e-6 for v in violations.values()), violations
    kernel = namespace["params"]["layers_0"]["kernel"]
    assert float(jnp.linalg.norm(kernel, axis=0).max()) <= 2.0 * (1 + 1e-6)
