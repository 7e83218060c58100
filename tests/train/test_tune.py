"""`mtnlg tune`: two learning rates on a toy task, the better one ranked first, its config runs."""

from __future__ import annotations

import json
import logging

import yaml

from mtnlg_ray.cli import main
from mtnlg_ray.config import FinetuneJob, TuneJob, load_job, validate
from mtnlg_ray.train.tune import format_ranking, run_tune, trial_job

from sft_assets import finetune_job, tiny_checkpoint, write_task


def test_unknown_hyperparameter_is_refused(tmp_path, capsys):
    path = tmp_path / "tune.yaml"
    path.write_text(yaml.safe_dump({"finetune": {"init_from": "ckpt"},
                                    "tune": {"search_space": {"lr": [1e-3], "momentum": [0.9]}}}))
    assert main(["tune", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: tune.yaml: tune.search_space.momentum: unknown key "
                   "(known here: lr, global_batch_size, warmup_tokens, lora_rank)")


def test_trial_job_sets_the_named_keys(tmp_path):
    job = validate(FinetuneJob, {"init_from": "ckpt", "lora": {"rank": 8}}, "ft.yaml")
    trial = trial_job(job, {"lr": 0.01, "global_batch_size": 32, "warmup_tokens": 100, "lora_rank": 2})
    assert (trial.optim.lr, trial.train.global_batch_size, trial.optim.warmup_tokens, trial.lora.rank) == (0.01, 32, 100, 2)
    rows = [{"hp": {"lr": 0.01}, "best": 1.5, "last": 1.6, "evals": 2, "error": None},
            {"hp": {"lr": 1e-5}, "best": 2.5, "last": 2.5, "evals": 1, "error": None}]
    table = format_ranking(rows, max_evals=2).splitlines()
    assert table[1].split()[:4] == ["1", "0.01", "2", "1.5000"] and table[2].endswith("stopped early (ASHA)")


def test_tune_ranks_the_better_learning_rate_first_and_its_config_runs(ray_session, tiny_tokenizer, tmp_path, capsys,
                                                                        caplog, monkeypatch):
    init = tiny_checkpoint(tmp_path / "init", tiny_tokenizer)
    task = write_task(tmp_path / "task")
    finetune = finetune_job(init, task, tmp_path / "runs", "toy").model_dump(mode="json")
    finetune["train"]["loggers"] = ["tensorboard", "mlflow"]
    best_out = tmp_path / "best.yaml"
    job = validate(TuneJob, {"finetune": finetune, "tune": {"search_space": {"lr": [1e-5, 3e-3]},
                                                             "best_config_out": str(best_out)}}, "tune.yaml")
    caplog.set_level(logging.INFO, logger="mtnlg_ray")
    rows = run_tune(job)
    assert [r["hp"]["lr"] for r in rows] == [3e-3, 1e-5]
    assert rows[0]["best"] < rows[1]["best"] and all(r["error"] is None for r in rows)
    assert rows[0]["evals"] == 2  # the better trial ran to the end: evaluations at steps 3 and 6
    assert "best: {'lr': 0.003}" in caplog.text and f"mtnlg finetune {best_out}" in caplog.text

    # each trial is one tracked run, named after it, grouped under the search (MLflow: its experiment)
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=(tmp_path / "runs" / "toy-tune-runs" / "mlruns").as_uri())
    trials = client.search_runs([client.get_experiment_by_name("toy-tune").experiment_id])
    assert sorted(float(r.data.params["optim.lr"]) for r in trials) == [1e-5, 3e-3]
    assert all(r.info.run_name.startswith("trial_") and "val/loss" in r.data.metrics for r in trials)
    assert all(list((tmp_path / "runs" / "toy-tune-runs" / r.info.run_name).glob("events.out.tfevents.*"))
               for r in trials)

    best = load_job(best_out, FinetuneJob)
    assert best.optim.lr == 3e-3 and best.scaling.name == "toy-best"
    code = main(["finetune", str(best_out), "--set", "train.max_steps=2", "--set", "baseline_eval=true"])
    assert code == 0
    out = capsys.readouterr().out
    assert "validation loss after 2 steps" in out and "(before: " in out
    records = [json.loads(x) for x in (tmp_path / "runs" / "toy-best" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
