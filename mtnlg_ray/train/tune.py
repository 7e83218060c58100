"""Hyperparameter search for fine-tuning on Ray Tune: a grid over the search space, ASHA on val loss.

    data    <- prepared once in the driver (train/finetune.py), shared by every trial
    tuner   =  Tuner(trial, param_space={"hp": {name: grid_search(values)}}, ASHA on val_loss (min))
    trial   =  a short fine-tuning run with the SAME trainer as `mtnlg finetune`: the trial function
               is the Ray Train driver (Ray Train V2's documented Train-inside-Tune pattern) and a
               TuneReportCallback forwards the workers' reports to Tune. Only reports that carry
               `val_loss` are forwarded, so one Tune iteration is one evaluation: ASHA's grace_period
               and rungs count evaluations (every train.eval_interval steps and the last step).
    tracked =  each trial is one run of the trackers in train.loggers (train/trackers.py), named
               after the trial, in the group NAME-tune (W&B group, MLflow experiment)
    output  =  the trials ranked by their best validation loss, and the best trial's FinetuneJob
               written as YAML (tune.best_config_out) that `mtnlg finetune` runs as is.

Searchable names (config.HYPERPARAMETERS): lr -> optim.lr, global_batch_size ->
train.global_batch_size, warmup_tokens -> optim.warmup_tokens, lora_rank -> lora.rank (alpha is
kept, so the update scale alpha / rank changes with the rank, as in the LoRA paper).
Every combination is validated before any trial starts.
"""

from __future__ import annotations

import itertools
import logging
import math
from pathlib import Path

from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler

from mtnlg_ray.config import HYPERPARAMETERS, FinetuneJob, TuneJob, apply_overrides, dump_yaml, validate
from mtnlg_ray.errors import UserError
from mtnlg_ray.train.finetune import fit, open_task_data, prepare_data

log = logging.getLogger(__name__)

METRIC = "val_loss"
TRIAL_CPUS = 0.25  # the trial process only drives Ray Train (its workers hold the real resources)


class EvalReportCallback(TuneReportCallback):
    """Forward to Tune only the reports that carry a validation loss (one Tune iteration = one eval)."""

    def after_report(self, run_context, metrics, checkpoint):
        if METRIC in metrics[0]:
            super().after_report(run_context, metrics, checkpoint)


def trial_job(job: FinetuneJob, hp: dict) -> FinetuneJob:
    """`job` with the hyperparameters `hp` ({search-space name: value}) set, re-validated."""
    data = job.model_dump(mode="json")
    overrides = [f"{HYPERPARAMETERS[name]}={value}" for name, value in hp.items()]
    return validate(FinetuneJob, apply_overrides(data, overrides), f"trial {hp}")


def evaluations(job: FinetuneJob) -> int:
    """Reports with val_loss in a full run: every eval_interval steps, plus the last step."""
    tc = job.train
    return tc.max_steps // tc.eval_interval + (1 if tc.max_steps % tc.eval_interval else 0)


def _trial(config: dict, job: dict, storage: str, group: str) -> None:
    """One Tune trial: the Ray Train driver of a short fine-tuning run with this trial's hyperparameters.
    Its run is one tracked run (train.loggers) named after the trial, in the search's group."""
    run = trial_job(FinetuneJob.model_validate(job), config["hp"])
    name = f"trial_{tune.get_context().get_trial_id()}"
    run = run.model_copy(update={"scaling": run.scaling.model_copy(update={"storage_path": storage, "name": name})})
    tracking = run.train.tracking.model_copy(update={"group": run.train.tracking.group or group})
    run = run.model_copy(update={"train": run.train.model_copy(update={"tracking": tracking})})
    fit(run, open_task_data(run), callbacks=[EvalReportCallback()])


