"""Config loading: typed --set overrides, one-line errors naming file and key."""

import pytest

from mtnlg_ray.config import ModelConfig, PretrainJob, ServeJob, apply_overrides, load_job
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
    with pytest.raises(ConfigError, match="is not a section"):
        apply_overrides({"train": 3}, ["train.lr=1"])


def test_model_properties():
    cfg = ModelConfig(d_model=96, n_heads=4, mlp_ratio=4, vocab_size=1000, pad_vocab_multiple=128)
    assert (cfg.head_dim, cfg.d_mlp, cfg.padded_vocab_size) == (24, 384, 1024)
    with pytest.raises(ConfigError, match="vocab_size"):
        ModelConfig().padded_vocab_size
