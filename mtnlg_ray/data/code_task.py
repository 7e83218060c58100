"""The built-in code task: (signature + docstring -> function body) pairs mined from Python sources.

No download: by default the sources are the running interpreter's standard library (the same
corpus pretraining uses). Every function or method with a docstring and at least one statement
after it becomes one example, dedented to column 0. The prompt is the signature and the first
paragraph of the docstring (its summary, on one line: it keeps examples short enough for small
contexts); the response is the body after the docstring:

    prompt:    def insort_right(a, x, lo=0, hi=None, *, key=None):
                   \"\"\"Insert item x in list a, and keep it sorted assuming a is sorted.\"\"\"
    response:      if key is None:
                       lo = bisect_right(a, x, lo, hi)
                   ...

Decorators are left out of the prompt. Files that do not parse are skipped (the stdlib ships a
few deliberately broken ones under test/, which is excluded anyway).
"""

from __future__ import annotations

import ast
import sysconfig
import textwrap
from pathlib import Path

# Directories that hold tests, test data, or third-party packages rather than library code.
EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def python_files(paths: list[str]) -> list[str]:
    """Sorted .py files under `paths` (files or directories; default: the stdlib), tests excluded."""
    roots = [Path(p).resolve() for p in paths] if paths else [stdlib_dir()]
    out: list[str] = []
    for root in roots:
        if root.is_file():
            out.append(str(root))
        elif root.is_dir():
            out += [str(f) for f in root.rglob("*.py")
                    if not EXCLUDED_DIRS.intersection(f.relative_to(root).parts[:-1])]
    return sorted(set(out))


def function_examples(source: str) -> list[tuple[int, str, str]]:
    """(line number, prompt, response) for every documented function in `source`, in source order."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    lines = source.splitlines(keepends=True)
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or len(node.body) < 2:
            continue
        doc, first = ast.get_docstring(node), node.body[0]
        if not doc or first.lineno == node.lineno or first.end_lineno >= node.body[1].lineno:
            continue  # no docstring, or the docstring shares a line with code
        start = node.lineno - 1  # the `def` line (0-based); decorators are not part of the prompt
        text = textwrap.dedent("".join(lines[start:node.end_lineno])).splitlines(keepends=True)
        signature = "".join(text[: first.lineno - 1 - start])  # `def ...:`, possibly several lines
        indent = " " * (first.col_offset - node.col_offset)
        summary = " ".join(doc.split("\n\n")[0].split()).replace('"""', "'''")  # first paragraph, one line
        body = "".join(text[first.end_lineno - start:]).rstrip("\n")
        if body.strip():
            out.append((node.lineno, f'{signature}{indent}"""{summary}"""', body))
    return sorted(out)
