"""fileio.atomic_dir: all or nothing, and the result carries the user's umask (shareable, not 0700)."""

import os

import pytest

from mtnlg_ray.fileio import atomic_dir


@pytest.fixture
def umask():
    """Set the process umask for one test; the old one comes back afterwards."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o755), (0o027, 0o750), (0o077, 0o700)])
def test_the_directory_gets_the_umask(tmp_path, umask, mask, mode):
    umask(mask)
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "f").write_text("x")
        os.close(os.open(tmp / "private", os.O_CREAT | os.O_WRONLY, 0o600))  # as safetensors writes its file
        (tmp / "sub").mkdir(mode=0o700)
    out = tmp_path / "out"
    assert (out / "f").read_text() == "x"
    modes = {p.name: p.stat().st_mode & 0o777 for p in [out, *out.iterdir()]}
    assert modes == {"out": mode, "sub": mode, "f": mode & 0o666, "private": mode & 0o666}


def test_a_failed_write_leaves_nothing(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old").write_text("kept")
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "out") as tmp:
        (tmp / "new").write_text("x")
        raise RuntimeError("interrupted")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (tmp_path / "out" / "old").read_text() == "kept"
