"""The main job end to end with a reduced step count: every stage's outputs, a completion over HTTP,
and a console a person can read with stdout not a terminal (as under CI or `| tee`)."""

import json
import logging

import pytest

from mtnlg_ray import console
from mtnlg_ray.quickstart import run_quickstart

# What Ray Data prints per execution unless told not to (thousands of lines for one preprocess)
PROGRESS = ("Running Dataset", "Total Progress", "logging_progress", "Execution plan of", "Starting execution of")


@pytest.fixture
def default_console(monkeypatch):
    """The console `mtnlg quickstart` sets up (console.configure(0)); the package logger and the
    environment put back afterwards."""
    log = logging.getLogger(console.ROOT)
    level, handlers = log.level, list(log.handlers)
    for key, value in console.QUIET_RAY_ENV.items():
        monkeypatch.setenv(key, value)
    console.configure(0)
    yield
    log.setLevel(level)
    log.handlers[:] = handlers


@pytest.mark.timeout(1500)  # five stages; about 3 minutes on 2 idle cores
def test_quickstart_end_to_end(ray_session, tmp_path, default_console, capfd):
    out = run_quickstart(tmp_path / "demo", quick=True)
    printed = capfd.readouterr()  # file descriptors 1 and 2: whatever Ray or Ray Data write too
    work = tmp_path / "demo"
    manifest = json.loads((work / "data" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["rows"] > 0 and manifest["cleaning"]["documents_kept"] > 0
    for run in ("pretrain", "finetune"):
        rows = [json.loads(line) for line in (work / "runs" / run / "metrics.jsonl").read_text().splitlines()]
        assert any("loss" in r for r in rows)
        assert list((work / "runs" / run).glob("checkpoint_*")), run
        assert (work / f"{run}_loss.png").is_file()
    ckpt = work / "export"
    assert {p.name for p in ckpt.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.model", "manifest.json"}
    samples = out["samples"]
    assert len(samples) == 3 and samples[-1]["stream"] and all(isinstance(s["completion"], str) for s in samples)
    timings = json.loads((work / "timings.json").read_text())["timings"]
    assert set(timings) >= {"preprocess", "pretrain", "finetune", "export", "serve", "total"}

    # The first stage, preprocess: what it does and what it wrote, a handful of lines, no progress reports.
    lines = printed.out.splitlines()
    first = lines.index("=== [1/5] preprocess: clean + dedup the stdlib sources, train a tokenizer, write shards")
    second = next(i for i, line in enumerate(lines) if line.startswith("=== [2/5] pretrain"))
    stage = lines[first:second] + printed.err.splitlines()  # warnings go to stderr
    assert len(stage) < 60, "\n".join(stage)
    assert any(line.startswith("[preprocess] wrote ") for line in stage), "\n".join(stage)
    assert not [line for line in lines + printed.err.splitlines() if any(p in line for p in PROGRESS)]
    assert "Continue with:" in printed.out and "  mtnlg preprocess stdlib --set " in printed.out
