"""The GPT: one plain PyTorch module for pretraining, fine-tuning, export and serving.

Decoder-only, as in GPT-2 / Megatron-LM: token embedding (+ learned positions, or rotary),
pre-LN blocks of causal self-attention and a GELU MLP, final LayerNorm, LM head tied to the
embedding. No Ray and no torch.distributed here: parallelism is applied from outside by
`mtnlg_ray.parallel` using the module names below (TP plans are keyed by them):

    tok_emb, pos_emb, blocks.{i}.ln_1, blocks.{i}.attn.{q_proj,k_proj,v_proj,out_proj},
    blocks.{i}.ln_2, blocks.{i}.mlp.{up_proj,down_proj}, ln_f, lm_head

`blocks` is a ModuleDict keyed by layer index so a pipeline stage that deletes other layers
keeps the same parameter names (and cache layer numbers); a stage without `tok_emb` takes
hidden states as input, one without `lm_head` returns them.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mtnlg_ray.config import ModelConfig
from mtnlg_ray.model import decode_layout
from mtnlg_ray.model import generate as decoding
from mtnlg_ray.model.kv_cache import KVCache


class CacheStep(NamedTuple):
    """What every layer needs to read and write the KV cache in one forward."""

    cache: KVCache
    rows: torch.Tensor | None  # (B,) cache rows of the batch; None: rows 0..B-1
    positions: torch.Tensor  # (B, T) absolute positions of the new tokens
    length: int  # L: keys to attend over (longest row after the write)
    mask: torch.Tensor | None  # (B, 1, T, L) bool, True = may attend; None: no masking needed
    causal: bool  # prefill from an empty prefix: plain causal attention


def rotary_tables(cfg: ModelConfig, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables (max_seq_len, head_dim / 2) for rotary position embedding (RoFormer)."""
    half = cfg.head_dim // 2
    inv_freq = 1.0 / (cfg.rotary_base ** (torch.arange(half, device=device, dtype=torch.float32) / half))
    angles = torch.outer(torch.arange(cfg.max_seq_len, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, nh, T, hs) by position; cos/sin are (T, hs/2) or (B, T, hs/2). NeoX half-split."""
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, hs/2)
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.d_model
        self.head_dim = cfg.head_dim
        self.q_proj = nn.Linear(d, d, bias=cfg.bias)
        self.k_proj = nn.Linear(d, d, bias=cfg.bias)
        self.v_proj = nn.Linear(d, d, bias=cfg.bias)
        self.out_proj = nn.Linear(d, d, bias=cfg.bias)
        self.dropout = cfg.dropout
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, rope=None, step: CacheStep | None = None, layer: int = 0) -> torch.Tensor:
        B, T, _ = x.shape
        # -1 heads: under tensor parallelism each rank holds n_heads / tp of them.
        q = self.q_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        drop = self.dropout if self.training else 0.0
        if step is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, is_causal=True)
        else:
            k, v = step.cache.update(layer, step.rows, step.positions, step.length, k, v)  # (B, nh, L, hs)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=step.mask, dropout_p=drop, is_causal=step.causal)
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, d) with heads side by side
        return self.resid_drop(self.out_proj(y))


GELU_C = math.sqrt(2 / math.pi)  # tanh GELU: 0.5 x (1 + tanh(C (x + K x^3)))
GELU_K = 0.044715
_TWO_C = torch.tensor(2 * GELU_C)  # float32 0-dim


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """tanh GELU (GPT-2's "gelu_new", so imported GPT-2 weights give the same logits).

    On CPU without autograd it is computed as x * sigmoid(2u), u = C (x + K x^3), the same function
    (0.5 (1 + tanh u) = sigmoid(2u); within one float32 ulp of the fused kernel), in four in-place
    passes over one new tensor: the fused kernel's vectorized tanh is slow on AVX2 CPUs (3 ns per
    element), and this form is 2.3x faster on a (2048, 1536) prefill activation and a (16, 1536)
    decode batch, as fast on one row. Training, GPUs, other dtypes and DTensors (tensor parallel)
    keep the fused kernel (one pass, and the in-place passes would overwrite what autograd saves).
    """
    if x.device.type != "cpu" or x.dtype != torch.float32 or torch.is_grad_enabled() or type(x) is not torch.Tensor:
        return F.gelu(x, approximate="tanh")
    two_u_over_x = torch.addcmul(_TWO_C, x, x, value=2 * GELU_C * GELU_K)  # 2C (1 + K x^2)
    return two_u_over_x.mul_(x).sigmoid_().mul_(x)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_mlp, bias=cfg.bias)
        self.down_proj = nn.Linear(cfg.d_mlp, cfg.d_model, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.down_proj(gelu_tanh(self.up_proj(x))))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model, eps=cfg.layernorm_eps, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.d_model, eps=cfg.layernorm_eps, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x, rope=None, step: CacheStep | None = None, layer: int = 0):
        x = x + self.attn(self.ln_1(x), rope, step, layer)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = cfg = config
        V, d = cfg.padded_vocab_size, cfg.d_model
        self.tok_emb = nn.Embedding(V, d)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, d) if cfg.position == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleDict({str(i): Block(cfg) for i in range(cfg.n_layers)})
        self.ln_f = nn.LayerNorm(d, eps=cfg.layernorm_eps, bias=cfg.bias)
        self.lm_head = nn.Linear(d, V, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        if cfg.position == "rotary":
            cos, sin = rotary_tables(cfg)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        if self.tok_emb.weight.device.type != "meta":
            self.init_weights()
        self.decode_plan = None  # cached eval forwards run it when set (model/decode_layout.py)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Megatron init: N(0, std) weights, residual output projections N(0, std / sqrt(2 L)),
        zero biases, unit LayerNorm. Also (re)builds the rotary tables: call after `to_empty`."""
        std = self.config.init_std
        resid_std = std / math.sqrt(2 * self.config.n_layers)
        for name, mod in self.named_modules():
            if isinstance(mod, nn.Linear):
                is_resid = name.endswith(("out_proj", "down_proj"))
                nn.init.normal_(mod.weight, 0.0, resid_std if is_resid else std)
                if mod.bias is not None:
                    nn.init.zeros_(mod.bias)
            elif isinstance(mod, nn.Embedding):
                nn.init.normal_(mod.weight, 0.0, std)
            elif isinstance(mod, nn.LayerNorm):
                nn.init.ones_(mod.weight)
                if mod.bias is not None:
                    nn.init.zeros_(mod.bias)
            if mod is not self and hasattr(mod, "init_weights"):
                mod.init_weights()  # modules with their own extra parameters (LoRA adapters, model/lora.py)
        if self.config.position == "rotary":
            cos, sin = rotary_tables(self.config, device=self.rope_cos.device)
            self.rope_cos.copy_(cos)
            self.rope_sin.copy_(sin)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count (tied weights once); works on the meta device without memory."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= sum(m.weight.numel() for m in (self.tok_emb, self.pos_emb) if m is not None)
        return n

    def _cache_step(self, cache: KVCache, rows: torch.Tensor | None, B: int, T: int) -> CacheStep:
        positions = cache.positions(rows, B, T)  # (B, T)
        start = positions[:, 0]
        length = int(positions[:, -1].max()) + 1
        mask, causal = None, False
        if bool((start == 0).all()) and T == length:
            causal = True  # every row is a fresh prefill of the same length
        elif not (T == 1 and bool((start == length - 1).all())):
            keys = torch.arange(length, device=positions.device)
            mask = (keys[None, None, :] <= positions[:, :, None])[:, None]  # (B, 1, T, L)
        return CacheStep(cache, rows, positions, length, mask, causal)

    def forward(self, input_ids: torch.Tensor, kv_cache: KVCache | None = None, rows=None,
                last_only: bool = False) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, padded_vocab), or (B, 1, padded_vocab) with `last_only`.

        Without a cache: plain causal attention over the T tokens (training). With a cache:
        the tokens continue rows `rows` of the cache (None: rows 0..B-1) and those rows advance.
        `last_only` skips the LM head for all but the last position (a prompt prefill needs only it).
        """
        if kv_cache is not None and self.decode_plan is not None and not self.training and not torch.is_grad_enabled():
            plan = decode_layout.current_plan(self)  # same logits, fewer and fused ops
            if plan is not None:
                return plan(self, input_ids, kv_cache, rows, last_only)
        B, T = input_ids.shape[:2]
        if rows is not None:
            rows = torch.as_tensor(rows, device=input_ids.device, dtype=torch.long)
        step = None
        if kv_cache is None:
            if T > self.config.max_seq_len:
                raise ValueError(f"sequence of {T} tokens exceeds max_seq_len={self.config.max_seq_len}")
            positions = torch.arange(T, device=input_ids.device)  # (T,)
        else:
            step = self._cache_step(kv_cache, rows, B, T)
            positions = step.positions  # (B, T)
        x = self.tok_emb(input_ids) if self.tok_emb is not None else input_ids  # (B, T, d)
        if self.pos_emb is not None:
            x = x + self.pos_emb(positions)
        rope = (self.rope_cos[positions], self.rope_sin[positions]) if self.config.position == "rotary" else None
        x = self.drop(x)
        ckpt = self.config.activation_checkpointing and self.training and step is None
        for key, block in self.blocks.items():
            if ckpt:
                x = checkpoint(block, x, rope, use_reentrant=False)
            else:
                x = block(x, rope, step, int(key))
        if kv_cache is not None:
            kv_cache.advance(rows, B, T)
        if last_only:
            x = x[:, -1:]
        if self.ln_f is not None:
            x = self.ln_f(x)
        return self.lm_head(x) if self.lm_head is not None else x

    def generate(self, input_ids, max_new_tokens: int, **kwargs):
        """Incremental (KV-cached) decoding; see `mtnlg_ray.model.generate.generate`."""
        return decoding.generate(self, input_ids, max_new_tokens, **kwargs)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean next-token cross entropy; logits (B, T, V), targets (B, T); -100 targets are ignored."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=ignore_index)
