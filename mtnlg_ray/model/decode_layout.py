"""The decode-time form of a GPT: what a KV-cached forward (generate, the serving engine's steps) runs.

A decode step feeds one token per row, so on a CPU its time is the weights streamed through the
matrix-vector products (memory bound) plus a fixed cost per operator dispatched from Python. The
plain module graph pays three q/k/v products, a dozen module calls and a few small ops per layer
for that. The plan below runs a forward of up to 16 new tokens (a decode step, a verification, a
short prefill) as one native call (the whole step in C with AVX2 kernels: model/native_step.py)
where the machine can build it; otherwise, and for longer forwards, it runs the same math on torch
ops with:

- one fused (3d, d) q/k/v product per layer (one weight stream, one dispatch instead of three);
- each product in the form CPU BLAS runs fastest for its row count (`_Product`: one row on both
  cores as two half-matrix products, a few rows through oneDNN on a blocked copy of the weight);
- direct functional calls (no `nn.Module.__call__` per sub-module), and slice writes into the KV
  cache when every row writes the same position (generate's steps);
- optionally int8 weights (model/quantize.py) for every Linear and the LM head.
Where a step's time goes before and after: docs/benchmarks.md ("Decoding").

The plan is derived data, never the model's parameters: module names, state_dict and training
stay as they are. `GPT.forward` hands a cached forward to the plan when the model has one and is
in eval mode; a plan checks on every call that the modules are the ones it was built from and
that their weights were not changed in place (version counter, storage), and rebuilds itself when
they were (an optimizer step between two generate() calls). A model whose layers are not plain
Linear modules (LoRA adapters, tensor-parallel DTensors) or a pipeline stage gets no plan and
keeps the plain forward. torch.compile was not used: Inductor's CPU compile takes tens of seconds
per cache length on 2 cores and the length changes every step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mtnlg_ray.model import gpt  # gpt.py imports this module: names are looked up at call time
from mtnlg_ray.model import native_step


def _plain_linear(m) -> bool:
    return type(m) is nn.Linear and type(m.weight.data) is torch.Tensor


SMALL_BATCH = 16  # up to this many rows a product runs in a small-batch form (below); beyond, a plain GEMM
ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


class _Product:
    """y = x W^T + b for x (..., in) float32, W (out, in), computed the way CPU BLAS runs fastest.

    Measured on 2 cores (MKL, weights read from memory, not cache; docs/benchmarks.md):
    - one row: MKL runs a matrix-vector product on one thread. The same product as a batch of two
      half-matrices (2, out/2, in) @ (in, 1) runs on both, 1.2-2x faster than `F.linear` in
      either layout. The halves are views of W (row-major), or of W^T for a column-major W (the
      LM head after use_decode_layout), so no copy.
    - 2-16 rows: oneDNN's linear on a copy of W reordered into its blocked layout for a few rows
      (`torch.ops.mkldnn._reorder_linear_weight`, what Inductor's weight freezing uses), 1.1-1.5x
      faster than MKL's best form at 3-16 rows, equal at 2. Without oneDNN: the row-major
      (out, in) @ (in, N) product, transposed back as a view, 1.2-3x faster than (N, in) @ (in, out);
      a column-major W keeps a row-major copy for it.
    - more rows (prefill): `F.linear`, compute bound either way.
    With `small_batch=False` (the native step runs every forward of up to 16 rows) only F.linear's
    form is kept: no blocked or row-major copies.
    """

    def __init__(self, w: torch.Tensor, b: torch.Tensor | None, small_batch: bool = True):
        out, inp = w.shape
        self.b = b
        self.halves = self.halves_t = self.blocked = None
        self.b_col = None if b is None else b[:, None]  # (out, 1)
        self.rows = w
        if not small_batch:
            return
        rows = w if w.is_contiguous() else w.contiguous()  # (out, in) row-major
        # oneDNN-blocked copy for 2-16 rows: float32 CPU weights only
        self.blocked = (torch.ops.mkldnn._reorder_linear_weight(rows, SMALL_BATCH)
                        if ONEDNN and w.dtype == torch.float32 and w.device.type == "cpu" else None)
        # with the blocked copy only F.linear (prefill) reads this, in any layout: no row-major copy kept
        self.rows = w if self.blocked is not None else rows
        if out % 2 == 0 and w.is_contiguous():
            self.halves = w.view(2, out // 2, inp)  # (2, out/2, in) @ (2, in, 1)
            self.b_halves = None if b is None else b.view(2, out // 2, 1)
        elif out % 2 == 0 and w.stride() == (1, out):
            self.halves_t = w.t().view(inp, 2, out // 2).transpose(0, 1)  # (2, 1, in) @ (2, in, out/2)
            self.b_halves_t = None if b is None else b.view(2, 1, out // 2)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n = x.numel() // x.shape[-1]
        if n == 1 and self.halves is not None:
            xc = x.reshape(1, -1).t().expand(2, -1, 1)  # (2, in, 1), strides (0, 1, in): MKL's batched GEMM
            y = torch.bmm(self.halves, xc) if self.b is None else torch.baddbmm(self.b_halves, self.halves, xc)
            return y.view(*x.shape[:-1], -1)
        if n == 1 and self.halves_t is not None:
            xr = x.reshape(1, 1, -1).expand(2, 1, -1)  # (2, 1, in)
            y = torch.bmm(xr, self.halves_t) if self.b is None else torch.baddbmm(self.b_halves_t, xr, self.halves_t)
            return y.view(*x.shape[:-1], -1)  # (2, 1, out/2) holds the halves in order
        if 1 < n <= SMALL_BATCH and self.blocked is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.blocked, self.b, "none", [], "")
        if 1 < n <= SMALL_BATCH:
            xt = x.reshape(n, -1).t()  # (in, N)
            y = torch.mm(self.rows, xt) if self.b is None else torch.addmm(self.b_col, self.rows, xt)  # (out, N)
            return y.t().reshape(*x.shape[:-1], -1)
        return F.linear(x, self.rows, self.b)


class _Layer:
    """One block's norms and products for decoding (float32, or int8 packed weights)."""

    def __init__(self, block, index: int, make):
        attn, mlp = block.attn, block.mlp
        self.index = index  # cache layer number (the block's key)
        self.ln_1, self.ln_2 = block.ln_1, block.ln_2
        self.qkv_w = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])  # (3d, d)
        self.qkv_b = (None if attn.q_proj.bias is None
                      else torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]))
        self.qkv = make(self.qkv_w, self.qkv_b)
        self.out, self.up, self.down = (make(m.weight, m.bias) for m in (attn.out_proj, mlp.up_proj, mlp.down_proj))


