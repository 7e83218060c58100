"""The base of every config model, and a job written back as YAML."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """Base of every config model: unknown keys are refused."""

    model_config = ConfigDict(extra="forbid")


def dump_yaml(job: BaseModel, path: str | Path) -> None:
    """Write a job back as YAML that `load_job` accepts."""
    Path(path).write_text(yaml.safe_dump(job.model_dump(mode="json"), sort_keys=False))
