"""The built-in fine-tuning tasks, mined from the docstrings and functions of Python sources.

No download: the sources are the .py files that `code_task.python_files` lists (default: the running
interpreter's standard library, tests excluded), the corpus pretraining uses. Three tasks:

  stdlib_code       signature + docstring summary -> function body            (data/code_task.py)
  stdlib_summarize  a docstring's body -> its summary line, one per documented module, class or
                    function whose docstring has both:
      prompt:    Summarize in one sentence:
                 Create a heap from the items of *iterable* ... (the docstring after its first paragraph)
      response:  Transform list into a heap, in-place, in O(len(x)) time.
  stdlib_dialogue   conversations about one module, answered from its docstrings (several turns each):
      user: What does the module `heapq` do?       assistant: Heap queue algorithm (a.k.a. priority queue).
      user: What does `heapq.heappush` do?         assistant: Push item onto heap, maintaining the heap invariant.
      ...

The summary is a docstring's first paragraph on one line (PEP 257's "summary line"). Examples are
produced per file in source order (the same files give the same examples); each carries a key, and
`mine` / the Ray pipeline (data/sft.py) keep only the first example of each key: the input text for
code and summarization (the same docstring body copied into several places would otherwise ask
one question with several answers, possibly across the train/val split), the whole conversation for
dialogue.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from typing import Callable, NamedTuple

from mtnlg_ray.data.code_task import function_examples

SUMMARIZE_PROMPT = "Summarize in one sentence:\n"  # the instruction of the shipped summarization examples
MIN_SUMMARY_WORDS = 3  # "Constructor." or "Helper." says nothing a question could be answered with
MAX_SUMMARY_CHARS = 300  # a longer first paragraph is a description, not a summary line
MIN_BODY_CHARS = 40  # a shorter docstring body is a note ("See foo."), too little to summarize
SIGNATURE = re.compile(r"[\w.]+\(.*\)\.?")
TURNS = 4  # question/answer pairs per dialogue conversation: ~150 tokens, inside a 256-token row


class Example(NamedTuple):
    line: int  # where the example comes from in its file (1-based)
    key: str  # examples with the same key are duplicates: the first one is kept
    example: dict  # {"prompt", "response"} or {"messages"}: a JSONL line of data/sft.py


def summary_line(doc: str) -> str | None:
    """The docstring's first paragraph on one line, or None when it does not read as a summary."""
    summary = " ".join(doc.split("\n\n")[0].split())
    if len(summary.split()) < MIN_SUMMARY_WORDS or len(summary) > MAX_SUMMARY_CHARS or summary.endswith(":"):
        return None  # too short, too long, or an introduction to what follows (a list, an example)
    if "->" in summary or SIGNATURE.fullmatch(summary) or summary.lower().startswith("usage"):
        return None  # a signature ("S.join(iterable) -> str", "execlpe(file, *args, env)") or a usage block
    return summary


def module_name(path: str | Path) -> str:
    """Dotted module name of a .py file: its stem, prefixed by the packages (dirs with __init__.py) above it."""
    path = Path(path)
    parts = [] if path.stem == "__init__" else [path.stem]
    parent = path.parent
    while (parent / "__init__.py").is_file():
        parts.insert(0, parent.name)
        parent = parent.parent
    return ".".join(parts)


def _documented(tree: ast.Module) -> list[tuple[int, str, ast.AST, bool]]:
    """(line, qualified name, node, inside a function) of every documented class and function, in source order."""
    out = []

    def visit(node, prefix, in_function):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                if ast.get_docstring(child):
                    out.append((child.lineno, name, child, in_function))
                visit(child, f"{name}.", in_function or not isinstance(child, ast.ClassDef))
            elif not isinstance(child, ast.expr):
                visit(child, prefix, in_function)  # definitions under if / try keep their level's prefix

    visit(tree, "", False)
    return sorted(out, key=lambda x: x[0])


