"""Small file helpers shared by every stage: content hashes and all-or-nothing directory writes."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextmanager
def atomic_dir(out_dir: str | Path, overwrite: bool = True):
    """Yield a temporary sibling directory; on success it replaces `out_dir`, on error it is removed.

    A failed or interrupted write never leaves a directory that looks finished. What it holds gets
    the modes the user's umask gives a plain mkdir / open, so the result can be shared: not
    tempfile's 0700, nor the 0600 some writers use for their own temporary files (safetensors).
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        _widen_to_umask(tmp)
        if out.exists():
            if not overwrite:
                raise FileExistsError(f"{out}: already exists")
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def umask() -> int:
    """The process umask, read from /proc where Linux has it (setting it to read it back is not
    thread-safe), else set and restored."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _widen_to_umask(root: Path) -> None:
    """`root` and everything below it: the modes a plain mkdir / open gives under the umask
    (directories 0777, files 0666, less the umask; an execute bit a file has is kept)."""
    mask = umask()
    for path in [root, *root.rglob("*")]:
        mode = path.lstat().st_mode
        if stat.S_ISLNK(mode):
            continue
        wanted = (mode | (0o777 if stat.S_ISDIR(mode) else 0o666)) & ~mask & 0o7777
        if wanted != mode & 0o7777:
            os.chmod(path, wanted)
