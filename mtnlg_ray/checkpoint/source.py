"""What a path is, and the one way to read it: `open_source(path, step=None) -> Source`.

    kind      what the path is                                  what is read
    native    config.json + model.safetensors + manifest.json   the directory (`mtnlg export` writes it)
    run       a Ray Train run directory                         its newest checkpoint that verifies (or `step`'s)
    sharded   one checkpoint_* directory (DCP shards)           the directory, consolidated in this process
    hf_gpt2   a transformers GPT-2 directory                    config.json (model_type gpt2) + model.safetensors
    remote    a run or checkpoint on s3://, gs://, ...          its checkpoint, fetched to this node's cache

Resume and fine-tune init (train/), export and generate (api.py) and serving (serve/) all open
checkpoints here. Opening reads no weights: the kind follows from the files, a run's checkpoint is
chosen by its manifest (a corrupted newer one is skipped with a warning), and `config()` reads
config.json. `state_dict()` reads full tensors in one process (a sharded checkpoint consolidated,
LoRA adapters merged, a tied lm_head left out), so every consumer gets a plain GPT state dict.

Opening imports neither torch nor Ray: the CLI and the driver's preflight call it to refuse a wrong
path in about a second. The weight readers (native, sharded, hf_gpt2: torch and safetensors) are
imported by the methods that read weights, `state_dict()` and `model()`, and by a GPT-2
directory's `config()`.
"""

from __future__ import annotations

import enum
import json
import os
from dataclasses import dataclass
from pathlib import Path

from mtnlg_ray.checkpoint import remote
from mtnlg_ray.checkpoint.manifest import CONFIG, MANIFEST, WEIGHTS, read_config, read_trainer_state
from mtnlg_ray.config import ModelConfig
from mtnlg_ray.data.tokenizer import find_tokenizer, load_tokenizer
from mtnlg_ray.errors import PathError, UserError

NOT_FOUND = "no such checkpoint, run directory or GPT-2 directory"


class Kind(str, enum.Enum):
    NATIVE = "native"
    RUN = "run"
    SHARDED = "sharded"
    HF_GPT2 = "hf_gpt2"
    REMOTE = "remote"


TRAINING_KINDS = (Kind.RUN, Kind.SHARDED, Kind.REMOTE)  # read from a DCP training checkpoint


@dataclass(frozen=True)
class Source:
    """An opened checkpoint. `location`: as the user named it; `path`: the local directory read
    (for a run or a URI, the checkpoint chosen, fetched to this node when remote)."""

    location: str
    kind: Kind
    path: Path

    @property
    def tokenizer_path(self) -> Path | None:
        """tokenizer.model, a tokenizer.json, or the directory when it holds GPT-2's vocab.json +
        merges.txt (`find_tokenizer`: which one when several); None if none."""
        return find_tokenizer(self.path)

    def config(self) -> ModelConfig:
        """The model's architecture (no weights read)."""
        if self.kind is Kind.HF_GPT2:
            from mtnlg_ray.checkpoint import hf_gpt2  # torch: see the module docstring

            return hf_gpt2.read_config(self.path)
        return read_config(self.path)[0]

    def meta(self) -> dict:
        """What the checkpoint says about itself besides the model: a native export's metadata, or
        for a training checkpoint {"source": kind, "kind", "checkpoint", "step", "tokens"}."""
        if self.kind is Kind.HF_GPT2:
            return {"source": self.kind.value}
        _, meta = read_config(self.path)
        meta = {k: v for k, v in meta.items() if k not in ("format_version", "model", "job")}
        if self.kind in TRAINING_KINDS:
            state = read_trainer_state(self.path)
            meta.update(source=self.kind.value, checkpoint=str(self.path), step=state["step"], tokens=state["tokens"])
        return meta

    def state_dict(self) -> dict:
        """Full tensors {name: torch.Tensor} of the plain GPT (a tied lm_head left out)."""
        from mtnlg_ray.checkpoint import hf_gpt2, native, sharded  # torch: see the module docstring

        if self.kind is Kind.NATIVE:
            return native.load_tensors(self.path)
        if self.kind is Kind.HF_GPT2:
            return hf_gpt2.load(self.path)[1]
        cfg, meta = read_config(self.path)
        return sharded.full_weights(self.path, cfg, meta.get("job") or {})

    def model(self, device="cpu", dtype=None):
        """The GPT (eval mode) on `device` (a torch device or its name), in `dtype` (default: as stored)."""
        from mtnlg_ray.checkpoint import native  # torch: see the module docstring

        return native.build_model(self.config(), self.state_dict(), self.location, device, dtype)

    def tokenizer(self):
        """The tokenizer (SentencePiece, tokenizer.json or GPT-2 BPE), checked against the model's vocabulary;
        None if there is none."""
        tok = self.tokenizer_path
        return None if tok is None else load_checked_tokenizer(tok, self.config(), self.location)


def load_checked_tokenizer(path: str | Path, cfg: ModelConfig, where: str | Path):
    """The tokenizer at `path`, refused in one line when its vocabulary is not the model's."""
    tok = load_tokenizer(path)
    if tok.vocab_size != cfg.vocab_size:
        raise UserError(f"{where}: tokenizer has {tok.vocab_size} tokens but the model's vocab_size is "
                        f"{cfg.vocab_size}")
    return tok


def check_exists(location: str | Path, key: str | None = None) -> None:
    """A local path that does not exist is a PathError (exit 2) naming `key` (a config key) when
    given; a URI is checked when it is opened."""
    location = str(location)
    if not remote.is_uri(location) and not os.path.exists(location.removeprefix("file://")):
        raise PathError(f"{key}: {location}: {NOT_FOUND}" if key else f"{location}: {NOT_FOUND}")


def open_source(location: str | Path, step: int | None = None) -> Source:
    """Open a checkpoint of any kind (module docstring); `step` picks a run's checkpoint (default: the
    newest that verifies). A missing path is a PathError, anything else unreadable a UserError."""
    location = str(location)
    if remote.is_uri(location):
        return Source(location, Kind.REMOTE, remote.pick_checkpoint(location, step))
    check_exists(location)
    path = Path(location.removeprefix("file://"))
    if (path / CONFIG).is_file() and (path / WEIGHTS).is_file() and (path / MANIFEST).is_file():
        kind = Kind.NATIVE
    elif _is_hf_gpt2(path):
        kind = Kind.HF_GPT2
    else:
        kind = Kind.SHARDED if remote.CKPT_RE.match(path.name) else Kind.RUN
        return Source(location, kind, remote.pick_checkpoint(path, step))
    if step is not None:
        raise UserError(f"{location}: a {kind.value} checkpoint has one set of weights; step={step} applies to "
                        "run directories")
    return Source(location, kind, path)


def _is_hf_gpt2(path: Path) -> bool:
    """A transformers directory of a GPT-2 model: config.json says model_type "gpt2"."""
    try:
        cfg = json.loads((path / CONFIG).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and cfg.get("model_type") == "gpt2"
