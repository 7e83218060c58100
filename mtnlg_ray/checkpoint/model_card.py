"""The model card (README.md) every export writes: the model's shape, its tokenizer, how it was
trained, and how to load it with mtnlg_ray and with transformers.

`training_facts(source)` gathers what a checkpoint says about its training (kind, steps, tokens,
data, the last validation loss in its metrics.jsonl); a native export keeps them in its config.json
(`training`), so a later export of that export still knows them.
"""

from __future__ import annotations

import json
from pathlib import Path

from mtnlg_ray.checkpoint.manifest import read_config
from mtnlg_ray.checkpoint.source import TRAINING_KINDS, Kind, Source
from mtnlg_ray.config import ModelConfig

METRICS = "metrics.jsonl"
EXAMPLE_PROMPT = "def fib(n):"


def training_facts(src: Source) -> dict:
    """{"kind", "step", "tokens", "data", "init_from", "val_loss", "val_step"}: those the checkpoint knows."""
    meta = src.meta()
    if isinstance(meta.get("training"), dict):
        return meta["training"]
    if src.kind is Kind.HF_GPT2:
        return {"kind": "imported", "init_from": src.location}
    facts = {k: meta[k] for k in ("kind", "step", "tokens") if meta.get(k) is not None}
    if src.kind in TRAINING_KINDS:
        job = read_config(src.path)[1].get("job") or {}
        facts["data"] = _data(job)
        if job.get("init_from"):
            facts["init_from"] = job["init_from"]
        places = [src.path] if src.kind is Kind.REMOTE else [src.path, src.path.parent]
        facts.update(_last_validation(places, facts.get("step")))
    return facts


def _data(job: dict) -> list[str]:
    """The training data of a job config: pretraining's datasets, or fine-tuning's task and files."""
    datasets = (job.get("data") or {}).get("datasets") or []
    if datasets:
        return [f"{d.get('path')} (weight {d.get('weight', 1.0)})" for d in datasets]
    sft = job.get("sft") or {}
    if sft:
        paths = sft.get("train_paths") or ["the Python standard library"]
        return [f"{sft.get('task', 'jsonl')}: {', '.join(map(str, paths))}"]
    return []


def _last_validation(places: list[Path], step: int | None) -> dict:
    """{"val_loss", "val_step"} of the last evaluation up to `step` in the first metrics.jsonl found."""
    for place in places:
        path = Path(place) / METRICS
        if not path.is_file():
            continue
        last = {}
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
            if isinstance(rec, dict) and "val_loss" in rec and (step is None or rec.get("step", 0) <= step):
                last = {"val_loss": rec["val_loss"], "val_step": rec.get("step")}
        return last
    return {}


def parameter_count(cfg: ModelConfig, tensors: dict) -> int:
    """Parameters of the model as trained: a tied lm_head once, the embedding's padding rows left out."""
    count = 0
    for name, t in tensors.items():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue
        count += cfg.vocab_size * t.shape[1] if name in ("tok_emb.weight", "lm_head.weight") else t.numel()
    return count


def describe_tokenizer(tok) -> str:
    """One line: the tokenizer's algorithm and vocabulary."""
    from mtnlg_ray.data.tokenizer_json import HFTokenizer
    from mtnlg_ray.data.tokenizer import Tokenizer

    if isinstance(tok, Tokenizer):
        from sentencepiece import sentencepiece_model_pb2

        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(tok.path.read_bytes())
        t, n = proto.trainer_spec, proto.normalizer_spec
        algo = t.ModelType.Name(t.model_type).lower()
        extras = [x for x, on in (("byte fallback", t.byte_fallback), ("dummy prefix", n.add_dummy_prefix),
                                  ("no dummy prefix", not n.add_dummy_prefix)) if on]
        line = f"SentencePiece {algo}, {tok.vocab_size:,} pieces, {', '.join(extras)}"
        if algo == "unigram":
            line += (" (SentencePiece and the `tokenizers` library may order the pieces of equal-score "
                     "segmentations, such as runs of spaces, differently)")
        return line
    if isinstance(tok, HFTokenizer):
        return f"Hugging Face tokenizer.json, {tok.vocab_size:,} tokens"
    return f"GPT-2 byte-level BPE, {tok.vocab_size:,} tokens"


