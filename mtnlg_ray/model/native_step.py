"""The fused native decode step: decode_step.c, built with the system C compiler and called by ctypes.

A decode step on a CPU is the weights streamed from memory plus a fixed cost per operator; the
decode plan (model/decode_layout.py) still dispatches about 35 torch calls per layer, 3-8 us each,
which at batch 1 on a small model is as long as the products themselves. `decode_step.c` runs the
whole step (embedding, every layer, final norm and LM head) in one OpenMP parallel region with
AVX2 kernels (docs/benchmarks.md, "Decoding"), so the step costs one call.

Build: the first use in a process compiles the file with `cc -O3 -mavx2 -mfma -fopenmp` (about a
second) into `$MTNLG_CACHE_DIR` (default `~/.cache/mtnlg_ray`), named by a hash of the source
and flags, and later processes load that file. The library links `libgomp.so.1`, the OpenMP
runtime torch has already loaded, so the step and torch's own ops share one thread pool. Without
an x86-64 CPU with AVX2 and FMA, without a compiler, or with `MTNLG_NATIVE_DECODE=0`, `library()`
returns None and the plan's torch ops run instead (same logits).

Used for forwards of at most MAX_ROWS new tokens in all: decode steps, speculative verification
(several tokens per row, attending causally) and short prefills; float32 or int8 weights (the int8
products multiply int8 weights by float32 activations, with the per-row scales of
model/quantize.py). Longer forwards run the plan's torch ops.
Memory: the step keeps a copy of every layer and LM head weight (float32, or int8 and scales) in
one huge-page buffer; with it the plan's torch ops keep no small-batch copies of their own.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("decode_step.c")
FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC"]
MAX_ROWS = 16  # tokens per step (rows x tokens per row); beyond, a step is compute bound: torch's GEMMs
F32_ROWS, I8_ROWS = 0, 1  # weight kinds: (out, in) float32, (out, in) int8 with row scales
_p, _i64 = ctypes.c_void_p, ctypes.c_int64


class _Mat(ctypes.Structure):
    _fields_ = [("w", _p), ("scale", _p), ("bias", _p), ("out", _i64), ("in_", _i64), ("kind", _i64)]


class _Layer(ctypes.Structure):
    _fields_ = [("ln1_w", _p), ("ln1_b", _p), ("ln2_w", _p), ("ln2_b", _p), ("qkv", _Mat), ("proj", _Mat),
                ("up", _Mat), ("down", _Mat), ("cache_layer", _i64)]


class _Model(ctypes.Structure):
    _fields_ = [("n_layers", _i64), ("d", _i64), ("n_heads", _i64), ("head_dim", _i64), ("d_mlp", _i64),
                ("vocab", _i64), ("max_pos", _i64), ("eps", ctypes.c_double),
                ("tok_emb", _p), ("emb_s0", _i64), ("emb_s1", _i64), ("pos_emb", _p), ("rope_cos", _p),
                ("rope_sin", _p), ("lnf_w", _p), ("lnf_b", _p), ("head", _Mat),
                ("layers", ctypes.POINTER(_Layer))]


class _Cache(ctypes.Structure):
    _fields_ = [("k", _p), ("v", _p), ("lengths", _p), ("slots", _i64), ("max_len", _i64)]


def _cpu_ok() -> bool:
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return False
    return {"avx2", "fma"} <= set(flags.split())


def _build(cc: str) -> Path:
    """Compile decode_step.c once into the cache directory (atomically: concurrent builders race safely)."""
    source = SOURCE.read_bytes()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256(source + " ".join(FLAGS).encode() + version.encode()).hexdigest()[:16]
    out_dir = Path(os.environ.get("MTNLG_CACHE_DIR", Path.home() / ".cache" / "mtnlg_ray"))
    out = out_dir / f"decode_step-{key}.so"
    if out.exists():
        return out
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        subprocess.run([cc, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True, check=True)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled step, or None where it cannot run here (see the module docstring)."""
    if os.environ.get("MTNLG_NATIVE_DECODE", "1") == "0" or not _cpu_ok():
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        log.info("no C compiler: decoding runs on torch ops")
        return None
    try:
        lib = ctypes.CDLL(str(_build(cc)))
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        log.warning("the native decode step did not build (%s); decoding runs on torch ops", detail.strip()[:300])
        return None
    lib.mt_workspace_floats.argtypes = [ctypes.POINTER(_Model), _i64]
    lib.mt_workspace_floats.restype = _i64
    lib.mt_decode_step.argtypes = [ctypes.POINTER(_Model), ctypes.POINTER(_Cache), _p, _p, _i64, _i64, _p, _p,
                                   ctypes.c_int]
    lib.mt_decode_step.restype = _i64
    return lib


def _int64(t: torch.Tensor) -> torch.Tensor:
    """`t` as the contiguous int64 the C side reads; no copy when it already is."""
    return t if t.dtype == torch.long and t.is_contiguous() else t.long().contiguous()


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


HUGE_PAGE = 2 << 20  # bytes, x86-64's transparent huge page
MADV_HUGEPAGE = 14


def _huge_page_buffer(nbytes: int) -> torch.Tensor:
    """nbytes uint8 from a 2 MiB boundary, advised for transparent huge pages before the first write.

    A decode step streams every weight: with 4 KiB pages that is a TLB miss every 4 KiB; with 2 MiB
    pages (and one buffer in the order the step reads, instead of the parameters scattered over the
    heap) the step took 4-10% less (docs/benchmarks.md). Without THP the advice does nothing."""
    buf = torch.empty(nbytes + HUGE_PAGE, dtype=torch.uint8)
    out = buf[(-buf.data_ptr()) % HUGE_PAGE:][:nbytes]
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes, libc.madvise.restype = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int), ctypes.c_int
    libc.madvise(out.data_ptr(), nbytes, MADV_HUGEPAGE)  # a hint: an error leaves 4 KiB pages
    return out


