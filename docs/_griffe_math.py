"""Griffe extension for the API site: Sphinx's :math:`x` role -> MathJax's \\(x\\).

The docstrings write inline math as RST roles (readable in `help()`); the
site renders them with MathJax through pymdownx.arithmatex. Used by
mkdocs.yml; nothing in the package imports it.
"""

import re

import griffe

_MATH = re.compile(r":math:`([^`]+)`")


class MathRoles(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _MATH.sub(r"\\(\1\\)", obj.docstring.value)
