"""mtnlg_ray: Megatron-Turing-NLG-style GPT pretraining, fine-tuning and serving on Ray."""

__version__ = "0.1.0"


def from_pretrained(path, device="cpu"):
    """`tokenizer, model = mtnlg_ray.from_pretrained(path)`: any checkpoint kind (see mtnlg_ray.api)."""
    # imported on call: `import mtnlg_ray` (every `mtnlg` command) must not import torch
    from mtnlg_ray.api import from_pretrained as _load

    return _load(path, device)


__all__ = ["from_pretrained", "__version__"]
