"""Experiment trackers: TensorBoard, MLflow and Weights & Biases, fed the records of metrics.jsonl.

    train.loggers: [tensorboard]                 the default: event files in the run directory
                   [tensorboard, mlflow, wandb]  any subset (mlflow, wandb: pip install 'mtnlg-ray[tracking]')

As the Ray Train guide to experiment tracking describes, the tracker libraries are called natively
inside the train function, on the worker of world rank 0 only (the others hold the same numbers).
That worker's `MetricsLog` passes every record it appends to metrics.jsonl to `Trackers.write`,
which keeps the records of log intervals (they carry throughput) and evaluations, so a step
costs one dict lookup and the trackers write at the rate of the console lines.

    series (x: optimizer step)   train/loss, train/lr, train/grad_norm, train/tokens_per_s, train/mfu,
                                 train/data_wait, train/tokens (tokens seen), train/batch_size, train/epoch,
                                 val/loss, val/ppl, val/bpb
    parameters                   the job config, nested keys flattened (optim.lr, model.n_layers, ...):
                                 TensorBoard hparams, MLflow params, W&B config

One run directory is one tracked run through restarts and resumes: RUN_DIR/trackers.json keeps
the MLflow and W&B run ids. A resumed run repeats the steps after its checkpoint; TensorBoard's
writer purges the events past the resumed step, W&B draws against `trainer/step` (its own
`_step` only grows), MLflow keeps both values of a repeated step.

Where each writes: TensorBoard into RUN_DIR (`tensorboard --logdir STORAGE_PATH` shows every run
by name); MLflow to `train.tracking.mlflow_uri`, else $MLFLOW_TRACKING_URI, else the file store
STORAGE_PATH/mlruns (MLflow keeps file stores in maintenance mode; they open with
MLFLOW_ALLOW_FILE_STORE=true, which is set for this one); W&B under RUN_DIR/wandb, online when it
has an API key, else offline (`wandb sync RUN_DIR/wandb/offline-run-*` uploads later). A tracker
that fails to start or to write is dropped with a warning: the training run goes on.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import netrc
import os
import time
from pathlib import Path

from mtnlg_ray.errors import ConfigError

log = logging.getLogger(__name__)

IDS_FILE = "trackers.json"
PACKAGES = {"tensorboard": "tensorboardX", "mlflow": "mlflow", "wandb": "wandb"}
SERIES = {  # metrics.jsonl key -> tracker series
    "loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm", "tokens_per_s": "train/tokens_per_s",
    "mfu": "train/mfu", "data_wait": "train/data_wait", "tokens": "train/tokens", "batch_size": "train/batch_size",
    "epoch": "train/epoch", "val_loss": "val/loss", "val_ppl": "val/ppl", "val_bpb": "val/bpb",
}


def check_installed(loggers: list[str]) -> None:
    """Refuse, before any worker starts, a tracker whose library is not installed (one line)."""
    for name in loggers:
        if importlib.util.find_spec(PACKAGES[name]) is None:
            raise ConfigError(f"train.loggers: {name} needs the {PACKAGES[name]} package, which is not installed "
                              "(pip install 'mtnlg-ray[tracking]', or remove it from train.loggers)")


def flatten(d: dict, prefix: str = "") -> dict:
    """{"optim": {"lr": 3e-4}} -> {"optim.lr": 3e-4}; lists and None as text (what every tracker takes)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v if isinstance(v, (bool, int, float, str)) else json.dumps(v)
    return out


def mlflow_uri(cfg, storage_dir: Path) -> str:
    """The MLflow tracking URI of a run whose run directories are in `storage_dir` (see the module doc)."""
    uri = cfg.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return (storage_dir / "mlruns").resolve().as_uri()
    return uri if "://" in uri or uri.startswith(("file:", "databricks")) else Path(uri).resolve().as_uri()


def wandb_mode(cfg) -> str:
    """online / offline / disabled: the config, else $WANDB_MODE, else online only with an API key."""
    if cfg.wandb_mode or os.environ.get("WANDB_MODE"):
        return cfg.wandb_mode or os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:  # `wandb login` stores the key in ~/.netrc
        return "online" if netrc.netrc().authenticators(os.environ.get("WANDB_BASE_URL", "api.wandb.ai")
                                                        .split("://")[-1]) else "offline"
    except (OSError, netrc.NetrcParseError):
        return "offline"


