"""MkDocs hook: links from included pages (the README) to repository files
outside docs/ (notebooks, examples, benchmarks, tests) point at the repository,
since the site holds only docs/. Used by mkdocs.yml; not part of the package.
"""

import re

REPO_BLOB = "https://github.com/optax-constraints/optax_constraints/blob/main/"
# A Markdown link target that leaves docs/: (../notebooks/x.ipynb), (../examples/...).
_OUTSIDE = re.compile(r"\]\(\.\./((?!docs/)[^)\s]+)\)")


def on_page_markdown(markdown, page, config, files):
    return _OUTSIDE.sub(lambda m: f"]({REPO_BLOB}{m.group(1)})", markdown)
