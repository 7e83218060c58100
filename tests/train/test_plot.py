"""Loss-curve PNG from metrics.jsonl."""

import pytest

from mtnlg_ray.errors import UserError
from mtnlg_ray.train.metrics import MetricsLog
from mtnlg_ray.train.plot import plot_run


def test_plot_run_writes_a_png(tmp_path):
    log = MetricsLog(tmp_path)
    for step in range(1, 21):
        rec = {"step": step, "loss": 6.0 - step * 0.1, "lr": 1e-3, "tokens": step * 512, "time": 3.0 + step}
        if step % 5 == 0:
            rec["val_loss"] = 6.1 - step * 0.1
        log.write(rec)
    log.write({"step": 0, "tokens": 0, "time": 2.0, "val_loss": 6.3, "val_bpb": 4.0})  # eval_at_start
    (out,) = plot_run(tmp_path)
    assert out == tmp_path / "loss.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_plot_run_without_metrics_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="no training steps recorded"):
        plot_run(tmp_path)
