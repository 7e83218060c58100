"""Hyperparameter search job config: a fine-tuning job and the grid searched over it on Ray Tune."""

from __future__ import annotations

from pydantic import Field, model_validator

from mtnlg_ray.config.base import Section
from mtnlg_ray.config.finetune import FinetuneJob

HYPERPARAMETERS = {  # search-space name -> the FinetuneJob key it sets
    "lr": "optim.lr", "global_batch_size": "train.global_batch_size",
    "warmup_tokens": "optim.warmup_tokens", "lora_rank": "lora.rank",
}


class SearchSpaceConfig(Section):
    """Values to try for each hyperparameter (a grid); any other name is refused as an unknown key."""

    lr: list[float] | None = Field(None, min_length=1)
    global_batch_size: list[int] | None = Field(None, min_length=1)
    warmup_tokens: list[int] | None = Field(None, min_length=1)
    lora_rank: list[int] | None = Field(None, min_length=1, description="needs a finetune.lora section")

    def grid(self) -> dict[str, list]:
        """{name: values} of the hyperparameters given."""
        return {k: v for k, v in self.model_dump().items() if v is not None}


class SearchConfig(Section):
    """The search: a grid over `search_space`, repeated num_samples times, ASHA stopping laggards."""

    search_space: SearchSpaceConfig = Field(default_factory=SearchSpaceConfig)
    num_samples: int = Field(1, gt=0, description="repeats of the grid")
    max_concurrent_trials: int = Field(1, gt=0)
    grace_period: int = Field(1, gt=0, description="ASHA: evaluations before a trial may stop")
    reduction_factor: int = Field(2, gt=1)
    best_config_out: str = Field("best_finetune.yaml", description="the best trial's FinetuneJob, as YAML")

    @model_validator(mode="after")
    def _not_empty(self) -> "SearchConfig":
        if not self.search_space.grid():
            raise ValueError(f"search_space: empty (got no values; searchable: {', '.join(HYPERPARAMETERS)})")
        return self


class TuneJob(Section):
    """`mtnlg tune`: one fine-tuning job, searched over on Ray Tune (train/tune.py)."""

    finetune: FinetuneJob
    tune: SearchConfig

    @model_validator(mode="after")
    def _space(self) -> "TuneJob":
        if "lora_rank" in self.tune.search_space.grid() and self.finetune.lora is None:
            raise ValueError("tune.search_space.lora_rank: needs a finetune.lora section (got lora: null, "
                             "i.e. full fine-tuning)")
        return self
