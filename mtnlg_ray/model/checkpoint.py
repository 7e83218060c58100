"""The native consolidated checkpoint: a directory that describes itself.

    config.json        {"format_version": 1, "model": {...ModelConfig...}, ...extra metadata}
    model.safetensors  full, unsharded weights (no pickle); a tied lm_head is stored once
    tokenizer.model    the SentencePiece model, when there is one (or GPT-2's vocab.json + merges.txt)
    manifest.json      {"format_version": 1, "files": {name: sha256}}, checked on load

Writes go to a temporary sibling directory that is renamed into place when complete, so an
interrupted save never leaves a directory that looks finished.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mtnlg_ray.config import ModelConfig, validate
from mtnlg_ray.errors import UserError
from mtnlg_ray.fileio import atomic_dir, file_sha256
from mtnlg_ray.model.gpt import GPT, rotary_tables

FORMAT_VERSION = 1
WEIGHTS, CONFIG, MANIFEST, TOKENIZER = "model.safetensors", "config.json", "manifest.json", "tokenizer.model"


def write_manifest(directory: Path) -> None:
    """Record the sha256 of every file in `directory` (except the manifest) in manifest.json."""
    files = {p.name: file_sha256(p) for p in sorted(directory.iterdir()) if p.is_file() and p.name != MANIFEST}
    (directory / MANIFEST).write_text(json.dumps({"format_version": FORMAT_VERSION, "files": files}, indent=2))


def verify_manifest(directory: Path) -> dict:
    """Check every file listed in manifest.json; a missing or altered one is a UserError naming it."""
    mpath = directory / MANIFEST
    if not mpath.is_file():
        raise UserError(f"{mpath}: missing (not a complete checkpoint)")
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise UserError(f"{mpath}: not a valid manifest") from None
    for name, digest in files.items():
        f = directory / name
        if not f.is_file():
            raise UserError(f"{f}: missing (listed in {MANIFEST})")
        if file_sha256(f) != digest:
            raise UserError(f"{f}: sha256 does not match {MANIFEST} (file altered or corrupted)")
    return manifest


def is_native_checkpoint(path: str | Path) -> bool:
    p = Path(path)
    return (p / CONFIG).is_file() and (p / WEIGHTS).is_file() and (p / MANIFEST).is_file()


def save_checkpoint(
    state_dict: dict[str, torch.Tensor],
    config: ModelConfig,
    out_dir: str | Path,
    tokenizer_path: str | Path | None = None,
    extra: dict | None = None,
) -> Path:
    """Write a consolidated checkpoint of full (unsharded) tensors; replaces `out_dir` atomically."""
    with atomic_dir(out_dir) as tmp:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
        if config.tie_embeddings:
            tensors.pop("lm_head.weight", None)
        save_file(tensors, tmp / WEIGHTS, metadata={"format": "pt"})
        meta = {"format_version": FORMAT_VERSION, "model": config.model_dump(mode="json"), **(extra or {})}
        (tmp / CONFIG).write_text(json.dumps(meta, indent=2))
        if tokenizer_path is not None:
            from mtnlg_ray.data.tokenizer import copy_tokenizer

            copy_tokenizer(tokenizer_path, tmp)
        write_manifest(tmp)
    return Path(out_dir)


def read_config(path: str | Path) -> tuple[ModelConfig, dict]:
    """The ModelConfig and the whole config.json of a native checkpoint (no weights read)."""
    cpath = Path(path) / CONFIG
    try:
        meta = json.loads(cpath.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{cpath}: cannot read ({err})") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{cpath}: format_version {meta.get('format_version')!r} (expected {FORMAT_VERSION})")
    return validate(ModelConfig, meta.get("model", {}), str(cpath)), meta


def load_state(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor], dict]:
    """Verify and read a native checkpoint: (model config, tensors, config.json)."""
    p = Path(path)
    if not p.is_dir():
        raise UserError(f"{p}: checkpoint directory not found")
    verify_manifest(p)
    cfg, meta = read_config(p)
    try:
        tensors = load_file(p / WEIGHTS)
    except SafetensorError as err:
        raise UserError(f"{p / WEIGHTS}: unreadable safetensors file ({err})") from None
    return cfg, tensors, meta


def build_model(cfg: ModelConfig, tensors: dict[str, torch.Tensor], source: str = "checkpoint",
                device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> GPT:
    """A GPT with exactly these weights (built on meta, then assigned: no double allocation)."""
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


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """(GPT in eval mode, config.json dict) from a native consolidated checkpoint."""
    cfg, tensors, meta = load_state(path)
    return build_model(cfg, tensors, str(path), device, dtype), meta
