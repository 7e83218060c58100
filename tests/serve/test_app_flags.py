"""The server as vLLM users drive it, over real HTTP, on one deployment built from `mtnlg serve`'s
vLLM-style flags (--api-key, --served-model-name, --max-model-len, --max-num-seqs, --chat-template,
--lora-modules, --max-loras; one deployment because each takes ~20 s to start and stop):
- prompt text as vLLM and OpenAI read it: special tokens written in text, /tokenize and
  /tokenizer_info, logprob bytes and offsets, the OpenAPI document and /docs, /version, and 400s
  naming the field for values the engine cannot honour;
- multi-LoRA: /v1/models lists the adapters, a request's `model` picks one (its output is the merged
  model's; structured outputs hold), vLLM's runtime load / unload routes need the key, a load at the
  bound unloads the least recently used adapter, and unknown names get OpenAI errors with the right
  status."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from mtnlg_ray import __version__
from mtnlg_ray.checkpoint.native import build_model
from mtnlg_ray.cli import build_parser
from mtnlg_ray.serve.flags import serve_job
from mtnlg_ray.data.chat import render_chat
from mtnlg_ray.model.generate import generate

KEY = "flag-key"
NAME = "tiny-chat"
PROMPT = "def fill(text, width=70"
TEMPLATE = ("{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")


@pytest.fixture(scope="module")
def url(ray_session, tiny_checkpoint, tiny_loras, serve_port, tmp_path_factory):
    from ray import serve

    from mtnlg_ray.serve.deploy import deploy

    template = tmp_path_factory.mktemp("template") / "chat.jinja"
    template.write_text(TEMPLATE)
    args = build_parser().parse_args([
        "serve", str(tiny_checkpoint), "--port", str(serve_port), "--api-key", KEY, "--served-model-name", NAME,
        "--max-model-len", "128", "--max-num-seqs", "2", "--chat-template", str(template),
        "--lora-modules", f"sql={tiny_loras['sql'][0]}", "--max-loras", "2",
        "--set", "serve.num_cpus=0.5", "--set", "serve.max_waiting=4", "--set", "serve.max_ongoing_requests=6"])
    job = serve_job(args)
    assert (job.serve.model_name, job.serve.max_context, job.serve.max_batch_slots) == (NAME, 128, 2)
    assert job.serve.api_key == KEY and KEY not in repr(job.serve)
    assert job.serve.lora_adapters == {"sql": str(tiny_loras["sql"][0])} and job.serve.max_loras == 2
    try:
        yield deploy(job, name="flags")
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def http(url):
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
        yield c


def test_flags_reach_the_server(url, http):
    from ray import serve

    assert http.get("/v1/models").json()["data"][0]["max_model_len"] == 128
    assert serve.get_app_handle("flags").replica_info.remote().result(timeout_s=30)["free_rows"] == 2
    r = http.post("/v1/completions", json={"model": "mtnlg", "prompt": "x", "max_tokens": 1})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    assert httpx.post(url + "/tokenize", json={"prompt": "x"}).status_code == 401  # --api-key
    assert httpx.get(url + "/tokenizer_info").status_code == 401


def test_special_tokens_in_prompt_text_are_the_tokens(http, tiny):
    _, tok = tiny
    text = "<|endoftext|>def f():\n    return 1\n"
    ids = [tok.eod_id] + tok.encode("def f():\n    return 1\n")
    r = http.post("/tokenize", json={"prompt": text, "return_token_strs": True, "add_special_tokens": True}).json()
    assert r["tokens"] == ids and r["count"] == len(ids) and r["max_model_len"] == 128
    assert r["token_strs"] == [tok.id_to_piece(i) for i in ids] and r["token_strs"][0] == "<|endoftext|>"
    literal = http.post("/tokenize", json={"prompt": text, "split_special_tokens": True}).json()["tokens"]
    assert literal == tok.sp.encode(text) and tok.eod_id not in literal
    # scoring a text prompt (echo, prompt logprobs, nothing generated) = scoring its token ids
    body = {"model": NAME, "max_tokens": 0, "echo": True, "logprobs": 1}
    by_text = http.post("/v1/completions", json={**body, "prompt": text}).json()
    by_ids = http.post("/v1/completions", json={**body, "prompt": ids}).json()
    assert by_text["usage"]["prompt_tokens"] == len(ids)
    assert by_text["choices"][0]["logprobs"]["token_logprobs"] == by_ids["choices"][0]["logprobs"]["token_logprobs"]
    assert by_text["choices"][0]["logprobs"]["tokens"][0] == "<|endoftext|>"


def test_chat_uses_the_template_flag_and_reads_special_tokens_in_messages(http, tiny):
    _, tok = tiny
    msgs = [{"role": "user", "content": "x<|endoftext|>y"}]
    expected = tok.encode(render_chat(msgs, True, TEMPLATE))
    assert tok.eod_id in expected
    assert http.post("/tokenize", json={"messages": msgs}).json()["tokens"] == expected
    r = http.post("/v1/chat/completions", json={"model": NAME, "messages": msgs, "max_tokens": 2}).json()
    assert r["usage"]["prompt_tokens"] == len(expected)


def test_tokenizer_info_is_vllms(http, tiny):
    _, tok = tiny
    info = http.get("/tokenizer_info").json()
    assert info["tokenizer_class"] and info["model_max_length"] == 128 and info["chat_template"] == TEMPLATE
    assert info["eos_token"] == "<|endoftext|>" and info["pad_token"] == "<pad>" and info["unk_token"] == "<unk>"
    assert info["added_tokens_decoder"][str(tok.eod_id)] == {"content": "<|endoftext|>", "special": True}
    assert info["special_token_ids"] == tok.special_tokens
    assert set(info["additional_special_tokens"]) == {"<|system|>", "<|user|>", "<|assistant|>", "<|end|>"}


def test_logprob_tokens_of_partial_characters_are_bytes_and_offsets_match_the_text(http):
    prompt = "name = 'J\u00fcrgen \u2603'\n"
    body = {"model": NAME, "prompt": prompt, "max_tokens": 4, "echo": True, "logprobs": 2, "temperature": 0}
    choice = http.post("/v1/completions", json=body).json()["choices"][0]
    lp, text = choice["logprobs"], choice["text"]
    assert text.startswith(prompt) and any(t.startswith("bytes:\\x") for t in lp["tokens"])
    for t, at in zip(lp["tokens"], lp["text_offset"]):
        if not t.startswith("bytes:") and t != "<|endoftext|>":
            assert text[at: at + len(t)] == t
    assert lp["text_offset"] == sorted(lp["text_offset"])


def test_openapi_docs_version_and_400s_for_what_the_engine_cannot_honour(url, http):
    doc = httpx.get(url + "/openapi.json").json()  # public, as the docs page
    assert doc["info"]["version"] == __version__
    op = doc["paths"]["/v1/completions"]["post"]
    assert op["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/CompletionRequest")
    assert "prompt" in doc["components"]["schemas"]["CompletionRequest"]["properties"]
    assert doc["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    assert op["security"] == [{"bearerAuth": []}] and "security" not in doc["paths"]["/health"]["get"]
    assert {"/tokenize", "/tokenizer_info", "/v1/chat/completions", "/version"} <= set(doc["paths"])
    docs = httpx.get(url + "/docs")
    assert docs.status_code == 200 and "/openapi.json" in docs.text
    assert httpx.get(url + "/version").json() == {"version": __version__}
    for field, value in (("stop_token_ids", [99999]), ("logit_bias", {"99999": 1.0}), ("max_tokens", 129)):
        r = http.post("/v1/completions", json={"model": NAME, "prompt": "x", field: value})
        assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
    r = http.post("/tokenize", json={"prompt": "x", "messages": [{"role": "user", "content": "y"}]})
    assert r.status_code == 400


# ------------------------------------------------------------------------------------ multi-LoRA
def expected(tiny, state, max_tokens=8) -> str:
    """The merged model's greedy continuation of PROMPT."""
    model, tok = tiny
    ids = tok.encode(PROMPT)
    merged = model if state is None else build_model(model.config, state).eval()
    return tok.decode(generate(merged, [ids], max_tokens)[0][len(ids):])


