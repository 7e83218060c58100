"""--resume auto|never|PATH and the check that a checkpoint fits the job, on one real 4-step run.

Refusals go through `mtnlg` in a fresh process: one line, exit 2, neither torch nor Ray imported,
the run directory untouched. `--resume PATH` starts a new run from step 2 of the first one and
trains steps 3-4 on the same tokens with the same losses.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from cli_probe import heavy, probe
from train_jobs import make_job, run_checkpoints

from mtnlg_ray.api import export
from mtnlg_ray.checkpoint.remote import step_of
from mtnlg_ray.config import dump_yaml
from mtnlg_ray.errors import ConfigError, PathError
from mtnlg_ray.train.metrics import read_metrics
from mtnlg_ray.train.preflight import plan_pretrain
from mtnlg_ray.train.resume import manifest_digest
from mtnlg_ray.train.trainer import run_pretrain

FIRST = dict(train={"max_steps": 4, "log_interval": 1, "eval_interval": 2}, checkpoint={"interval": 2})


@pytest.fixture(scope="module")
def first(ray_session, pretrain_data, tmp_path_factory):
    """(job, run directory) of a finished 4-step run with checkpoints at steps 2 and 4."""
    storage = tmp_path_factory.mktemp("runs")
    job = make_job(pretrain_data, storage, "first", **FIRST)
    run_pretrain(job)
    return job, storage / "first"


def snapshot(run_dir) -> tuple:
    """What a refused command must leave as it was: the run's entries and its metrics."""
    return sorted(p.name for p in run_dir.iterdir()), (run_dir / "metrics.jsonl").read_bytes()


def test_never_refuses_an_existing_run(first, tmp_path):
    job, run = first
    before = snapshot(run)
    cfg = tmp_path / "pretrain.yaml"
    dump_yaml(job, cfg)
    res, seconds = probe("pretrain", str(cfg), "--resume", "never")
    line = (f"error: {run}: a run already exists here (checkpoints up to step 4) and --resume never refuses to "
            "start over it; continue it with --resume auto, or start a new run with --set scaling.name=NEW_NAME\n")
    assert (res.returncode, res.stderr) == (2, line)
    assert heavy(res) == "heavy: []" and seconds < 4, seconds
    # fine-tuning applies the same rule before reading its start point
    ft = tmp_path / "finetune.yaml"
    ft.write_text(json.dumps({"init_from": str(run), "scaling": {"storage_path": str(run.parent), "name": "first"}}))
    res, _ = probe("finetune", str(ft), "--resume", "never")
    assert (res.returncode, res.stderr) == (2, line) and heavy(res) == "heavy: []"
    assert snapshot(run) == before


def test_a_changed_model_tokenizer_or_dataset_is_one_line_naming_the_keys(first, tmp_path, cluster_pretrain_data):
    job, run = first
    before = snapshot(run)
    cfg = tmp_path / "pretrain.yaml"
    dump_yaml(job, cfg)
    res, seconds = probe("pretrain", str(cfg), "--set", "model.n_layers=3", "--set", "train.max_steps=8",
                         "--set", f"data.datasets=[{{path: {cluster_pretrain_data}}}]")
    old, new = (json.loads((Path(d) / "manifest.json").read_text()) for d in (job.data.datasets[0].path,
                                                                               cluster_pretrain_data))
    latest = run_checkpoints(run)[0]
    assert res.returncode == 2 and res.stderr == (
        f"error: {latest}: cannot resume: model.n_layers (2 -> 3), tokenizer.sha256 "
        f"({old['tokenizer_sha256'][:12]} -> {new['tokenizer_sha256'][:12]}), data.datasets[0] "
        f"({manifest_digest(old)[:12]} -> {manifest_digest(new)[:12]}) differ from the checkpoint's; restore them, "
        "or start a new run with --set scaling.name=NEW_NAME\n")
    assert heavy(res) == "heavy: []" and seconds < 4, seconds
    assert snapshot(run) == before


def test_safe_changes_are_allowed_and_logged(first, caplog):
    job, run = first
    changed = make_job(job.data.datasets[0].path, run.parent, "first",
                       train={**FIRST["train"], "max_steps": 8, "log_interval": 2, "eval_batches": 3},
                       checkpoint={"interval": 4})
    with caplog.at_level(logging.INFO, logger="mtnlg_ray"):
        start = plan_pretrain(changed)
    assert start.resume_from is None  # auto: Ray Train continues the run itself
    assert f"resuming from {run_checkpoints(run)[0]} (step 4); changed since then: checkpoint.interval: 2 -> 4; " \
           "train.eval_batches: 2 -> 3; train.log_interval: 1 -> 2; train.max_steps: 4 -> 8" in caplog.text


def test_resume_path_refusals(first, tmp_path):
    job, run = first
    step2, step4 = sorted(run_checkpoints(run), key=step_of)
    assert plan_pretrain(job, str(step4)).resume_from is None  # the run's own latest: the same as auto
    with pytest.raises(ConfigError, match=rf"--resume {step2}: {run} holds a run already, which Ray Train would "
                                          r"continue from its own latest checkpoint instead"):
        plan_pretrain(job, str(step2))
    fresh = job.model_copy(update={"scaling": job.scaling.model_copy(update={"name": "fresh"})})
    exported = export(run, tmp_path / "export")
    with pytest.raises(PathError, match="an exported model .* fine-tune with init_from"):
        plan_pretrain(fresh, str(exported))
    with pytest.raises(PathError, match="no checkpoint_\\* directories"):
        plan_pretrain(fresh, str(tmp_path))
    assert not (run.parent / "fresh").exists()


def test_resume_path_starts_a_new_run_from_that_checkpoint(first):
    job, run = first
    step2 = min(run_checkpoints(run), key=step_of)
    fresh = job.model_copy(update={"scaling": job.scaling.model_copy(update={"name": "from_path"})})
    run_pretrain(fresh, resume=str(step2))
    steps, events = read_metrics(run.parent / "from_path")
    assert [(e["from_step"], e["checkpoint"]) for e in events if e["event"] == "resume"] == [(2, step2.name)]
    reference = {r["step"]: r for r in read_metrics(run)[0]}
    resumed = [r for r in steps if r["step"] > 2]
    assert [r["step"] for r in resumed] == [3, 4]
    for r in resumed:  # the same rows, learning rate and loss as steps 3-4 of the first run
        ref = reference[r["step"]]
        assert (r["tokens_sha"], r["lr"]) == (ref["tokens_sha"], ref["lr"])
        assert r["loss"] == pytest.approx(ref["loss"], abs=1e-6)
    saved = json.loads((run_checkpoints(run.parent / "from_path")[0] / "trainer_state.json").read_text())
    assert saved["step"] == 4 and saved["identity"]["seq_len"] == 64  # what the next resume is checked against
