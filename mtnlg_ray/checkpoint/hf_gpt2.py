"""GPT-2 interchange with Hugging Face `transformers` directories (config.json + model.safetensors).

GPT-2 stores projections as Conv1D weights of shape (in, out) and fuses Q, K, V into one
`c_attn`; we keep separate nn.Linear (out, in) projections so tensor parallelism can shard
heads, so import transposes and splits, export transposes and concatenates. Our embedding is
padded to a multiple of 128 rows (Megatron); the padding is dropped on export.

Only safetensors are read: a `pytorch_model.bin` is refused (it would need unpickling). An export's
tokenizer files and token ids come from hf_tokenizer.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mtnlg_ray.checkpoint.manifest import CONFIG, WEIGHTS
from mtnlg_ray.config import ModelConfig
from mtnlg_ray.errors import UserError
from mtnlg_ray.fileio import atomic_dir

TANH_GELUS = {"gelu_new", "gelu_pytorch_tanh", "gelu_fast"}


def model_config(hf: dict, source: str) -> ModelConfig:
    """Our ModelConfig of a transformers GPT2Config dict (`source` names it in errors)."""
    act = hf.get("activation_function", "gelu_new")
    if act not in TANH_GELUS:
        raise UserError(f"{source}: activation_function={act!r} is not supported (GPT-2 uses gelu_new)")
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if hf.get(flag):
            raise UserError(f"{source}: {flag}=true is not supported")
    d = hf["n_embd"]
    return ModelConfig(
        vocab_size=hf["vocab_size"], n_layers=hf["n_layer"], d_model=d, n_heads=hf["n_head"],
        mlp_ratio=(hf.get("n_inner") or 4 * d) / d, max_seq_len=hf.get("n_positions", hf.get("n_ctx", 1024)),
        position="learned", bias=True, tie_embeddings=hf.get("tie_word_embeddings", True),
        layernorm_eps=hf.get("layer_norm_epsilon", 1e-5), init_std=hf.get("initializer_range", 0.02),
    )


def read_config(path: str | Path) -> ModelConfig:
    """Our ModelConfig of a transformers GPT-2 directory (its config.json; no weights read)."""
    cpath = Path(path) / CONFIG
    try:
        return model_config(json.loads(cpath.read_text()), str(cpath))
    except (KeyError, OSError, json.JSONDecodeError) as err:
        raise UserError(f"{cpath}: not a GPT-2 config ({err})") from None


def load(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read a transformers GPT-2 directory into our config and state dict (full tensors)."""
    p = Path(path)
    if not (p / WEIGHTS).is_file():
        if list(p.glob("*.bin")):
            raise UserError(f"{p}: only pytorch_model.bin found; convert it to {WEIGHTS} "
                            "(e.g. GPT2LMHeadModel.from_pretrained(dir).save_pretrained(dir, safe_serialization=True))")
        raise UserError(f"{p / WEIGHTS}: not found")
    cfg = read_config(p)
    try:
        hf = {k.removeprefix("transformer."): v for k, v in load_file(p / WEIGHTS).items()}
    except SafetensorError as err:
        raise UserError(f"{p / WEIGHTS}: unreadable ({err})") from None
    d, V = cfg.d_model, cfg.padded_vocab_size

    def get(name: str) -> torch.Tensor:
        if name not in hf:
            raise UserError(f"{p / WEIGHTS}: missing tensor {name!r}")
        return hf[name]

    wte = get("wte.weight")
    sd = {"tok_emb.weight": torch.cat([wte, wte.new_zeros(V - wte.shape[0], d)]), "pos_emb.weight": get("wpe.weight")}
    for i in range(cfg.n_layers):
        h, o = f"h.{i}.", f"blocks.{i}."
        q, k, v = get(h + "attn.c_attn.weight").t().split(d, dim=0)  # Conv1D (d, 3d) -> 3 x (d, d)
        qb, kb, vb = get(h + "attn.c_attn.bias").split(d)
        sd.update({
            o + "ln_1.weight": get(h + "ln_1.weight"), o + "ln_1.bias": get(h + "ln_1.bias"),
            o + "attn.q_proj.weight": q, o + "attn.k_proj.weight": k, o + "attn.v_proj.weight": v,
            o + "attn.q_proj.bias": qb, o + "attn.k_proj.bias": kb, o + "attn.v_proj.bias": vb,
            o + "attn.out_proj.weight": get(h + "attn.c_proj.weight").t(), o + "attn.out_proj.bias": get(h + "attn.c_proj.bias"),
            o + "ln_2.weight": get(h + "ln_2.weight"), o + "ln_2.bias": get(h + "ln_2.bias"),
            o + "mlp.up_proj.weight": get(h + "mlp.c_fc.weight").t(), o + "mlp.up_proj.bias": get(h + "mlp.c_fc.bias"),
            o + "mlp.down_proj.weight": get(h + "mlp.c_proj.weight").t(), o + "mlp.down_proj.bias": get(h + "mlp.c_proj.bias"),
        })
    sd["ln_f.weight"], sd["ln_f.bias"] = get("ln_f.weight"), get("ln_f.bias")
    if not cfg.tie_embeddings:
        lm = hf.get("lm_head.weight", wte)
        sd["lm_head.weight"] = torch.cat([lm, lm.new_zeros(V - lm.shape[0], d)])
    return cfg, {k: v.contiguous() for k, v in sd.items()}


