"""Checks the built API site: every doctest example renders as a code block.

Markdown reads a docstring's `>>>` prompts as three nested blockquotes and runs
the example's lines together into one paragraph, unless the example is fenced
(docs/_griffe_docstrings.py fences them). This fails on a `>>>` outside a
<pre>/<code> block, on a blockquote holding `>>>`, and on a blockquote inside a
blockquote (what the prompts become); the pages themselves nest none.

Usage: python docs/check_site.py SITE_DIR   (run by .ci/run after mkdocs build)
"""

import sys
from html.parser import HTMLParser
from pathlib import Path


class _Checker(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.code = 0  # depth of <pre>/<code>
        self.quotes = 0  # depth of <blockquote>
        self.problems: list[str] = []

    def _where(self) -> str:
        return f"line {self.getpos()[0]}"

    def handle_starttag(self, tag, attrs) -> None:
        if tag in ("pre", "code"):
            self.code += 1
        elif tag == "blockquote":
            if self.quotes == 1:  # once per nest: one per example
                self.problems.append(f"{self._where()}: a blockquote inside a blockquote")
            self.quotes += 1

    def handle_endtag(self, tag) -> None:
        if tag in ("pre", "code"):
            self.code = max(self.code - 1, 0)
        elif tag == "blockquote":
            self.quotes = max(self.quotes - 1, 0)

    def handle_data(self, data) -> None:
        if ">>>" not in data:
            return
        if self.quotes:
            self.problems.append(f"{self._where()}: `>>>` in a blockquote")
        elif not self.code:
            self.problems.append(f"{self._where()}: `>>>` outside <pre>/<code>")


def check(site: Path) -> list[str]:
    problems = []
    for page in sorted(site.rglob("*.html")):
        checker = _Checker()
        checker.feed(page.read_text(encoding="utf-8"))
        checker.close()
        problems += [f"{page.relative_to(site)}: {p}" for p in checker.problems]
    return problems


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not Path(argv[1]).is_dir():
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    site = Path(argv[1])
    if not any(site.rglob("*.html")):
        print(f"{site}: no HTML pages", file=sys.stderr)
        return 2
    problems = check(site)
    for p in problems:
        print(p, file=sys.stderr)
    if problems:
        print(f"{len(problems)} doctest examples not rendered as code", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
