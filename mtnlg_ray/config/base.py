"""The base of every config model and the loading helpers: YAML, `--set` overrides, one-line errors."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from mtnlg_ray.errors import ConfigError


class Section(BaseModel):
    """Base of every config model: unknown keys are refused."""

    model_config = ConfigDict(extra="forbid")


# --------------------------------------------------------------------------------------- loading
def _format_error(source: str, err: ValidationError) -> str:
    e = err.errors()[0]
    loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
    msg = e["msg"].removeprefix("Value error, ")
    if e["type"] == "extra_forbidden":
        msg = "unknown key"
    elif e["type"] == "missing":
        msg = "required key is missing"
    elif "got" not in msg and e["type"] not in ("model_type", "dict_type"):
        msg = f"{msg} (got {e.get('input')!r})"
    return f"{source}: {loc}: {msg}"


def validate(job_cls: type[BaseModel], data: dict, source: str = "config"):
    """Validate a dict into `job_cls`, raising a one-line ConfigError naming `source` and the key."""
    try:
        return job_cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_error(source, err)) from None


def apply_overrides(data: dict, overrides: list[str] | None, source: str = "--set") -> dict:
    """Apply `key.path=value` strings; values are parsed as YAML scalars (`3e-4`, `true`, `[1, 2]`)."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"{source}: {item!r}: expected key.path=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"{source}: {key}: {part} is not a section")
            node = child
        node[parts[-1]] = value
    return data


def load_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: no such config file")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{p.name}:{where}: not valid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p.name}: top level must be a mapping of sections")
    return data


def load_job(path: str | Path | None, job_cls: type[BaseModel], overrides: list[str] | None = None):
    """Load a job config from YAML (or defaults when path is None), apply --set, validate."""
    data = load_yaml(path) if path is not None else {}
    source = Path(path).name if path is not None else job_cls.__name__
    return validate(job_cls, apply_overrides(data, overrides), source)


def dump_yaml(job: BaseModel, path: str | Path) -> None:
    """Write a job back as YAML that `load_job` accepts."""
    Path(path).write_text(yaml.safe_dump(job.model_dump(mode="json"), sort_keys=False))