def save(cfg: ModelConfig, state_dict: dict[str, torch.Tensor], out_dir: str | Path, token_ids: dict | None = None,
         files: dict[str, bytes] | None = None) -> Path:
    """Write our weights as a transformers GPT-2 directory (`GPT2LMHeadModel.from_pretrained` loads it).
    `token_ids`: bos/eos/pad_token_id for config.json (default none: GPT-2's 50256 would be taken);
    `files`: more files to write into it (the tokenizer's, the model card), replaced atomically with it."""
    if cfg.position != "learned" or not cfg.bias:
        raise UserError("export --format hf: GPT-2 needs learned positions and biases "
                        f"(this model has position={cfg.position}, bias={cfg.bias})")
    sd, V, n = state_dict, cfg.vocab_size, cfg.n_layers
    hf = {"transformer.wte.weight": sd["tok_emb.weight"][:V], "transformer.wpe.weight": sd["pos_emb.weight"]}
    for i in range(n):
        h, o = f"transformer.h.{i}.", f"blocks.{i}."
        hf.update({
            h + "ln_1.weight": sd[o + "ln_1.weight"], h + "ln_1.bias": sd[o + "ln_1.bias"],
            h + "attn.c_attn.weight": torch.cat([sd[o + f"attn.{x}_proj.weight"] for x in "qkv"]).t(),
            h + "attn.c_attn.bias": torch.cat([sd[o + f"attn.{x}_proj.bias"] for x in "qkv"]),
            h + "attn.c_proj.weight": sd[o + "attn.out_proj.weight"].t(), h + "attn.c_proj.bias": sd[o + "attn.out_proj.bias"],
            h + "ln_2.weight": sd[o + "ln_2.weight"], h + "ln_2.bias": sd[o + "ln_2.bias"],
            h + "mlp.c_fc.weight": sd[o + "mlp.up_proj.weight"].t(), h + "mlp.c_fc.bias": sd[o + "mlp.up_proj.bias"],
            h + "mlp.c_proj.weight": sd[o + "mlp.down_proj.weight"].t(), h + "mlp.c_proj.bias": sd[o + "mlp.down_proj.bias"],
        })
    hf["transformer.ln_f.weight"], hf["transformer.ln_f.bias"] = sd["ln_f.weight"], sd["ln_f.bias"]
    if not cfg.tie_embeddings:
        hf["lm_head.weight"] = sd["lm_head.weight"][:V]
    hf_cfg = {
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": V,
        "n_positions": cfg.max_seq_len, "n_embd": cfg.d_model, "n_layer": n, "n_head": cfg.n_heads,
        "n_inner": cfg.d_mlp, "activation_function": "gelu_new", "layer_norm_epsilon": cfg.layernorm_eps,
        "initializer_range": cfg.init_std, "tie_word_embeddings": cfg.tie_embeddings,
        "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
        **(token_ids or {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}),
    }
    with atomic_dir(out_dir) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in hf.items()}, tmp / WEIGHTS, metadata={"format": "pt"})
        (tmp / CONFIG).write_text(json.dumps(hf_cfg, indent=2))
        for name, data in (files or {}).items():
            (tmp / name).write_bytes(data)
    return Path(out_dir)
