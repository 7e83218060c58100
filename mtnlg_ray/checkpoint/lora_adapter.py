"""A LoRA fine-tune's adapters, read on their own (no merge) for serving them over a base model.

A LoRA run (`mtnlg finetune` with a `lora` section) writes training checkpoints like any run: DCP shards
of the whole model, base weights and `{layer}.lora_A` (r, in) / `{layer}.lora_B` (out, r), with the job
(its `lora`: rank, alpha, target_modules) in config.json. Any path `open_source` reads as a training
checkpoint works: a run directory (its newest checkpoint that verifies), one checkpoint_* directory, or
a remote URI of either. Only the adapter tensors are read.

    check_adapter(path, base)   what the adapter is (LoraConfig), without reading tensors: refuses, in one
                                line naming the path, anything but a LoRA run, and a run whose model shape
                                is not `base`'s (no torch import: the CLI checks paths with it before Ray)
    read_adapter(path, base)    the same checks, then the tensors as model/multi_lora.py's LoraWeights
"""

from __future__ import annotations

from mtnlg_ray.checkpoint.manifest import CONFIG, read_config
from mtnlg_ray.checkpoint.source import TRAINING_KINDS, open_source
from mtnlg_ray.config import LoraConfig, ModelConfig, validate
from mtnlg_ray.errors import UserError

# What makes two models' linears the same shapes (and the adapter's base the served model).
SHAPE_KEYS = ("n_layers", "d_model", "n_heads", "mlp_ratio", "vocab_size", "pad_vocab_multiple", "position", "bias")
LORA_SUFFIXES = (".lora_A", ".lora_B")


def check_adapter(location: str, base: ModelConfig | None = None) -> LoraConfig:
    """The adapter's LoraConfig; UserError (PathError when missing) naming `location` when it is not a
    LoRA fine-tune run or checkpoint, or when its model's shape differs from `base`."""
    return _open(location, base)[1]


def check_adapters(adapters: dict[str, str], base: ModelConfig) -> None:
    """`check_adapter` of each of serve.lora_adapters ({name: location}); the error names the key."""
    for name, location in adapters.items():
        try:
            check_adapter(location, base)
        except UserError as err:
            raise type(err)(f"serve.lora_adapters.{name}: {err}") from None


def read_adapter(location: str, base: ModelConfig | None = None):
    """The adapter's tensors as `LoraWeights` (after `check_adapter`'s checks)."""
    from mtnlg_ray.checkpoint import sharded  # torch: see the module docstring
    from mtnlg_ray.model.multi_lora import LoraWeights

    source, cfg = _open(location, base)
    tensors = sharded.consolidate(source.path, keep=lambda name: name.endswith(LORA_SUFFIXES))
    weights = LoraWeights(cfg.rank, cfg.alpha)
    for key, a in tensors.items():
        if key.endswith(".lora_A"):
            layer = key.removesuffix(".lora_A")
            b = tensors.get(f"{layer}.lora_B")
            if b is None or a.shape[0] != cfg.rank:
                raise UserError(f"{location}: {layer}: adapter without lora_B or of rank {a.shape[0]} "
                                f"(lora.rank={cfg.rank})")
            weights.layers[layer] = (a, b)
    if not weights.layers:
        raise UserError(f"{location}: the checkpoint holds no LoRA adapter tensors")
    return weights


def _open(location: str, base: ModelConfig | None):
    source = open_source(location)
    if source.kind not in TRAINING_KINDS:
        raise UserError(f"{location}: not a LoRA fine-tune run or checkpoint (a {source.kind.value} checkpoint has "
                        "plain weights; serve it as a model of its own)")
    model, meta = read_config(source.path)
    lora = (meta.get("job") or {}).get("lora")
    if not lora:
        raise UserError(f"{location}: not a LoRA fine-tune run or checkpoint (its job has no lora section)")
    cfg = validate(LoraConfig, lora, str(source.path / CONFIG))
    if base is not None:
        diff = [f"{k} {getattr(model, k)} vs {getattr(base, k)}" for k in SHAPE_KEYS
                if getattr(model, k) != getattr(base, k)]
        if diff:
            raise UserError(f"{location}: the adapter's base model differs from the served model ({', '.join(diff)})")
    return source, cfg
