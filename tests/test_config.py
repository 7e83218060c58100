"""Config loading: typed --set overrides; every problem at once, a line each naming the file or
the --set at fault and the key; "did you mean"; a config of another command named as such."""

import pytest

from mtnlg_ray.config import (JOBS, ModelConfig, PreprocessJob, PretrainJob, ServeJob, TuneJob, WorkerRunConfig,
                              apply_overrides, load_job, validate)
from mtnlg_ray.errors import ConfigError


def write(tmp_path, text, name="pretrain.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_defaults_and_preset_merge(tmp_path):
    job = load_job(write(tmp_path, "model: {preset: gpt-125m, n_layers: 2}\n"), PretrainJob)
    assert job.model.n_layers == 2 and job.model.d_model == 768 and job.model.vocab_size == 50257
    assert job.model.padded_vocab_size == 50304


def test_set_overrides_are_typed(tmp_path):
    job = load_job(write(tmp_path, "train: {max_steps: 5}\n"), PretrainJob,
                   ["optim.lr=3e-4", "model.n_layers=3", "scaling.num_workers=[1, 2]", "parallel.sequence_parallel=true"])
    assert job.optim.lr == pytest.approx(3e-4) and job.model.n_layers == 3
    assert tuple(job.scaling.num_workers) == (1, 2) and job.parallel.sequence_parallel is True
    with pytest.raises(ConfigError, match=r"--set|train.max_steps"):
        load_job(write(tmp_path, ""), PretrainJob, ["train.max_steps=many"])


def test_heads_must_divide_width(tmp_path):
    path = write(tmp_path, "model: {d_model: 512, n_heads: 7}\n")
    with pytest.raises(ConfigError) as err:
        load_job(path, PretrainJob)
    assert str(err.value) == "pretrain.yaml: model.n_heads: must divide d_model=512 (got 7)"


@pytest.mark.parametrize("text, key, words", [
    ("model: {n_layer: 2}\n", "model.n_layer", "unknown key"),
    ("optim: {lr: -1}\n", "optim.lr", "greater than 0"),
    ("model: {preset: gpt-9000}\n", "model", "unknown preset"),
    ("train: {max_steps: [1]}\n", "train.max_steps", "integer"),
    ("scaling: {num_workers: [3, 1]}\n", "scaling.num_workers", "min <= max"),
])
def test_errors_name_the_key(tmp_path, text, key, words):
    with pytest.raises(ConfigError) as err:
        load_job(write(tmp_path, text), PretrainJob)
    line = str(err.value)
    assert line.startswith(f"pretrain.yaml: {key}") and words in line and "\n" not in line


def test_every_problem_is_reported_with_did_you_mean(tmp_path):
    path = write(tmp_path, "model: {d_model: 512, n_heads: 7, n_layer: 3}\ntrain: {max_step: 5, eval_batches: some}\n"
                           "scaling: {num_workers: abc}\nsearch: {}\n")
    with pytest.raises(ConfigError) as err:
        load_job(path, PretrainJob)
    assert str(err.value).splitlines() == [
        "pretrain.yaml: model.n_heads: must divide d_model=512 (got 7)",
        "pretrain.yaml: model.n_layer: unknown key (did you mean 'n_layers'?)",
        "pretrain.yaml: train.eval_batches: Input should be a valid integer, unable to parse string as an integer; "
        "or Input should be 'all' (got 'some')",  # one line for the two branches of `int | "all"`
        "pretrain.yaml: train.max_step: unknown key (did you mean 'max_steps'?)",
        "pretrain.yaml: scaling.num_workers: Input should be a valid integer, unable to parse string as an "
        "integer; or Input should be a valid tuple (got 'abc')",
        "pretrain.yaml: search: unknown key (known here: model, data, parallel, optim, train, checkpoint, scaling)",
    ]


def test_a_problem_of_an_override_names_the_set(tmp_path):
    path = write(tmp_path, "model: {preset: debug}\ntrain: {max_steps: 0}\n")
    with pytest.raises(ConfigError) as err:
        load_job(path, PretrainJob, ["optim.lr=-1", "train.max_stpes=3", "data.datasets=[{path: d, weigth: 2}]"])
    assert str(err.value).splitlines() == [
        "--set data.datasets=[{path: d, weigth: 2}]: data.datasets[0].weigth: unknown key (did you mean 'weight'?)",
        "--set optim.lr=-1: optim.lr: Input should be greater than 0 (got -1)",
        "pretrain.yaml: train.max_steps: Input should be greater than 0 (got 0)",  # the file's own
        "--set train.max_stpes=3: train.max_stpes: unknown key (did you mean 'max_steps'?)",
    ]
    with pytest.raises(ConfigError, match=r"^--set model.preset=gpt-125: model: unknown preset 'gpt-125' "
                                          r"\(did you mean 'gpt-125m'\? known: debug"):
        load_job(path, PretrainJob, ["model.preset=gpt-125", "train.max_steps=5"])


@pytest.mark.parametrize("kind, text, other", [
    ("preprocess", "model: {preset: debug}\ntrain: {max_steps: 5}\n", "pretrain"),
    ("pretrain", "corpus: {kind: stdlib}\noutput_dir: x\n", "preprocess"),
    ("tune", "init_from: ckpt\nsft: {task: stdlib_code}\n", "finetune"),
    ("finetune", "finetune: {init_from: ckpt}\ntune: {}\n", "tune"),
])
def test_a_config_of_another_command_says_so(tmp_path, kind, text, other):
    with pytest.raises(ConfigError) as err:
        load_job(write(tmp_path, text, "job.yaml"), JOBS[kind])
    expects = ", ".join(JOBS[kind].model_fields)
    assert str(err.value).startswith(f"job.yaml: this is a {other} config (")
    assert str(err.value).endswith(f"); {kind} expects {expects}")


def test_the_worker_half_of_the_run_is_typed():
    run = WorkerRunConfig(model=ModelConfig(preset="debug", vocab_size=512), seq_len=64, tokenizer_path="/t.model",
                          train_rows=10, metrics_dir="/runs/x", start_time=1.0)
    again = validate(WorkerRunConfig, run.model_dump(mode="json"), "run (worker)")  # what Ray hands the worker
    assert again == run and again.model.n_layers == 2 and again.resume_from is None
    with pytest.raises(ConfigError, match=r"^run \(worker\): seq_len: required key is missing$"):
        validate(WorkerRunConfig, {k: v for k, v in run.model_dump(mode="json").items() if k != "seq_len"},
                 "run (worker)")


def test_unknown_keys_of_every_job_get_suggestions():
    with pytest.raises(ConfigError, match=r"tune.search_space.learning_rate: unknown key \(known here: lr,"):
        validate(TuneJob, {"finetune": {"init_from": "x"}, "tune": {"search_space": {"learning_rate": [1]}}})
    with pytest.raises(ConfigError, match=r"serve.autoscaling.max_replica: unknown key \(did you mean 'max_replicas'"):
        validate(ServeJob, {"serve": {"checkpoint": "c", "autoscaling": {"max_replica": 2}}})
    with pytest.raises(ConfigError, match=r"pack.seqlen: unknown key \(did you mean 'seq_len'\?\)"):
        validate(PreprocessJob, {"pack": {"seqlen": 2}})


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"pretrain.yaml: line \d+: not valid YAML"):
        load_job(write(tmp_path, "model:\n  n_layers: [1\n"), PretrainJob)
    with pytest.raises(ConfigError, match="no such config file"):
        load_job(tmp_path / "nope.yaml", PretrainJob)
    with pytest.raises(ConfigError, match="required key is missing"):
        load_job(write(tmp_path, "{}\n", "serve.yaml"), ServeJob)


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="expected key.path=value"):
        apply_overrides({}, ["train.lr"])
    with pytest.raises(ConfigError, match="^--set train.lr=1: train is not a section"):
        apply_overrides({"train": 3}, ["train.lr=1"])


def test_model_properties():
    cfg = ModelConfig(d_model=96, n_heads=4, mlp_ratio=4, vocab_size=1000, pad_vocab_multiple=128)
    assert (cfg.head_dim, cfg.d_mlp, cfg.padded_vocab_size) == (24, 384, 1024)
    with pytest.raises(ConfigError, match="vocab_size"):
        ModelConfig().padded_vocab_size
