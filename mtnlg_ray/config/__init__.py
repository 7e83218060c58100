"""Typed configs for every job: pydantic v2 models loaded from YAML, with `--set` overrides.

Each command has one top-level job model (PreprocessJob, PretrainJob, FinetuneJob, TuneJob,
ServeJob), made of sections; every model forbids unknown keys, so a typo is an error, not a
silent default. Names: a section model ends in `Config`, a command's model in `Job`; where Ray
has a class of the same idea (ray.train.DataConfig, CheckpointConfig, ScalingConfig, ray.tune's
TuneConfig, Serve's AutoscalingConfig) ours says what it holds: TrainDataConfig,
CheckpointingConfig, WorkerScalingConfig, SearchConfig, ReplicaAutoscalingConfig.

    base.py        Section (the base of every model), dump_yaml
    model.py       ModelConfig (the GPT), presets.py its named shapes
    preprocess.py  PreprocessJob: corpus, cleaning, tokenizer, packing
    train.py       PretrainJob: data, parallel, optim, train, checkpoint, scaling
    finetune.py    FinetuneJob: init_from, sft, lora + pretraining's sections
    tune.py        TuneJob: a FinetuneJob and the search over it
    serve.py       ServeJob: one OpenAI-compatible deployment
    worker.py      WorkerRunConfig: what the driver hands every training worker beside the job
    load.py        load_job (file or shipped name, --set, every problem at once), validate
    problems.py    a ValidationError as one line per problem, "did you mean" for unknown keys
    shipped.py     the configs shipped in mtnlg_ray/configs/, by name

`from mtnlg_ray.config import PretrainJob, load_job`. Ray hands `train_loop_config` to the
workers as a dict; they re-validate the job and the WorkerRunConfig with `validate`.
"""

from mtnlg_ray.config.base import Section, dump_yaml
from mtnlg_ray.config.model import ModelConfig
from mtnlg_ray.config.preprocess import CorpusConfig, CleanConfig, TokenizerConfig, PackConfig, PreprocessJob
from mtnlg_ray.config.train import (
    DatasetConfig,
    TrainDataConfig,
    ParallelConfig,
    OptimConfig,
    RampupConfig,
    TrackingConfig,
    TrainConfig,
    CheckpointingConfig,
    WorkerScalingConfig,
    PretrainJob,
)
from mtnlg_ray.config.finetune import LoraConfig, SftDataConfig, FinetuneJob
from mtnlg_ray.config.tune import HYPERPARAMETERS, SearchSpaceConfig, SearchConfig, TuneJob
from mtnlg_ray.config.serve import ReplicaAutoscalingConfig, ServeConfig, ServeJob, SpeculativeConfig
from mtnlg_ray.config.worker import WorkerRunConfig
from mtnlg_ray.config.load import JOBS, apply_overrides, load_job, load_yaml, validate

__all__ = [
    "HYPERPARAMETERS",
    "JOBS",
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
    "DatasetConfig",
    "TrainDataConfig",
    "ParallelConfig",
    "OptimConfig",
    "RampupConfig",
    "TrackingConfig",
    "TrainConfig",
    "CheckpointingConfig",
    "WorkerScalingConfig",
    "PretrainJob",
    "LoraConfig",
    "SftDataConfig",
    "FinetuneJob",
    "SearchSpaceConfig",
    "SearchConfig",
    "TuneJob",
    "ReplicaAutoscalingConfig",
    "ServeConfig",
    "SpeculativeConfig",
    "ServeJob",
    "WorkerRunConfig",
]
