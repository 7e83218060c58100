"""Sharded training checkpoints (torch.distributed.checkpoint): save and load inside the training
loop, and consolidation into full tensors in one process.

A checkpoint directory, as Ray Train stores it under `storage_path/name/` (every rank writes
its own files into a local directory; `ray.train.report(checkpoint=...)` merges them):

    checkpoint_{step:08d}_{time}/
      .metadata, __{rank}_0.distcp   DCP: {"model": weights, "optim": AdamW tensors}, sharded as trained
      trainer_state.json             step, consumed samples/tokens, data position, identity (rank 0)
      rng_rank{r}.json               Python / NumPy / torch RNG states of rank r
      config.json                    {"format_version": 1, "model": ModelConfig, "kind", "job"} (rank 0)
      tokenizer.model                the dataset's tokenizer (rank 0)
      manifest.json                  sha256 of every file above, from all ranks (rank 0)

Keys are the model's own parameter names (FSDP2, DTensor TP and pipeline stages keep them), and
optimizer state is flattened per parameter name (`state.{fqn}.exp_avg`), so a checkpoint loads
into any other layout: DCP reshards on load. Only tensors are stored: hyperparameters come from
the config, so nothing is unpickled except DCP's `.metadata`, which is read with an allow-list.

The model is given as its parts (one module per pipeline stage a rank holds) and the optimizer
as (part, optimizer) pairs, one per part that has something to train: this module knows nothing
of the training loop that owns them.
"""

from __future__ import annotations

import json
import pickle
import random
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from mtnlg_ray.checkpoint import manifest, remote
from mtnlg_ray.checkpoint.manifest import CONFIG, TOKENIZER, TRAINER_STATE
from mtnlg_ray.config import LoraConfig, ModelConfig, validate
from mtnlg_ray.errors import UserError
from mtnlg_ray.model.lora import merge_lora_state

OPTIM_OPTS = StateDictOptions(flatten_optimizer_state_dict=True)
Pairs = list[tuple[nn.Module, torch.optim.Optimizer]]  # (model part, its optimizer)


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
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


# ------------------------------------------------------------------------------------ verifying
def verify(directory: Path) -> str | None:
    """manifest.problem, collective when a process group exists: every rank hashes its share of the
    files and all ranks get the same answer (None: the checkpoint verifies)."""
    rank, world = _rank_world()
    why = manifest.problem(directory, rank, world)
    if world > 1:
        answers = [None] * world
        dist.all_gather_object(answers, why)
        why = next((a for a in answers if a), None)
    return why


def resolve_resume(fs, latest: str) -> tuple[Path | None, list[str]]:
    """The newest checkpoint at or before `latest` (the one Ray Train hands back, on the pyarrow
    filesystem `fs`) that verifies, as a local directory, and why each newer one was skipped.

    The run's other checkpoints are the siblings of `latest`. On a local or shared filesystem they
    are read in place; on remote storage the candidates, newest first, are fetched into the node
    cache until one verifies. Collective: every rank walks the same list."""
    latest = latest.rstrip("/")
    candidates = [c for c in remote.checkpoints(fs, latest.rpartition("/")[0])
                  if remote.step_of(c) <= remote.step_of(latest)]
    if latest not in candidates:
        candidates.insert(0, latest)
    return remote.first_valid(candidates, verify, remote.local_copy(fs))


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


# ------------------------------------------------------------------------------ in-loop save/load
def _state_dicts(parts: list[nn.Module], pairs: Pairs):
    """({"model": merged weights, "optim": merged AdamW tensors}, per-pair full optimizer dicts)."""
    model_sd: dict = {}
    for part in parts:
        model_sd.update(get_model_state_dict(part))
    optim_full = [get_optimizer_state_dict(part, opt, options=OPTIM_OPTS) for part, opt in pairs]
    optim_sd = {k: v for sd in optim_full for k, v in sd.items() if isinstance(v, torch.Tensor)}
    return {"model": model_sd, "optim": optim_sd}, optim_full


