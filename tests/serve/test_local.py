"""`mtnlg generate` and `mtnlg chat` (serve/local.py): the server's engine and schema in this process.
Sampling values the server refuses are refused in one line (exit 2); chat keeps its history until
/reset; outputs are the model's greedy continuations."""

from __future__ import annotations

import io
import sys

import pytest

from mtnlg_ray.cli import main
from mtnlg_ray.data.chat import chat_stop_id, render_chat
from mtnlg_ray.model.generate import generate


def greedy(tiny, ids, n, stops=()):
    model, tok = tiny
    out = generate(model, [ids], n)[0][len(ids):]
    cut = next((i for i, t in enumerate(out) if t in stops), len(out))
    return tok.decode(out[:cut])


@pytest.mark.parametrize("flags, line", [
    (["--temperature", "-1"], "--temperature: Input should be greater than or equal to 0 (got -1.0)"),
    (["--top-p", "5"], "--top-p: Input should be less than or equal to 1 (got 5.0)"),
    (["--max-tokens", "0"], "--max-tokens: must be at least 1 (got 0)"),
    (["--top-k", "-3"], "--top-k: Input should be greater than or equal to -1 (got -3)"),
])
def test_generate_refuses_what_the_server_refuses(tiny_checkpoint, capsys, flags, line):
    assert main(["generate", str(tiny_checkpoint), "--prompt", "x", *flags]) == 2
    assert capsys.readouterr().err == f"error: {line}\n"


def test_generate_streams_and_warns_when_the_context_caps_max_tokens(tiny_checkpoint, tiny, capsys):
    _, tok = tiny
    prompt = "def f(x):\n    return x\n" * 24  # 240 tokens: 16 left
    n_prompt = len(tok.encode(prompt))
    assert main(["generate", str(tiny_checkpoint), "--prompt", prompt, "--max-tokens", "500"]) == 0
    out, err = capsys.readouterr()
    room = 256 - n_prompt  # the tiny model's context
    assert f"--max-tokens 500 capped at {room}" in err
    assert out == prompt + greedy(tiny, tok.encode(prompt), room, (tok.eod_id,)) + "\n"


def test_generate_chat_applies_the_template(tiny_checkpoint, tiny, capsys):
    _, tok = tiny
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Sort a list."}]
    assert main(["generate", str(tiny_checkpoint), "--chat", "--system", "be brief", "--prompt", "Sort a list.",
                 "--max-tokens", "8"]) == 0
    ids = tok.encode(render_chat(msgs, True))
    assert capsys.readouterr().out == greedy(tiny, ids, 8, (chat_stop_id(tok), tok.eod_id)) + "\n"


def test_chat_keeps_history_until_reset(tiny_checkpoint, tiny, capsys, monkeypatch):
    _, tok = tiny
    monkeypatch.setattr(sys, "stdin", io.StringIO("first\nsecond\n/reset\nthird\n"))
    assert main(["chat", str(tiny_checkpoint), "--temperature", "0", "--max-tokens", "6"]) == 0
    out, err = capsys.readouterr()
    stops = (chat_stop_id(tok), tok.eod_id)

    def reply(msgs):
        return greedy(tiny, tok.encode(render_chat(msgs, True)), 6, stops)

    r1 = reply([{"role": "user", "content": "first"}])
    r2 = reply([{"role": "user", "content": "first"}, {"role": "assistant", "content": r1},
                {"role": "user", "content": "second"}])
    r3 = reply([{"role": "user", "content": "third"}])  # /reset forgot the first two turns
    assert out == f"{r1}\n{r2}\n{r3}\n" and "history cleared" in err
