"""The main job end to end (`mtnlg quickstart`, `make demo`): raw text to a served model.

    1 preprocess  the built-in corpus (stdlib sources): cleaning report, tokenizer, Parquet shards
    2 pretrain    a small GPT, one Ray Train worker computing on all cores
    3 finetune    the code recipe (docstring + signature -> body pairs from the stdlib)
    4 export      the fine-tuned run -> a consolidated checkpoint
    5 serve       Ray Serve deployment, OpenAI-style requests (one streamed), then shut down

Every stage is the same library call its own command makes, with the shipped configs
(mtnlg_ray/configs/, `mtnlg configs`) plus the overrides printed at the end, so each stage can be
rerun alone.
Outputs stay in the work directory: data/, runs/pretrain, runs/finetune, export/, *.png, timings.json.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import urllib.request
from pathlib import Path

from mtnlg_ray.api import export
from mtnlg_ray.config import FinetuneJob, PreprocessJob, PretrainJob, ServeJob, load_job
from mtnlg_ray.data.shards import run_preprocess
from mtnlg_ray.serve.deploy import deploy, shutdown
from mtnlg_ray.train.finetune import run_finetune
from mtnlg_ray.train.trainer import ensure_ray, run_pretrain

log = logging.getLogger(__name__)
# The fine-tuned task's format (data/code_task.py): a signature and a one-line docstring, sent as a
# chat turn; the model answers with the function body.
PROMPTS = [
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""',
    'def read_lines(path):\n    """Return the lines of the text file at path, without newlines."""',
    'def is_palindrome(text):\n    """Return True if text reads the same forwards and backwards."""',
]


def _stage(n: int, name: str, what: str) -> float:
    log.info("\n=== [%d/5] %s: %s", n, name, what)
    return time.perf_counter()


def _post(url: str, body: dict, timeout: float = 120) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def _stream(url: str, body: dict, timeout: float = 120):
    """Yield the text of each SSE chunk of a streamed chat completion."""
    req = urllib.request.Request(url, json.dumps({**body, "stream": True}).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if line.startswith("data: ") and line != "data: [DONE]":
                yield json.loads(line[6:])["choices"][0]["delta"].get("content") or ""


def _jobs(work: Path, quick: bool):
    """The job configs of the quickstart: shipped configs (by name) + the overrides that place outputs in `work`."""
    runs = work / "runs"
    pre_set = [f"output_dir={work / 'data'}"] + (["corpus.max_files=60", "tokenizer.vocab_size=1024"] if quick else [])
    pt_set = [f"data.datasets=[{{path: {work / 'data'}}}]", f"scaling.storage_path={runs}", "scaling.name=pretrain"]
    pt_set += ["train.max_steps=12", "train.eval_interval=6", "train.log_interval=3", "checkpoint.interval=6"] if quick else []
    ft_set = [f"init_from={runs / 'pretrain'}", f"output_dir={work / 'sft_data'}", f"scaling.storage_path={runs}",
              "scaling.name=finetune"]
    ft_set += ["train.max_steps=6", "train.eval_interval=3", "train.log_interval=3", "checkpoint.interval=3",
               "train.global_batch_size=8", "train.micro_batch_size=4", "sft.max_examples=300",
               "sft.val_fraction=0.2"] if quick else []
    return {
        "preprocess": ("stdlib", PreprocessJob, pre_set),
        "pretrain": ("quickstart", PretrainJob, pt_set),
        "finetune": ("code", FinetuneJob, ft_set),
    }


def _command(sub: str, name: str, sets: list[str]) -> str:
    return f"mtnlg {sub} {name} " + " ".join(f"--set '{s}'" for s in sets)


def _copy_plots(run_dir: Path, work: Path, prefix: str) -> list[Path]:
    out = []
    for png in sorted(run_dir.glob("*.png")):
        dst = work / f"{prefix}_{png.name}"
        shutil.copyfile(png, dst)
        out.append(dst)
    return out


def run_quickstart(workdir: str | Path = "demo_run", quick: bool = False) -> dict:
    """Run all five stages; returns {"timings": {...}, "samples": [...], "paths": {...}}."""
    work = Path(workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    jobs = _jobs(work, quick)
    timings: dict[str, float] = {}
    t_all = time.perf_counter()
    ensure_ray()

    t = _stage(1, "preprocess", "clean + dedup the stdlib sources, train a tokenizer, write shards")
    name, cls, sets = jobs["preprocess"]
    data_dir = run_preprocess(load_job(name, cls, sets))
    timings["preprocess"] = time.perf_counter() - t

    t = _stage(2, "pretrain", "a 4-layer GPT on one Ray Train worker (all cores)")
    name, cls, sets = jobs["pretrain"]
    run_pretrain(load_job(name, cls, sets))
    pre_run = work / "runs" / "pretrain"
    plots = _copy_plots(pre_run, work, "pretrain")
    timings["pretrain"] = time.perf_counter() - t

    t = _stage(3, "finetune", "code recipe: docstring + signature -> function body")
    name, cls, sets = jobs["finetune"]
    run_finetune(load_job(name, cls, sets))
    ft_run = work / "runs" / "finetune"
    plots += _copy_plots(ft_run, work, "finetune")
    timings["finetune"] = time.perf_counter() - t

    t = _stage(4, "export", "consolidate the fine-tuned run into one checkpoint")
    ckpt = export(ft_run, work / "export")
    log.info("checkpoint: %s", ckpt)
    timings["export"] = time.perf_counter() - t

    t = _stage(5, "serve", "Ray Serve + OpenAI-compatible HTTP, continuous batching")
    serve_job = ServeJob.model_validate({"serve": {"checkpoint": str(ckpt), "num_cpus": 0.5, "port": 0}})
    base = deploy(serve_job)
    samples = []
    try:
        for i, prompt in enumerate(PROMPTS):
            body = {"model": serve_job.serve.model_name, "messages": [{"role": "user", "content": prompt}],
                    "max_tokens": 64, "temperature": 0.7, "top_p": 0.95, "seed": 0}
            streamed = i == len(PROMPTS) - 1
            print(f"--- POST /v1/chat/completions{' (stream=true)' if streamed else ''}\n{prompt}", flush=True)
            if streamed:
                pieces = []
                for piece in _stream(f"{base}/v1/chat/completions", body):
                    pieces.append(piece)
                    print(piece, end="", flush=True)
                text = "".join(pieces)
                print()
            else:
                text = _post(f"{base}/v1/chat/completions", body)["choices"][0]["message"]["content"]
                print(text, flush=True)
            samples.append({"prompt": prompt, "completion": text, "stream": streamed})
    finally:
        shutdown()
    timings["serve"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_all

    paths = {"dataset": str(data_dir), "pretrain_run": str(pre_run), "finetune_run": str(ft_run),
             "checkpoint": str(ckpt), "plots": [str(p) for p in plots]}
    (work / "timings.json").write_text(json.dumps({"timings": timings, "samples": samples, "paths": paths}, indent=2))
    log.info("\n=== done: seconds per stage\n%s", "\n".join(f"  {name:<11} {secs:7.1f}" for name, secs in timings.items()))
    log.info("\nOutputs in %s:\n  dataset      %s  (manifest.json has the cleaning report)\n"
             "  runs         %s, %s  (metrics.jsonl, checkpoints)\n  checkpoint   %s\n  loss curves  %s",
             work, data_dir, pre_run, ft_run, ckpt, ", ".join(p.name for p in plots))
    again = [_command(sub, *jobs[sub][::2]) for sub in ("preprocess", "pretrain", "finetune")]
    log.info("\nContinue with:\n  %s\n  mtnlg generate %s --prompt 'def parse(line):' --max-tokens 64 --temperature 0.7"
             "\n  mtnlg serve %s --port 8000\n  mtnlg plot %s", "\n  ".join(again), ckpt, ckpt, pre_run)
    return {"timings": timings, "samples": samples, "paths": paths}
