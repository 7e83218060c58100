"""int8 weights for decoding on CPU: per-output-channel symmetric quantization of the Linear layers
and the LM head (`serve.quantization: int8`, `generate(..., quantization="int8")`).

A weight W (out, in) is stored as int8 Q = round(W / s) with one scale per output row,
s = max|W_row| / 127, so W ~= s * Q and the largest entry of each row is exact. The products run
on fbgemm's int8 GEMM (`quantized::linear_dynamic`, the kernel behind PyTorch's dynamic
quantization): each call quantizes the activations per tensor to uint8 (7-bit range on CPUs
without VNNI, so the AVX2 multiply-add cannot saturate), multiplies in int32 and rescales to
float32 with the weight scales and the float32 bias. That is the scheme CTranslate2's int8 uses on
CPU. Forwards of up to 16 tokens (decode steps) run instead in the native step (model/native_step.py), which multiplies
the same int8 Q by float32 activations and applies the row scales (no activation quantization).
A decode step streams a quarter of the fp32 bytes; the embedding lookup stays fp32.

`torch.ops.aten._weight_int8pack_mm` (activations stay float32) exists in this torch but on an
AVX2 CPU it runs far slower than the fp32 product (docs/benchmarks.md), so it is not used.
Accuracy: docs/benchmarks.md reports the logit difference and greedy-token agreement with fp32.
"""

from __future__ import annotations

import warnings

import torch


def available() -> bool:
    """fbgemm (x86 CPUs) is the quantized engine this path needs."""
    return "fbgemm" in torch.backends.quantized.supported_engines


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: (Q (out, in) int8, scales (out,) float32) with W ~= scales[:, None] * Q."""
    w = w.detach().float()
    scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0  # (out,)
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


@torch.no_grad()
def int8_linear(w: torch.Tensor, b: torch.Tensor | None):
    """x (..., in) float32 -> x W^T + b (..., out) float32 through fbgemm's int8 GEMM."""
    if not available():
        raise RuntimeError("int8 quantization needs PyTorch's fbgemm engine (an x86 CPU)")
    if w.device.type != "cpu":
        raise RuntimeError("int8 quantization runs on CPU only")
    q, scale = quantize_rows(w)
    zero = torch.zeros(q.shape[0], dtype=torch.long)
    with warnings.catch_warnings():  # quantized tensors are deprecated in favour of torchao; the kernel is not
        warnings.simplefilter("ignore")
        qw = torch._make_per_channel_quantized_tensor(q, scale.double(), zero, 0)
        packed = torch.ops.quantized.linear_prepack(qw, None if b is None else b.detach().float())
    op = torch.ops.quantized.linear_dynamic

    def linear(x: torch.Tensor) -> torch.Tensor:
        return op(x, packed, True)  # reduce_range: 7-bit activations (see the module docstring)

    return linear
