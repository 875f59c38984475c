"""Griffe extension for the API site: docstrings written for `help()` and
doctest, rewritten into the Markdown that mkdocstrings renders.

- Sphinx's :math:`x` role -> MathJax's \\(x\\) (pymdownx.arithmatex).
- A doctest block (a `>>>` line and what follows it up to a blank line, and
  the blocks after it that only blank lines separate) -> a ```pycon fence,
  highlighted like any code block; without the fence Markdown reads the
  `>>>` prompts as nested blockquotes and runs the lines together.

Used by mkdocs.yml; nothing in the package imports it.
"""

import re

import griffe

_MATH = re.compile(r":math:`([^`]+)`")
_FENCE = re.compile(r"^\s*(```|~~~)")


def fence_doctests(text: str) -> str:
    """Wraps every doctest block outside an existing fence in a ```pycon fence."""
    lines = text.split("\n")
    out: list[str] = []
    in_fence = False
    i = 0
    while i < len(lines):
        line = lines[i]
        if _FENCE.match(line):
            in_fence = not in_fence
        stripped = line.lstrip()
        if in_fence or not stripped.startswith(">>>"):
            out.append(line)
            i += 1
            continue
        indent = line[: len(line) - len(stripped)]
        block: list[str] = []
        while i < len(lines):
            if lines[i].strip():
                block.append(lines[i])
                i += 1
                continue
            j = i  # blank lines: the block goes on if a prompt at its indent follows
            while j < len(lines) and not lines[j].strip():
                j += 1
            if j < len(lines) and lines[j].startswith(indent + ">>>"):
                block.extend(lines[i:j])
                i = j
            else:
                break
        out += [indent + "```pycon", *block, indent + "```"]
    return "\n".join(out)


class DocstringMarkdown(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            value = _MATH.sub(r"\\(\1\\)", obj.docstring.value)
            obj.docstring.value = fence_doctests(value)
