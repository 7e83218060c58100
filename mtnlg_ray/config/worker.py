"""What the driver settles for a training run and hands every Ray Train worker beside the job.

Ray passes `train_loop_config` to the workers as a dict: {"kind": "pretrain" | "finetune",
"job": the job, "run": a WorkerRunConfig}. The worker validates both halves on its first line
(train/loop.py), so a field added here is checked on both sides.
"""

from __future__ import annotations

from pydantic import Field

from mtnlg_ray.config.base import Section
from mtnlg_ray.config.model import ModelConfig


class WorkerRunConfig(Section):
    """The run as the driver found it: the model with the dataset's vocabulary, the data's shape,
    where rank 0 writes, and what each checkpoint records for a later resume."""

    model: ModelConfig = Field(description="the job's model, vocab_size from the dataset's tokenizer")
    seq_len: int = Field(gt=0, description="tokens per row of the dataset (rows hold seq_len + 1 ids)")
    tokenizer_path: str = Field(description="absolute path of the dataset's tokenizer.model")
    train_rows: int = Field(ge=0, description="rows of one epoch of the train split")
    metrics_dir: str = Field(description="the run directory: metrics.jsonl, plots, error.log")
    start_time: float = Field(description="time.time() when the command started the run")
    niceness: int = Field(0, description="the driver's niceness, which the workers take back (loop.claim_cores)")
    identity: dict | None = Field(None, description="saved in every checkpoint: what a resume is compared with "
                                  "(train/resume.py)")
    resume_from: str | None = Field(None, description="--resume PATH: the checkpoint a new run starts from")
