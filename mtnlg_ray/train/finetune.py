"""Fine-tuning: task data -> the pretraining trainer, started from a checkpoint (full or LoRA).

    tokenizer <- the init checkpoint's tokenizer.model (or sft.tokenizer); its vocabulary must be the model's
    dataset   <- data/sft.py: masked (labels -100 on prompts), packed rows in output_dir
    baseline  <- validation loss of the initial weights (driver, CPU), for the before / after line
    result    <- build_trainer(job, bundle).fit(): the SAME trainer, loop, parallel layouts and
                 checkpoints as pretraining; the loop loads init_from, applies LoRA (model/lora.py)
                 with `model_transform`, and learns only where labels != -100

`init_from` is a native checkpoint, a Ray Train run directory (its latest valid checkpoint) or a
Hugging Face GPT-2 directory that holds our tokenizer.model (as `mtnlg export --format hf`
writes it): the chat template needs the tokenizer's role tokens. Re-running the same config
resumes from the run's latest checkpoint, as pretraining does (the dataset is rebuilt
identically: preparation is deterministic); `--resume never|PATH` and the check that the
checkpoint fits the job run in `plan_start`, before Ray starts (train/resume.py).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import NamedTuple

import ray.train
import torch

from mtnlg_ray.checkpoint.manifest import TOKENIZER
from mtnlg_ray.checkpoint.source import open_source
from mtnlg_ray.config import TrainDataConfig, DatasetConfig, FinetuneJob
from mtnlg_ray.data.dataset import open_datasets
from mtnlg_ray.data.sft import prepare_sft
from mtnlg_ray.data.tokenizer import Tokenizer
from mtnlg_ray.errors import UserError
from mtnlg_ray.fileio import file_sha256
from mtnlg_ray.model.gpt import lm_loss
from mtnlg_ray.train.batching import inputs_targets
from mtnlg_ray.train.evaluate import load_eval_set
from mtnlg_ray.train.failures import fit_and_report
from mtnlg_ray.train.plot import plot_run
from mtnlg_ray.train.preflight import check_finetune_inputs, model_config
from mtnlg_ray.train.resume import check_resume, identity
from mtnlg_ray.train.trainer import build_trainer, ensure_ray, run_dir_of

log = logging.getLogger(__name__)


def init_tokenizer(path: str | Path) -> Path:
    """The tokenizer.model that belongs to a fine-tuning start point (checkpoint, run dir or GPT-2 dir,
    or a run on s3:// / gs://, whose latest checkpoint is fetched to this node)."""
    tok = open_source(path).path / TOKENIZER
    if not tok.is_file():
        raise UserError(f"init_from: {path} has no {TOKENIZER}; fine-tuning needs the SentencePiece model the "
                        f"checkpoint was trained with (set sft.tokenizer to it)")
    return tok


def resolve_paths(job: FinetuneJob) -> FinetuneJob:
    """Absolute paths (Ray workers run in other directories); relative ones are from the current one."""
    sft = job.sft.model_copy(update={
        "train_paths": [str(Path(p).resolve()) if "://" not in p else p for p in job.sft.train_paths],
        "val_paths": [str(Path(p).resolve()) if "://" not in p else p for p in job.sft.val_paths],
        "tokenizer": str(Path(job.sft.tokenizer).resolve()) if job.sft.tokenizer else None,
    })
    init = job.init_from if "://" in job.init_from else str(Path(job.init_from).resolve())
    return job.model_copy(update={"init_from": init,
                                  "output_dir": str(Path(job.output_dir).resolve()), "sft": sft})


class Start(NamedTuple):
    """Where a fine-tuning run starts, checked before Ray starts (`plan_start`)."""

    job: FinetuneJob             # paths made absolute
    tokenizer: Path              # the tokenizer.model of the task data
    resume_from: str | None      # --resume PATH: the checkpoint a new run starts from


def plan_start(job: FinetuneJob, resume: str | None = None) -> Start:
    """The start point against the tokenizer, and with `resume` (auto, never or PATH) the run
    directory and the checkpoint it resumes from against the job (train/resume.py); no Ray.

    A model whose vocabulary differs from the tokenizer's, or whose context is shorter than
    sft.seq_len, is refused; so is a resume that changes the model, tokenizer, LoRA shape or task data."""
    check_finetune_inputs(job, None)  # paths; --resume below, once the job's identity is known
    job = resolve_paths(job)
    tok_path = Path(job.sft.tokenizer) if job.sft.tokenizer else init_tokenizer(job.init_from)
    cfg = model_config(job, Tokenizer(tok_path).vocab_size, job.sft.seq_len, tok_path)  # vocab and length checks
    start_from = None
    if resume is not None:
        ident = identity(job, cfg.model_dump(mode="json"), file_sha256(tok_path), job.sft.seq_len)
        start_from = check_resume(job, resume, ident)
    return Start(job, tok_path, start_from)


def prepare_data(job: FinetuneJob, require_val: bool = False, start: Start | None = None) -> FinetuneJob:
    """Write the task dataset (after `plan_start`'s checks, which `start` says were done); returns
    the resolved job. Splits too small for one micro-batch are refused (the loop could not train,
    or could not evaluate); so, with `require_val`, is a task without validation data."""
    job, tok_path, _ = start or plan_start(job)
    ensure_ray()
    splits = prepare_sft(job.sft, tok_path, job.output_dir)["splits"]
    mb = job.train.micro_batch_size
    for name in ("train", "val"):
        rows = splits[name]["rows"]
        if (rows or name == "train" or require_val) and rows < mb:
            raise UserError(f"{job.output_dir}: the {name} split holds {rows} rows of sft.seq_len={job.sft.seq_len}, "
                            f"fewer than train.micro_batch_size={mb}; add examples, set sft.packing: false "
                            "(one example per row), or lower micro_batch_size")
    return job


def open_task_data(job: FinetuneJob):
    """The prepared task dataset as the trainer's DatasetBundle."""
    return open_datasets(TrainDataConfig(datasets=[DatasetConfig(path=job.output_dir)], seed=job.sft.seed))


@torch.no_grad()
def baseline_val_loss(job: FinetuneJob, bundle) -> float | None:
    """Validation loss of the initial weights on the rows the loop evaluates (the first
    eval_batches micro-batches of the val stream), token-weighted like the loop's `evaluate`."""
    if bundle.val is None:
        return None
    model = open_source(job.init_from).model()
    total = tokens = 0.0
    for batch in load_eval_set(bundle.val, job.train.micro_batch_size, job.train.eval_batches):
        inp, tgt = inputs_targets(batch, torch.device("cpu"))
        n = float((tgt != -100).sum())
        total += float(lm_loss(model(inp), tgt)) * n
        tokens += n
    return total / tokens if tokens else None


def fit(job: FinetuneJob, bundle, callbacks=None, resume_from: str | None = None) -> ray.train.Result:
    """Run (or resume) the fine-tuning job on Ray Train with the pretraining trainer."""
    return fit_and_report(build_trainer(job, bundle, callbacks=callbacks, resume_from=resume_from))


def run_finetune(job: FinetuneJob, resume: str = "auto") -> ray.train.Result:
    """`mtnlg finetune`: prepare the task data, report the starting validation loss, train, summarise.
    `resume`: auto, never or a checkpoint path (train/resume.py), checked before Ray starts."""
    start = plan_start(job, resume)
    job = prepare_data(job, start=start)
    bundle = open_task_data(job)
    before = baseline_val_loss(job, bundle) if job.baseline_eval else None
    if before is not None:
        log.info("validation loss of %s: %.4f (ppl %.2f)", job.init_from, before, math.exp(min(before, 50)))
    run_dir = run_dir_of(job)[1]
    mode = f"LoRA rank {job.lora.rank} on {', '.join(job.lora.target_modules)}" if job.lora else "full fine-tuning"
    log.info("fine-tuning (%s); run directory: %s", mode, run_dir)
    result = fit(job, bundle, resume_from=start.resume_from)
    for path in plot_run(run_dir):
        log.info("wrote %s", path)
    after = (result.metrics or {}).get("val_loss")
    if after is not None:
        line = f"validation loss after {result.metrics['step']} steps: {after:.4f}"
        log.info("%s", line + (f" (before: {before:.4f})" if before is not None else ""))
    if result.checkpoint is not None:
        log.info("export the merged model with: mtnlg export %s --out %s/export", run_dir, run_dir)
    return result
