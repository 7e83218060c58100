"""OpenAI request models: strict validation with the field at fault, and the mapping to SamplingParams."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from mtnlg_ray.serve.responses import error_body
from mtnlg_ray.serve.schemas import ChatCompletionRequest, CompletionRequest, TokenizeRequest
from mtnlg_ray.serve.structured import JSON_WHITESPACE, GrammarSpec


def test_completion_defaults_and_sampling_params():
    req = CompletionRequest.model_validate({"model": "m", "prompt": "hi", "n": 3, "seed": 5, "stop": "\n\n",
                                            "logit_bias": {"7": -100}, "stop_token_ids": [9]})
    assert req.max_tokens == 16 and req.prompts == ["hi"]
    p0 = req.sampling_params(16, default_stop_ids=(2,), logprobs=None, choice=0)
    p2 = req.sampling_params(16, default_stop_ids=(2,), logprobs=None, choice=2)
    assert (p0.temperature, p0.top_p, p0.seed, p2.seed) == (1.0, 1.0, 5, 7)  # choice j: seed + j
    assert p0.stop == ("\n\n",) and p0.stop_token_ids == (9, 2) and p0.logit_bias == {7: -100}
    no_eos = CompletionRequest.model_validate({"model": "m", "prompt": [1, 2], "ignore_eos": True})
    assert no_eos.prompts == [[1, 2]] and no_eos.sampling_params(4, (2,), None).stop_token_ids == ()
    many = CompletionRequest.model_validate({"model": "m", "prompt": [[1], [2, 3]]})
    assert many.prompts == [[1], [2, 3]]


@pytest.mark.parametrize("body, field", [
    ({"prompt": "x", "max_tokens": "16"}, "max_tokens"),  # strings are not coerced
    ({"prompt": "x", "temperature": float("nan")}, "temperature"),
    ({"prompt": "x", "temperature": True}, "temperature"),
    ({"prompt": "x", "top_k": -2}, "top_k"),
    ({"prompt": "x", "presence_penalty": 3}, "presence_penalty"),
    ({"prompt": "x", "logit_bias": {"a": 1}}, "logit_bias"),
    ({"prompt": "x", "logit_bias": {"1": 500}}, "logit_bias"),
    ({"prompt": "x", "stop": [""]}, "stop"),
    ({"prompt": "x", "stop": ["s" * 300]}, "stop"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "best_of": 2}, "best_of"),
    ({"prompt": "x", "suffix": "y"}, "suffix"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, None),  # needs stream
    ({"prompt": [[1], []]}, "prompt"),
    ({"prompt": [1, "a"]}, "prompt"),
    ({"prompt": ["a"] * 65}, "prompt"),
    ({"prompt": "x", "truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
    ({"prompt": "x", "frobnicate": 1}, "frobnicate"),
    ({"prompt": "x", "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {
        "type": "array", "uniqueItems": True}}}}, "response_format"),  # a feature the grammar library lacks
    ({"prompt": "x", "response_format": {"type": "json_schema"}}, "response_format"),
    ({"prompt": "x", "structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
    ({"prompt": "x", "structured_outputs": {"regex": "(a"}}, "structured_outputs"),
    ({"prompt": "x", "structured_outputs": {"guided_json": {}}}, "structured_outputs"),
])
def test_completion_request_refuses(body, field):
    with pytest.raises(ValidationError) as info:
        CompletionRequest.model_validate({"model": "m", **body})
    if field is not None:
        assert info.value.errors()[0]["loc"][0] == field


def test_structured_output_fields():
    schema = {"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "boolean"}}}
    req = ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "x"}],
                                                "ignore_eos": True, "response_format": {
        "type": "json_schema", "json_schema": {"name": "p", "schema": schema, "strict": True}}})
    params = req.sampling_params(8, default_stop_ids=(6, 2), logprobs=None)
    assert params.structured.kind == "json" and params.structured.value == json.dumps(schema, separators=(",", ":"))
    assert params.stop_token_ids == (6, 2)  # the grammar decides where it ends, so ignore_eos keeps the stops
    for body, spec in [
        ({"structured_outputs": {"choice": ["a", "b"]}}, GrammarSpec("choice", ("a", "b"))),
        ({"structured_outputs": {"regex": "[0-9]+"}}, GrammarSpec("regex", "[0-9]+")),
        ({"structured_outputs": {"json": json.dumps(schema), "disable_any_whitespace": True}},
         GrammarSpec.json_schema(schema, None)),
        ({"response_format": {"type": "json_object"}}, GrammarSpec.json_schema({"type": "object"}, JSON_WHITESPACE)),
        ({"response_format": {"type": "text"}}, None),
    ]:
        assert CompletionRequest.model_validate({"model": "m", "prompt": "x", **body}).grammar_spec == spec


def test_chat_request():
    req = ChatCompletionRequest.model_validate({"model": "m", "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
        "max_completion_tokens": 5, "logprobs": True, "top_logprobs": 3})
    assert req.chat_messages() == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "ab"}]
    assert req.token_budget == 5
    for bad in ({"messages": []}, {"messages": [{"role": "tool", "content": "x"}]},
                {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "u"}]}]},
                {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
                {"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}):
        with pytest.raises(ValidationError):
            ChatCompletionRequest.model_validate({"model": "m", **bad})


def test_tokenize_needs_exactly_one_input_and_error_body_shape():
    with pytest.raises(ValidationError):
        TokenizeRequest.model_validate({})
    with pytest.raises(ValidationError):
        TokenizeRequest.model_validate({"prompt": "a", "messages": [{"role": "user", "content": "b"}]})
    assert error_body("bad", param="x", code="c") == {
        "error": {"message": "bad", "type": "invalid_request_error", "param": "x", "code": "c"}}
