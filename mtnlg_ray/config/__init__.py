"""Typed configs for every job: pydantic v2 models loaded from YAML, with `--set` overrides.

Each job has one top-level model (PreprocessJob, PretrainJob, FinetuneJob, TuneJob, ServeJob)
made of sections. Every model forbids unknown keys, so a typo is an error, not a silent default.
`load_job(path, Job, overrides)` raises `ConfigError` with one line naming the file and the
dotted key path, e.g. `pretrain.yaml: model.n_heads: must divide d_model=512 (got 7)`.
Ray hands `train_loop_config` to workers as a dict; they re-validate it with `Job.model_validate`.

One module per job family (model, data, train, serve; base holds the loading helpers), all
re-exported here: `from mtnlg_ray.config import PretrainJob, load_job`.
"""

from mtnlg_ray.config.base import Section, apply_overrides, dump_yaml, load_job, load_yaml, validate
from mtnlg_ray.config.model import ModelConfig
from mtnlg_ray.config.data import CorpusConfig, CleanConfig, TokenizerConfig, PackConfig, PreprocessJob
from mtnlg_ray.config.train import (
    HYPERPARAMETERS,
    DatasetSpec,
    DataConfig,
    ParallelConfig,
    OptimConfig,
    RampupConfig,
    TrainConfig,
    CheckpointConfig,
    ScalingSection,
    PretrainJob,
    LoraConfig,
    SftDataConfig,
    FinetuneJob,
    SearchSpace,
    TuneSection,
    TuneJob,
)
from mtnlg_ray.config.serve import AutoscalingSection, ServeSection, ServeJob

__all__ = [
    "HYPERPARAMETERS",
    "Section",
    "apply_overrides",
    "dump_yaml",
    "load_job",
    "load_yaml",
    "validate",
    "ModelConfig",
    "CorpusConfig",
    "CleanConfig",
    "TokenizerConfig",
    "PackConfig",
    "PreprocessJob",
    "DatasetSpec",
    "DataConfig",
    "ParallelConfig",
    "OptimConfig",
    "RampupConfig",
    "TrainConfig",
    "CheckpointConfig",
    "ScalingSection",
    "PretrainJob",
    "LoraConfig",
    "SftDataConfig",
    "FinetuneJob",
    "SearchSpace",
    "TuneSection",
    "TuneJob",
    "AutoscalingSection",
    "ServeSection",
    "ServeJob",
]