class NativeStep:
    """The step for one model: its weights copied, in the order a step reads them, into one buffer
    of huge pages (row-major float32, or int8 with the row scales of model/quantize.py), and ctypes
    descriptions of them and of the norms and embeddings it reads in place. Built by the decode
    plan, which rebuilds it with itself when a weight changes."""

    def __init__(self, lib: ctypes.CDLL, model, plan, int8: bool):
        from mtnlg_ray.model.quantize import quantize_rows

        self.lib, self.keep = lib, []
        cfg = model.config
        blocks = [(L, model.blocks[str(L.index)]) for L in plan.layers]
        weights = [w for L, blk in blocks for w in (L.qkv_w, blk.attn.out_proj.weight, blk.mlp.up_proj.weight,
                                                     blk.mlp.down_proj.weight)] + [model.lm_head.weight]
        dtype = torch.int8 if int8 else torch.float32
        size = [-(-w.numel() * dtype.itemsize // 64) * 64 for w in weights]  # bytes, 64-aligned starts
        self.arena = _huge_page_buffer(sum(size))
        starts = iter(torch.tensor([0] + size).cumsum(0).tolist())

        def mat(w: torch.Tensor, b: torch.Tensor | None) -> _Mat:
            # Called in the order of `weights` above, so each matrix takes the next slot of the arena.
            start = next(starts)
            dst = self.arena[start:start + w.numel() * dtype.itemsize].view(dtype).view(w.shape)  # (out, in)
            scale = None
            if int8:
                q, scale = quantize_rows(w)
                dst.copy_(q)
                self.keep.append(scale)
            else:
                dst.copy_(w.detach())
            return _Mat(dst.data_ptr(), _ptr(scale), _ptr(b), w.shape[0], w.shape[1], I8_ROWS if int8 else F32_ROWS)

        layers = [_Layer(_ptr(blk.ln_1.weight), _ptr(blk.ln_1.bias), _ptr(blk.ln_2.weight), _ptr(blk.ln_2.bias),
                         mat(L.qkv_w, L.qkv_b), mat(blk.attn.out_proj.weight, blk.attn.out_proj.bias),
                         mat(blk.mlp.up_proj.weight, blk.mlp.up_proj.bias),
                         mat(blk.mlp.down_proj.weight, blk.mlp.down_proj.bias), L.index) for L, blk in blocks]
        self.layers = (_Layer * len(layers))(*layers)
        emb = model.tok_emb.weight
        pos = None if model.pos_emb is None else model.pos_emb.weight.detach().contiguous()
        rope = (model.rope_cos.contiguous(), model.rope_sin.contiguous()) if cfg.position == "rotary" else (None, None)
        self.keep += [pos, *rope]
        # the LM head's copy is row-major: the column-major parameter streamed 10-25% slower in the
        # kernels at one row (its 256-byte pieces of d rows lie far apart)
        head = model.lm_head.weight
        self.vocab = head.shape[0]
        self.model = _Model(len(layers), cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.d_mlp, self.vocab,
                            cfg.max_seq_len, cfg.layernorm_eps, emb.data_ptr(), emb.stride(0), emb.stride(1), _ptr(pos),
                            _ptr(rope[0]), _ptr(rope[1]), _ptr(model.ln_f.weight), _ptr(model.ln_f.bias),
                            mat(head, None), self.layers)
        self.model_ref = ctypes.byref(self.model)
        self.work_floats = [lib.mt_workspace_floats(self.model_ref, b) for b in range(MAX_ROWS + 1)]

    @staticmethod
    def supports(model) -> bool:
        """float32 CPU weights, and widths the AVX2 kernels take (multiples of 8)."""
        cfg, w = model.config, model.tok_emb.weight
        return (w.dtype == torch.float32 and w.device.type == "cpu" and cfg.n_heads * cfg.head_dim == cfg.d_model
                and all(n % 8 == 0 for n in (cfg.d_model, cfg.head_dim, cfg.d_mlp)))

    @staticmethod
    def fits(kv_cache, n_tokens: int) -> bool:
        k = kv_cache.k
        return n_tokens <= MAX_ROWS and k.dtype == torch.float32 and k.device.type == "cpu" and k.is_contiguous()

    def __call__(self, input_ids: torch.Tensor, kv_cache, rows: torch.Tensor | None) -> torch.Tensor:
        """input_ids (B, T) continuing cache rows `rows` (None: 0..B-1) -> logits (B, T, V); rows advance by T.

        About 20 us of Python around the native call (a decode step of a small model is ~1 ms)."""
        B, T = input_ids.shape
        rows = None if rows is None else _int64(rows)
        ids = _int64(input_ids)
        logits = torch.empty(B, T, self.vocab)
        work = torch.empty(self.work_floats[B * T])
        c = kv_cache
        cache = _Cache(c.k.data_ptr(), c.v.data_ptr(), c.lengths.data_ptr(), c.k.shape[1], c.max_len)
        full = self.lib.mt_decode_step(self.model_ref, ctypes.byref(cache), ids.data_ptr(),
                                       None if rows is None else rows.data_ptr(), B, T, logits.data_ptr(),
                                       work.data_ptr(), torch.get_num_threads())
        if full >= 0:
            limit = min(c.max_len, self.model.max_pos)
            raise ValueError(f"KV cache overflow: position {full} >= max_len {limit}")
        return logits
