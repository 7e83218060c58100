"""Sharded training checkpoints (torch.distributed.checkpoint) and their one-process consolidation.

A checkpoint directory, as Ray Train stores it under `storage_path/name/` (every rank writes
its own files into a local directory; `ray.train.report(checkpoint=...)` merges them):

    checkpoint_{step:08d}_{time}/
      .metadata, __{rank}_0.distcp   DCP: {"model": weights, "optim": AdamW tensors}, sharded as trained
      trainer_state.json             step, consumed samples/tokens, data position, layout (rank 0)
      rng_rank{r}.json               Python / NumPy / torch RNG states of rank r
      config.json                    {"format_version": 1, "model": ModelConfig, "kind", "job"} (rank 0)
      tokenizer.model                the dataset's tokenizer (rank 0)
      manifest.json                  sha256 of every file above, from all ranks (rank 0)

Keys are the model's own parameter names (FSDP2, DTensor TP and pipeline stages keep them), and
optimizer state is flattened per parameter name (`state.{fqn}.exp_avg`), so a checkpoint loads
into any other layout: DCP reshards on load. Only tensors are stored: hyperparameters come from
the config, so nothing is unpickled except DCP's `.metadata`, which is read with an allow-list.

`load_run_state(run_dir_or_checkpoint)` consolidates the weights into full tensors in one
process without a process group; a checkpoint whose manifest does not verify is skipped with a
warning and the previous one is used.
"""

from __future__ import annotations

import json
import logging
import pickle
import random
import shutil
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch import nn

from mtnlg_ray.config import ModelConfig, validate
from mtnlg_ray.errors import PathError, UserError
from mtnlg_ray.fileio import file_sha256
from mtnlg_ray.model.checkpoint import CONFIG, FORMAT_VERSION, MANIFEST, TOKENIZER, read_config
from mtnlg_ray.train.optim import Optimizers
from mtnlg_ray.train.storage import CKPT_RE, step_of

log = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.json"
OPTIM_OPTS = StateDictOptions(flatten_optimizer_state_dict=True)


def checkpoint_dir_name(step: int) -> str:
    """Unique and sortable: a run resumed from an older checkpoint never reuses a directory."""
    return f"checkpoint_{step:08d}_{time.strftime('%Y%m%d-%H%M%S')}_{time.time_ns() % 10**6:06d}"


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@contextmanager
def _single_process_quiet(world: int):
    """Without a process group DCP warns that it assumes one process: that is the intent here."""
    with warnings.catch_warnings():
        if world == 1:
            warnings.filterwarnings("ignore", message=".*assuming the intent is to")
        yield


# ------------------------------------------------------------------------------- safe DCP reading
class _MetadataUnpickler(pickle.Unpickler):
    """DCP's `.metadata` is a pickle: allow only the classes it is made of, never arbitrary code."""

    _MODULES = {"torch.distributed.checkpoint.metadata"}
    _NAMES = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
              ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"), ("collections", "OrderedDict"),
              ("torch.distributed.checkpoint.filesystem", "_StorageInfo")}

    def find_class(self, module: str, name: str):
        if module in self._MODULES or (module, name) in self._NAMES:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a checkpoint's .metadata")


class SafeReader(FileSystemReader):
    """FileSystemReader whose `.metadata` is read with the allow-list (tensors: weights_only loads)."""

    def read_metadata(self, *args, **kwargs):
        path = Path(self.path) / ".metadata"
        try:
            with open(path, "rb") as f:
                metadata = _MetadataUnpickler(f).load()
        except (OSError, pickle.UnpicklingError, EOFError, AttributeError) as err:
            raise UserError(f"{path}: not a readable checkpoint index ({err})") from None
        from torch.distributed.checkpoint.metadata import StorageMeta

        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


