"""`--resume auto|never|PATH` (LitGPT's convention) and whether a checkpoint fits the new job.

    auto    (default) a run whose `storage_path/name` holds checkpoints continues from its latest,
            which is what Ray Train does with a new trainer of the same storage path and name
    never   refuse to start where a run already is (its directory is not empty)
    PATH    a new run starts from that checkpoint (a checkpoint_* directory, or a run directory:
            its newest); the run's own directory must be empty, since Ray Train would otherwise
            continue the run found there (PATH naming that run's newest checkpoint is `auto`)

A checkpoint records what it was trained on, its identity (`identity()`, in trainer_state.json):
the model's architecture, the tokenizer's sha256, the sequence length and the data (each dataset's
manifest digest, weight and the blend seed; for fine-tuning the task data settings and the LoRA
shape). Before resuming, the saved identity is compared with the new job's: any difference is a
one-line ConfigError naming the keys (resuming would fail inside DCP with a size mismatch, or
continue silently on other data at a meaningless position). Every other change (max_steps,
intervals, lr, batch size, layout, ...) is allowed and logged. Only a few small JSON files are
read (local or remote storage, through pyarrow.fs) and neither torch nor Ray is imported: this
runs in the driver before either starts.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import NamedTuple

import pyarrow.fs as pafs

from mtnlg_ray.checkpoint.manifest import CONFIG, MANIFEST, TOKENIZER, TRAINER_STATE
from mtnlg_ray.checkpoint.remote import CKPT_RE, checkpoints, is_uri, listing, open_location, step_of
from mtnlg_ray.errors import ConfigError, PathError
from mtnlg_ray.train.storage import run_location

log = logging.getLogger(__name__)

# ModelConfig fields that shape the weights (or, rotary_base, what they mean); the rest (dropout,
# init_std, layernorm_eps, activation_checkpointing) may change on resume
ARCH_KEYS = ("vocab_size", "pad_vocab_multiple", "n_layers", "d_model", "n_heads", "mlp_ratio", "max_seq_len",
             "position", "rotary_base", "bias", "tie_embeddings")
# SftDataConfig fields that change the task rows (the tokenizer is compared by content instead)
SFT_DATA_KEYS = ("task", "train_paths", "val_paths", "val_fraction", "packing", "overlong", "max_examples", "seed")
LORA_SHAPE_KEYS = ("rank", "target_modules")
# manifest.json fields that describe a dataset's rows (not where it was written)
MANIFEST_DATA_KEYS = ("tokenizer_sha256", "vocab_size", "eod_id", "seq_len", "columns", "splits", "cleaning")


# ------------------------------------------------------------------------------------- identity
def manifest_digest(manifest: dict) -> str:
    """sha256 of what a dataset manifest says about the rows: a moved copy keeps it, new data does not."""
    data = {k: manifest[k] for k in MANIFEST_DATA_KEYS if k in manifest}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def identity(job, model: dict, tokenizer_sha256: str, seq_len: int, manifests: list[dict] | None = None) -> dict:
    """{dotted key: value} of what a run trains on: what must not change when it resumes.

    `model`: the resolved ModelConfig dump (vocab_size set); `manifests`: the pretraining datasets'
    manifest.json, in data.datasets order (fine-tuning: its task settings are compared instead)."""
    out = {f"model.{k}": model.get(k) for k in ARCH_KEYS}
    out["tokenizer.sha256"] = tokenizer_sha256
    out["seq_len"] = int(seq_len)
    sft = getattr(job, "sft", None)
    if sft is not None:
        out.update({f"sft.{k}": getattr(sft, k) for k in SFT_DATA_KEYS})
        lora = job.lora.model_dump(mode="json") if job.lora is not None else {}
        out.update({f"lora.{k}": lora.get(k) for k in LORA_SHAPE_KEYS})
    else:
        out["data.seed"] = job.data.seed
        for i, (spec, m) in enumerate(zip(job.data.datasets, manifests or [])):
            out[f"data.datasets[{i}]"] = manifest_digest(m)
            out[f"data.datasets[{i}].weight"] = spec.weight
    return json.loads(json.dumps(out))  # as it reads back from trainer_state.json (tuples -> lists)


# ------------------------------------------------------------------------------- saved checkpoints
def _read_json(fs, path: str) -> dict | None:
    try:
        with fs.open_input_stream(path) as f:
            return json.loads(f.read())
    except (OSError, ValueError):  # missing, unreadable or not JSON
        return None


class Saved(NamedTuple):
    """What a checkpoint says about the run that wrote it."""

    where: str           # the checkpoint directory, as the user would name it
    step: int
    job: dict            # the job it was trained with
    identity: dict       # see identity(); older checkpoints: model, tokenizer and seq_len only


def read_saved(fs, path: str, where: str) -> Saved:
    """The Saved of checkpoint directory `path` on `fs` (`where`: how to name it in messages)."""
    config, state = _read_json(fs, f"{path}/{CONFIG}"), _read_json(fs, f"{path}/{TRAINER_STATE}")
    if config is None or state is None:
        raise PathError(f"{where}: not a training checkpoint (config.json or trainer_state.json missing or "
                        "unreadable)")
    ident = state.get("identity")
    if ident is None:  # written before identities were saved: rebuild what the files still tell
        model = config.get("model") or {}
        files = (_read_json(fs, f"{path}/{MANIFEST}") or {}).get("files", {})
        ident = {f"model.{k}": model.get(k) for k in ARCH_KEYS}
        ident["tokenizer.sha256"] = files.get(TOKENIZER)
        if state.get("consumed_samples"):
            ident["seq_len"] = state["tokens"] // state["consumed_samples"]
    return Saved(where, int(state.get("step", step_of(path))), config.get("job") or {}, ident)


# ---------------------------------------------------------------------------------------- policy
def check_resume(job, mode: str, new_identity: dict) -> str | None:
    """Apply `--resume mode` to `job`'s run directory and check the checkpoint it resumes from
    against `new_identity`; returns the checkpoint a new run starts from (PATH), else None."""
    saved, start_from = resume_target(job, mode)
    if saved is not None:
        check_compatible(saved, new_identity, job)
    return start_from


def resume_target(job, mode: str) -> tuple[Saved | None, str | None]:
    """(what the run would resume from, or None; the checkpoint a new run starts from (PATH), or
    None), refusing in one line what `--resume mode` forbids (see the module docstring)."""
    run = run_location(job.scaling.storage_path, job.scaling.name)
    fs, run_path = open_location(run)
    infos = listing(fs, run_path)
    ckpts = checkpoints(fs, run_path)
    if mode == "never":
        if infos:
            what = f"checkpoints up to step {step_of(ckpts[0])}" if ckpts else \
                ", ".join(sorted(i.base_name for i in infos)[:3])
            raise ConfigError(f"{run}: a run already exists here ({what}) and --resume never refuses to start "
                              f"over it; continue it with --resume auto, or start a new run with --set "
                              f"scaling.name=NEW_NAME")
        return None, None
    if mode == "auto":
        for ckpt in ckpts:  # a directory left half-written by a crash is no run to compare with
            try:
                return read_saved(fs, ckpt, _name(run, ckpt, run_path)), None
            except PathError:
                continue
        return None, None
    src_fs, src, where = _resume_source(mode)
    if infos:
        if ckpts and src_fs.type_name == fs.type_name and src == ckpts[0]:  # this run's own latest: auto
            return read_saved(fs, src, where), None
        raise ConfigError(f"--resume {mode}: {run} holds a run already, which Ray Train would continue from its "
                          f"own latest checkpoint instead; start from {where} under a new name (--set "
                          f"scaling.name=NEW_NAME), or continue {run} with --resume auto")
    return read_saved(src_fs, src, where), where


def _name(run: str, path: str, run_path: str) -> str:
    return run + path[len(run_path):] if path.startswith(run_path) else path


def _resume_source(value: str) -> tuple:
    """(fs, path, name for messages and for the workers) of the checkpoint `--resume PATH` means."""
    fs, path = open_location(value)
    kind = fs.get_file_info(path).type
    if kind == pafs.FileType.NotFound:
        raise PathError(f"--resume {value}: no such checkpoint or run directory")
    if kind != pafs.FileType.Directory:
        raise PathError(f"--resume {value}: not a directory (expected a checkpoint_* directory or a run directory)")
    name = value.rstrip("/") if is_uri(value) else path
    if CKPT_RE.match(path.rpartition("/")[2]):
        return fs, path, name
    ckpts = checkpoints(fs, path)
    if ckpts:
        return fs, ckpts[0], name + ckpts[0][len(path):]
    if _read_json(fs, f"{path}/{CONFIG}") is not None:
        raise PathError(f"--resume {value}: an exported model (no optimizer or trainer state), not a training "
                        "checkpoint; to start from its weights, fine-tune with init_from")
    raise PathError(f"--resume {value}: no checkpoint_* directories (not a run directory, or none saved yet)")


def check_compatible(saved: Saved, new_identity: dict, job) -> None:
    """Refuse a resume that changes what the run trains on; log every other change of the job."""
    complete = any(k.startswith(("data.", "sft.")) for k in saved.identity)
    keys = dict.fromkeys([*saved.identity, *(new_identity if complete else ())])  # older: what it has
    differ = [k for k in keys if saved.identity.get(k) != new_identity.get(k)]
    if differ:
        changes = ", ".join(f"{k} ({_short(saved.identity.get(k))} -> {_short(new_identity.get(k))})" for k in differ)
        raise ConfigError(f"{saved.where}: cannot resume: {changes} differ from the checkpoint's; restore "
                          f"{'it' if len(differ) == 1 else 'them'}, or start a new run with --set scaling.name=NEW_NAME")
    if not complete:
        log.warning("resume: %s predates data fingerprints; its dataset is not compared with the new one", saved.where)
    old, new = _flat(saved.job), _flat(job.model_dump(mode="json"))
    changed = [f"{k}: {_short(old.get(k))} -> {_short(new.get(k))}" for k in sorted(set(old) | set(new))
               if old.get(k) != new.get(k)]
    log.info("resuming from %s (step %d)%s", saved.where, saved.step,
             f"; changed since then: {'; '.join(changed)}" if changed else "")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _short(v) -> str:
    """A value for a one-line message: digests cut to 12 characters."""
    if isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v):
        return v[:12]
    return "absent" if v is None else json.dumps(v) if isinstance(v, (list, dict)) else str(v)
