"""Where checkpoints live: local paths and storage URIs (s3://, gs://, ... through `pyarrow.fs`).

A run's checkpoints are the `checkpoint_{step:08d}_{time}` directories of its run directory
(`storage_path/name`), on a local or shared filesystem or on remote storage:

    open_location(path_or_uri)       (pyarrow filesystem, path inside it)
    checkpoints(fs, run_path)        a run's committed checkpoint directories, newest first
    drop_uncommitted(fs, run_path)   remove the ones Ray Train never committed
    pick_checkpoint(location, step)  a run's newest checkpoint that verifies (or the one at `step`),
                                     as a local directory; a corrupted newer one is skipped with a warning
    first_valid(candidates, verify)  the first candidate that verifies, and why each newer one did not

Local and shared-filesystem checkpoints are read in place. DCP and the manifest check read local
files, so a checkpoint on remote storage is fetched whole into a node-local cache first
(`fetch_dir`): once per node (the ranks of a node share it under a file lock) and once per
checkpoint (a `.complete` marker). That suits checkpoints of up to a few tens of GB; for larger
models use a shared filesystem path, which every rank reads in place.

A checkpoint directory is complete once its files are written, but it belongs to the run only
once Ray Train's controller registered it in `checkpoint_manager_snapshot.json` (at its next poll
of the workers, up to seconds later). A worker killed in between leaves a directory Ray never
resumes from: every reader here ignores it, and a resumed run removes it. A run directory without
that file (copied by hand, or written by another tool) has all of its checkpoint directories read.

Neither torch nor Ray is imported here: the driver's preflight lists runs with it before either starts.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Callable

import pyarrow.fs as pafs
from filelock import FileLock

from mtnlg_ray.checkpoint import manifest
from mtnlg_ray.errors import UserError

# MTNLG_CHECKPOINT_CACHE: where fetched checkpoints are kept on each node
CACHE_ROOT = Path(os.environ.get("MTNLG_CHECKPOINT_CACHE", "/tmp/mtnlg-checkpoint-cache"))
CKPT_RE = re.compile(r"^checkpoint_(\d{8})_")
SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's list of the checkpoints it committed


def checkpoint_dir_name(step: int) -> str:
    """checkpoint_{step:08d}_{time}: sorts by step, and a run resumed from an older checkpoint never
    reuses a directory name."""
    return f"checkpoint_{step:08d}_{time.strftime('%Y%m%d-%H%M%S')}_{time.time_ns() % 10**6:06d}"


def step_of(directory: str | Path) -> int:
    """The step of a checkpoint directory (path or URI), -1 for any other name."""
    m = CKPT_RE.match(str(directory).rstrip("/").rpartition("/")[2])
    return int(m.group(1)) if m else -1


def is_uri(path: str) -> bool:
    """True for `scheme://...` other than `file://` (a remote store that pyarrow.fs resolves)."""
    scheme, sep, _ = str(path).partition("://")
    return bool(sep) and scheme.isidentifier() and scheme.lower() != "file"


def is_local_fs(fs) -> bool:
    return fs is None or isinstance(fs, pafs.LocalFileSystem)


def open_location(location: str | Path) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) of a local path (made absolute; `file://` dropped) or a URI."""
    location = str(location)
    if not is_uri(location):
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(location.removeprefix("file://")))
    try:
        fs, path = pafs.FileSystem.from_uri(location)
    except (ValueError, OSError) as err:  # pyarrow's ArrowInvalid is a ValueError
        raise UserError(f"{location}: cannot open this storage URI ({err})") from None
    return fs, path.rstrip("/")


def listing(fs, path: str) -> list[pafs.FileInfo]:
    """What is directly inside `path` on `fs` (empty when it does not exist or is not a directory)."""
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    return fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))


def committed_names(fs, run_path: str) -> set[str] | None:
    """The checkpoint directory names Ray Train committed in this run; None when the run directory
    has no readable snapshot (then no directory can be told apart, and all count)."""
    try:
        with fs.open_input_stream(f"{run_path}/{SNAPSHOT}") as f:
            snapshot = json.loads(f.read())
        return {r["checkpoint_dir_name"] for r in snapshot["checkpoint_results"]}
    except (OSError, ValueError, KeyError, TypeError):  # FileNotFoundError is an OSError
        return None


def _on_disk(fs, run_path: str) -> list[str]:
    return [i.path for i in listing(fs, run_path)
            if i.type == pafs.FileType.Directory and CKPT_RE.match(i.base_name)]


def checkpoints(fs, run_path: str) -> list[str]:
    """The committed checkpoint directories of a run on `fs`, newest first (by step, then name:
    time of writing)."""
    found, committed = _on_disk(fs, run_path), committed_names(fs, run_path)
    if committed is not None:
        found = [p for p in found if p.rpartition("/")[2] in committed]
    return sorted(found, key=lambda p: (step_of(p), p), reverse=True)


def drop_uncommitted(fs, run_path: str) -> list[str]:
    """Remove the checkpoint directories of a run that Ray Train never committed (a worker died
    before the controller registered them); their names. Only while no worker of the run writes."""
    committed = committed_names(fs, run_path)
    if committed is None:
        return []
    dropped = [p for p in _on_disk(fs, run_path) if p.rpartition("/")[2] not in committed]
    for path in dropped:
        fs.delete_dir(path)
    return sorted(p.rpartition("/")[2] for p in dropped)


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


def local_copy(fs) -> Callable[[str], Path]:
    """How to get a local directory for a checkpoint path on `fs`: itself, or a fetched copy."""
    return Path if is_local_fs(fs) else functools.partial(fetch_dir, fs)


def first_valid(candidates: list[str], verify: Callable[[Path], str | None],
                fetch: Callable[[str], Path] = Path) -> tuple[Path | None, list[str]]:
    """The local directory of the first of `candidates` (newest first) that passes `verify` (None =
    fine), and why each one before it was skipped. `fetch` maps a candidate to the local directory
    to check (see `local_copy`); problems name the candidate, not the cached copy."""
    problems = []
    for cand in candidates:
        local = fetch(cand)
        why = verify(local)
        if why is None:
            return local, problems
        problems.append(why.replace(str(local), str(cand)))
    return None, problems


def pick_checkpoint(location: str | Path, step: int | None = None) -> Path:
    """A verified checkpoint of a run directory (its newest valid one, or the one at `step`), or of
    `location` itself when that is a checkpoint directory, on any storage; a local directory (a
    remote one is fetched to this node). Skipped ones are reported with a warning."""
    fs, path = open_location(location)
    if CKPT_RE.match(path.rpartition("/")[2]):
        found = [path]
    else:
        found = checkpoints(fs, path)
        if not found:
            raise UserError(f"{location}: no checkpoint_* directories (not a run directory, or no checkpoint "
                            "saved yet)")
    if step is not None:
        have = sorted({step_of(p) for p in found})
        found = [p for p in found if step_of(p) == step]
        if not found:
            raise UserError(f"{location}: no checkpoint at step {step} (have steps {have})")
    chosen, problems = first_valid(found, manifest.problem, local_copy(fs))
    if chosen is None:
        raise UserError(f"{location}: no valid checkpoint ({'; '.join(problems)})")
    for why in problems:
        warnings.warn(f"skipping a corrupted checkpoint: {why}; using {found[len(problems)].rpartition('/')[2]}",
                      stacklevel=3)
    return chosen
