"""The installed package, not the checkout: the wheel carries the shipped configs, and from it every
config resolves by name, each job command's --help example loads, and `mtnlg configs` lists them."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from mtnlg_ray.config import shipped

ROOT = Path(__file__).resolve().parents[1]
# Run with the unpacked wheel first on sys.path and the checkout nowhere on it (cwd is a temp dir).
FROM_WHEEL = """
import shlex, sys
from pathlib import Path
import mtnlg_ray
from mtnlg_ray.cli import COMMANDS, main
from mtnlg_ray.config import JOBS, load_job, load_yaml, shipped
assert Path(mtnlg_ray.__file__).resolve().is_relative_to(Path(sys.argv[1]).resolve()), mtnlg_ray.__file__
for s in shipped.listing():
    if "applications" not in load_yaml(s.path):  # a Ray Serve config file, not a job
        load_job(s.name, JOBS[s.kind])
for command, (_, _, _, example) in COMMANDS.items():
    if command in ("preprocess", "pretrain", "finetune", "tune"):  # the commands that take a job config
        words = shlex.split(example)
        load_job(words[2], JOBS[command], [words[i + 1] for i, w in enumerate(words) if w == "--set"])
sys.exit(main(["configs"]))
"""


def test_the_wheel_carries_the_configs_and_they_resolve(tmp_path):
    src = tmp_path / "src"  # a copy: the build writes build/ and *.egg-info beside pyproject.toml
    shutil.copytree(ROOT / "mtnlg_ray", src / "mtnlg_ray", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(src),
                    "-w", str(tmp_path / "dist")], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("mtnlg_ray-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        metadata = z.read("mtnlg_ray-0.1.0.dist-info/METADATA").decode()
        z.extractall(tmp_path / "site")
    shipped_files = {f"mtnlg_ray/{p.relative_to(shipped.ROOT.parent).as_posix()}" for p in shipped.ROOT.rglob("*")
                     if p.is_file() and p.suffix in (".yaml", ".jsonl")}
    assert shipped_files and shipped_files <= names, sorted(shipped_files - names)
    assert "mtnlg_ray-0.1.0.dist-info/licenses/LICENSE" in names and "License: Apache-2.0" in metadata

    run = subprocess.run([sys.executable, "-c", FROM_WHEEL, str(tmp_path / "site")], cwd=tmp_path,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path / "site"), "HOME": str(tmp_path)},
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    *table, blank, where = run.stdout.splitlines()  # `mtnlg configs`: a row per config, then where they are
    assert [row.split()[:2] for row in table] == [[s.kind, s.name] for s in shipped.listing()] and not blank
    assert where.endswith(str((tmp_path / "site" / "mtnlg_ray" / "configs").resolve())), where
