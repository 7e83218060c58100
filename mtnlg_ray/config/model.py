"""The GPT architecture config (presets.py fills it)."""

from __future__ import annotations

import difflib
import math
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from mtnlg_ray.config.base import Section
from mtnlg_ray.config.presets import PRESETS
from mtnlg_ray.errors import ConfigError


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
            name = data["preset"]
            if name not in PRESETS:
                close = difflib.get_close_matches(str(name), PRESETS, n=1, cutoff=0.8)
                mean = f"did you mean {close[0]!r}? " if close else ""
                raise ValueError(f"unknown preset {name!r} ({mean}known: {', '.join(PRESETS)})")
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
