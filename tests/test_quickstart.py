"""The main job end to end with a reduced step count: every stage's outputs, and a completion over HTTP."""

import json

import pytest

from mtnlg_ray.quickstart import run_quickstart


@pytest.mark.timeout(1500)  # five stages; about 3 minutes on 2 idle cores
def test_quickstart_end_to_end(ray_session, tmp_path):
    out = run_quickstart(tmp_path / "demo", quick=True)
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