# ------------------------------------------------------------------------------------ manifests
def verify_files(directory: Path, rank: int = 0, world: int = 1) -> str | None:
    """Check this rank's share (every world-th file) of manifest.json; None if fine, else why not."""
    mpath = directory / MANIFEST
    try:
        files = json.loads(mpath.read_text())["files"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        return f"{mpath}: missing or unreadable (checkpoint incomplete)"
    for name in sorted(files)[rank::world]:
        f = directory / name
        if not f.is_file():
            return f"{f}: missing (listed in {MANIFEST})"
        if file_sha256(f) != files[name]:
            return f"{f}: sha256 does not match {MANIFEST} (file altered or corrupted)"
    return None


def verify_checkpoint(directory: Path) -> str | None:
    """Collective when a process group exists: every rank hashes its share, all must agree."""
    rank, world = _rank_world()
    problem = verify_files(directory, rank, world)
    if world > 1:
        problems = [None] * world
        dist.all_gather_object(problems, problem)
        problem = next((p for p in problems if p), None)
    return problem


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint directories of a run, newest first (by step, then by name: time of writing)."""
    found = [p for p in run_dir.iterdir() if p.is_dir() and CKPT_RE.match(p.name)] if run_dir.is_dir() else []
    return sorted(found, key=lambda p: (step_of(p), p.name), reverse=True)


# ----------------------------------------------------------------------------------- rng states
def rng_state() -> dict:
    state = {"python": _jsonable(random.getstate()), "numpy": _jsonable(np.random.get_state()),
             "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_tuples(state["python"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


def _jsonable(x):
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (tuple, list)):
        return [_jsonable(v) for v in x]
    return x


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, list) else x


# ---------------------------------------------------------------------------------- in-loop save
def _state_dicts(parts: list[nn.Module], optimizers: Optimizers):
    """({"model": merged weights, "optim": merged AdamW tensors}, per-pair full optimizer dicts)."""
    model_sd: dict = {}
    for part in parts:
        model_sd.update(get_model_state_dict(part))
    optim_full = [get_optimizer_state_dict(part, opt, options=OPTIM_OPTS) for part, opt in optimizers.pairs]
    optim_sd = {k: v for sd in optim_full for k, v in sd.items() if isinstance(v, torch.Tensor)}
    return {"model": model_sd, "optim": optim_sd}, optim_full


def save(parts: list[nn.Module], optimizers: Optimizers, trainer_state: dict, config_json: dict,
         tokenizer_path: str | Path | None) -> Path:
    """Write this rank's part of a checkpoint into a fresh local temp directory (collective).

    The caller hands the directory to `ray.train.report(checkpoint=...)` and deletes it after.
    """
    rank, world = _rank_world()
    out = Path(tempfile.mkdtemp(prefix=f"mtnlg-ckpt-r{rank}-"))
    state, _ = _state_dicts(parts, optimizers)
    with _single_process_quiet(world):
        dcp.save(state, storage_writer=FileSystemWriter(out), no_dist=world == 1)
    (out / f"rng_rank{rank}.json").write_text(json.dumps(rng_state()))
    if rank == 0:
        (out / TRAINER_STATE).write_text(json.dumps({**trainer_state, "world_size": world}, indent=2))
        (out / CONFIG).write_text(json.dumps({"format_version": FORMAT_VERSION, **config_json}, indent=2))
        if tokenizer_path is not None:
            shutil.copyfile(tokenizer_path, out / TOKENIZER)
    hashes = {p.name: file_sha256(p) for p in sorted(out.iterdir()) if p.is_file()}
    if world > 1:
        gathered = [None] * world if rank == 0 else None
        dist.gather_object(hashes, gathered, dst=0)
        if rank == 0:
            hashes = {k: v for h in gathered for k, v in h.items()}
    if rank == 0:
        (out / MANIFEST).write_text(json.dumps({"format_version": FORMAT_VERSION, "world_size": world,
                                                "files": hashes}, indent=2))
    return out


# ---------------------------------------------------------------------------------- in-loop load
def load(directory: Path, parts: list[nn.Module], optimizers: Optimizers | None) -> dict:
    """Load weights (+ optimizer state when given) into the parts, any saved layout; returns the
    trainer state. Restores this rank's RNG when the checkpoint was written by as many ranks."""
    rank, world = _rank_world()
    if optimizers is not None:
        state, optim_full = _state_dicts(parts, optimizers)
    else:
        state = {"model": {k: v for part in parts for k, v in get_model_state_dict(part).items()}}
    with _single_process_quiet(world):
        dcp.load(state, storage_reader=SafeReader(directory), no_dist=world == 1)
    for part in parts:  # the loaded tensors were written in place; hand each part its own keys
        own = get_model_state_dict(part)
        set_model_state_dict(part, {k: state["model"][k] for k in own})
    if optimizers is not None:
        for (part, opt), full in zip(optimizers.pairs, optim_full):
            set_optimizer_state_dict(part, opt, full, options=OPTIM_OPTS)
    trainer_state = json.loads((directory / TRAINER_STATE).read_text())
    rng = directory / f"rng_rank{rank}.json"
    if trainer_state.get("world_size") == world and rng.is_file():
        set_rng_state(json.loads(rng.read_text()))
    return trainer_state


def resolve_resume(latest: Path | None) -> tuple[Path | None, list[str]]:
    """The newest checkpoint at or before Ray's `latest` that verifies (collective), and why each
    newer one was skipped. The run's other checkpoints are the siblings of `latest`."""
    if latest is None:
        return None, []
    candidates = [p for p in list_checkpoints(latest.parent) if step_of(p) <= step_of(latest)]
    if latest not in candidates:
        candidates.insert(0, latest)
    return first_valid(candidates, verify_checkpoint)


def first_valid(candidates: list, verify, fetch=None) -> tuple[Path | None, list[str]]:
    """The first of `candidates` (newest first) whose files pass `verify` (None = fine), and why each
    one before it was skipped. `fetch` maps a candidate to the local directory to check (remote
    storage: a cached copy; default: the candidate itself); problems then name the candidate."""
    problems = []
    for cand in candidates:
        local = fetch(cand) if fetch is not None else cand
        problem = verify(local)
        if problem is None:
            return local, problems
        problems.append(problem.replace(str(local), str(cand)))
    return None, problems


# ---------------------------------------------------------------------------- offline: one process
def consolidate(directory: Path) -> dict[str, torch.Tensor]:
    """Full model tensors of a DCP checkpoint, whatever layout wrote it (no process group)."""
    reader = SafeReader(directory)
    metadata = reader.read_metadata()
    model = {}
    for key, md in metadata.state_dict_metadata.items():
        if key.startswith("model.") and isinstance(md, TensorStorageMetadata):
            model[key.removeprefix("model.")] = torch.empty(md.size, dtype=md.properties.dtype)
    with _single_process_quiet(1):
        dcp.load({"model": model}, storage_reader=reader, no_dist=True)
    return model


def pick_checkpoint(path: Path, step: int | None = None) -> Path:
    """A verified checkpoint of a run directory (the latest valid one, or the one at `step`), or
    `path` itself when it is a checkpoint directory. Skipped ones are reported with a warning."""
    if CKPT_RE.match(path.name) and (path / CONFIG).is_file():
        problem = verify_files(path)
        if problem:
            raise UserError(problem)
        return path
    found = list_checkpoints(path)
    if not found:
        raise UserError(f"{path}: no checkpoint_* directories (not a run directory, or no checkpoint saved yet)")
    if step is not None:
        found = [p for p in found if step_of(p) == step]
        if not found:
            steps = sorted({step_of(p) for p in list_checkpoints(path)})
            raise UserError(f"{path}: no checkpoint at step {step} (have steps {steps})")
    chosen, problems = first_valid(found, verify_files)
    if chosen is None:
        raise UserError(f"{path}: no valid checkpoint ({'; '.join(problems)})")
    for p in problems:
        warnings.warn(f"skipping a corrupted checkpoint: {p}; using {chosen.name}", stacklevel=3)
    return chosen


def load_run_state(path: str | Path, step: int | None = None) -> tuple[ModelConfig, dict[str, torch.Tensor], Path | None, dict]:
    """(model config, full weights, tokenizer.model or None, metadata) of a run's checkpoint.

    LoRA runs are merged into plain weights, so the result is an ordinary GPT state dict.
    """
    p = Path(path)
    if not p.is_dir():
        raise PathError(f"{p}: no such run or checkpoint directory")
    ckpt = pick_checkpoint(p, step)
    cfg, meta = read_config(ckpt)
    tensors = consolidate(ckpt)
    lora = (meta.get("job") or {}).get("lora")
    if lora:
        from mtnlg_ray.config import LoraConfig
        from mtnlg_ray.model.lora import merge_lora_state

        tensors = merge_lora_state(tensors, validate(LoraConfig, lora, str(ckpt / CONFIG)))
    if cfg.tie_embeddings:
        tensors.pop("lm_head.weight", None)
    state = json.loads((ckpt / TRAINER_STATE).read_text())
    tok = ckpt / TOKENIZER
    meta = {**{k: v for k, v in meta.items() if k != "job"}, "source": "run", "checkpoint": str(ckpt),
            "step": state["step"], "tokens": state["tokens"]}
    return cfg, tensors, tok if tok.is_file() else None, meta