class DecodePlan:
    """Runs `GPT.forward(ids, kv_cache, rows, last_only)` for an eval-mode model; same logits."""

    def __init__(self, model, quantization: str = "none"):
        from mtnlg_ray.model.quantize import int8_linear  # quantize.py builds on this module's users

        self.quantization = quantization
        cfg = model.config
        self.d, self.n_heads, self.eps = cfg.d_model, cfg.n_heads, cfg.layernorm_eps
        self.rotary = cfg.position == "rotary"
        # forwards of up to 16 new tokens: the whole step in one native call (model/native_step.py);
        # then the torch products below run only longer forwards and keep no small-batch copies
        lib = native_step.library()
        native = lib is not None and native_step.NativeStep.supports(model)
        make = int8_linear if quantization == "int8" else lambda w, b: _Product(w, b, small_batch=not native)
        self.layers = [_Layer(b, int(k), make) for k, b in model.blocks.items()]
        # (V, d), column-major after use_decode_layout (CPU): one row reads the parameter, a few rows
        # a blocked copy (_Product)
        self.head = make(model.lm_head.weight, None)
        self.native = native_step.NativeStep(lib, model, self, quantization == "int8") if native else None
        self._modules, self._sources = self._watch(model)
        self._versions = [t._version for t in self._sources]
        self._ptrs = [t.data_ptr() for t in self._sources]

    @staticmethod
    def supports(model) -> bool:
        """A full, single-process model of plain Linear layers (what the plan knows how to run)."""
        if getattr(model, "tok_emb", None) is None or getattr(model, "lm_head", None) is None or model.ln_f is None:
            return False
        lin = [model.lm_head] + [m for b in model.blocks.values() for m in
                                 (b.attn.q_proj, b.attn.k_proj, b.attn.v_proj, b.attn.out_proj, b.mlp.up_proj,
                                  b.mlp.down_proj)]
        return all(_plain_linear(m) for m in lin) and type(model.tok_emb.weight.data) is torch.Tensor

    @staticmethod
    def _watch(model):
        """(owner, name, module) triples and the tensors the plan reads or derived weights from."""
        mods = [(model, n, getattr(model, n)) for n in ("tok_emb", "pos_emb", "ln_f", "lm_head")]
        for b in model.blocks.values():
            mods += [(b, n, getattr(b, n)) for n in ("ln_1", "ln_2")]
            mods += [(b.attn, n, getattr(b.attn, n)) for n in ("q_proj", "k_proj", "v_proj", "out_proj")]
            mods += [(b.mlp, n, getattr(b.mlp, n)) for n in ("up_proj", "down_proj")]
        sources = [t for _, _, m in mods if m is not None for t in (m.weight, getattr(m, "bias", None))
                   if t is not None]
        return mods, sources

    def current(self) -> bool:
        """The modules are the ones the plan was built from and their weights did not change.

        Runs before every cached forward: `_modules` lookups and two list comparisons (~20 us for
        6 layers), not `nn.Module.__getattr__` (~60 us)."""
        return (all(o._modules.get(n) is m for o, n, m in self._modules)
                and [t._version for t in self._sources] == self._versions
                and [t.data_ptr() for t in self._sources] == self._ptrs)

    def __call__(self, model, input_ids: torch.Tensor, kv_cache, rows, last_only: bool) -> torch.Tensor:
        B, T = input_ids.shape
        if rows is not None:
            rows = torch.as_tensor(rows, device=input_ids.device, dtype=torch.long)
        if self.native is not None and self.native.fits(kv_cache, B * T):  # decode, verify, short prefill
            logits = self.native(input_ids, kv_cache, rows)
            return logits[:, -1:] if last_only else logits
        step = model._cache_step(kv_cache, rows, B, T)
        d, eps = self.d, self.eps
        # one new token per row, all rows 0..B-1 at one position (generate's steps): _cache_step sets
        # no mask then, and not causal
        same_column = step.rows is None and step.mask is None and not step.causal
        x = F.embedding(input_ids, model.tok_emb.weight)  # (B, T, d)
        if model.pos_emb is not None:
            x = x + F.embedding(step.positions, model.pos_emb.weight)
        rope = (model.rope_cos[step.positions], model.rope_sin[step.positions]) if self.rotary else None
        for L in self.layers:
            h = F.layer_norm(x, (d,), L.ln_1.weight, L.ln_1.bias, eps)
            q, k, v = L.qkv(h).view(B, T, 3, self.n_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)  # (B, nh, T, hs)
            if rope is not None:
                q, k = gpt.apply_rotary(q, *rope), gpt.apply_rotary(k, *rope)
            if same_column:  # every row writes position length - 1: a plain slice, no index tensors
                k, v = kv_cache.write_column(L.index, B, step.length, k, v)
            else:
                k, v = kv_cache.update(L.index, step.rows, step.positions, step.length, k, v)  # (B, nh, L, hs)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=step.mask, is_causal=step.causal)
            x = x + L.out(y.transpose(1, 2).reshape(B, T, d))
            h = F.layer_norm(x, (d,), L.ln_2.weight, L.ln_2.bias, eps)
            u = L.up(h)
            # a few rows: one fused GELU op costs less than gelu_tanh's four passes' dispatch
            x = x + L.down(F.gelu(u, approximate="tanh") if u.numel() <= 4 * d * SMALL_BATCH else gpt.gelu_tanh(u))
        kv_cache.advance(rows, B, T)
        if last_only:
            x = x[:, -1:]
        x = F.layer_norm(x, (d,), model.ln_f.weight, model.ln_f.bias, eps)
        return self.head(x)  # (B, T|1, V)


@torch.no_grad()
def plan_decode(model, quantization: str = "none") -> DecodePlan | None:
    """Give `model` the decode plan its cached forwards use (None when it cannot have one)."""
    if quantization not in ("none", "int8"):
        raise ValueError(f"quantization must be 'none' or 'int8', got {quantization!r}")
    plan = DecodePlan(model, quantization) if DecodePlan.supports(model) else None
    model.decode_plan = plan
    return plan


def current_plan(model) -> DecodePlan | None:
    """The model's plan, rebuilt first if its weights or modules changed since it was made."""
    plan = model.decode_plan
    if plan is not None and not plan.current():
        plan = plan_decode(model, plan.quantization) if DecodePlan.supports(model) else None
        model.decode_plan = plan
    return plan
