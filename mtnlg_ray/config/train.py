"""Pretraining job config: the blended datasets, parallel layout, optimizer and schedule, the
training loop, checkpointing and the Ray Train workers. Fine-tuning (finetune.py) reuses every
section but the data."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from mtnlg_ray.config.base import Section
from mtnlg_ray.config.model import ModelConfig


# ------------------------------------------------------------------------------------- training
class DatasetConfig(Section):
    """One dataset directory written by preprocess, and its share of the blend."""

    path: str
    weight: float = Field(1.0, gt=0)


class TrainDataConfig(Section):
    """Dataset directories written by preprocess, blended by weight (Megatron semantics)."""

    datasets: list[DatasetConfig] = Field(default_factory=list)
    seed: int = 1234


class ParallelConfig(Section):
    """Mesh = pp x dp x tp (tp fastest-varying); dp = -1 fills the rest of the world size.
    Checked against the model and world size by `mtnlg_ray.parallel.check_layout`."""

    tp: int = Field(1, gt=0, description="tensor-parallel ranks (Megatron layout); must divide n_heads")
    pp: int = Field(1, gt=0, description="pipeline stages; pp > 1 needs model.tie_embeddings: false")
    dp: int = Field(-1, description="data-parallel ranks; -1: world_size / (tp * pp)")
    data_parallel: Literal["fsdp", "ddp"] = Field("fsdp", description="fsdp: FSDP2 ZeRO-3 sharding; ddp: replicas")
    sequence_parallel: bool = Field(False, description="with tp > 1: also split norms/residual along the sequence")
    pp_schedule: Literal["1f1b", "interleaved_1f1b", "gpipe"] = "1f1b"
    pp_microbatches: int = Field(2, gt=0, description="chunks each micro-batch is split into along the batch "
                                 "for the pipeline; must divide micro_batch_size")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 on CUDA, fp32 on CPU")


class OptimConfig(Section):
    """AdamW + linear warmup + cosine decay to a floor (MT-NLG: 10% of lr). The schedule's lengths
    are given in tokens (Megatron) or in optimizer steps (nanoGPT), at most one of each pair; the
    floor as a ratio of lr or as an absolute min_lr, at most one of them."""

    lr: float = Field(6e-4, gt=0)
    min_lr_ratio: float | None = Field(None, ge=0, le=1, description="floor of the cosine as a fraction of lr "
                                       "(None and no min_lr: 0.1, as MT-NLG)")
    min_lr: float | None = Field(None, ge=0, description="floor of the cosine as an absolute value "
                                 "(instead of min_lr_ratio)")
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    grad_clip: float = Field(1.0, ge=0, description="0 disables clipping")
    implementation: Literal["fused", "foreach", "for-loop"] = Field(
        "fused", description="torch's AdamW kernel: fused (all parameters in one kernel, torchtitan's default; "
        "on CPU ~3x faster than the for-loop), foreach, or the per-parameter for-loop")
    warmup_tokens: int = Field(0, ge=0, description="linear warmup from 0 to lr over this many tokens")
    warmup_steps: int | None = Field(None, ge=0, description="linear warmup over this many optimizer steps "
                                     "(instead of warmup_tokens)")
    decay_tokens: int | None = Field(None, gt=0, description="tokens at which the cosine reaches the floor "
                                     "(counted from 0, warmup included); None: the whole run")
    decay_steps: int | None = Field(None, gt=0, description="optimizer steps at which the cosine reaches the "
                                    "floor (instead of decay_tokens)")

    @model_validator(mode="after")
    def _one_of_each_pair(self) -> "OptimConfig":
        # judged on values, not on which fields were typed: the worker re-validates a full dump
        for a, b in (("warmup_tokens", "warmup_steps"), ("decay_tokens", "decay_steps"), ("min_lr_ratio", "min_lr")):
            a_given = getattr(self, a) is not None and not (a == "warmup_tokens" and self.warmup_tokens == 0)
            if a_given and getattr(self, b) is not None:
                raise ValueError(f"{a} and {b} are two ways to set the same thing: give one of them")
        if self.min_lr is not None and self.min_lr > self.lr:
            raise ValueError(f"min_lr={self.min_lr} exceeds lr={self.lr}")
        if self.decay_tokens is not None and self.decay_tokens <= self.warmup_tokens:
            raise ValueError(f"decay_tokens={self.decay_tokens} must exceed warmup_tokens={self.warmup_tokens}")
        if self.decay_steps is not None and self.warmup_steps is not None and self.decay_steps <= self.warmup_steps:
            raise ValueError(f"decay_steps={self.decay_steps} must exceed warmup_steps={self.warmup_steps}")
        return self

    @property
    def floor(self) -> float:
        """The learning rate the cosine decays to."""
        if self.min_lr is not None:
            return self.min_lr
        return self.lr * (0.1 if self.min_lr_ratio is None else self.min_lr_ratio)


class RampupConfig(Section):
    """Megatron batch ramp-up: start, +increment every samples/((global-start)/increment) samples."""

    start: int = Field(gt=0)
    increment: int = Field(gt=0)
    samples: int = Field(gt=0)


LoggerName = Literal["tensorboard", "mlflow", "wandb"]


class TrackingConfig(Section):
    """Where the experiment trackers of `train.loggers` write (train/trackers.py). A tracker library's
    own environment variables (MLFLOW_TRACKING_URI, WANDB_MODE, WANDB_API_KEY, ...) apply where a key
    here is None."""

    project: str = Field("mtnlg", description="W&B project; MLflow experiment of runs without a group")
    group: str | None = Field(None, description="runs that belong together: W&B group, MLflow experiment "
                              "(mtnlg tune sets it to the search's name: one tracked run per trial)")
    mlflow_uri: str | None = Field(None, description="MLflow tracking URI (http://HOST:5000, sqlite:///mlflow.db, "
                                   "a directory); None: $MLFLOW_TRACKING_URI, else the file store "
                                   "STORAGE_PATH/mlruns beside the run directories")
    wandb_mode: Literal["online", "offline", "disabled"] | None = Field(
        None, description="None: $WANDB_MODE, else online when W&B has an API key (WANDB_API_KEY or wandb login), "
        "else offline (RUN_DIR/wandb; `wandb sync` uploads it later)")


class TrainConfig(Section):
    """The loop: batch sizes, steps, logging and evaluation intervals, seed, device, trackers."""

    global_batch_size: int = Field(16, gt=0, description="sequences per optimizer step, whatever the worker count")
    micro_batch_size: int = Field(4, gt=0, description="at most this many sequences per worker per forward")
    rampup: RampupConfig | None = None
    max_steps: int = Field(100, gt=0)
    log_interval: int = Field(10, gt=0)
    eval_interval: int = Field(50, gt=0)
    eval_batches: int | Literal["all"] = Field(4, description="validation micro-batches per evaluation "
                                               "(the first of the seeded order), or all: the whole split")
    eval_at_start: bool = Field(False, description="also evaluate the initial weights (a step-0 record)")
    compile: bool = Field(False, description="torch.compile each transformer block (Inductor), as torchtitan; "
                          "the first steps pay the compilation")
    seed: int = 1234
    device: Literal["auto", "cpu", "cuda"] = "auto"
    peak_flops: float | None = Field(None, gt=0, description="FLOP/s per device for MFU; None: measured")
    kill_at_step: int | None = Field(None, gt=0, description="fault injection for testing recovery: the rank-0 "
                                     "worker kills its own process after this step, once per run directory")
    loggers: list[LoggerName] = Field(default_factory=lambda: ["tensorboard"], description="experiment trackers "
                                      "that rank 0 writes at each log interval and evaluation: tensorboard (event "
                                      "files in the run directory), mlflow, wandb (pip install 'mtnlg-ray[tracking]')")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _rampup_fits(self) -> "TrainConfig":
        if isinstance(self.eval_batches, int) and self.eval_batches < 1:
            raise ValueError(f"eval_batches must be >= 1 or 'all' (got {self.eval_batches})")
        if len(set(self.loggers)) < len(self.loggers):
            raise ValueError(f"loggers: each tracker at most once (got {self.loggers})")
        r = self.rampup
        if r is not None:
            if r.start > self.global_batch_size:
                raise ValueError(f"rampup.start={r.start} exceeds global_batch_size={self.global_batch_size}")
            if (self.global_batch_size - r.start) % r.increment:
                raise ValueError(f"rampup.increment={r.increment} must divide global_batch_size - start = "
                                 f"{self.global_batch_size - r.start}")
        # No divisibility between the global batch, micro_batch_size and the worker count:
        # the loop deals any global batch out to any number of ranks (train/batching.py).
        return self


class CheckpointingConfig(Section):
    """When the loop saves a sharded checkpoint, and how many Ray Train keeps."""

    interval: int = Field(50, ge=0, description="steps between checkpoints; 0: only at the end of the run "
                          "(a failure then restarts from scratch)")
    num_to_keep: int = Field(2, gt=0)


class WorkerScalingConfig(Section):
    """Ray Train layout. num_workers: N, or [min, max] for an elastic run: Ray Train starts (and after a
    failure restarts) it with any count in the range the cluster holds; each must fit the tp x pp layout."""

    num_workers: int | tuple[int, int] = 1
    use_gpu: bool = False
    cpus_per_worker: float = Field(0.5, gt=0, description="CPUs Ray reserves per worker (scheduling only; "
                                   "see threads_per_worker)")
    threads_per_worker: int | None = Field(None, gt=0, description="torch threads each worker computes with; "
                                           "None: the node's CPUs shared among the training workers on it")
    gpus_per_worker: float = Field(0, ge=0)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    max_failures: int = Field(0, ge=-1)
    storage_path: str = Field("runs", description="run directory root: a local path, or s3:// gs:// ... "
                              "(on a multi-node cluster it must be shared: see train/storage.py)")
    shared_storage: bool = Field(False, description="declare that the local storage_path is the same shared "
                                 "mount on every node (when it is not a detected network filesystem)")
    name: str = "pretrain"

    @field_validator("num_workers")
    @classmethod
    def _workers(cls, v):
        lo, hi = (v, v) if isinstance(v, int) else v
        if lo < 1 or hi < lo:
            raise ValueError(f"need 1 <= min <= max (got {v})")
        return v


class PretrainJob(Section):
    """`mtnlg pretrain`: a GPT trained from scratch on preprocessed dataset directories."""

    model: ModelConfig = Field(default_factory=lambda: ModelConfig(preset="debug"))
    data: TrainDataConfig = Field(default_factory=TrainDataConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    checkpoint: CheckpointingConfig = Field(default_factory=CheckpointingConfig)
    scaling: WorkerScalingConfig = Field(default_factory=WorkerScalingConfig)
