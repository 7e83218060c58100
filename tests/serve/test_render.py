"""Engine outputs -> OpenAI objects: usage per prompt, echo with prompt logprobs, chat chunk order."""

from __future__ import annotations

from mtnlg_ray.serve.engine import Output
from mtnlg_ray.serve.render import Choice, Renderer, usage


def outputs(rid, tokens, texts, finish="length", prompt_len=3):
    outs = [Output(rid, t, x, (-0.5, [(t, -0.5), (99, -2.0)]), None, prompt_len, i + 1)
            for i, (t, x) in enumerate(zip(tokens, texts))]
    outs[-1].finish_reason = finish
    return outs


def test_usage_counts_each_prompt_once_and_every_choice(tiny):
    a, b, c = Choice(0, [1, 2, 3], 0), Choice(1, [1, 2, 3], 0), Choice(2, [4, 5], 1)  # n=2 on prompt 0
    for ch, n in ((a, 4), (b, 2), (c, 1)):
        for out in outputs("r", [7] * n, ["x"] * n):
            ch.add(out)
    u = usage([a, b, c])
    assert (u.prompt_tokens, u.completion_tokens, u.total_tokens) == (5, 7, 12)


def test_completion_echo_with_prompt_logprobs(tiny):
    _, tok = tiny
    r = Renderer(tok, "m")
    prompt = tok.encode("import os")
    ch = Choice(0, prompt, 0)
    outs = outputs("r", [10, 11], ["a", "b"], prompt_len=len(prompt))
    outs[0].prompt_logprobs = [None] + [(-1.0, [(5, -1.0)])] * (len(prompt) - 1)
    for out in outs:
        ch.add(out)
    body = r.completion([ch], echo=True, logprobs=True)
    choice = body.choices[0]
    assert choice.text == "import os" + "ab" and choice.finish_reason == "length"
    lp = choice.logprobs
    assert len(lp.tokens) == len(prompt) + 2 and lp.token_logprobs[0] is None and lp.token_logprobs[-1] == -0.5
    assert lp.text_offset[1] == len(lp.tokens[0])  # offsets follow the token strings


def test_chat_stream_opens_with_the_role_and_ends_with_a_reason(tiny):
    _, tok = tiny
    r = Renderer(tok, "m")
    ch = Choice(0, [1], 0)
    chunks = []
    for out in outputs("r", [10, 11], ["he", "llo"], finish="stop"):
        ch.add(out)
        chunks += r.chat_chunks("id", 0, ch, out, logprobs=True)
    deltas = [c.choices[0].delta for c in chunks]
    assert deltas[0].role == "assistant" and deltas[0].content == ""
    assert "".join(d.content or "" for d in deltas) == "hello"
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert chunks[1].choices[0].logprobs.content[0].top_logprobs[1].logprob == -2.0


def test_byte_tokens_are_bytes_strings_and_offsets_follow_the_text(tiny):
    """A non-ASCII prompt echoed with logprobs: byte-fallback pieces of a character are `bytes:\\xNN`
    (each alone is no UTF-8), chat's `bytes` are the raw bytes, and text_offset indexes the returned text."""
    _, tok = tiny
    r = Renderer(tok, "m")
    prompt_text = "s = 'caf\u00e9 \u2603'  # \u00fcber"
    prompt = tok.encode(prompt_text)
    gen = tok.encode(" \u00e9t\u00e9\n")
    ch = Choice(0, prompt, 0)
    texts = [tok.decode(gen)] + [""] * (len(gen) - 1)  # the engine's text, held back until characters complete
    for out in outputs("r", gen, texts, prompt_len=len(prompt)):
        ch.add(out)
    lp = r.completion([ch], echo=True, logprobs=True).choices[0].logprobs
    text = prompt_text + tok.decode(gen)
    byte_tokens = [s for s in lp.tokens if s.startswith("bytes:")]
    assert byte_tokens and all(len(s) == len("bytes:\\xNN") for s in byte_tokens)
    assert "bytes:\\xc3" in lp.tokens and "bytes:\\xa9" in lp.tokens  # é = C3 A9
    for i, (s, at) in enumerate(zip(lp.tokens, lp.text_offset)):
        if not s.startswith("bytes:"):  # a whole token's text sits at its offset in the returned text
            assert text[at: at + len(s)] == s, (i, s, at)
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[-1] < len(text)
    # streamed: the same tokens and offsets, chunk by chunk, continuing from the echoed prompt
    ch2, streamed = Choice(0, prompt, 0), []
    for k, out in enumerate(outputs("r", gen, texts, prompt_len=len(prompt))):
        out.prompt_logprobs = [None] * len(prompt) if k == 0 else None
        ch2.add(out)
        streamed.append(r.completion_chunk("id", 0, ch2, out, echo=True, logprobs=True).choices[0].logprobs)
    assert sum((c.text_offset for c in streamed), []) == lp.text_offset
    assert sum((c.tokens for c in streamed), []) == lp.tokens
    e_bytes = [b for t in gen for b in r.chat_logprobs([t], [(-0.5, [])]).content[0].bytes]
    assert bytes(e_bytes).decode() == " \u00e9t\u00e9\n"  # chat's bytes: the raw bytes, joined
