"""What every checkpoint directory carries to describe itself: config.json and manifest.json.

Both kinds this project writes, a native export (native.py) and one sharded training checkpoint
(sharded.py), hold

    config.json          {"format_version": 1, "model": {...ModelConfig...}, ...metadata}
    manifest.json        {"format_version": 1, "files": {name: sha256}, ...}, written last
    trainer_state.json   (training checkpoints) step, consumed samples, tokens, world size, identity

so a reader knows the model without touching the weights, and a missing or altered file is found
before anything is loaded. A sharded checkpoint's manifest lists the files of every rank (each
rank hashes its own, rank 0 writes them all) and its `world_size`; on load the ranks share the
hashing (`problem(directory, rank, world)`: every world-th file).

Neither torch nor Ray is imported here: the CLI and the driver's preflight read checkpoints with
it before either starts.
"""

from __future__ import annotations

import json
from pathlib import Path

from mtnlg_ray.config import ModelConfig, validate
from mtnlg_ray.errors import UserError
from mtnlg_ray.fileio import file_sha256

FORMAT_VERSION = 1
CONFIG, MANIFEST, TOKENIZER, WEIGHTS = "config.json", "manifest.json", "tokenizer.model", "model.safetensors"
TRAINER_STATE = "trainer_state.json"  # a training checkpoint's step, data position and identity


def hash_files(directory: str | Path) -> dict[str, str]:
    """{name: sha256} of the plain files directly inside `directory`, the manifest itself excluded."""
    d = Path(directory)
    return {p.name: file_sha256(p) for p in sorted(d.iterdir()) if p.is_file() and p.name != MANIFEST}


def write(directory: str | Path, files: dict[str, str] | None = None, **extra) -> None:
    """Write manifest.json: `files` ({name: sha256}; default: every file now in `directory`) and `extra` keys."""
    d = Path(directory)
    body = {"format_version": FORMAT_VERSION, **extra, "files": hash_files(d) if files is None else files}
    (d / MANIFEST).write_text(json.dumps(body, indent=2))


def add_file(directory: str | Path, name: str) -> None:
    """List `name`, a file added to `directory` after its manifest was written, with its sha256."""
    mpath = Path(directory) / MANIFEST
    body = json.loads(mpath.read_text())
    body["files"][name] = file_sha256(Path(directory) / name)
    mpath.write_text(json.dumps(body, indent=2))


def problem(directory: str | Path, rank: int = 0, world: int = 1) -> str | None:
    """Why `directory` does not verify, or None when it does. Checks this rank's share of the
    listed files (every world-th, in name order); with the defaults, all of them."""
    d = Path(directory)
    mpath = d / MANIFEST
    try:
        files = json.loads(mpath.read_text())["files"]
        names = sorted(files)
    except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
        return f"{mpath}: missing or unreadable (checkpoint incomplete)"
    for name in names[rank::world]:
        f = d / name
        if not f.is_file():
            return f"{f}: missing (listed in {MANIFEST})"
        if file_sha256(f) != files[name]:
            return f"{f}: sha256 does not match {MANIFEST} (file altered or corrupted)"
    return None


def verify(directory: str | Path) -> None:
    """Every file listed in manifest.json is there and unaltered, else a UserError naming it."""
    why = problem(directory)
    if why is not None:
        raise UserError(why)


def write_config(directory: str | Path, meta: dict) -> None:
    """Write config.json: the format version and `meta` ({"model": ModelConfig dump, ...metadata})."""
    (Path(directory) / CONFIG).write_text(json.dumps({"format_version": FORMAT_VERSION, **meta}, indent=2))


def read_config(directory: str | Path) -> tuple[ModelConfig, dict]:
    """The ModelConfig and the whole config.json of a checkpoint directory (no weights read)."""
    cpath = Path(directory) / CONFIG
    try:
        meta = json.loads(cpath.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{cpath}: cannot read ({err})") from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        version = meta.get("format_version") if isinstance(meta, dict) else None
        raise UserError(f"{cpath}: format_version {version!r} (expected {FORMAT_VERSION})")
    return validate(ModelConfig, meta.get("model", {}), str(cpath)), meta


def read_trainer_state(directory: str | Path) -> dict:
    """trainer_state.json of a training checkpoint: {"step", "consumed_samples", "tokens", "world_size", ...}."""
    path = Path(directory) / TRAINER_STATE
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: cannot read ({err})") from None
