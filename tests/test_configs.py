"""Every shipped YAML under mtnlg_ray/configs/ validates against the code: the job model of its
directory (the command that runs it), and for pretraining also the parallel layout at every worker
count its (elastic) range allows. Each is found by its name."""

from pathlib import Path

import pytest
import yaml

from mtnlg_ray import config
from mtnlg_ray.config import load_job, shipped
from mtnlg_ray.errors import ConfigError

ROOT = shipped.ROOT
CONFIGS = sorted(ROOT.rglob("*.yaml"))


def job_class(path: Path):
    """The job model a config file is for: its directory names the command."""
    return config.JOBS[path.relative_to(ROOT).parts[0]]


def test_configs_are_in_the_package_and_found_by_name(tmp_path, monkeypatch):
    assert ROOT == Path(config.__file__).resolve().parent.parent / "configs" and set(shipped.KINDS) == set(config.JOBS)
    assert {p.parent.name for p in CONFIGS} == set(shipped.KINDS)
    monkeypatch.chdir(tmp_path)
    for s in shipped.listing():
        assert shipped.resolve(s.kind, s.name) == s.path == shipped.resolve(s.kind, f"{s.name}.yaml") and s.about
    (tmp_path / "debug.yaml").write_text("train: {max_steps: 3}\n")
    assert load_job("debug.yaml", config.PretrainJob).train.max_steps == 3  # a file of that name wins
    assert load_job("debug", config.PretrainJob, ["train.max_steps=7"]).train.max_steps == 7
    with pytest.raises(ConfigError, match=r"^stdlib: that is a shipped preprocess config, not a pretrain one "
                                          r"\(pretrain configs shipped: debug, gpt-1.3b, gpt-125m, mtnlg-530b, "):
        load_job("stdlib", config.PretrainJob)
    with pytest.raises(ConfigError, match=r"^debg: no such config file or shipped pretrain config .*did you mean 'debug'"):
        load_job("debg", config.PretrainJob)
    with pytest.raises(ConfigError, match=r"^nope/debug.yaml: no such config file or shipped pretrain config"):
        load_job("nope/debug.yaml", config.PretrainJob)
    data = load_job("jsonl_example", config.PreprocessJob).corpus.paths  # ${CONFIG_DIR}: beside the config
    assert data == [str(ROOT / "preprocess" / "data" / "example.jsonl")] and Path(data[0]).is_file()


