"""A pydantic ValidationError as the lines a person reads: one per problem, every problem at once.

    describe(Job, err)  ->  [Problem(loc="model.n_layer", text="unknown key (did you mean 'n_layers'?)"), ...]

Pydantic reports a value that fits no branch of a union (`int | tuple[int, int]`) once per branch;
those become one problem. An unknown key gets the closest known keys of its section as a "did you
mean" (difflib), or, with none close, the section's keys when they are few.
"""

from __future__ import annotations

import difflib
import types
import typing
from typing import NamedTuple

from pydantic import BaseModel, ValidationError

KEYS_LISTED = 12  # a section with at most this many keys lists them after an unknown key without a close match


class Problem(NamedTuple):
    loc: tuple  # the field path, e.g. ("data", "datasets", 0, "path")
    text: str   # what is wrong, e.g. "required key is missing"

    @property
    def where(self) -> str:
        out = ""
        for part in self.loc:
            out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
        return out or "(top level)"

    def line(self, source: str) -> str:
        return f"{source}: {self.where}: {self.text}"


def models_in(annotation) -> list[type[BaseModel]]:
    """The config models a field's annotation holds: `X`, `X | None`, `list[X]`, `dict[str, X]`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType, list, tuple, dict):
        return [m for arg in typing.get_args(annotation) for m in models_in(arg)]
    return []


def field_path(job_cls: type[BaseModel], loc: tuple) -> tuple[tuple, type[BaseModel] | None]:
    """The leading part of `loc` that names fields and list indices, and the model its last field
    holds (None where that is no single model). Pydantic appends the type of a union's branch to
    the location of a value that fits none of them (`scaling.num_workers.int`): it is cut off."""
    model, path = job_cls, []
    for part in loc:
        if not isinstance(part, int):
            if model is None or part not in model.model_fields:
                break
            held = models_in(model.model_fields[part].annotation)
            model = held[0] if len(held) == 1 else None
        path.append(part)
    return tuple(path), model


def unknown_key(job_cls: type[BaseModel], loc: tuple) -> str:
    """`unknown key`, with the closest known keys of its section."""
    path, parent = field_path(job_cls, loc[:-1])
    if parent is None or path != loc[:-1]:
        return "unknown key"
    known = list(parent.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6)
    if close:
        return f"unknown key (did you mean {close[0]!r}?)"
    if len(known) <= KEYS_LISTED:
        return f"unknown key (known here: {', '.join(known)})"
    return "unknown key"


def _text(job_cls: type[BaseModel], e: dict) -> tuple[str, str]:
    """(what is wrong, the value given: "" where the message shows it or it is a whole section)."""
    if e["type"] == "extra_forbidden":
        return unknown_key(job_cls, e["loc"]), ""
    if e["type"] == "missing":
        return "required key is missing", ""
    msg = e["msg"].removeprefix("Value error, ")
    shown = "got" in msg or e["type"] in ("model_type", "dict_type") or isinstance(e.get("input"), dict)
    return msg, "" if shown else f" (got {e.get('input')!r})"


def describe(job_cls: type[BaseModel], err: ValidationError) -> list[Problem]:
    """Every problem of `err`, in pydantic's order; the branches of one union value merged
    ("should be a valid integer; or should be 'all' (got 'some')")."""
    merged: dict[tuple, tuple[list[str], str]] = {}
    for e in err.errors():
        loc = tuple(e["loc"])
        path = loc if e["type"] == "extra_forbidden" else field_path(job_cls, loc)[0]
        msg, given = _text(job_cls, e)
        texts, _ = merged.setdefault(path, ([], given))
        if msg not in texts:
            texts.append(msg)
    return [Problem(loc, "; or ".join(texts) + given) for loc, (texts, given) in merged.items()]
