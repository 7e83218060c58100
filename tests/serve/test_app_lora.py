"""Multi-LoRA serving over real HTTP, on a deployment built from `mtnlg serve --lora-modules sql=RUN
--max-loras 2 --api-key KEY`: /v1/models lists the adapters, a request's `model` picks one (its output is
the merged model's; structured outputs hold), vLLM's runtime load / unload routes need the key, a load at
the bound unloads the least recently used adapter, and unknown names get OpenAI errors with the right status."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from mtnlg_ray.checkpoint.native import build_model
from mtnlg_ray.cli import build_parser, serve_job
from mtnlg_ray.model.generate import generate

KEY = "lora-key"
NAME = "tiny"
PROMPT = "def fill(text, width=70"


@pytest.fixture(scope="module")
def url(ray_session, tiny_checkpoint, tiny_loras, serve_port):
    from ray import serve

    from mtnlg_ray.serve.deploy import deploy

    args = build_parser().parse_args([
        "serve", str(tiny_checkpoint), "--port", str(serve_port), "--api-key", KEY, "--served-model-name", NAME,
        "--lora-modules", f"sql={tiny_loras['sql'][0]}", "--max-loras", "2", "--max-num-seqs", "4",
        "--set", "serve.num_cpus=0.5", "--set", "serve.max_waiting=4", "--set", "serve.max_ongoing_requests=8"])
    job = serve_job(args)
    assert job.serve.lora_adapters == {"sql": str(tiny_loras["sql"][0])} and job.serve.max_loras == 2
    try:
        yield deploy(job, name="lora")
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def http(url):
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
        yield c


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
