"""The benchmarks run: `benchmarks/run.py` and every section it registers.

No timing is asserted (speed lives in `benchmarks/`, its figures in
docs/performance.md). Checked: the section table runs a module with
`run(args)` / `report(result)` and a standalone one with `main(argv)`; and
each registered section, at `--quick` size, writes its result to the JSON
file with finite, positive ratios. Only the cheapest section runs by
default; the others are `slow` (minutes on a 2-core machine).
"""

from __future__ import annotations

import json
import math
import sys
import textwrap

import pytest

from benchmarks import run as R

FAST = {"every_k"}


def _numbers(tree, key=""):
    """(key, number) for every number in a JSON tree, with its innermost dict key."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _numbers(v, str(k))
    elif isinstance(tree, list):
        for v in tree:
            yield from _numbers(v, key)
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield key, tree


def _ratios(tree, inside=False):
    """Every number under a key that names a ratio (`ratios`, `compile_ratio`, ...)."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _ratios(v, inside or "ratio" in str(k))
    elif inside and isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield tree


def _run(tmp_path, *argv) -> dict:
    R.main([*argv, "--out", str(tmp_path)])
    [path] = tmp_path.glob("*.json")
    return json.loads(path.read_text())


def test_the_default_sections_are_registered():
    assert set(R.DEFAULT) <= set(R.SECTIONS)
    assert {"step", "compile", "whole_step", "sharded"} <= set(R.SECTIONS)


@pytest.fixture
def fake_sections(tmp_path, monkeypatch):
    """Two sections in a temporary package: one with `run`/`report`, one with `main`."""
    package = tmp_path / "fake_benchmarks"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "with_run.py").write_text(
        textwrap.dedent(
            """
            def run(args):
                return {"quick": args.quick, "ratios": {"a/b": 1.5}}

            def report(result):
                return [f"a/b {result['ratios']['a/b']}"]
            """
        )
    )
    (package / "with_main.py").write_text(
        "def main(argv):\n    return {'argv': argv, 'ratios': {'c/d': 0.5}}\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(R.SECTIONS, "with_run", "fake_benchmarks.with_run")
    monkeypatch.setitem(R.SECTIONS, "with_main", "fake_benchmarks.with_main")
    monkeypatch.setitem(R.SECTIONS, "missing", "fake_benchmarks.not_there")
    yield
    for name in list(sys.modules):
        if name.startswith("fake_benchmarks"):
            del sys.modules[name]


def test_the_table_runs_both_kinds_of_module(fake_sections, tmp_path, capsys):
    out = tmp_path / "results"
    written = _run(out, "--only", "with_run,with_main", "--quick")
    assert written["sections"]["with_run"]["quick"] is True
    assert written["sections"]["with_main"]["argv"] == ["--quick"]
    assert "a/b 1.5" in capsys.readouterr().out
    assert next(p.name for p in out.glob("*.json")).endswith("-quick-with_run-with_main.json")


def test_a_missing_module_fails_its_section_only(fake_sections, tmp_path):
    out = tmp_path / "results"
    with pytest.raises(SystemExit, match="missing"):
        R.main(["--only", "missing,with_run", "--out", str(out)])
    [path] = out.glob("*.json")
    sections = json.loads(path.read_text())["sections"]
    assert "ModuleNotFoundError" in sections["missing"]["error"]
    assert sections["with_run"]["ratios"] == {"a/b": 1.5}


def test_an_unknown_section_is_refused_with_the_known_ones():
    with pytest.raises(SystemExit):
        R.main(["--only", "nope"])


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=[] if n in FAST else [pytest.mark.slow]) for n in R.SECTIONS]
)
def test_section_writes_finite_ratios_at_quick_size(name, tmp_path):
    pytest.importorskip(R.SECTIONS[name])  # a section another branch adds may be absent
    argv = ["--only", name, "--quick"] + (["--reps", "2"] if name in FAST else [])
    section = _run(tmp_path, *argv)["sections"][name]
    assert "error" not in section, section.get("error")
    bad = [(k, x) for k, x in _numbers(section) if not math.isfinite(x)]
    assert not bad
    if hasattr(R.load(name), "run"):  # our own sections report ratios
        ratios = list(_ratios(section))
        assert ratios
        assert all(x > 0 for x in ratios)
