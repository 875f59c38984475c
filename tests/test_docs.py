"""Every public symbol is on the API site (docs/api/*.md, built by mkdocs.yml).

`mkdocs build --strict` (in CI) fails on a `:::` directive naming something
that does not exist; this test fails on the opposite: a public symbol that no
API page renders. Aliases count through the object they name
(`oc.max_norm is oc.MaxNorm`).
"""

import importlib
import re
import types
from pathlib import Path

import optax_constraints as oc

API = Path(__file__).resolve().parents[1] / "docs" / "api"
DIRECTIVE = re.compile(r"^::: (\S+)\n((?:[ \t]+.*\n|\n)*)", re.M)
MEMBER = re.compile(r"^\s+- (\w+)\s*$", re.M)


def _resolve(dotted: str):
    module, _, name = dotted.rpartition(".")
    try:
        return importlib.import_module(dotted)
    except ModuleNotFoundError:
        return getattr(importlib.import_module(module), name)


def documented() -> list:
    objects = []
    for page in sorted(API.glob("*.md")):
        for dotted, options in DIRECTIVE.findall(page.read_text()):
            obj = _resolve(dotted)
            objects.append(obj)
            if isinstance(obj, types.ModuleType):
                members = MEMBER.findall(options)
                assert members, f"{page.name}: list the members of ::: {dotted}"
                objects.extend(getattr(obj, m) for m in members)
    return objects


def public(module: types.ModuleType) -> dict[str, object]:
    return {
        f"{module.__name__}.{name}": obj
        for name, obj in vars(module).items()
        if not name.startswith("_") and not isinstance(obj, types.ModuleType)
    }


def test_every_public_symbol_has_an_api_entry():
    on_site = documented()
    symbols = public(oc) | public(oc.projections) | public(oc.constraints)
    missing = sorted(name for name, obj in symbols.items() if not any(obj is d for d in on_site))
    assert not missing, f"add these to a page in docs/api/: {missing}"


def test_citation_file_matches_the_package_metadata():
    """CITATION.cff (what GitHub's "Cite this repository" reads) says what pyproject.toml says."""
    import tomllib

    import yaml

    root = API.parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    cff = yaml.safe_load((root / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0"
    assert cff["type"] == "software" and cff["authors"]
    assert cff["title"] == project["name"]
    assert cff["version"] == project["version"]
    assert cff["license"] == project["license"]
    assert cff["repository-code"] == project["urls"]["Repository"]
    assert "CITATION.cff" in (root / "README.md").read_text()
