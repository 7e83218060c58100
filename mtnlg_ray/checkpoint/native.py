"""The native consolidated checkpoint: a directory that describes itself (what `mtnlg export` writes).

    config.json        {"format_version": 1, "model": {...ModelConfig...}, ...extra metadata}
    model.safetensors  full, unsharded weights (no pickle); a tied lm_head is stored once
    tokenizer.model    the SentencePiece model, when there is one (or a Hugging Face tokenizer.json +
                       tokenizer_config.json, or GPT-2's vocab.json + merges.txt)
    README.md          the model card (checkpoint/model_card.py); not in the manifest, free to edit
    manifest.json      {"format_version": 1, "files": {name: sha256}}, checked on load

Writes go to a temporary sibling directory that is renamed into place when complete, so an
interrupted save never leaves a directory that looks finished. `build_model` turns any full
state dict (this format's, a consolidated training checkpoint's, an imported GPT-2's) into a GPT.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mtnlg_ray.checkpoint import manifest
from mtnlg_ray.checkpoint.manifest import WEIGHTS
from mtnlg_ray.config import ModelConfig
from mtnlg_ray.data.tokenizer import copy_tokenizer
from mtnlg_ray.errors import UserError
from mtnlg_ray.fileio import atomic_dir
from mtnlg_ray.model.gpt import GPT, rotary_tables


def save(state_dict: dict[str, torch.Tensor], config: ModelConfig, out_dir: str | Path,
         tokenizer_path: str | Path | None = None, extra: dict | None = None,
         files: dict[str, bytes] | None = None) -> Path:
    """Write a consolidated checkpoint of full (unsharded) tensors; replaces `out_dir` atomically.
    `tokenizer_path`: a tokenizer as `find_tokenizer` names it; `files`: more files to write that the
    manifest leaves out, so editing them never fails the check (the model card)."""
    with atomic_dir(out_dir) as tmp:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
        if config.tie_embeddings:
            tensors.pop("lm_head.weight", None)
        save_file(tensors, tmp / WEIGHTS, metadata={"format": "pt"})
        manifest.write_config(tmp, {"model": config.model_dump(mode="json"), **(extra or {})})
        if tokenizer_path is not None:
            copy_tokenizer(tokenizer_path, tmp)
        manifest.write(tmp)
        for name, data in (files or {}).items():
            (tmp / name).write_bytes(data)
    return Path(out_dir)


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The weights of a native checkpoint, after its manifest verifies (every file, sha256)."""
    p = Path(path)
    manifest.verify(p)
    try:
        return load_file(p / WEIGHTS)
    except SafetensorError as err:
        raise UserError(f"{p / WEIGHTS}: unreadable safetensors file ({err})") from None


def build_model(cfg: ModelConfig, tensors: dict[str, torch.Tensor], source: str = "checkpoint",
                device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> GPT:
    """A GPT in eval mode with exactly these weights (built on meta, then assigned: no double
    allocation). A tied lm_head may be absent from `tensors`; `source` names them in errors."""
    with torch.device("meta"):
        model = GPT(cfg)
    expected = set(model.state_dict())
    if cfg.tie_embeddings:
        expected.discard("lm_head.weight")
    missing, unexpected = expected - set(tensors), set(tensors) - expected - {"lm_head.weight"}
    if missing or unexpected:
        raise UserError(f"{source}: weights do not match the config (missing {sorted(missing)[:3]}, "
                        f"unexpected {sorted(unexpected)[:3]})")
    sd = {k: v.to(device=device, dtype=dtype or v.dtype) for k, v in tensors.items()}
    if cfg.tie_embeddings:
        sd["lm_head.weight"] = sd["tok_emb.weight"]
    shapes = model.state_dict()
    for k, v in sd.items():
        if k in shapes and shapes[k].shape != v.shape:
            raise UserError(f"{source}: {k} has shape {tuple(v.shape)}, config expects {tuple(shapes[k].shape)}")
    model.load_state_dict(sd, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight
    if cfg.position == "rotary":  # non-persistent buffers are not in the file: rebuild them
        model.rope_cos, model.rope_sin = rotary_tables(cfg, device=device)
    return model.eval()
