"""mtnlg_ray: Megatron-Turing-NLG-style GPT pretraining, fine-tuning and serving on Ray."""

__version__ = "0.1.0"


def from_pretrained(path, device="cpu"):
    """`tokenizer, model = mtnlg_ray.from_pretrained(path)` (native checkpoint, run dir, or GPT-2 dir)."""
    from mtnlg_ray.api import from_pretrained as _load

    return _load(path, device)


__all__ = ["from_pretrained", "__version__"]
