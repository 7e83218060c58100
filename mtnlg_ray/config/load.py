"""Loading a job: a YAML file or a shipped config's name, `--set` overrides, every error at once.

    load_job("debug", PretrainJob, ["train.max_steps=50"])   # mtnlg_ray/configs/pretrain/debug.yaml

A config that does not validate raises one ConfigError with a line per problem, each naming where
it comes from and the key: `pretrain.yaml: model.n_heads: must divide d_model=512 (got 7)`, or
`--set train.max_step=50: train.max_step: unknown key (did you mean 'max_steps'?)` for a problem
the file alone does not have. A config written for another command says so instead of listing
its sections as unknown keys. In a YAML file, `${CONFIG_DIR}` is the directory that file is in.
"""

from __future__ import annotations

import copy
from pathlib import Path

import yaml
from pydantic import BaseModel, ValidationError

from mtnlg_ray.config import shipped
from mtnlg_ray.config.finetune import FinetuneJob
from mtnlg_ray.config.preprocess import PreprocessJob
from mtnlg_ray.config.problems import Problem, describe
from mtnlg_ray.config.serve import ServeJob
from mtnlg_ray.config.train import PretrainJob
from mtnlg_ray.config.tune import TuneJob
from mtnlg_ray.errors import ConfigError

JOBS: dict[str, type[BaseModel]] = {"preprocess": PreprocessJob, "pretrain": PretrainJob,
                                    "finetune": FinetuneJob, "tune": TuneJob, "serve": ServeJob}
CONFIG_DIR = "${CONFIG_DIR}"


def validate(job_cls: type[BaseModel], data: dict, source: str = "config"):
    """Validate a dict into `job_cls`; a ConfigError with one line per problem, each naming `source`."""
    try:
        return job_cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError("\n".join(p.line(source) for p in describe(job_cls, err))) from None


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
                raise ConfigError(f"{source} {item}: {part} is not a section")
            node = child
        node[parts[-1]] = value
    return data


def _expand(value, config_dir: str):
    if isinstance(value, str):
        return value.replace(CONFIG_DIR, config_dir)
    if isinstance(value, list):
        return [_expand(v, config_dir) for v in value]
    if isinstance(value, dict):
        return {k: _expand(v, config_dir) for k, v in value.items()}
    return value


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
    return _expand(data, str(p.resolve().parent))


def check_kind(job_cls: type[BaseModel], data: dict, source: str) -> None:
    """A config whose top-level keys are another job's: one line saying whose, not an unknown key each."""
    keys = set(data)
    if keys <= set(job_cls.model_fields) or job_cls not in JOBS.values():
        return
    fits = [kind for kind, cls in JOBS.items() if cls is not job_cls and keys <= set(cls.model_fields)]
    if fits:
        kind = next(k for k, cls in JOBS.items() if cls is job_cls)
        raise ConfigError(f"{source}: this is a {' or '.join(fits)} config ({', '.join(data)}); {kind} expects "
                          f"{', '.join(job_cls.model_fields)}")


def _set_source(problem: Problem, overrides: list[str]) -> str:
    """The `--set KEY=VALUE` a problem the file alone does not have comes from: the one whose key
    is, holds or lies in the problem's key; else one in the same section; else all of them."""
    loc = tuple(str(p) for p in problem.loc)
    keyed = [(item, tuple(item.split("=", 1)[0].strip().split("."))) for item in overrides]
    for related in (lambda k: k[:len(loc)] == loc or loc[:len(k)] == k, lambda k: k[:1] == loc[:1]):
        items = [item for item, key in keyed if related(key)]
        if items:
            return f"--set {items[-1]}"
    return "--set " + " --set ".join(overrides)


def load_job(path: str | Path | None, job_cls: type[BaseModel], overrides: list[str] | None = None):
    """Load a job config (a YAML path, a shipped config's name, or None: the defaults), apply
    `--set` overrides, validate; every problem in one ConfigError, a line each."""
    kind = next((k for k, cls in JOBS.items() if cls is job_cls), None)
    if path is not None and kind is not None:
        path = shipped.resolve(kind, path)
    data = load_yaml(path) if path is not None else {}
    source = Path(path).name if path is not None else job_cls.__name__
    check_kind(job_cls, data, source)
    try:
        return job_cls.model_validate(apply_overrides(copy.deepcopy(data), overrides))
    except ValidationError as err:
        problems = describe(job_cls, err)
    from_file = set()
    if overrides:
        try:
            job_cls.model_validate(data)
        except ValidationError as err:
            from_file = set(describe(job_cls, err))
    lines = [p.line(source if not overrides or p in from_file else _set_source(p, overrides)) for p in problems]
    raise ConfigError("\n".join(lines))