def render(location: str | Path, cfg: ModelConfig, n_params: int, tok, facts: dict, fmt: str) -> str:
    """The README.md of an export at `location` (`fmt`: "native" or "hf")."""
    where = str(location)
    form = "a transformers GPT-2 directory" if fmt == "hf" else "a native mtnlg_ray checkpoint"
    lines = ["---", "pipeline_tag: text-generation", "tags: [mtnlg_ray, gpt]"]
    lines += ["library_name: transformers", "---"] if fmt == "hf" else ["---"]
    lines += [f"# {Path(where).name}", "",
              f"A decoder-only GPT (pre-LayerNorm blocks, GELU MLP) trained with mtnlg_ray, exported as {form}.", "",
              "## Model", "",
              f"- parameters: {n_params:,} ({n_params / 1e6:.2f} M)",
              f"- layers {cfg.n_layers}, width {cfg.d_model}, heads {cfg.n_heads}, MLP width {cfg.d_mlp}",
              f"- context: {cfg.max_seq_len} tokens; positions: {cfg.position}; "
              f"tied embeddings: {'yes' if cfg.tie_embeddings else 'no'}",
              f"- vocabulary: {cfg.vocab_size:,} tokens", ""]
    lines += ["## Tokenizer", ""]
    if tok is None:
        lines += ["None bundled: the model takes token ids.", ""]
    else:
        specials = sorted(tok.special_tokens.items(), key=lambda kv: kv[1])
        roles = {tok.eod_id: "end of document", tok.pad_id: "padding"}
        lines += [f"- {describe_tokenizer(tok)}",
                  "- special tokens: " + ", ".join(f"`{p}` {i}" + (f" ({roles[i]})" if i in roles else "")
                                                   for p, i in specials)]
        if "<|end|>" in tok.special_tokens:
            lines.append("- chat: `<|system|>...<|end|><|user|>...<|end|><|assistant|>`; generation stops at the end "
                         "of document or `<|end|>`" + ("; the Jinja2 template is `chat_template` in "
                                                       "tokenizer_config.json" if fmt == "hf" else ""))
        lines.append("")
    lines += ["## Training", ""] + _training_lines(facts) + [""]
    lines += ["## Use", "", "With mtnlg_ray:", "", "```python",
              "from mtnlg_ray.api import from_pretrained, generate_text", "",
              f'tokenizer, model = from_pretrained("{where}")',
              f'print(generate_text("{where}", "{EXAMPLE_PROMPT}", max_tokens=32))', "```", "",
              "```bash", f"mtnlg generate {where} --prompt '{EXAMPLE_PROMPT}'", f"mtnlg serve {where}", "```", ""]
    if fmt == "hf":
        lines += ["With transformers:", "", "```python",
                  "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  f'tokenizer = AutoTokenizer.from_pretrained("{where}")',
                  f'model = AutoModelForCausalLM.from_pretrained("{where}")',
                  f'ids = tokenizer("{EXAMPLE_PROMPT}", return_tensors="pt").input_ids',
                  "print(tokenizer.decode(model.generate(ids, max_new_tokens=32)[0]))", "```", ""]
    else:
        lines += ["For transformers, export it as a GPT-2 directory: "
                  f"`mtnlg export {where} --out {where}-hf --format hf`.", ""]
    return "\n".join(lines)


def _training_lines(facts: dict) -> list[str]:
    if not facts:
        return ["Not recorded in the checkpoint."]
    out = []
    if facts.get("kind") == "imported":
        return [f"Imported from the transformers GPT-2 directory {facts.get('init_from')}."]
    if facts.get("kind"):
        out.append(f"- kind: {facts['kind']}")
    if facts.get("init_from"):
        out.append(f"- started from: {facts['init_from']}")
    if facts.get("step") is not None:
        out.append(f"- steps: {facts['step']:,}")
    if facts.get("tokens") is not None:
        out.append(f"- tokens: {facts['tokens']:,}")
    for d in facts.get("data") or []:
        out.append(f"- data: {d}")
    if facts.get("val_loss") is not None:
        out.append(f"- final validation loss: {facts['val_loss']:.4f} nats/token (step {facts.get('val_step')})")
    else:
        out.append("- final validation loss: not recorded")
    return out