def complete(http, model: str) -> httpx.Response:
    return http.post("/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0})


def models(http) -> list[str]:
    return [m["id"] for m in http.get("/v1/models").json()["data"]]


def test_models_list_the_adapters_and_each_request_gets_its_merged_models_output(http, tiny, tiny_loras):
    cards = http.get("/v1/models").json()["data"]
    assert [(m["id"], m["parent"], m["root"]) for m in cards] == [(NAME, None, None),
                                                                   ("sql", NAME, str(tiny_loras["sql"][0]))]
    with ThreadPoolExecutor(4) as pool:  # base and adapter requests at once: they share the engine's batches
        answers = list(pool.map(lambda m: complete(http, m), ["sql", NAME, "sql", NAME]))
    want = {"sql": expected(tiny, tiny_loras["sql"][1]), NAME: expected(tiny, None)}
    assert want["sql"] != want[NAME]
    for m, r in zip(["sql", NAME, "sql", NAME], answers):
        assert r.status_code == 200, r.text
        assert (r.json()["model"], r.json()["choices"][0]["text"]) == (m, want[m])
    r = http.post("/v1/completions", json={"model": "sql", "prompt": PROMPT, "max_tokens": 8, "temperature": 0,
                                           "structured_outputs": {"choice": ["yes", "no"]}})
    assert r.json()["choices"][0]["text"] in ("yes", "no")  # structured outputs hold for adapter requests
    r = complete(http, "nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found" and "`sql`" in r.text


def test_runtime_load_and_unload_need_the_key_and_the_bound_unloads_the_least_recently_used(
        url, http, tiny, tiny_loras, tiny_checkpoint):
    load = {"lora_name": "chat", "lora_path": str(tiny_loras["chat"][0])}
    assert httpx.post(url + "/v1/load_lora_adapter", json=load).status_code == 401
    assert httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "sql"}).status_code == 401
    assert models(http) == [NAME, "sql"]

    r = http.post("/v1/load_lora_adapter", json=load)
    assert (r.status_code, r.text) == (200, "Success: LoRA adapter 'chat' added successfully.")
    assert models(http) == [NAME, "sql", "chat"]
    assert complete(http, "sql").status_code == 200  # sql is now the most recently used: chat goes first
    r = http.post("/v1/load_lora_adapter", json={"lora_name": "poem", "lora_path": str(tiny_loras["poem"][0])})
    assert r.status_code == 200, r.text
    assert models(http) == [NAME, "sql", "poem"]
    assert complete(http, "chat").status_code == 404
    assert complete(http, "poem").json()["choices"][0]["text"] == expected(tiny, tiny_loras["poem"][1])

    r = http.post("/v1/load_lora_adapter", json={"lora_name": "poem", "lora_path": str(tiny_loras["poem"][0])})
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora_name"
    r = http.post("/v1/load_lora_adapter", json={"lora_name": NAME, "lora_path": str(tiny_loras["chat"][0])})
    assert r.status_code == 400 and r.json()["error"]["message"] == f"lora_name: `{NAME}` is the base model's name"
    r = http.post("/v1/load_lora_adapter", json={"lora_name": "base", "lora_path": str(tiny_checkpoint)})
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora_path"
    assert "not a LoRA fine-tune run" in r.json()["error"]["message"]
    r = http.post("/v1/load_lora_adapter", json={"lora_name": "x"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora_path"

    r = http.post("/v1/unload_lora_adapter", json={"lora_name": "chat"})
    assert r.status_code == 404 and r.json()["error"]["message"] == "The lora adapter 'chat' cannot be found."
    r = http.post("/v1/unload_lora_adapter", json={"lora_name": "poem"})
    assert (r.status_code, r.text) == (200, "Success: LoRA adapter 'poem' removed successfully.")
    assert models(http) == [NAME, "sql"]
    assert complete(http, "poem").status_code == 404