def save(parts: list[nn.Module], pairs: Pairs, trainer_state: dict, config_json: dict,
         tokenizer_path: str | Path | None) -> Path:
    """Write this rank's part of a checkpoint into a fresh local temp directory (collective).

    `config_json`: {"model": ModelConfig dump, ...} for config.json. The caller hands the directory
    to `ray.train.report(checkpoint=...)` and deletes it after."""
    rank, world = _rank_world()
    out = Path(tempfile.mkdtemp(prefix=f"mtnlg-ckpt-r{rank}-"))
    state, _ = _state_dicts(parts, pairs)
    with _single_process_quiet(world):
        dcp.save(state, storage_writer=FileSystemWriter(out), no_dist=world == 1)
    (out / f"rng_rank{rank}.json").write_text(json.dumps(rng_state()))
    if rank == 0:
        (out / TRAINER_STATE).write_text(json.dumps({**trainer_state, "world_size": world}, indent=2))
        manifest.write_config(out, config_json)
        if tokenizer_path is not None:
            shutil.copyfile(tokenizer_path, out / TOKENIZER)
    hashes = manifest.hash_files(out)
    if world > 1:
        gathered = [None] * world if rank == 0 else None
        dist.gather_object(hashes, gathered, dst=0)
        if rank == 0:
            hashes = {k: v for h in gathered for k, v in h.items()}
    if rank == 0:
        manifest.write(out, hashes, world_size=world)
    return out


def load(directory: Path, parts: list[nn.Module], pairs: Pairs | None) -> dict:
    """Load weights (+ optimizer state when `pairs` are given) into the parts, whatever layout
    saved them; returns the trainer state. Restores this rank's RNG when the checkpoint was
    written by as many ranks (collective)."""
    rank, world = _rank_world()
    if pairs is not None:
        state, optim_full = _state_dicts(parts, pairs)
    else:
        state = {"model": {k: v for part in parts for k, v in get_model_state_dict(part).items()}}
    with _single_process_quiet(world):
        dcp.load(state, storage_reader=SafeReader(directory), no_dist=world == 1)
    for part in parts:  # the loaded tensors were written in place; hand each part its own keys
        own = get_model_state_dict(part)
        set_model_state_dict(part, {k: state["model"][k] for k in own})
    if pairs is not None:
        for (part, opt), full in zip(pairs, optim_full):
            set_optimizer_state_dict(part, opt, full, options=OPTIM_OPTS)
    trainer_state = manifest.read_trainer_state(directory)
    rng = directory / f"rng_rank{rank}.json"
    if trainer_state.get("world_size") == world and rng.is_file():
        set_rng_state(json.loads(rng.read_text()))
    return trainer_state


# ---------------------------------------------------------------------------- offline: one process
def consolidate(directory: Path, keep: Callable[[str], bool] | None = None) -> dict[str, torch.Tensor]:
    """Full model tensors of a DCP checkpoint, whatever layout wrote it (no process group); with `keep`,
    only the tensors whose names it accepts are read."""
    reader = SafeReader(directory)
    metadata = reader.read_metadata()
    model = {}
    for key, md in metadata.state_dict_metadata.items():
        name = key.removeprefix("model.")
        if key.startswith("model.") and isinstance(md, TensorStorageMetadata) and (keep is None or keep(name)):
            model[name] = torch.empty(md.size, dtype=md.properties.dtype)
    with _single_process_quiet(1):
        dcp.load({"model": model}, storage_reader=reader, no_dist=True)
    return model


def full_weights(directory: Path, cfg: ModelConfig, job: dict) -> dict[str, torch.Tensor]:
    """The plain GPT state dict of a training checkpoint: consolidated, LoRA adapters (when `job`,
    the job it was trained with, has `lora`) merged into the weights, a tied lm_head left out."""
    tensors = consolidate(directory)
    if job.get("lora"):
        tensors = merge_lora_state(tensors, validate(LoraConfig, job["lora"], str(Path(directory) / CONFIG)))
    if cfg.tie_embeddings:
        tensors.pop("lm_head.weight", None)
    return tensors
