"""Running the tests leaves the work tree clean: notebooks write files only when asked.

The notebooks run as tests (`pytest --nbmake`), in `notebooks/`. A notebook
that refreshes a tracked file (the README's figure) must do so only under
`OC_SAVE_FIGURES=1`, so `git status` is unchanged after the suite. This
checks the notebooks' code statically (executing them is the notebook
tests' job): every cell that writes a file tests the variable first.
"""

import json
import re
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
WRITES = re.compile(r"\.savefig\(|\.to_csv\(|np\.save[z]?\(|open\([^)]*['\"][wa]b?['\"]")
GUARD = 'os.environ.get("OC_SAVE_FIGURES")'


def test_the_notebooks_are_found():
    assert len(NOTEBOOKS) >= 5


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_writes_only_when_asked(path):
    cells = json.loads(path.read_text())["cells"]
    for i, cell in enumerate(cells):
        src = "".join(cell["source"])
        if cell["cell_type"] != "code" or not WRITES.search(src):
            continue
        # The guard must come before the first write in the cell.
        first_write = WRITES.search(src).start()
        assert GUARD in src[:first_write], (
            f"{path.name}, cell {i}: writes a file without checking {GUARD};"
            " tests must leave the work tree clean"
        )


def test_the_pattern_catches_an_unguarded_write():
    assert WRITES.search('fig.savefig("../docs/images/x.png")')
    assert WRITES.search("open('out.txt', 'w')")
    assert not WRITES.search("open('data.txt')")
