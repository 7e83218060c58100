"""The HF export tokenizes exactly as we do: AutoTokenizer and apply_chat_template give our ids, the
config's token ids are the tokenizer's, transformers' greedy generate is ours; import-hf reads the
tokenizer back (tokenizer.model as exported, or a GPT-2 directory's own tokenizer.json)."""

from __future__ import annotations

import inspect
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

from mtnlg_ray.api import export, from_pretrained
from mtnlg_ray.checkpoint import native
from mtnlg_ray.config import ModelConfig
from mtnlg_ray.data.chat import CHAT_TEMPLATE, encode_chat, render_chat
from mtnlg_ray.data.tokenizer_json import HFTokenizer
from mtnlg_ray.data.tokenizer import EOD
from mtnlg_ray.model.gpt import GPT

CONVERSATIONS = [
    [{"role": "user", "content": "def f(x):"}],
    [{"role": "system", "content": "You write Python.\n"}, {"role": "user", "content": "  sort a list\tplease "},
     {"role": "assistant", "content": "sorted(xs)  # caf\u00e9 \u2603"},
     {"role": "user", "content": "and <|endoftext|>?"}],
    [{"role": "user", "content": "<|user|> inside <|end|> a message"}, {"role": "assistant", "content": ""}],
]


def snippets() -> list[str]:
    import colorsys
    import fractions
    import reprlib

    return [inspect.getsource(m) for m in (colorsys, fractions, reprlib)] + [
        "", "  x  ", "\tdef f():\r\n\n        return '\U0001f600 \u6f22'\n", "a<|endoftext|>b<|user|>c<pad><|end"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_tokenizer):
    """A native checkpoint of a debug GPT with the session's tokenizer, and its HF export."""
    root = tmp_path_factory.mktemp("hf_export")
    cfg = ModelConfig(preset="debug", vocab_size=tiny_tokenizer.vocab_size, init_std=0.3)  # varied greedy tokens
    torch.manual_seed(0)
    ckpt = native.save(GPT(cfg).state_dict(), cfg, root / "ckpt", tiny_tokenizer.path)
    return ckpt, export(ckpt, root / "hf", fmt="hf")


def test_auto_tokenizer_and_chat_template_give_our_ids(exported, tiny_tokenizer):
    tok, (_, hf_dir) = tiny_tokenizer, exported
    hf = AutoTokenizer.from_pretrained(hf_dir)
    for text in snippets():
        assert hf(text)["input_ids"] == tok.encode(text), text[:60]
    for msgs in CONVERSATIONS:
        for gen in (False, True):
            theirs = hf.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=True)
            theirs = theirs["input_ids"] if isinstance(theirs, dict) or hasattr(theirs, "keys") else theirs
            assert theirs == tok.encode(render_chat(msgs, gen)) == encode_chat(tok, msgs, gen)[0]
    config = json.loads((hf_dir / "tokenizer_config.json").read_text())
    assert config["chat_template"] == CHAT_TEMPLATE  # one definition, as our server renders it
    assert hf.decode(tok.encode("def f(x):\n    return x"), skip_special_tokens=True) == "def f(x):\n    return x"


def test_config_ids_are_the_tokenizers(exported, tiny_tokenizer):
    _, hf_dir = exported
    tok, end = tiny_tokenizer, tiny_tokenizer.token_id("<|end|>")
    config = json.loads((hf_dir / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (None, tok.eod_id, tok.pad_id)
    hf = AutoTokenizer.from_pretrained(hf_dir)
    assert (hf.eos_token_id, hf.pad_token_id, hf.bos_token) == (tok.eod_id, tok.pad_id, None)
    generation = json.loads((hf_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [tok.eod_id, end]  # a chat turn ends at <|end|>, as our server stops


def test_transformers_greedy_generate_is_ours(exported, tiny_tokenizer):
    ckpt, hf_dir = exported
    tok, stops = tiny_tokenizer, {tiny_tokenizer.eod_id, tiny_tokenizer.token_id("<|end|>")}
    _, ours = from_pretrained(ckpt)
    theirs = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    hf = AutoTokenizer.from_pretrained(hf_dir)
    prompts = [tok.encode("def fib(n):\n    "), tok.encode(render_chat(CONVERSATIONS[0], True))]
    for ids in prompts:
        mine = ours.generate(torch.tensor([ids]), 8)[0, len(ids):].tolist()
        assert len(set(mine)) > 2
        mine = mine[: next((i + 1 for i, t in enumerate(mine) if t in stops), len(mine))]
        with torch.no_grad():
            out = theirs.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False,
                                  attention_mask=torch.ones(1, len(ids)))
        assert out[0, len(ids):].tolist() == mine
    assert hf(tok.decode(prompts[0]))["input_ids"] == prompts[0]


def test_import_reads_back_the_exported_tokenizer_model(exported, tiny_tokenizer, tmp_path):
    _, hf_dir = exported
    back = export(hf_dir, tmp_path / "back")  # what `mtnlg import-hf` does
    assert (back / "tokenizer.model").read_bytes() == tiny_tokenizer.path.read_bytes()
    assert not (back / "tokenizer.json").exists()


def test_a_gpt2_directory_with_tokenizer_json_is_tokenized_as_it_says(tmp_path):
    """Its tokenizer.json adds role markers that vocab.json + merges.txt know nothing of: import-hf
    follows tokenizer.json, and the HF export of the import gives its ids again."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    from mtnlg_ray.data.gpt2_bpe import GPT2BPETokenizer

    gpt2 = tmp_path / "gpt2"
    fast = Tokenizer(models.BPE())
    fast.pre_tokenizer, fast.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    fast.train_from_iterator(snippets()[:2], trainers.BpeTrainer(vocab_size=400, special_tokens=[EOD], show_progress=False,
                                                                 initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    gpt2.mkdir()
    fast.model.save(str(gpt2))
    fast.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<|user|>", "<|end|>")])
    fast.save(str(gpt2 / "tokenizer.json"))
    GPT2LMHeadModel(GPT2Config(vocab_size=fast.get_vocab_size(), n_positions=64, n_embd=32, n_layer=1, n_head=2)
                    ).save_pretrained(gpt2)
    text = "<|user|>def f(x):<|end|>" + snippets()[0][:500]
    assert GPT2BPETokenizer(gpt2).encode(text) != fast.encode(text).ids  # vocab.json + merges.txt read otherwise

    native_dir = export(gpt2, tmp_path / "imported")
    tok, _ = from_pretrained(native_dir)
    assert isinstance(tok, HFTokenizer) and tok.encode(text) == fast.encode(text).ids
    hf_dir = export(native_dir, tmp_path / "hf", fmt="hf")
    hf = AutoTokenizer.from_pretrained(hf_dir)
    assert hf(text)["input_ids"] == fast.encode(text).ids
    msgs = CONVERSATIONS[0]
    theirs = hf.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    theirs = theirs["input_ids"] if hasattr(theirs, "keys") else theirs
    assert theirs == tok.encode(render_chat(msgs, True))
