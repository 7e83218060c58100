"""The job configs shipped inside the package (mtnlg_ray/configs/KIND/NAME.yaml), found by name.

    mtnlg pretrain debug            == mtnlg pretrain mtnlg_ray/configs/pretrain/debug.yaml
    resolve("pretrain", "debug")    -> that path; an existing file of the same name wins
    listing()                       -> (kind, name, path, first comment line) of every shipped config

KIND is the command that runs the config (preprocess, pretrain, finetune, tune, serve). Shipped
configs find files shipped beside them with `${CONFIG_DIR}` (load.py), so they work from an
installed package as from a checkout.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import NamedTuple

from mtnlg_ray.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent / "configs"
KINDS = ("preprocess", "pretrain", "finetune", "tune", "serve")


class Shipped(NamedTuple):
    kind: str
    name: str
    path: Path
    about: str  # the file's first comment line


def names(kind: str) -> list[str]:
    """The shipped configs of one command, sorted."""
    return sorted(p.stem for p in (ROOT / kind).glob("*.yaml"))


def _about(path: Path) -> str:
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
        if line.strip():
            break
    return ""


def listing() -> list[Shipped]:
    return [Shipped(kind, name, ROOT / kind / f"{name}.yaml", _about(ROOT / kind / f"{name}.yaml"))
            for kind in KINDS for name in names(kind)]


def resolve(kind: str, path_or_name: str | Path) -> Path:
    """A config file: the path if it exists, else the shipped `kind` config of that name (with or
    without .yaml). A name shipped only for another command, or no such file, is a ConfigError."""
    path = Path(path_or_name)
    if path.is_file():
        return path
    name = path.name.removesuffix(".yaml") if path.parent == Path(".") else None
    if name is not None and name in names(kind):
        return ROOT / kind / f"{name}.yaml"
    others = [k for k in KINDS if k != kind and name in names(k)]
    if others:
        raise ConfigError(f"{path_or_name}: that is a shipped {' and '.join(others)} config, not a {kind} one "
                          f"({_choices(kind)}; or a YAML path)")
    hint = ""
    if name is not None:
        close = difflib.get_close_matches(name, names(kind), n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"{path_or_name}: no such config file or shipped {kind} config ({_choices(kind)}){hint}")


def _choices(kind: str) -> str:
    shipped = names(kind)
    return f"{kind} configs shipped: {', '.join(shipped)}" if shipped else f"no {kind} config is shipped"
