"""Structured outputs on the engine with random weights: every output of a JSON schema parses and
validates, a choice is one of its choices, a regex matches, and constrained and free requests share
a batch (a free row draws what it draws alone). The vocabulary table keeps special tokens out."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from mtnlg_ray.serve.engine import Engine
from mtnlg_ray.serve.sampling import SamplingParams
from mtnlg_ray.serve.structured import (JSON_WHITESPACE, GrammarCompiler, GrammarSpec, UnsupportedGrammar, check,
                                        mask_rows)

SCHEMAS = [  # small and bounded: an untrained model closes them well within MAX_TOKENS
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 3},
    {"type": "object", "properties": {"ok": {"type": "boolean"},
                                      "score": {"type": "number", "minimum": 0, "maximum": 1},
                                      "tags": {"type": "array", "items": {"type": "string", "pattern": "^[a-z]{1,4}$"},
                                               "maxItems": 2}},
     "required": ["ok", "tags"], "additionalProperties": False},
    {"anyOf": [{"type": "integer", "minimum": -5, "maximum": 5}, {"type": "null"}, {"const": "x"}]},
    {"type": "object", "properties": {"point": {"$ref": "#/$defs/point"}}, "required": ["point"],
     "additionalProperties": False,
     "$defs": {"point": {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9},
                                                          "y": {"type": "integer", "minimum": 0, "maximum": 9}},
                         "required": ["x", "y"], "additionalProperties": False}}},
]
MAX_TOKENS = 128  # the longest of the 50 outputs below takes 84 tokens (whitespace between JSON tokens included)


def engine_for(tiny, **kw) -> Engine:
    model, tok = tiny
    return Engine(model, decode=tok.decode, grammars=GrammarCompiler(tok, model.config.vocab_size), **kw)


def run(engine, requests: dict) -> dict:
    """Add {key: (prompt, params)}, step until done; {key: (text, finish_reason, tokens)}."""
    ids = {engine.add(prompt, params): key for key, (prompt, params) in requests.items()}
    text, tokens, finish = {k: "" for k in requests}, {k: [] for k in requests}, {}
    while engine.has_work:
        for out in engine.step():
            key = ids[out.request_id]
            text[key] += out.text
            if out.token_id is not None:
                tokens[key].append(out.token_id)
            if out.finished:
                finish[key] = out.finish_reason
    return {k: (text[k], finish[k], tokens[k]) for k in requests}


def constrained(tok, spec: GrammarSpec, seed: int, temperature: float = 1.0) -> SamplingParams:
    return SamplingParams(max_tokens=MAX_TOKENS, temperature=temperature, seed=seed, stop_token_ids=(tok.eod_id,),
                          structured=spec)


def test_fifty_json_schema_outputs_parse_and_validate(tiny):
    _, tok = tiny
    prompt = tok.encode("def f(x):\n    return")
    requests = {k: (prompt, constrained(tok, GrammarSpec.json_schema(SCHEMAS[k % len(SCHEMAS)], JSON_WHITESPACE), k))
                for k in range(50)}
    got = run(engine_for(tiny, max_slots=16, max_waiting=64), requests)
    for k, (text, finish, tokens) in got.items():
        assert finish == "stop" and tokens[-1] == tok.eod_id, (k, text)  # ended by the grammar, not by max_tokens
        jsonschema.validate(json.loads(text), SCHEMAS[k % len(SCHEMAS)])
    assert any("\n" in text or " " in text for text, _, _ in got.values())  # whitespace between tokens is allowed
    compact = run(engine_for(tiny), {k: (prompt, constrained(tok, GrammarSpec.json_schema(SCHEMAS[0], None), k))
                                     for k in range(3)})
    for text, _, _ in compact.values():  # whitespace None (disable_any_whitespace): none outside strings
        jsonschema.validate(json.loads(text), SCHEMAS[0])
        assert not re.search(r"\s", re.sub(r'"(?:[^"\\]|\\.)*"', "", text)), text


def test_choice_regex_and_free_requests_share_a_batch(tiny):
    _, tok = tiny
    choices = ("yes", "no", "yes, sir", "café ☕")
    pattern = r"[0-9]{3}-[a-z]{2,4}"
    prompts = [tok.encode(p) for p in ("import os", "class A:", "x = [")]
    free = SamplingParams(max_tokens=12, temperature=1.0, seed=5, stop_token_ids=(tok.eod_id,))
    alone = run(engine_for(tiny), {"free": (prompts[0], free)})["free"]
    requests = {("free", 0): (prompts[0], free)}
    choice, regex = GrammarSpec("choice", choices), GrammarSpec("regex", pattern)
    requests |= {("choice", s): (prompts[s % 3], constrained(tok, choice, s)) for s in range(12)}
    requests |= {("regex", s): (prompts[s % 3], constrained(tok, regex, s)) for s in range(6)}
    requests[("choice", "greedy")] = (prompts[1], constrained(tok, choice, 0, temperature=0))
    got = run(engine_for(tiny, max_slots=8, max_waiting=32), requests)
    assert got[("free", 0)] == alone  # a free row is untouched by the constrained rows beside it
    for (kind, _), (text, finish, _) in got.items():
        if kind == "choice":
            assert text in choices and finish == "stop", text
        elif kind == "regex":
            assert re.fullmatch(pattern, text) and finish == "stop", text
    assert len({got[("choice", s)][0] for s in range(12)}) > 1  # sampled within the choices, not a fixed one


def is_text(data: bytes) -> bool:
    try:
        return bool(data.decode("utf-8"))
    except UnicodeDecodeError:
        return False


def test_vocabulary_table_keeps_special_tokens_out(tiny):
    model, tok = tiny
    grammars = GrammarCompiler(tok, model.config.vocab_size + 3)  # a model vocabulary padded past the tokenizer's
    c = grammars.constraint(GrammarSpec("regex", r"(.|\n)*"), (tok.eod_id,))
    logits = torch.zeros(1, model.config.vocab_size + 3)
    mask_rows(logits, [0], [c])
    allowed = set((logits[0] == 0).nonzero()[:, 0].tolist())
    special = set(tok.special_tokens.values()) - {tok.eod_id}
    assert not allowed & special and not allowed & set(range(tok.vocab_size, tok.vocab_size + 3))
    assert tok.eod_id in allowed  # the grammar accepts here: the stop token may come
    # every token that is whole UTF-8 text on its own: "▁" pieces as spaces, byte pieces <0x00>-<0x7F>
    text = {i for i in set(range(tok.vocab_size)) - special - {tok.eod_id, tok.unk_id} if is_text(tok.token_bytes(i))}
    assert text <= allowed and tok.sp.piece_to_id("<0x7E>") in text and tok.encode(" ")[0] in text


@pytest.mark.parametrize("spec, message", [
    (GrammarSpec.json_schema({"type": "array", "uniqueItems": True}), "JSON Schema keyword not supported: uniqueItems"),
    (GrammarSpec.json_schema({"type": "object", "if": {}, "then": {}}), "keywords not supported: if, then"),
    (GrammarSpec.json_schema({"type": "string", "format": "postcode"}), "Unknown format: postcode"),
    (GrammarSpec.json_schema({"type": "string", "pattern": "a(?=b)"}), "look-around"),
    (GrammarSpec("regex", "a(b"), "regex: unclosed group"),
])
def test_unsupported_features_are_named(spec, message):
    with pytest.raises(UnsupportedGrammar, match=re.escape(message)):
        check(spec)