def _parse(source: str) -> ast.Module | None:
    try:
        return ast.parse(source)
    except (SyntaxError, ValueError):
        return None  # the stdlib ships a few deliberately broken files (lib2to3 test data and the like)


# ----------------------------------------------------------------------------------------- tasks
def code_examples(path: str, source: str) -> list[Example]:
    """stdlib_code: signature + docstring summary -> body; the key is the prompt."""
    return [Example(line, prompt, {"prompt": prompt, "response": body})
            for line, prompt, body in function_examples(source)]


def summarize_examples(path: str, source: str) -> list[Example]:
    """stdlib_summarize: the body of a docstring (after its summary paragraph) -> the summary line."""
    tree = _parse(source)
    if tree is None:
        return []
    docs = [(1, tree)] if ast.get_docstring(tree) else []
    out = []
    for line, node in docs + [(line, node) for line, _, node, _ in _documented(tree)]:
        doc = ast.get_docstring(node)  # dedented (inspect.cleandoc)
        head, _, body = doc.partition("\n\n")
        summary, body = summary_line(head), body.strip()
        if summary is None or len(body) < MIN_BODY_CHARS:
            continue
        if " ".join(summary.split()).lower() in " ".join(body.split()).lower():
            continue  # the body repeats its summary: copying it out is not summarizing
        out.append(Example(line, body, {"prompt": SUMMARIZE_PROMPT + body, "response": summary}))
    return out


def dialogue_examples(path: str, source: str) -> list[Example]:
    """stdlib_dialogue: conversations of up to TURNS questions about one module's public names.

    The first conversation of a module opens with the module itself; every question names its
    object in full (`json.JSONDecoder.decode`), so each conversation stands on its own. Names that
    start with "_", private modules and names defined twice (per platform) after the first are left out.
    """
    module = module_name(path)
    tree = _parse(source)
    if tree is None or not module or any(p.startswith("_") for p in module.split(".")):
        return []
    turns: list[tuple[int, str, str]] = []  # (line, question, answer)
    module_summary = summary_line(ast.get_docstring(tree) or "")
    if module_summary:
        turns.append((1, f"What does the module `{module}` do?", module_summary))
    seen = set()
    for line, name, node, in_function in _documented(tree):
        summary = summary_line(ast.get_docstring(node))
        # public top-level names and public methods of public classes; not helpers inside functions
        public = not any(p.startswith("_") for p in name.split("."))
        if summary is None or not public or in_function or name in seen:
            continue
        seen.add(name)
        verb = "What is" if isinstance(node, ast.ClassDef) else "What does"
        turns.append((line, f"{verb} `{module}.{name}`{'' if verb == 'What is' else ' do'}?", summary))
    chunks = [turns[i:i + TURNS] for i in range(0, len(turns), TURNS)]
    if len(chunks) > 1 and len(chunks[-1]) == 1:
        last = chunks.pop()
        chunks[-1] += last  # no one-question conversation: the last question joins the one before
    out = []
    for chunk in chunks:
        if len(chunk) < 2:
            continue  # a module with a single documented name makes no conversation
        messages = []
        for _, question, answer in chunk:
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        out.append(Example(chunk[0][0], json.dumps(messages), {"messages": messages}))
    return out


TASKS: dict[str, Callable[[str, str], list[Example]]] = {
    "stdlib_code": code_examples, "stdlib_summarize": summarize_examples, "stdlib_dialogue": dialogue_examples,
}


def mine(task: str, files: list[str]) -> list[tuple[str, dict]]:
    """(FILE:LINE, example) of `task` over `files`, in file then source order, the first of each key kept.

    The same result as the Ray pipeline of data/sft.py (which mines files in parallel and drops
    duplicates in the driver); this one runs in-process, for inspection and tests."""
    seen: set[str] = set()
    out = []
    for path in files:
        source = Path(path).read_bytes().decode("utf-8", errors="replace")
        for line, key, example in TASKS[task](path, source):
            if key not in seen:
                seen.add(key)
                out.append((f"{path}:{line}", example))
    return out
