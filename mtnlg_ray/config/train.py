"""Training job configs: pretraining (data, parallel layout, optimizer, schedule, checkpoints,
scaling), fine-tuning (SFT data, LoRA) and hyperparameter search."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from mtnlg_ray.config.base import Section
from mtnlg_ray.config.model import ModelConfig


# ------------------------------------------------------------------------------------- training
class DatasetSpec(Section):
    path: str
    weight: float = Field(1.0, gt=0)


class DataConfig(Section):
    """Dataset directories written by preprocess, blended by weight (Megatron semantics)."""

    datasets: list[DatasetSpec] = Field(default_factory=list)
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


class CheckpointConfig(Section):
    interval: int = Field(50, ge=0, description="steps between checkpoints; 0: only at the end of the run "
                          "(a failure then restarts from scratch)")
    num_to_keep: int = Field(2, gt=0)


class ScalingSection(Section):
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
    model: ModelConfig = Field(default_factory=lambda: ModelConfig(preset="debug"))
    data: DataConfig = Field(default_factory=DataConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    scaling: ScalingSection = Field(default_factory=ScalingSection)


# ----------------------------------------------------------------------------------- fine-tuning
LoraTarget = Literal["q_proj", "k_proj", "v_proj", "out_proj", "up_proj", "down_proj"]


class LoraConfig(Section):
    """LoRA adapters (model/lora.py): base weights frozen, W + alpha/rank * B @ A learned."""

    rank: int = Field(8, gt=0)
    alpha: float = Field(16.0, gt=0, description="update scale is alpha / rank")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter input")
    target_modules: list[LoraTarget] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"],
                                             min_length=1, description="the model's own linear module names")


class SftDataConfig(Section):
    """Task data (data/sft.py): JSONL ({prompt, response}, OpenAI messages, ShareGPT, Alpaca) or a built-in task."""

    task: Literal["jsonl", "stdlib_code", "stdlib_summarize", "stdlib_dialogue"] = Field(
        "jsonl", description="jsonl: the files in train_paths; built in, mined from the .py files in train_paths "
        "(default: the Python standard library; data/stdlib_tasks.py): stdlib_code (signature + docstring -> "
        "body), stdlib_summarize (docstring body -> summary line), stdlib_dialogue (questions about a module "
        "answered from its docstrings)")
    train_paths: list[str] = Field(default_factory=list, description="JSONL files, directories or globs")
    val_paths: list[str] = Field(default_factory=list, description="validation JSONL; empty: val_fraction of train")
    val_fraction: float = Field(0.1, ge=0, lt=1, description="examples sent to val by a seeded content hash")
    seq_len: int = Field(256, gt=0, description="rows hold seq_len + 1 tokens; at most the model's max_seq_len")
    packing: bool = Field(True, description="several whole examples per row; false: one padded example per row")
    overlong: Literal["truncate", "drop"] = Field("truncate", description="an example longer than a row")
    max_bad_fraction: float = Field(0.05, ge=0, le=1, description="bad lines skipped up to this fraction, else refused")
    max_examples: int | None = Field(None, gt=0, description="read at most this many examples (per input)")
    tokenizer: str | None = Field(None, description="tokenizer.model to use; None: the init checkpoint's")
    seed: int = 1234


class FinetuneJob(Section):
    init_from: str = Field(description="native checkpoint, run directory, or Hugging Face GPT-2 directory")
    sft: SftDataConfig = Field(default_factory=SftDataConfig)
    output_dir: str = Field("data_out/sft", description="where the tokenized task dataset is written")
    lora: LoraConfig | None = Field(None, description="LoRA adapters; None: full fine-tuning")
    baseline_eval: bool = Field(True, description="evaluate the initial weights on the val set first (in the "
                                "driver process, on CPU: turn off for models too large for it)")
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    optim: OptimConfig = Field(default_factory=lambda: OptimConfig(lr=1e-4))
    train: TrainConfig = Field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    scaling: ScalingSection = Field(default_factory=lambda: ScalingSection(name="finetune"))


HYPERPARAMETERS = {  # search-space name -> the FinetuneJob key it sets
    "lr": "optim.lr", "global_batch_size": "train.global_batch_size",
    "warmup_tokens": "optim.warmup_tokens", "lora_rank": "lora.rank",
}


class SearchSpace(Section):
    """Values to try for each hyperparameter (a grid); names are checked (unknown names are refused)."""

    lr: list[float] | None = Field(None, min_length=1)
    global_batch_size: list[int] | None = Field(None, min_length=1)
    warmup_tokens: list[int] | None = Field(None, min_length=1)
    lora_rank: list[int] | None = Field(None, min_length=1, description="needs a finetune.lora section")

    @model_validator(mode="before")
    @classmethod
    def _known_names(cls, data: Any) -> Any:
        if isinstance(data, dict):
            unknown = [k for k in data if k not in HYPERPARAMETERS]
            if unknown:
                raise ValueError(f"got unknown hyperparameter {unknown[0]!r} (searchable: {', '.join(HYPERPARAMETERS)})")
        return data

    def grid(self) -> dict[str, list]:
        """{name: values} of the hyperparameters given."""
        return {k: v for k, v in self.model_dump().items() if v is not None}


class TuneSection(Section):
    search_space: SearchSpace = Field(default_factory=SearchSpace)
    num_samples: int = Field(1, gt=0, description="repeats of the grid")
    max_concurrent_trials: int = Field(1, gt=0)
    grace_period: int = Field(1, gt=0, description="ASHA: evaluations before a trial may stop")
    reduction_factor: int = Field(2, gt=1)
    best_config_out: str = Field("best_finetune.yaml", description="the best trial's FinetuneJob, as YAML")

    @model_validator(mode="after")
    def _not_empty(self) -> "TuneSection":
        if not self.search_space.grid():
            raise ValueError(f"search_space: empty (got no values; searchable: {', '.join(HYPERPARAMETERS)})")
        return self


class TuneJob(Section):
    finetune: FinetuneJob
    tune: TuneSection

    @model_validator(mode="after")
    def _space(self) -> "TuneJob":
        if "lora_rank" in self.tune.search_space.grid() and self.finetune.lora is None:
            raise ValueError("tune.search_space.lora_rank: needs a finetune.lora section (got lora: null, "
                             "i.e. full fine-tuning)")
        return self
