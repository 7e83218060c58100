"""Checkpoints on remote storage (s3://, gs://, ... through `pyarrow.fs`).

With a URI `scaling.storage_path`, Ray Train uploads each checkpoint and hands it back as
(filesystem, path). DCP and the manifest check read local files, so a checkpoint is fetched
whole into a node-local cache first: once per node (the ranks of a node share it under a file
lock) and once per checkpoint (a `.complete` marker). That suits checkpoints of up to a few tens
of GB; for larger models use a shared filesystem path, which every rank reads in place.

    resolve_resume_from(ray_checkpoint)   resume: the newest verifying checkpoint (local or remote)
    local_source(path, step)              what every loader opens: a local path as is, or for a URI
                                          (export / serve / fine-tune from s3://.../run_name) the
                                          fetched checkpoint directory, which loaders read like a run
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import warnings
from pathlib import Path

import pyarrow.fs as pafs
from filelock import FileLock

from mtnlg_ray.errors import UserError
from mtnlg_ray.train.checkpoint import CKPT_RE, first_valid, resolve_resume, step_of, verify_checkpoint, verify_files
from mtnlg_ray.train.storage import is_uri

# MTNLG_CHECKPOINT_CACHE: where fetched checkpoints are kept on each node
CACHE_ROOT = Path(os.environ.get("MTNLG_CHECKPOINT_CACHE", "/tmp/mtnlg-checkpoint-cache"))


def is_local_fs(fs) -> bool:
    return fs is None or isinstance(fs, pafs.LocalFileSystem)


def open_uri(uri: str):
    """(pyarrow filesystem, path inside it) of a storage URI such as s3://bucket/runs/name."""
    try:
        return pafs.FileSystem.from_uri(uri)
    except (ValueError, OSError) as err:  # pyarrow's ArrowInvalid is a ValueError
        raise UserError(f"{uri}: cannot open this storage URI ({err})") from None


def list_dirs(fs, path: str) -> list[str]:
    """Paths of the directories directly inside `path` on `fs` (empty if it does not exist)."""
    infos = fs.get_file_info(pafs.FileSelector(path.rstrip("/"), allow_not_found=True))
    return [i.path for i in infos if i.type == pafs.FileType.Directory]


def fetch_dir(fs, path: str) -> Path:
    """A local copy of the directory `path` on `fs`, downloaded once per node and reused."""
    key = hashlib.sha256(f"{fs.type_name}:{path}".encode()).hexdigest()[:16]
    dest = CACHE_ROOT / f"{Path(path).name}-{key}"
    CACHE_ROOT.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dest) + ".lock"):
        if not (dest / ".complete").is_file():
            tmp = dest.with_name(dest.name + ".partial")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            pafs.copy_files(path, str(tmp), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
            shutil.rmtree(dest, ignore_errors=True)
            tmp.rename(dest)
            (dest / ".complete").write_text(path)
    return dest


def resolve_resume_from(checkpoint) -> tuple[Path | None, list[str]]:
    """`resolve_resume` for the `ray.train.Checkpoint` Ray hands back, on any storage.

    On a local or shared filesystem the checkpoints are read in place. On remote storage
    (s3://, gs://, ...) the candidates, newest first, are fetched into a node-local cache
    (`fetch_dir`) until one verifies; every rank walks the same list (the check is collective).
    """
    if is_local_fs(checkpoint.filesystem):
        return resolve_resume(Path(checkpoint.path))
    fs, latest = checkpoint.filesystem, checkpoint.path.rstrip("/")
    candidates = [c for c in _remote_checkpoints(fs, latest.rpartition("/")[0]) if _step(c) <= _step(latest)]
    if latest not in candidates:
        candidates.insert(0, latest)
    return first_valid(candidates, verify_checkpoint, fetch=functools.partial(fetch_dir, fs))


def _step(path: str) -> int:
    return step_of(Path(path))


def _remote_checkpoints(fs, run_path: str) -> list[str]:
    """Checkpoint directories of a run on a pyarrow filesystem, newest first (as list_checkpoints)."""
    found = [d for d in list_dirs(fs, run_path) if CKPT_RE.match(d.rstrip("/").rpartition("/")[2])]
    return sorted(found, key=lambda d: (_step(d), d), reverse=True)


def fetch_run_checkpoint(uri: str, step: int | None = None) -> Path:
    """A local, verified copy of a run's checkpoint on remote storage (`uri`: the run or one checkpoint)."""
    fs, path = open_uri(uri)
    path = path.rstrip("/")
    if CKPT_RE.match(path.rpartition("/")[2]):
        found = [path]
    else:
        found = _remote_checkpoints(fs, path)
        if not found:
            raise UserError(f"{uri}: no checkpoint_* directories (not a run directory, or no checkpoint saved yet)")
        if step is not None:
            found = [d for d in found if _step(d) == step]
            if not found:
                raise UserError(f"{uri}: no checkpoint at step {step}")
    local, problems = first_valid(found, verify_files, fetch=functools.partial(fetch_dir, fs))
    if local is None:
        raise UserError(f"{uri}: no valid checkpoint ({'; '.join(problems)})")
    for p in problems:
        warnings.warn(f"skipping a corrupted checkpoint: {p}; using {found[len(problems)]}", stacklevel=3)
    return local


def local_source(path: str | Path, step: int | None = None) -> Path:
    """`path` itself (file:// dropped), or for a remote storage URI a verified local copy of the run's
    checkpoint (the latest, or the one at `step`): a checkpoint directory, which every loader accepts
    where a run directory goes."""
    path = str(path)
    return fetch_run_checkpoint(path, step) if is_uri(path) else Path(path.removeprefix("file://"))
