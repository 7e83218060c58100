"""Fine-tuning end to end on a real local Ray: the loss falls, LoRA trains only adapters, resume is exact."""

from __future__ import annotations

import json

import pytest
import torch

from mtnlg_ray import api
from mtnlg_ray.checkpoint.sharded import consolidate
from mtnlg_ray.checkpoint.source import open_source
from mtnlg_ray.errors import UserError
from mtnlg_ray.data.tokenizer import train_tokenizer
from mtnlg_ray.train.finetune import baseline_val_loss, fit, open_task_data, prepare_data

from sft_assets import finetune_job, tiny_checkpoint, write_task


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("finetune")
    return tiny_checkpoint(root / "init", tiny_tokenizer), write_task(root / "task")


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_tokenizer_that_does_not_match_the_checkpoint_is_refused(assets, tmp_path):
    init, task = assets
    other = train_tokenizer(["def f(x):\n    return x + 1\n" * 50], tmp_path / "other.model", vocab_size=300)
    job = finetune_job(init, tmp_path, tmp_path / "runs", "x", sft={"train_paths": [str(task / "train.jsonl")],
                                                                    "val_paths": [str(task / "val.jsonl")],
                                                                    "tokenizer": str(other.path)})
    with pytest.raises(UserError, match=r"vocab_size 512 .* has 300 tokens"):
        prepare_data(job)
    assert not (tmp_path / "sft_data").exists()  # refused before any data was written


def test_a_validation_split_too_small_to_evaluate_is_refused(ray_session, assets, tmp_path):
    init, task = assets
    (tmp_path / "val.jsonl").write_text('{"prompt": "copy: open", "response": "open"}\n')
    job = finetune_job(init, tmp_path, tmp_path / "runs", "x", sft={"train_paths": [str(task / "train.jsonl")],
                                                                    "val_paths": [str(tmp_path / "val.jsonl")]})
    with pytest.raises(UserError, match="the val split holds 1 rows .* fewer than train.micro_batch_size=4"):
        prepare_data(job)


def test_full_finetune_from_a_gpt2_directory_lowers_val_loss(ray_session, assets, tmp_path):
    init, task = assets
    hf = api.export(init, tmp_path / "hf", fmt="hf")  # a Hugging Face GPT-2 directory (+ our tokenizer.model)
    job = prepare_data(finetune_job(hf, task, tmp_path / "runs", "full"))
    bundle = open_task_data(job)
    before = baseline_val_loss(job, bundle)
    result = fit(job, bundle)
    after = result.metrics["val_loss"]
    assert result.metrics["step"] == 6
    assert after < before - 0.5, (before, after)
    evals = [r["val_loss"] for r in metrics(tmp_path / "runs" / "full") if "val_loss" in r]
    assert evals[-1] == pytest.approx(after) and len(evals) == 2


def test_lora_trains_only_adapters_and_resumes_exactly(ray_session, assets, tmp_path):
    init, task = assets
    lora = {"rank": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj", "up_proj"]}
    job = prepare_data(finetune_job(init, task, tmp_path / "runs", "lora", lora=lora))
    bundle = open_task_data(job)
    fit(job, bundle)
    run_dir = tmp_path / "runs" / "lora"

    # the run's checkpoint: base weights exactly the initial ones, adapters trained
    start = open_source(init).state_dict()
    raw = consolidate(open_source(run_dir).path)
    adapters = {k for k in raw if ".lora_" in k}
    assert len(adapters) == 2 * 3 * 2  # (A, B) x 3 targets x 2 layers
    for key, value in start.items():
        assert torch.equal(raw[key], value), f"{key} changed"
    assert all(raw[k].abs().sum() > 0 for k in adapters if k.endswith("lora_B"))  # B started at 0

    # export merges the adapters into plain weights: a checkpoint the server loads as is
    out = api.export(run_dir, tmp_path / "export")
    merged = api.from_pretrained(out)[1].state_dict()
    assert not any(".lora_" in k for k in merged)
    assert not torch.equal(merged["blocks.0.attn.q_proj.weight"], start["blocks.0.attn.q_proj.weight"])
    assert torch.equal(merged["blocks.0.attn.k_proj.weight"], start["blocks.0.attn.k_proj.weight"])

    # 3 steps, stop, resume to 6: the same losses as the 6-step run (init_from does not override the checkpoint)
    half = job.model_copy(update={"scaling": job.scaling.model_copy(update={"name": "lora_resumed"}),
                                  "train": job.train.model_copy(update={"max_steps": 3})})
    fit(half, bundle)
    fit(half.model_copy(update={"train": job.train}), bundle)
    straight = {r["step"]: r for r in metrics(run_dir) if "loss" in r}
    resumed_log = metrics(tmp_path / "runs" / "lora_resumed")
    resumed = {r["step"]: r for r in resumed_log if "loss" in r}
    assert any(r.get("event") == "resume" and r["from_step"] == 3 for r in resumed_log)
    assert sorted(resumed) == sorted(straight) == [1, 2, 3, 4, 5, 6]
    for step in straight:
        assert resumed[step]["loss"] == pytest.approx(straight[step]["loss"], rel=1e-6, abs=1e-6)
        assert resumed[step]["tokens_sha"] == straight[step]["tokens_sha"]