def test_there_are_configs_for_every_pretraining_scale():
    names = {p.name for p in (ROOT / "pretrain").glob("*.yaml")}
    assert {"debug.yaml", "gpt-125m.yaml", "gpt-1.3b.yaml", "mtnlg-530b.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_config_validates(path):
    data = yaml.safe_load(path.read_text())
    if "applications" in data:  # a Ray Serve deploy file: Serve's schema, then each app's args a ServeJob
        from ray._common.utils import import_attr
        from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
        from ray.serve.schema import ServeDeploySchema

        for app in ServeDeploySchema.model_validate(data).applications:
            config.validate(config.ServeJob, app.args, path.name)
            # What `serve deploy` does with it: Serve's typed-builder call of our build_app.
            call_user_app_builder_with_args_if_necessary(import_attr(app.import_path), app.args)
        return
    job = load_job(path, job_class(path))
    if isinstance(job, config.PretrainJob):
        from mtnlg_ray.train.trainer import check_scaling

        model = job.model if job.model.vocab_size else job.model.model_copy(update={"vocab_size": 4096})
        check_scaling(job, config.ModelConfig.model_validate(model.model_dump()))


def test_mtnlg_530b_is_the_papers_recipe():
    from mtnlg_ray.train.schedule import global_batch_at, lr_at

    job = load_job(ROOT / "pretrain" / "mtnlg-530b.yaml", config.PretrainJob)
    m, p, t, o = job.model, job.parallel, job.train, job.optim
    assert (m.n_layers, m.d_model, m.n_heads, m.max_seq_len, m.vocab_size) == (105, 20480, 128, 2048, 50257)
    assert (p.tp, p.pp) == (8, 35) and job.scaling.num_workers // (p.tp * p.pp) == 16
    assert t.global_batch_size == 1920 and (t.rampup.start, t.rampup.increment) == (32, 32)
    assert t.rampup.samples * 2048 == pytest.approx(12e9, rel=1e-6)
    assert global_batch_at(0, 1920, t.rampup) == 32 and global_batch_at(t.rampup.samples, 1920, t.rampup) == 1920
    assert o.lr == 5e-5 and o.warmup_tokens == 1e9 and o.decay_tokens == 340e9 and o.min_lr_ratio == 0.1
    assert lr_at(int(340e9), o, 0) == pytest.approx(5e-6)


def test_gpu_pretraining_configs_are_elastic_where_the_layout_allows():
    """gpt-125m and gpt-1.3b run on any worker count of their range (pure data parallelism;
    test_config_validates checks each count); the 530B TP x PP grid only fits multiples of 280
    GPUs, so it stays fixed. clusters/ are sized to gpt-1.3b's range (tests/clusters)."""
    for name, workers in {"gpt-125m.yaml": (4, 8), "gpt-1.3b.yaml": (8, 16)}.items():
        job = load_job(ROOT / "pretrain" / name, config.PretrainJob)
        assert tuple(job.scaling.num_workers) == workers and (job.parallel.tp, job.parallel.pp) == (1, 1), name
        assert job.scaling.use_gpu and job.scaling.gpus_per_worker == 1
    job = load_job(ROOT / "pretrain" / "mtnlg-530b.yaml", config.PretrainJob)
    assert isinstance(job.scaling.num_workers, int) and job.scaling.num_workers % (job.parallel.tp * job.parallel.pp) == 0


@pytest.mark.parametrize("path", sorted((ROOT / "pretrain").glob("*.yaml")), ids=lambda p: p.name)
def test_pretraining_config_says_where_runs_go_on_a_cluster(path):
    """Its storage_path line or a comment names shared storage (train/storage.py refuses local paths
    on multi-node clusters), e.g. `# on a cluster: /mnt/shared/runs (NFS) or s3://BUCKET/runs`."""
    comments = " ".join(line.split("#", 1)[1] for line in path.read_text().splitlines() if "#" in line)
    assert "shared" in comments and "s3://" in comments


def test_every_finetuning_task_has_a_recipe():
    assert {"dialogue", "summarization", "code"} <= set(shipped.names("finetune")) and "code" in shipped.names("tune")


@pytest.mark.parametrize("path", sorted((ROOT / "finetune" / "data").glob("*.jsonl")), ids=lambda p: p.name)
def test_shipped_format_examples_are_valid(path):
    """The example JSONL beside the recipes (the formats their comments point to) parses line by line."""
    import json

    from mtnlg_ray.data.sft import example_messages

    lines = path.read_text().splitlines()
    assert lines
    for i, line in enumerate(lines, start=1):
        assert example_messages(json.loads(line)), f"{path}:{i}"


@pytest.mark.parametrize("path", sorted((ROOT / "finetune").glob("*.yaml")), ids=lambda p: p.name)
def test_finetuning_recipe_examples_are_valid(path):
    """The JSONL a recipe names exists and every line is a well-formed example that renders with the
    chat template's roles."""
    import json

    from mtnlg_ray.data.sft import example_messages

    job = load_job(path, job_class(path))
    ft = job.finetune if isinstance(job, config.TuneJob) else job
    paths = ft.sft.train_paths + ft.sft.val_paths
    assert ft.sft.task != "jsonl" or paths  # built-in tasks mine the standard library when no path is given
    for rel in paths:
        lines = Path(rel).read_text().splitlines()
        assert lines, rel
        for i, line in enumerate(lines, start=1):
            assert example_messages(json.loads(line)), f"{rel}:{i}"