def rank_trials(results) -> list[dict]:
    """One row per trial, best (lowest min val_loss) first; failed trials last."""
    rows = []
    for r in results:
        df = r.metrics_dataframe
        losses = df[METRIC].dropna().tolist() if df is not None and METRIC in df else []
        rows.append({"hp": r.config["hp"], "best": min(losses) if losses else math.inf,
                     "last": losses[-1] if losses else math.inf, "evals": len(losses), "path": r.path,
                     "error": f"{type(r.error).__name__}: {str(r.error).splitlines()[0][:120]}" if r.error else None})
    return sorted(rows, key=lambda row: (row["error"] is not None, row["best"]))


def format_ranking(rows: list[dict], max_evals: int) -> str:
    names = list(rows[0]["hp"]) if rows else []
    head = ["rank", *names, "evals", f"best {METRIC}", f"last {METRIC}", "status"]
    lines = [head]
    for i, row in enumerate(rows, start=1):
        status = row["error"] or ("completed" if row["evals"] >= max_evals else "stopped early (ASHA)")
        lines.append([str(i), *(f"{row['hp'][n]:g}" for n in names), str(row["evals"]),
                      f"{row['best']:.4f}", f"{row['last']:.4f}", status])
    widths = [max(len(line[c]) for line in lines) for c in range(len(head))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)


def run_tune(job: TuneJob) -> list[dict]:
    """`mtnlg tune`: search, print the ranking, write the best FinetuneJob; returns the ranked rows."""
    grid = job.tune.search_space.grid()
    combos = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    for hp in combos:  # refuse an impossible combination (e.g. a batch size micro_batch does not divide) now
        trial_job(job.finetune, hp)
    resolved = prepare_data(job.finetune, require_val=True)  # trials are ranked by validation loss
    base = job.finetune.scaling
    storage = str(Path(resolved.scaling.storage_path).resolve()) if "://" not in base.storage_path else base.storage_path
    max_evals = evaluations(job.finetune)
    if max_evals < 1:
        raise UserError("finetune.train: a trial must evaluate at least once (eval_interval <= max_steps)")
    trainable = tune.with_resources(tune.with_parameters(_trial, job=resolved.model_dump(mode="json"),
                                                         storage=f"{storage}/{base.name}-tune-runs",
                                                         group=f"{base.name}-tune"),
                                    {"cpu": TRIAL_CPUS})
    # max_t one past a full trial: ASHA stops a trial that reaches max_t at once, which would kill its
    # Train driver while it finishes (final checkpoint, worker shutdown); this way complete trials end
    # on their own and ASHA only cuts trials at the rungs below.
    scheduler = ASHAScheduler(time_attr="training_iteration", max_t=max_evals + 1,
                              grace_period=job.tune.grace_period, reduction_factor=job.tune.reduction_factor)
    tuner = tune.Tuner(
        trainable,
        param_space={"hp": {name: tune.grid_search(values) for name, values in grid.items()}},
        tune_config=tune.TuneConfig(metric=METRIC, mode="min", scheduler=scheduler,
                                    num_samples=job.tune.num_samples,
                                    max_concurrent_trials=job.tune.max_concurrent_trials),
        run_config=tune.RunConfig(name=f"{base.name}-tune", storage_path=storage, verbose=1),
    )
    log.info("searching %d combination(s) x %d of %s; ASHA on %s over up to %d evaluation(s) per trial",
             len(combos), job.tune.num_samples, ", ".join(grid), METRIC, max_evals)
    rows = rank_trials(tuner.fit())
    log.info("%s", format_ranking(rows, max_evals))
    best = rows[0] if rows else None
    if best is None or best["error"] is not None:
        raise UserError(f"tune: every trial failed ({best['error'] if best else 'no trials ran'})")
    best_job = trial_job(job.finetune, best["hp"])
    best_job = best_job.model_copy(update={"scaling": best_job.scaling.model_copy(update={"name": f"{base.name}-best"})})
    out = Path(job.tune.best_config_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    dump_yaml(best_job, out)
    log.info("best: %s (%s %.4f); wrote %s\nrun it with: mtnlg finetune %s", best["hp"], METRIC, best["best"], out, out)
    return rows
