"""The built-in code task: (signature + docstring -> function body) pairs mined from Python sources.

No download: by default the sources are the running interpreter's standard library (the same
corpus pretraining uses). Every function or method with a docstring and at least one statement
after it becomes one example, dedented to column 0:

    prompt:    def bisect_left(a, x, lo=0, hi=None, *, key=None):
                   \"\"\"Return the index where to insert item x in list a, assuming a is sorted. ...\"\"\"
    response:      if lo < 0:
                       raise ValueError('lo must be non-negative')
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
    roots = [Path(p) for p in paths] if paths else [stdlib_dir()]
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
        doc = node.body[0]
        if ast.get_docstring(node, clean=False) is None or doc.end_lineno >= node.body[1].lineno:
            continue  # no docstring, or code on the docstring's last line
        start = node.lineno - 1  # the `def` line (0-based)
        text = textwrap.dedent("".join(lines[start:node.end_lineno])).splitlines(keepends=True)
        head = doc.end_lineno - start  # lines of signature + docstring
        prompt, response = "".join(text[:head]), "".join(text[head:])
        if response.strip():
            out.append((node.lineno, prompt.rstrip("\n"), response.rstrip("\n")))
    return sorted(out)
