"""LoRA (Hu et al., 2021): trainable low-rank adapters beside the frozen linear layers of the GPT.

A targeted `nn.Linear` y = x W^T + b becomes

    y = x W^T + b + (alpha / r) * dropout(x) A^T B^T,    A: (r, in), B: (out, r)

with W and b frozen, A ~ kaiming-uniform (as in the reference implementation and PEFT) and B = 0,
so the adapted model starts exactly equal to the base model.

Parameter names. `LoraLinear` is a subclass of `nn.Linear` that keeps the base `weight` / `bias`
under their original names and adds two parameters beside them:

    blocks.0.attn.q_proj.weight   (unchanged: a base checkpoint loads as is, TP plans still apply)
    blocks.0.attn.q_proj.lora_A   (r, in)
    blocks.0.attn.q_proj.lora_B   (out, r)

Initialisation on the meta device. The trainer builds the GPT on meta, calls `apply_lora`, shards,
then `to_empty` + `GPT.init_weights()`: that method calls `init_weights()` of every submodule that
has one, which is where `LoraLinear` (re)initialises its adapters. Base weights are then loaded from
the init checkpoint with the adapter keys allowed to be missing (they are not in a base checkpoint).

Export. A LoRA run's checkpoints hold `lora_A` / `lora_B`; `merge_lora_state` folds them into plain
weights (W + alpha / r * B @ A) so exported checkpoints are ordinary GPT state dicts.

Plain torch: no Ray, no torch.distributed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mtnlg_ray.config import LoraConfig

LORA_A, LORA_B = "lora_A", "lora_B"


class LoraLinear(nn.Linear):
    """An `nn.Linear` with a frozen base weight and a trainable rank-r update (see module docstring)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        nn.Module.__init__(self)  # not nn.Linear.__init__: reuse base's tensors, allocate nothing twice
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.register_parameter("bias", base.bias)
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **kw))  # (r, in)
        self.lora_B = nn.Parameter(torch.empty(self.out_features, rank, **kw))  # (out, r)
        self.lora_dropout = nn.Dropout(dropout)
        if base.weight.device.type != "meta":
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Adapters only (the base weight belongs to the GPT's init or the checkpoint): B = 0."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)  # (..., out)
        update = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)  # (..., r) -> (..., out)
        return y + self.scale * update

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}"


def apply_lora(model: nn.Module, cfg: LoraConfig) -> None:
    """Wrap every nn.Linear whose own name is in `cfg.target_modules`; freeze everything else.

    In place, on any device including meta. Raises ValueError when no module matched."""
    targets = set(cfg.target_modules)
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = 0
    for mod in list(model.modules()):
        for child_name, child in list(mod.named_children()):
            if child_name in targets and type(child) is nn.Linear:
                setattr(mod, child_name, LoraLinear(child, cfg.rank, cfg.alpha, cfg.dropout))
                wrapped += 1
    if wrapped == 0:
        raise ValueError(f"lora.target_modules={sorted(targets)}: no module of the model matched")


def lora_parameter_names(model: nn.Module) -> list[str]:
    """Names of the adapter parameters (the only trainable ones after `apply_lora`)."""
    return [n for n, _ in model.named_parameters() if n.rsplit(".", 1)[-1] in (LORA_A, LORA_B)]


def is_lora_state(tensors: dict[str, torch.Tensor]) -> bool:
    return any(k.endswith("." + LORA_A) for k in tensors)


@torch.no_grad()
def merge_lora_state(tensors: dict[str, torch.Tensor], cfg: LoraConfig) -> dict[str, torch.Tensor]:
    """Full tensors of a LoRA model -> a plain GPT state dict: W <- W + alpha / r * B @ A, adapters removed.

    The sum is done in float32 and cast back to W's dtype. Raises ValueError when an adapter's rank
    differs from `cfg.rank` (the scale alpha / r would be wrong) or its base weight is missing."""
    out = {k: v for k, v in tensors.items() if not k.endswith(("." + LORA_A, "." + LORA_B))}
    scale = cfg.alpha / cfg.rank
    for key, a in tensors.items():
        if not key.endswith("." + LORA_A):
            continue
        prefix = key[: -len(LORA_A) - 1]
        b, w_key = tensors.get(f"{prefix}.{LORA_B}"), f"{prefix}.weight"
        if b is None or w_key not in tensors:
            raise ValueError(f"{prefix}: LoRA adapter without {LORA_B if b is None else 'base weight'}")
        if a.shape[0] != cfg.rank:
            raise ValueError(f"{key}: rank {a.shape[0]} does not match lora.rank={cfg.rank}")
        w = tensors[w_key]
        out[w_key] = (w.float() + scale * (b.float() @ a.float())).to(w.dtype)  # (out, in)
    return out