class TensorBoard:
    """Event files in the run directory (tensorboardX: protobuf only, no TensorFlow)."""

    def __init__(self, run_dir: Path, params: dict, start_step: int, first: bool):
        from tensorboardX import SummaryWriter

        # purge_step: TensorBoard hides events at or past it that earlier writers left (a resumed run
        # repeats the steps after its checkpoint); flush_secs is moot, write() flushes.
        self.writer = SummaryWriter(str(run_dir), purge_step=start_step + 1)
        if first:
            from tensorboardX.summary import hparams

            metrics = [s for s in SERIES.values() if s.startswith("val/")] + ["train/loss"]
            for summary in hparams(params, {m: 0 for m in metrics}):  # the HPARAMS tab: config beside the metrics
                self.writer._get_file_writer().add_summary(summary)

    def log(self, metrics: dict, step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()  # a killed worker keeps what it logged

    def close(self) -> None:
        self.writer.close()


class MLflow:
    """One MLflow run per run directory, through MlflowClient (no process-global active run, which
    Tune trials in one process would share)."""

    def __init__(self, uri: str, experiment: str, name: str, params: dict, tags: dict, run_id: str | None):
        if uri.startswith("file:"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.entities import Param, RunStatus
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        if run_id is not None:
            try:
                self.client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
                self.run_id = run_id
                return
            except MlflowException:  # the store was moved or emptied: start a new run there
                pass
        found = self.client.get_experiment_by_name(experiment)
        try:
            exp_id = found.experiment_id if found else self.client.create_experiment(experiment)
        except MlflowException:  # created meanwhile by a concurrent trial
            exp_id = self.client.get_experiment_by_name(experiment).experiment_id
        self.run_id = self.client.create_run(exp_id, run_name=name, tags=tags).info.run_id
        self.client.log_batch(self.run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])

    def log(self, metrics: dict, step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class WandB:
    """A W&B run in RUN_DIR/wandb, resumed by id; charts are drawn against `trainer/step`."""

    def __init__(self, run_dir: Path, cfg, name: str, params: dict, run_id: str | None):
        import wandb

        self.run = wandb.init(
            project=cfg.project, group=cfg.group, name=name, id=run_id, resume="allow",
            dir=str(run_dir), mode=wandb_mode(cfg), config=params,
            # no stdout capture in a Ray worker, no banner lines, no system-metrics sampling thread
            settings=wandb.Settings(console="off", silent=True, x_disable_stats=True, save_code=False),
        )
        self.run.define_metric("trainer/step")
        self.run.define_metric("*", step_metric="trainer/step")
        self.run_id = self.run.id

    def log(self, metrics: dict, step: int) -> None:
        self.run.log({**metrics, "trainer/step": step})

    def close(self) -> None:
        self.run.finish()


class Trackers:
    """The trackers of `train.loggers` for one run directory, on rank 0 (see the module doc)."""

    def __init__(self, loggers: list[str], cfg, run_dir: str | Path, name: str, params: dict, start_step: int = 0):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        ids_path = self.run_dir / IDS_FILE
        ids = json.loads(ids_path.read_text()) if ids_path.is_file() else {}
        first = not ids_path.is_file()
        params = flatten(params)
        opens = {
            "tensorboard": lambda: TensorBoard(self.run_dir, params, start_step, first),
            "mlflow": lambda: MLflow(mlflow_uri(cfg, self.run_dir.parent), cfg.group or cfg.project, name, params,
                                     {"group": cfg.group} if cfg.group else {}, ids.get("mlflow")),
            "wandb": lambda: WandB(self.run_dir, cfg, name, params, ids.get("wandb")),
        }
        self.backends: dict = {}
        for logger in loggers:
            try:
                self.backends[logger] = opens[logger]()
            except Exception as err:  # noqa: BLE001 - a tracker never stops the training run
                log.warning("train.loggers: %s could not start (%s: %s); training goes on without it",
                            logger, type(err).__name__, err)
        ids.update({k: b.run_id for k, b in self.backends.items() if hasattr(b, "run_id")})
        ids_path.write_text(json.dumps(ids, indent=2) + "\n")

    def write(self, record: dict) -> None:
        """Log a metrics.jsonl record if it ends a log interval or holds an evaluation."""
        if "event" in record or not ("tokens_per_s" in record or "val_loss" in record):
            return
        metrics = {series: float(record[key]) for key, series in SERIES.items()
                   if isinstance(record.get(key), (int, float))}
        for name, backend in list(self.backends.items()):
            try:
                backend.log(metrics, record["step"])
            except Exception as err:  # noqa: BLE001
                log.warning("train.loggers: %s failed to log step %d (%s: %s); dropped for the rest of the run",
                            name, record["step"], type(err).__name__, err)
                del self.backends[name]

    def close(self) -> None:
        for name, backend in self.backends.items():
            try:
                backend.close()
            except Exception as err:  # noqa: BLE001
                log.warning("train.loggers: %s did not close cleanly (%s: %s)", name, type(err).__name__, err)
        self.backends = {}


def open_trackers(job, kind: str, run_dir: str | Path, start_step: int) -> Trackers | None:
    """Rank 0's trackers for a `kind` (pretrain, finetune) run of `job` in `run_dir`, resumed at `start_step`."""
    tc = job.train
    if not tc.loggers:
        return None
    return Trackers(tc.loggers, tc.tracking, run_dir, job.scaling.name, {"kind": kind, **job.model_dump(mode="json")},
                    start_step)
