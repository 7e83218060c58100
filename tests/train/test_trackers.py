"""trackers.py: TensorBoard, MLflow and W&B (offline) fed metrics.jsonl records, read back from disk.

No Ray here: the records are what the loop writes (a step record at a log interval carries
throughput, an evaluation carries val_loss); tests/train/test_failures.py runs the trackers
inside a real training run.
"""

import json
import struct
from pathlib import Path

import pytest
from train_jobs import make_job

from mtnlg_ray.errors import ConfigError
from mtnlg_ray.train.metrics import MetricsLog
from mtnlg_ray.train.trackers import IDS_FILE, check_installed, flatten, open_trackers


def records(steps, every=2, eval_at=(4,)):
    """What the loop appends: every step, throughput at log intervals, val_loss at evaluations."""
    out = [{"event": "start", "time": 0.0}]
    for s in steps:
        r = {"step": s, "loss": 6.0 - 0.1 * s, "lr": 1e-3, "grad_norm": 1.0, "batch_size": 8, "tokens": 512 * s,
             "epoch": s / 100, "tokens_sha": "ab", "time": float(s)}
        if s % every == 0:
            r.update(tokens_per_s=1000.0 + s, mfu=0.01, data_wait=0.1)
        if s in eval_at:
            r.update(val_loss=5.5, val_ppl=244.7, val_bpb=2.2)
        out.append(r)
    return out


def tensorboard_scalars(run_dir: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def wandb_records(run_file: Path) -> list:
    """The protobuf records of an offline run's .wandb file (LevelDB log format: 32 KiB blocks,
    7-byte record headers crc32 / length / type, after a 7-byte ':W&B' file header)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, buf, out = run_file.read_bytes(), 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
            buf = b""
    return out


def wandb_history(run_dir: Path) -> tuple[dict, list[dict]]:
    """(config, history rows) of every offline run under run_dir/wandb."""
    config, rows = {}, []
    for path in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        for rec in wandb_records(path):
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                config.update({i.key: json.loads(i.value_json) for i in rec.run.config.update})
            elif kind == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
    return config, rows


@pytest.fixture
def job(tmp_path):
    return make_job(tmp_path / "data", tmp_path / "runs", "tracked",
                    train={"loggers": ["tensorboard", "mlflow", "wandb"], "tracking": {"wandb_mode": "offline"}})


def opened(job, start_step: int):
    """open_trackers as the loop calls it for a pretraining run of `job`."""
    return open_trackers(job, "pretrain", Path(job.scaling.storage_path) / job.scaling.name, start_step)


def test_three_trackers_get_log_and_eval_records_and_resume_as_one_run(job, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = Path(job.scaling.storage_path) / "tracked"
    metrics = MetricsLog(run_dir)
    metrics.trackers = opened(job, 0)
    for r in records(range(1, 7)):  # steps 1..6: logs at 2, 4, 6; evaluation at 4
        metrics.write(r)
    metrics.close()

    # resumed from a checkpoint at step 4: steps 5, 6 again with other values, then 7, 8
    metrics.trackers = opened(job, 4)
    ids = json.loads((run_dir / IDS_FILE).read_text())
    for r in records(range(5, 9))[1:]:
        r["loss"] += 1.0
        metrics.write(r)
    metrics.close()
    assert json.loads((run_dir / IDS_FILE).read_text()) == ids and set(ids) == {"mlflow", "wandb"}

    # TensorBoard: the log-interval and eval steps only; the resumed run's step 6 replaces the first one's
    tb = tensorboard_scalars(run_dir)
    assert sorted(tb["train/loss"]) == [2, 4, 6, 8] and tb["val/loss"] == {4: 5.5}
    assert tb["train/loss"][6] == pytest.approx(6.0 - 0.6 + 1.0) and tb["train/tokens"][8] == 512 * 8
    assert {"train/lr", "train/grad_norm", "train/tokens_per_s", "train/mfu", "val/ppl", "val/bpb"} <= set(tb)

    # MLflow: one run in the file store beside the run directories, the job config as params
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(run_dir.parent / "mlruns").as_uri())
    run = client.get_run(ids["mlflow"])
    assert run.info.run_name == "tracked" and run.info.status == "FINISHED"
    assert run.data.params["optim.lr"] == str(job.optim.lr) and run.data.params["model.preset"] == "debug"
    assert run.data.params["kind"] == "pretrain"
    history = [(m.step, m.value) for m in client.get_metric_history(ids["mlflow"], "train/loss")]
    assert [s for s, _ in history] == [2, 4, 6, 6, 8]  # a repeated step keeps both values
    assert client.get_experiment(run.info.experiment_id).name == "mtnlg"

    # W&B offline: one run id, the config, every logged row against trainer/step
    config, rows = wandb_history(run_dir)
    assert {p.name.rsplit("-", 1)[-1] for p in run_dir.glob("wandb/offline-run-*")} == {ids["wandb"]}
    assert config["optim.lr"] == job.optim.lr and config["train.loggers"] == '["tensorboard", "mlflow", "wandb"]'
    assert [r["trainer/step"] for r in rows] == [2, 4, 6, 6, 8]
    assert rows[1]["val/loss"] == 5.5 and "val/loss" not in rows[0]


def test_tracking_config_and_missing_packages(tmp_path, monkeypatch):
    job = make_job(tmp_path, tmp_path, "x")
    assert job.train.loggers == ["tensorboard"] and opened(
        make_job(tmp_path, tmp_path, "x", train={"loggers": []}), 0) is None
    with pytest.raises(ConfigError, match="each tracker at most once"):
        make_job(tmp_path, tmp_path, "x", train={"loggers": ["mlflow", "mlflow"]})
    with pytest.raises(ConfigError, match="loggers"):
        make_job(tmp_path, tmp_path, "x", train={"loggers": ["comet"]})
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "wandb" else object())
    with pytest.raises(ConfigError, match=r"train.loggers: wandb needs the wandb package.*mtnlg-ray\[tracking\]"):
        check_installed(["tensorboard", "wandb"])
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": None}) == {"a.b": 1, "a.c": "[1, 2]", "d": "null"}


def test_a_tracker_that_cannot_start_is_dropped_with_a_warning(tmp_path, caplog):
    job = make_job(tmp_path, tmp_path / "runs", "broken",
                   train={"loggers": ["tensorboard", "mlflow"], "tracking": {"mlflow_uri": "bogus-scheme://x"}})
    trackers = opened(job, 0)
    assert list(trackers.backends) == ["tensorboard"]
    assert "train.loggers: mlflow could not start" in caplog.text
    trackers.write(records([2])[1])
    trackers.close()
