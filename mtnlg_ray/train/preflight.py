"""What a training job's inputs must satisfy, checked in the driver before Ray or a model starts.

    check_datasets(data)                every data.datasets[i].path is a finished dataset directory
    model_config(job, vocab, seq_len)   the run's model against the tokenizer and the rows
    plan_pretrain(job, resume)          all of the above and --resume (train/resume.py): a Start
    check_finetune_inputs(job, resume)  init_from, the sft paths, and what --resume needs

A missing path is a one-line PathError, a config that does not fit a ConfigError (both exit 2).
This module imports neither torch nor Ray (a fine-tuning start point is opened through
checkpoint/source.py, which reads its config.json, no weights), so the CLI runs it first:
`mtnlg pretrain` with a wrong dataset path answers in about a second, not after a Ray start.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

from mtnlg_ray.checkpoint.source import check_exists, open_source
from mtnlg_ray.config import FinetuneJob, ModelConfig
from mtnlg_ray.errors import ConfigError, PathError
from mtnlg_ray.train.resume import check_resume, identity, resume_target


class Start(NamedTuple):
    """Where a pretraining run starts, as the checks found it."""

    model: ModelConfig           # the run's model, vocab_size from the tokenizer
    identity: dict               # what it trains on (train/resume.py), saved in every checkpoint
    resume_from: str | None      # --resume PATH: the checkpoint a new run starts from


def check_datasets(data) -> list[dict]:
    """The manifest.json of every dataset directory of `data` (a TrainDataConfig), or a PathError naming
    the first one that is missing or unfinished. open_datasets checks the rest (shards, versions)."""
    if not data.datasets:
        raise ConfigError("data.datasets: no dataset directories given (mtnlg preprocess writes one)")
    manifests = []
    for i, spec in enumerate(data.datasets):
        root, key = Path(spec.path), f"data.datasets[{i}].path"
        if not root.is_dir():
            what = "not a directory" if root.exists() else "no such dataset directory"
            raise PathError(f"{key}: {spec.path}: {what} (mtnlg preprocess writes one)")
        mpath = root / "manifest.json"
        if not mpath.is_file():
            raise PathError(f"{key}: {spec.path}: no manifest.json (an unfinished preprocess, or not a dataset "
                            "directory)")
        try:
            manifest = json.loads(mpath.read_text())
        except (OSError, ValueError) as err:
            raise PathError(f"{mpath}: not valid JSON ({err})") from None
        missing = [k for k in ("tokenizer_sha256", "seq_len", "vocab_size") if k not in manifest]
        if missing:
            raise PathError(f"{mpath}: missing key {missing[0]!r} (not a dataset manifest)")
        manifests.append(manifest)
    return manifests


def model_config(job, vocab_size: int, seq_len: int, tokenizer: Path) -> ModelConfig:
    """The model of the run, with vocab_size from the tokenizer (a different explicit one is refused)."""
    if isinstance(job, FinetuneJob):
        cfg = open_source(job.init_from).config()  # a run on s3:// / gs://: its checkpoint, fetched here
        where = f"init_from {job.init_from}"
    else:
        cfg, where = job.model, "model.vocab_size"
    if cfg.vocab_size is None:
        cfg = cfg.model_copy(update={"vocab_size": vocab_size})
    elif cfg.vocab_size != vocab_size:
        raise ConfigError(f"{where}: the model has vocab_size {cfg.vocab_size} but the dataset's tokenizer "
                          f"{tokenizer} has {vocab_size} tokens")
    if cfg.max_seq_len < seq_len:
        raise ConfigError(f"model.max_seq_len: {cfg.max_seq_len} is shorter than the dataset's rows "
                          f"(seq_len {seq_len})")
    return ModelConfig.model_validate(cfg.model_dump())


def plan_pretrain(job, resume: str = "auto") -> Start:
    """Every check of a pretraining job that needs no Ray: datasets, model against them, --resume."""
    manifests = check_datasets(job.data)
    first = manifests[0]
    cfg = model_config(job, first["vocab_size"], first["seq_len"], Path(job.data.datasets[0].path) / "tokenizer.model")
    ident = identity(job, cfg.model_dump(mode="json"), first["tokenizer_sha256"], first["seq_len"], manifests)
    return Start(cfg, ident, check_resume(job, resume, ident))


def check_finetune_inputs(job: FinetuneJob, resume: str | None = "auto") -> None:
    """The paths of a fine-tuning job exist, and (unless `resume` is None) its run directory is what
    --resume asks for. The start point itself is opened later (train/finetune.plan_start), when
    torch is imported anyway."""
    check_exists(job.init_from, "init_from")
    if job.sft.tokenizer and not Path(job.sft.tokenizer).is_file():
        raise PathError(f"sft.tokenizer: {job.sft.tokenizer}: no such file")
    for key in ("train_paths", "val_paths"):
        for i, p in enumerate(getattr(job.sft, key)):
            if "://" not in p and not any(c in p for c in "*?[") and not Path(p).exists():
                raise PathError(f"sft.{key}[{i}]: {p}: no such file or directory")
    if resume is not None:
        resume_target(job, resume)
