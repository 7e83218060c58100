"""Typed configs for every job: pydantic v2 models loaded from YAML, with `--set` overrides.

Each job has one top-level model (PreprocessJob, PretrainJob, FinetuneJob, TuneJob, ServeJob)
made of sections. Every model forbids unknown keys, so a typo is an error, not a silent default.
`load_job(path, Job, overrides)` raises `ConfigError` with one line naming the file and the
dotted key path, e.g. `pretrain.yaml: model.n_heads: must divide d_model=512 (got 7)`.
Ray hands `train_loop_config` to workers as a dict; they re-validate it with `Job.model_validate`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mtnlg_ray.errors import ConfigError


class Section(BaseModel):
    """Base of every config model: unknown keys are refused."""

    model_config = ConfigDict(extra="forbid")


# ---------------------------------------------------------------------------------------- model
class ModelConfig(Section):
    """The GPT architecture. `preset` fills every field it names; explicit fields override it."""

    preset: str | None = None
    vocab_size: int | None = Field(None, gt=0, description="real vocabulary size; None: from the tokenizer")
    pad_vocab_multiple: int = Field(128, gt=0, description="embedding rows padded to this multiple (Megatron)")
    n_layers: int = Field(4, gt=0)
    d_model: int = Field(128, gt=0)
    n_heads: int = Field(4, gt=0)
    mlp_ratio: float = Field(4.0, gt=0, description="MLP hidden width = mlp_ratio * d_model")
    max_seq_len: int = Field(256, gt=0, description="context length in tokens")
    position: Literal["learned", "rotary"] = "learned"
    rotary_base: float = Field(10000.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    bias: bool = True
    tie_embeddings: bool = True
    init_std: float = Field(0.02, gt=0, description="std of the normal init; residual projections / sqrt(2 L)")
    layernorm_eps: float = Field(1e-5, gt=0)
    activation_checkpointing: bool = False

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("preset") is not None:
            from mtnlg_ray.model.presets import PRESETS

            name = data["preset"]
            if name not in PRESETS:
                raise ValueError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})")
            data = {**PRESETS[name], **data}
        return data

    @field_validator("n_heads")
    @classmethod
    def _heads_divide_width(cls, v: int, info) -> int:
        d = info.data.get("d_model")
        if d is not None and d % v:
            raise ValueError(f"must divide d_model={d} (got {v})")
        if d is not None and (d // v) % 2:
            raise ValueError(f"head size d_model/n_heads must be even (got {d}/{v})")
        return v

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def d_mlp(self) -> int:
        return int(round(self.mlp_ratio * self.d_model))

    @property
    def padded_vocab_size(self) -> int:
        if self.vocab_size is None:
            raise ConfigError("model.vocab_size: not set (it comes from the tokenizer)")
        m = self.pad_vocab_multiple
        return int(math.ceil(self.vocab_size / m) * m)


# ----------------------------------------------------------------------------------------- data
class CorpusConfig(Section):
    """One corpus: the built-in stdlib sources, or text / JSONL / Parquet files (paths, dirs, globs)."""

    kind: Literal["stdlib", "text", "jsonl", "parquet"] = "stdlib"
    paths: list[str] = Field(default_factory=list, description="files, directories or globs; any pyarrow.fs URI")
    text_mode: Literal["file", "line", "paragraph"] = "file"
    text_field: str = Field("text", description="JSONL field / Parquet column holding the document")
    max_files: int | None = Field(None, gt=0, description="read at most this many files (sorted order)")

    @model_validator(mode="after")
    def _paths_needed(self) -> "CorpusConfig":
        if self.kind != "stdlib" and not self.paths:
            raise ValueError(f"kind={self.kind} needs at least one entry in paths")
        return self


class CleanConfig(Section):
    """Normalisation, length filter, exact and MinHash/LSH near-duplicate removal."""

    min_chars: int = Field(64, ge=0)
    max_chars: int = Field(200_000, gt=0)
    exact_dedup: bool = True
    near_dedup: bool = True
    shingle_size: int = Field(5, gt=0, description="words per shingle")
    num_perm: int = Field(128, gt=0)
    bands: int = Field(16, gt=0, description="LSH bands; rows per band = num_perm / bands")
    threshold: float = Field(0.8, gt=0, le=1, description="Jaccard similarity counted as a duplicate")
    max_bad_fraction: float = Field(0.05, ge=0, le=1)

    @field_validator("bands")
    @classmethod
    def _bands_divide(cls, v: int, info) -> int:
        p = info.data.get("num_perm")
        if p is not None and p % v:
            raise ValueError(f"must divide num_perm={p} (got {v})")
        return v


class TokenizerConfig(Section):
    """Train a SentencePiece model on a sample of the cleaned corpus, or load `path`."""

    path: str | None = None
    model_type: Literal["bpe", "unigram", "char"] = "bpe"
    vocab_size: int = Field(4096, gt=0)
    byte_fallback: bool = True
    sample_docs: int = Field(2000, gt=0, description="documents sampled for training")
    max_sentence_length: int = Field(8192, gt=0)


class PackConfig(Section):
    """Tokenize on an actor pool, EOD after each document, pack into rows of seq_len + 1 ids."""

    seq_len: int = Field(256, gt=0, description="rows hold seq_len + 1 token ids")
    val_fraction: float = Field(0.02, ge=0, lt=1, description="documents sent to val, by content hash")
    rows_per_shard: int = Field(4096, gt=0)
    num_actors: int = Field(2, gt=0, description="tokenizer actors in the Ray Data pool")


class PreprocessJob(Section):
    """`mtnlg preprocess`: corpus -> cleaned, deduplicated, tokenized, packed dataset directory."""

    corpus: CorpusConfig = Field(default_factory=CorpusConfig)
    val_corpus: CorpusConfig | None = Field(None, description="explicit validation corpus (replaces val_fraction)")
    clean: CleanConfig = Field(default_factory=CleanConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    pack: PackConfig = Field(default_factory=PackConfig)
    output_dir: str = "data_out/stdlib"
    seed: int = 1234


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
    """AdamW + linear warmup + cosine decay to min_lr_ratio * lr (MT-NLG: 10%)."""

    lr: float = Field(6e-4, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    grad_clip: float = Field(1.0, ge=0, description="0 disables clipping")
    warmup_tokens: int = Field(0, ge=0, description="linear warmup from 0 to lr over this many tokens")
    decay_tokens: int | None = Field(None, gt=0, description="tokens at which the cosine reaches min_lr_ratio * lr "
                                     "(counted from 0, warmup included); None: the whole run")

    @model_validator(mode="after")
    def _decay_after_warmup(self) -> "OptimConfig":
        if self.decay_tokens is not None and self.decay_tokens <= self.warmup_tokens:
            raise ValueError(f"decay_tokens={self.decay_tokens} must exceed warmup_tokens={self.warmup_tokens}")
        return self


class RampupConfig(Section):
    """Megatron batch ramp-up: start, +increment every samples/((global-start)/increment) samples."""

    start: int = Field(gt=0)
    increment: int = Field(gt=0)
    samples: int = Field(gt=0)


class TrainConfig(Section):
    global_batch_size: int = Field(16, gt=0, description="sequences per optimizer step, whatever the worker count")
    micro_batch_size: int = Field(4, gt=0, description="at most this many sequences per worker per forward")
    rampup: RampupConfig | None = None
    max_steps: int = Field(100, gt=0)
    log_interval: int = Field(10, gt=0)
    eval_interval: int = Field(50, gt=0)
    eval_batches: int = Field(4, gt=0)
    seed: int = 1234
    device: Literal["auto", "cpu", "cuda"] = "auto"
    peak_flops: float | None = Field(None, gt=0, description="FLOP/s per device for MFU; None: measured")
    kill_at_step: int | None = Field(None, gt=0, description="fault injection for testing recovery: the rank-0 "
                                     "worker kills its own process after this step, once per run directory")

    @model_validator(mode="after")
    def _rampup_fits(self) -> "TrainConfig":
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
    interval: int = Field(50, gt=0, description="steps between checkpoints")
    num_to_keep: int = Field(2, gt=0)


class ScalingSection(Section):
    """Ray Train layout. num_workers: N, or [min, max] for an elastic run: Ray Train starts (and after a
    failure restarts) it with any count in the range the cluster holds; each must fit the tp x pp layout."""

    num_workers: int | tuple[int, int] = 1
    use_gpu: bool = False
    cpus_per_worker: float = Field(0.5, gt=0)
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
    """Task data (data/sft.py): JSONL of {prompt, response} or {messages: [...]}, or the built-in code task."""

    task: Literal["jsonl", "stdlib_code"] = Field(
        "jsonl", description="jsonl: the files in train_paths; stdlib_code: (signature + docstring -> body) "
        "pairs mined from the .py files in train_paths (default: the Python standard library)")
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


# -------------------------------------------------------------------------------------- serving
class AutoscalingSection(Section):
    """Ray Serve autoscaling_config (validated here: Serve ignores misspelled keys)."""

    min_replicas: int = Field(1, ge=0, description="0 lets the deployment scale to zero when idle")
    max_replicas: int = Field(1, gt=0)
    target_ongoing_requests: float = Field(8, gt=0, description="ongoing requests per replica the autoscaler aims at")
    upscale_delay_s: float = Field(5.0, ge=0)
    downscale_delay_s: float = Field(30.0, ge=0)

    @model_validator(mode="after")
    def _range(self) -> "AutoscalingSection":
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas={self.max_replicas} < min_replicas={self.min_replicas}")
        return self


class ServeSection(Section):
    """One OpenAI-compatible deployment: the model, the engine's KV-cache pool, Serve's limits."""

    checkpoint: str = Field(description="native checkpoint, Ray Train run directory, or GPT-2 directory")
    model_name: str = Field("mtnlg", description="the `model` clients send; others get 404")
    host: str = Field("127.0.0.1", description="HTTP host (mtnlg serve; a Serve config sets http_options)")
    port: int = Field(8000, ge=0, lt=65536)
    max_batch_slots: int = Field(8, gt=0, description="sequences decoded together (KV-cache rows)")
    max_context: int | None = Field(None, gt=0, description="tokens per slot; None: the model's max_seq_len")
    max_waiting: int = Field(64, ge=0, description="engine queue bound beyond the slots")
    max_ongoing_requests: int = Field(32, gt=0, description="requests Serve sends one replica at a time")
    max_queued_requests: int = Field(64, ge=-1, description="requests queued per caller beyond that; -1: no bound")
    retry_after_s: float = Field(1.0, ge=0, description="Retry-After of 503 answers when overloaded")
    max_body_bytes: int = Field(1_000_000, gt=0, description="larger request bodies get 413")
    num_cpus: float = Field(1.0, ge=0, description="per replica")
    num_gpus: float = Field(0.0, ge=0, description="per replica")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    health_check_period_s: float = Field(10.0, gt=0, description="Serve calls check_health this often")
    autoscaling: AutoscalingSection = Field(default_factory=AutoscalingSection)

    @model_validator(mode="after")
    def _engine_holds_ongoing(self) -> "ServeSection":
        held = self.max_batch_slots + self.max_waiting
        if self.max_ongoing_requests > held:
            raise ValueError(f"max_ongoing_requests={self.max_ongoing_requests} exceeds what one replica's engine "
                             f"holds (max_batch_slots + max_waiting = {held})")
        return self


class ServeJob(Section):
    serve: ServeSection


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
