"""SFT data: loss masks (no gradient from prompts), the shared chat template, packing, bad input."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import torch

from mtnlg_ray.config import ModelConfig, SftDataConfig
from mtnlg_ray.data import chat, sft
from mtnlg_ray.data.code_task import function_examples, python_files, stdlib_dir
from mtnlg_ray.data.stdlib_tasks import SUMMARIZE_PROMPT, mine, summary_line
from mtnlg_ray.data.dataset import open_datasets
from mtnlg_ray.train.stream import iter_batches
from mtnlg_ray.config import TrainDataConfig, DatasetConfig
from mtnlg_ray.errors import UserError
from mtnlg_ray.model.gpt import GPT, lm_loss

CHAT = {"messages": [{"role": "system", "content": "be terse"}, {"role": "user", "content": "alpha beta"},
                     {"role": "assistant", "content": "gamma delta"}]}


def write_jsonl(path, lines):
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def rows(directory, split="train"):
    return pq.read_table(directory / split).to_pylist()


def test_chat_template_ids_are_the_servers(tiny_tokenizer):
    tok = tiny_tokenizer
    ids, labels = chat.encode_chat(tok, CHAT["messages"])
    t = tok.token_id
    expected = ([t("<|system|>")] + tok.encode("be terse") + [t("<|end|>")] + [t("<|user|>")] + tok.encode("alpha beta")
                + [t("<|end|>")] + [t("<|assistant|>")] + tok.encode("gamma delta") + [t("<|end|>")])
    assert ids == expected
    n_reply = len(tok.encode("gamma delta")) + 1
    assert labels == [-100] * (len(ids) - n_reply) + ids[-n_reply:]  # only the reply and its <|end|> are learned
    # serving renders the same prefix and asks for the assistant turn
    prompt, _ = chat.encode_chat(tok, CHAT["messages"][:2], add_generation_prompt=True)
    assert prompt == ids[: len(prompt)] and prompt[-1] == t("<|assistant|>")
    assert sft.encode_chat is chat.encode_chat  # training uses the very function the server uses


def test_pack_rows_keeps_examples_whole():
    examples = [([1, 2, 3], [-100, 2, 3]), ([4, 5], [-100, 5]), ([6, 7, 8, 9], [-100, -100, 8, 9])]
    packed = list(sft.pack_rows(examples, width=6, pad_id=0, packing=True))
    assert packed == [([1, 2, 3, 4, 5, 0], [-100, 2, 3, -100, 5, -100]), ([6, 7, 8, 9, 0, 0], [-100, -100, 8, 9, -100, -100])]
    padded = list(sft.pack_rows(examples, width=6, pad_id=0, packing=False))
    assert [r[0] for r in padded] == [[1, 2, 3, 0, 0, 0], [4, 5, 0, 0, 0, 0], [6, 7, 8, 9, 0, 0]]


def test_dataset_dir_masks_prompts_and_they_give_no_gradient(ray_session, tiny_tokenizer, tmp_path):
    lines = [CHAT] + [{"prompt": f"alpha {w}", "response": f"beta {w} gamma"} for w in ("pi rho", "tau", "phi chi psi")] * 5
    src = write_jsonl(tmp_path / "train.jsonl", lines)
    val = write_jsonl(tmp_path / "val.jsonl", lines[:3])
    cfg = SftDataConfig(train_paths=[str(src)], val_paths=[str(val)], seq_len=48, packing=True)
    manifest = sft.prepare_sft(cfg, tiny_tokenizer.path, tmp_path / "ds")
    assert manifest["sft"]["lines"] == 19 and manifest["splits"]["train"]["examples"] == 16
    assert manifest["splits"]["val"]["examples"] == 3 and manifest["columns"] == ["input_ids", "labels"]
    train = rows(tmp_path / "ds")
    assert all(len(r["input_ids"]) == len(r["labels"]) == 49 for r in train)
    # every example is present whole: the chat's ids appear in some row with its labels
    ids, labels = chat.encode_chat(tiny_tokenizer, CHAT["messages"])
    found = [r for r in train if any(r["input_ids"][i:i + len(ids)] == ids and r["labels"][i:i + len(ids)] == labels
                                     for i in range(49 - len(ids) + 1))]
    assert len(found) == 1

    # the trainer's reader carries labels; prompt positions get exactly zero gradient
    bundle = open_datasets(TrainDataConfig(datasets=[DatasetConfig(path=str(tmp_path / "ds"))]))
    batch = next(iter_batches(bundle.train, 4))
    torch.manual_seed(0)
    model = GPT(ModelConfig(preset="debug", vocab_size=tiny_tokenizer.vocab_size))
    x, y = batch["input_ids"][:, :-1], batch["labels"][:, 1:]
    logits = model(x)
    logits.retain_grad()
    lm_loss(logits, y).backward()
    grad = logits.grad.abs().sum(-1)  # (B, T)
    masked = y == -100
    assert masked.any() and (~masked).any()
    assert (grad[masked] == 0).all() and (grad[~masked] > 0).all()


def test_bad_lines_are_reported_with_file_and_line_and_skipped_or_refused(ray_session, tiny_tokenizer, tmp_path, caplog):
    good = [{"prompt": "alpha", "response": "beta"}] * 16
    bad = ['{"prompt": "alpha"}', '{"messages": [{"role": "robot", "content": "x"}]}',
           '{"prompt": "alpha", "response": "  "}', "not json"]
    src = write_jsonl(tmp_path / "mixed.jsonl", good[:8] + bad + good[8:])
    src.write_bytes(src.read_bytes() + b'{"prompt": "\xff", "response": "x"}\n')  # line 21: not UTF-8
    cfg = SftDataConfig(train_paths=[str(src)], seq_len=32, val_fraction=0.0, max_bad_fraction=0.25)
    manifest = sft.prepare_sft(cfg, tiny_tokenizer.path, tmp_path / "ok")
    report = manifest["sft"]
    assert report["bad"] == 5 and manifest["splits"]["train"]["examples"] == 16
    assert report["bad_lines"][0] == f'{src}:9: missing field "response" (the {{"prompt", "response"}} format)'
    assert "unknown role 'robot'" in report["bad_lines"][1] and f"{src}:10:" in report["bad_lines"][1]
    assert report["bad_lines"][2] == f"{src}:11: empty response"
    assert f"{src}:12:" in report["bad_lines"][3]
    assert report["bad_lines"][4].startswith(f"{src}:21: not valid UTF-8")
    assert f"{src}:9: missing field" in caplog.text

    with pytest.raises(UserError, match=rf"{src}:9: missing field .*5 of 21 lines bad, more than sft.max_bad_fraction=0.1"):
        sft.prepare_sft(cfg.model_copy(update={"max_bad_fraction": 0.1}), tiny_tokenizer.path, tmp_path / "refused")
    assert not (tmp_path / "refused").exists() and not list(tmp_path.glob(".refused*"))  # nothing half-written
    with pytest.raises(UserError, match="sft.train_paths: .*missing.jsonl: no such file"):
        sft.prepare_sft(SftDataConfig(train_paths=[str(tmp_path / "missing.jsonl")]), tiny_tokenizer.path, tmp_path / "x")


def test_overlong_examples_truncated_or_dropped_and_counted(ray_session, tiny_tokenizer, tmp_path):
    long = {"prompt": "alpha", "response": " ".join(["beta gamma"] * 40)}
    too_long_prompt = {"prompt": " ".join(["delta"] * 80), "response": "zeta"}
    src = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "alpha", "response": "beta"}] * 4 + [long, too_long_prompt])
    cfg = SftDataConfig(train_paths=[str(src)], seq_len=16, packing=False, val_fraction=0.0)
    m = sft.prepare_sft(cfg, tiny_tokenizer.path, tmp_path / "trunc")
    assert (m["sft"]["truncated"], m["sft"]["overlong_dropped"]) == (1, 1)  # a prompt filling the row is dropped
    assert m["splits"]["train"]["rows"] == 5
    ids, _ = chat.encode_prompt_response(tiny_tokenizer, long["prompt"], long["response"])
    assert ids[:17] in [r["input_ids"] for r in rows(tmp_path / "trunc")]
    m = sft.prepare_sft(cfg.model_copy(update={"overlong": "drop"}), tiny_tokenizer.path, tmp_path / "drop")
    assert (m["sft"]["truncated"], m["sft"]["overlong_dropped"], m["splits"]["train"]["rows"]) == (0, 2, 4)


def test_code_task_pairs_signature_and_docstring_with_body():
    source = '''
import functools

class Box:
    @functools.cache
    def area(self, scale=1):
        """Area of the box,
        scaled.

        Details that the prompt leaves out.
        """
        w = self.w * scale
        return w * self.h

def undocumented(x):
    return x

def only_doc():
    """Nothing else."""
'''
    (line, prompt, response), = function_examples(source)
    assert line == 6
    assert prompt == 'def area(self, scale=1):\n    """Area of the box, scaled."""'  # summary paragraph, one line
    assert response == "    w = self.w * scale\n    return w * self.h"


# ------------------------------------------------------------------------------- input formats
FORMATS = [  # (a line in a format users bring, the same example as {"messages"})
    ({"conversations": [{"from": "system", "value": "be terse"}, {"from": "human", "value": "alpha beta"},
                        {"from": "gpt", "value": "gamma delta"}, {"from": "user", "value": "tau"},
                        {"from": "assistant", "value": "phi"}]},
     [("system", "be terse"), ("user", "alpha beta"), ("assistant", "gamma delta"), ("user", "tau"),
      ("assistant", "phi")]),
    ({"instruction": "alpha beta", "input": "pi rho", "output": "gamma"},
     [("user", "alpha beta\n\npi rho"), ("assistant", "gamma")]),
    ({"instruction": "alpha beta", "input": "", "output": "gamma"}, [("user", "alpha beta"), ("assistant", "gamma")]),
    ({"instruction": "alpha tau", "output": "gamma"}, [("user", "alpha tau"), ("assistant", "gamma")]),
    ({"messages": [{"role": "user", "content": "alpha", "name": "ann"},
                   {"role": "assistant", "content": "beta", "weight": 1}], "id": 7},
     [("user", "alpha"), ("assistant", "beta")]),
    ({"prompt": "alpha chi", "response": "beta"}, [("user", "alpha chi"), ("assistant", "beta")]),
]


def as_messages(turns):
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


def test_input_formats_render_like_their_messages_equivalent(ray_session, tiny_tokenizer, tmp_path):
    for line, turns in FORMATS:
        assert sft.example_messages(line) == as_messages(turns)["messages"], line
    # through the whole pipeline: the same rows as the {"messages"} file (order aside: it hashes the raw line)
    cfg = SftDataConfig(seq_len=48, packing=False, val_fraction=0.0, max_bad_fraction=0.0)
    out = {}
    for name, lines in (("formats", [f[0] for f in FORMATS]), ("messages", [as_messages(f[1]) for f in FORMATS])):
        src = write_jsonl(tmp_path / f"{name}.jsonl", lines)
        manifest = sft.prepare_sft(cfg.model_copy(update={"train_paths": [str(src)]}), tiny_tokenizer.path,
                                   tmp_path / name)
        assert manifest["splits"]["train"]["examples"] == len(FORMATS) and manifest["sft"]["bad"] == 0
        out[name] = sorted((r["input_ids"], r["labels"]) for r in rows(tmp_path / name))
    assert out["formats"] == out["messages"]
    ids, labels = chat.encode_chat(tiny_tokenizer, as_messages(FORMATS[0][1])["messages"])
    assert (ids + [tiny_tokenizer.pad_id] * (49 - len(ids)), labels + [-100] * (49 - len(ids))) in out["formats"]


def test_unknown_format_is_reported_with_its_line_and_the_accepted_formats(ray_session, tiny_tokenizer, tmp_path):
    good = [{"instruction": "alpha", "output": "beta"}] * 8
    bad = [{"text": "alpha beta"}, {"prompt": "alpha", "output": "beta"},
           {"conversations": [{"from": "human", "value": "alpha"}, {"from": "tool", "value": "beta"}]},
           {"conversations": [{"from": "human", "value": "alpha"}]}]
    src = write_jsonl(tmp_path / "odd.jsonl", good[:2] + bad + good[2:])
    cfg = SftDataConfig(train_paths=[str(src)], seq_len=32, val_fraction=0.0, max_bad_fraction=0.5)
    report = sft.prepare_sft(cfg, tiny_tokenizer.path, tmp_path / "ds")["sft"]
    assert report["bad"] == 4
    unknown, mixed, role, no_reply = report["bad_lines"]
    assert unknown.startswith(f"{src}:3: unknown format (fields: text); accepted: ")
    assert unknown.endswith('{"prompt", "response"}, OpenAI {"messages"}, ShareGPT {"conversations"}, '
                            'Alpaca {"instruction", "input", "output"}')
    assert mixed.startswith(f"{src}:4: has fields of two formats (prompt/response and alpaca)")
    assert role == f"{src}:5: conversations[1].from: unknown role 'tool' (expected one of human, gpt, system, user, assistant)"
    assert no_reply == f"{src}:6: no assistant message (nothing to learn)"
    with pytest.raises(UserError, match=rf"{src}:3: unknown format .*4 of 12 lines bad"):
        sft.prepare_sft(cfg.model_copy(update={"max_bad_fraction": 0.2}), tiny_tokenizer.path, tmp_path / "no")


# ------------------------------------------------------------------------------ built-in tasks
def test_stdlib_summarize_mines_thousands_of_unique_body_to_summary_pairs():
    examples = mine("stdlib_summarize", python_files([]))
    prompts = [e["prompt"] for _, e in examples]
    assert len(examples) >= 2000 and len(set(prompts)) == len(prompts)
    for source, e in examples:
        body, summary = e["prompt"].removeprefix(SUMMARIZE_PROMPT), e["response"]
        assert e["prompt"].startswith(SUMMARIZE_PROMPT) and body.strip() == body and len(body) >= 40, source
        assert "\n" not in summary and len(summary.split()) >= 3, source
        assert " ".join(summary.split()).lower() not in " ".join(body.split()).lower(), source  # not copied out
    head = "Insert item x in list a, and keep it sorted assuming a is sorted."  # bisect.insort_right
    hit = [e for src, e in examples if src.startswith(f"{stdlib_dir() / 'bisect.py'}:") and e["response"] == head]
    assert hit and hit[0]["prompt"].startswith(SUMMARIZE_PROMPT + "If x is already in a, insert it to the right")


def test_stdlib_dialogue_answers_questions_about_modules_from_their_docstrings():
    import importlib
    import inspect

    examples = mine("stdlib_dialogue", python_files([]))
    conversations = [json.dumps(e["messages"]) for _, e in examples]
    assert len(examples) >= 500 and len(set(conversations)) == len(conversations)
    for source, e in examples:
        roles = [m["role"] for m in e["messages"]]
        assert len(roles) >= 4 and roles == ["user", "assistant"] * (len(roles) // 2), source
    by_module = {}
    for src, e in examples:
        first = e["messages"][0]["content"]
        if first.startswith("What does the module `"):
            by_module[first.split("`")[1]] = e["messages"]
    assert by_module["heapq"][1]["content"] == "Heap queue algorithm (a.k.a. priority queue)."
    # every answer about these pure-Python modules (no C accelerator with its own docstrings) is the
    # summary of the named object's docstring, as Python itself sees it
    def resolve(name):
        parts = name.split(".")
        i = len(parts)
        while True:  # the longest importable prefix (json.decoder.JSONDecoder -> module json.decoder)
            try:
                obj = importlib.import_module(".".join(parts[:i]))
                break
            except ImportError:
                i -= 1
        for part in parts[i:]:
            obj = getattr(obj, part)
        return obj

    checked = 0
    for src, e in examples:
        for question, answer in zip(e["messages"][::2], e["messages"][1::2]):
            name = question["content"].split("`")[1]
            if name.split(".")[0] in ("json", "textwrap", "shlex", "fractions"):
                assert answer["content"] == summary_line(inspect.getdoc(resolve(name))), name
                checked += 1
    assert checked >= 20


def test_builtin_tasks_through_ray_drop_duplicates(ray_session, tiny_tokenizer, tmp_path):
    """The pipeline mines files in parallel, keeps the first of each duplicate, and equals `mine`."""
    src = tmp_path / "src"
    src.mkdir()
    for name, original in (("a.py", "bisect.py"), ("b.py", "bisect.py"), ("c.py", "heapq.py")):
        (src / name).write_bytes((stdlib_dir() / original).read_bytes())  # b.py: a copy of a.py
    files = python_files([str(src)])
    assert [f.rsplit("/", 1)[1] for f in files] == ["a.py", "b.py", "c.py"]
    for task, duplicates in (("stdlib_summarize", len(mine("stdlib_summarize", files[:1]))), ("stdlib_dialogue", 0)):
        cfg = SftDataConfig(task=task, train_paths=[str(src)], seq_len=256, val_fraction=0.2, max_bad_fraction=0.0)
        manifest = sft.prepare_sft(cfg, tiny_tokenizer.path, tmp_path / task)
        report = manifest["sft"]
        kept = manifest["splits"]["train"]["examples"] + manifest["splits"]["val"]["examples"]
        assert kept + report["overlong_dropped"] == len(mine(task, files)) > 0, task
        # dialogue: a.py and b.py are the modules `a` and `b`, so their questions differ: nothing to drop
        assert duplicates > 0 or task == "stdlib_dialogue"
        assert report["duplicates"] == duplicates and report["lines"] == len(mine(task, files)) + duplicates, task
