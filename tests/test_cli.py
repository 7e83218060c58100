"""The `mtnlg` command: help for every subcommand, exit codes, one-line errors, shipped configs by name, --version, -q / -v."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_probe import heavy, probe

import mtnlg_ray
from mtnlg_ray.checkpoint import native
from mtnlg_ray.cli import COMMANDS, build_parser, main
from mtnlg_ray.config import (FinetuneJob, ModelConfig, PreprocessJob, PretrainJob, ServeJob, TuneJob,
                              apply_overrides, load_job, shipped, validate)
from mtnlg_ray.config.presets import PRESETS
from mtnlg_ray.model.gpt import GPT

ROOT = Path(__file__).resolve().parents[1]


def mtnlg(*args):
    return subprocess.run([sys.executable, "-m", "mtnlg_ray.cli", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_subcommand_has_help_with_an_example(command):
    res = mtnlg(command, "--help")
    assert res.returncode == 0 and "example:" in res.stdout and f"mtnlg {command}" in res.stdout


def test_config_error_is_one_line_exit_2(tmp_path):
    cfg = tmp_path / "pretrain.yaml"
    cfg.write_text("model: {d_model: 512, n_heads: 7}\n")
    res = mtnlg("pretrain", str(cfg))
    assert res.returncode == 2
    assert res.stderr.strip() == "error: pretrain.yaml: model.n_heads: must divide d_model=512 (got 7)"
    res = mtnlg("pretrain", str(cfg), "--set", "model.n_heads=8", "--set", "train.nope=1", "--set", "optim.lr=0")
    assert res.returncode == 2 and res.stderr.splitlines() == [  # every problem, each naming its --set
        "error: --set optim.lr=0: optim.lr: Input should be greater than 0 (got 0)",
        "error: --set train.nope=1: train.nope: unknown key"]


def test_usage_error_exit_2():
    assert mtnlg("pretrain").returncode == 2
    assert mtnlg("frobnicate").returncode == 2


def test_generate_export_and_import_hf(tmp_path, tiny_tokenizer):
    cfg = ModelConfig(preset="debug", vocab_size=tiny_tokenizer.vocab_size)
    torch.manual_seed(0)
    path = native.save(GPT(cfg).state_dict(), cfg, tmp_path / "ckpt", tiny_tokenizer.path)
    res = mtnlg("generate", str(path), "--prompt", "import os", "--max-tokens", "5", "--seed", "0", "--temperature", "0.7")
    assert res.returncode == 0 and res.stdout.startswith("import os")
    res = mtnlg("export", str(path), "--out", str(tmp_path / "hf"), "--format", "hf")
    assert res.returncode == 0 and (tmp_path / "hf" / "model.safetensors").is_file()
    res = mtnlg("import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back"))
    assert res.returncode == 0 and (tmp_path / "back" / "manifest.json").is_file()


def write_yaml(path, text):
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("case", ["pretrain", "finetune", "export", "generate", "serve", "plot"])
def test_a_missing_path_is_one_line_exit_2_before_ray_or_torch(tmp_path, case):
    missing = tmp_path / "missing"
    runs = tmp_path / "runs"
    args, line = {
        "pretrain": (["pretrain", write_yaml(tmp_path / "p.yaml", f"data: {{datasets: [{{path: {missing}}}]}}\n"
                                            f"scaling: {{storage_path: {runs}}}\n")],
                     f"data.datasets[0].path: {missing}: no such dataset directory (mtnlg preprocess writes one)"),
        "finetune": (["finetune", write_yaml(tmp_path / "f.yaml", f"init_from: {missing}\n"
                                            f"scaling: {{storage_path: {runs}}}\n")],
                     f"init_from: {missing}: no such checkpoint, run directory or GPT-2 directory"),
        "export": (["export", str(missing), "--out", str(tmp_path / "out")],
                   f"{missing}: no such checkpoint, run directory or GPT-2 directory"),
        "generate": (["generate", str(missing), "--prompt", "x"],
                     f"{missing}: no such checkpoint, run directory or GPT-2 directory"),
        "serve": (["serve", str(missing), "--port", "0"],
                  f"{missing}: no such checkpoint, run directory or GPT-2 directory"),
        "plot": (["plot", str(missing)], f"{missing}: no such run directory"),
    }[case]
    res, seconds = probe(*args)
    assert (res.returncode, res.stderr) == (2, f"error: {line}\n")
    assert heavy(res) == "heavy: []"  # refused before torch or Ray was imported
    assert {p.name for p in tmp_path.iterdir()} <= {"p.yaml", "f.yaml"}  # no run, output or export written
    assert seconds < 4, seconds


def test_help_and_config_errors_stay_fast(tmp_path):
    res, seconds = probe("--help")
    assert res.returncode == 0 and heavy(res) == "heavy: []" and seconds < 4, seconds
    res, seconds = probe("pretrain", write_yaml(tmp_path / "p.yaml", "train: {max_steps: 0}\n"))
    assert res.returncode == 2 and res.stderr.startswith("error: p.yaml: train.max_steps:")
    assert heavy(res) == "heavy: []" and seconds < 4, seconds


def test_pretrain_refuses_a_missing_resume_path_before_ray(tmp_path, cluster_pretrain_data):
    runs, missing = tmp_path / "runs", tmp_path / "nope"
    cfg = write_yaml(tmp_path / "p.yaml", f"data: {{datasets: [{{path: {cluster_pretrain_data}}}]}}\n"
                                          f"model: {{preset: debug, max_seq_len: 64}}\nscaling: {{storage_path: {runs}}}\n")
    res, seconds = probe("pretrain", cfg, "--resume", str(missing))
    assert (res.returncode, res.stderr) == (2, f"error: --resume {missing}: no such checkpoint or run directory\n")
    assert heavy(res) == "heavy: []" and not runs.exists() and seconds < 4, seconds


def test_version():
    res = mtnlg("--version")
    assert (res.returncode, res.stdout) == (0, f"mtnlg {mtnlg_ray.__version__}\n")


def test_verbosity_flags_go_before_or_after_the_subcommand():
    parse = build_parser().parse_args
    assert parse(["pretrain", "x.yaml", "-q"]).quiet and not parse(["pretrain", "x.yaml", "-q"]).verbose
    assert parse(["-q", "pretrain", "x.yaml"]).quiet  # the subcommand's unset -q leaves it alone
    assert parse(["plot", "runs/x", "--verbose"]).verbose
    assert not parse(["plot", "runs/x"]).quiet
    with pytest.raises(SystemExit) as exit_:
        main(["-q", "plot", "runs/x", "-v"])
    assert exit_.value.code == 2


def test_quiet_after_the_subcommand_drops_info_lines(tmp_path, tiny_tokenizer):
    cfg = ModelConfig(preset="debug", vocab_size=tiny_tokenizer.vocab_size)
    path = native.save(GPT(cfg).state_dict(), cfg, tmp_path / "ckpt", tiny_tokenizer.path)
    res = mtnlg("export", str(path), "--out", str(tmp_path / "a"))
    assert (res.returncode, res.stdout, res.stderr) == (0, f"exported {path} -> {tmp_path / 'a'} (native)\n", "")
    res = mtnlg("export", str(path), "--out", str(tmp_path / "b"), "-q")
    assert (res.returncode, res.stdout, res.stderr) == (0, "", "") and (tmp_path / "b" / "manifest.json").is_file()


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_shows_defaults_and_a_valid_set_example(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    defaults = {"export": "(default: native)", "generate": "(default: 64)", "quickstart": "(default: demo_run)",
                "serve": "(default: serve.port, 8000)"}
    assert defaults.get(command, "") in text
    jobs = {"preprocess": PreprocessJob, "pretrain": PretrainJob, "finetune": FinetuneJob, "tune": TuneJob}
    if command in jobs:  # the --set example is a key of this command's job, set on its own example config
        example = re.search(r"e\.g\. --set (\S+)", text).group(1)
        config = COMMANDS[command][3].split()[2]  # a shipped config's name
        load_job(config, jobs[command], [example])
        assert all(name in text for name in shipped.names(command))
    if command == "pretrain":
        assert "model presets (--set model.preset=NAME): " + ", ".join(PRESETS) in text
    if command == "serve":  # its --set example sets a ServeJob key
        example = re.search(r"e\.g\. --set (\S+)", text).group(1)
        validate(ServeJob, apply_overrides({"serve": {"checkpoint": "ckpt/"}}, [example]))


def test_a_shipped_config_by_name_and_its_errors_before_ray(tmp_path):
    res, seconds = probe("pretrain", "debug", "--set", "train.max_steps=0", "--set", "model.n_layer=2")
    assert res.returncode == 2 and res.stderr.splitlines() == [  # in the order of the job's sections
        "error: --set model.n_layer=2: model.n_layer: unknown key (did you mean 'n_layers'?)",
        "error: --set train.max_steps=0: train.max_steps: Input should be greater than 0 (got 0)"]
    assert heavy(res) == "heavy: []" and seconds < 4, seconds
    res, _ = probe("preprocess", "quickstart")
    assert res.returncode == 2 and res.stderr.startswith("error: quickstart: that is a shipped pretrain config, not a "
                                                         "preprocess one (preprocess configs shipped: jsonl_example")


def test_serve_lora_modules_flags_and_their_errors_before_ray_or_torch(tmp_path):
    from mtnlg_ray.serve.flags import serve_job

    torch.manual_seed(0)
    cfg = ModelConfig(preset="debug", vocab_size=64)
    ckpt = str(native.save(GPT(cfg).state_dict(), cfg, tmp_path / "ckpt"))
    job = serve_job(build_parser().parse_args(["serve", ckpt, "--lora-modules", "a=runs/a", "b=runs/b",
                                               "--max-loras", "3"]))
    assert (job.serve.lora_adapters, job.serve.max_loras) == ({"a": "runs/a", "b": "runs/b"}, 3)
    missing = tmp_path / "missing"
    for args, (code, line) in {
        ("--lora-modules", "sqlonly"): (2, "--lora-modules: 'sqlonly' is not NAME=PATH"),
        ("--lora-modules", "a=x", "b=y", "--max-loras", "1"):
            (2, "mtnlg serve: serve: lora_adapters: 2 adapters exceed max_loras=1"),
        ("--lora-modules", f"sql={missing}"):
            (2, f"serve.lora_adapters.sql: {missing}: no such checkpoint, run directory or GPT-2 directory"),
        ("--lora-modules", f"sql={ckpt}"):
            (1, f"serve.lora_adapters.sql: {ckpt}: not a LoRA fine-tune run or checkpoint (a native checkpoint "
                "has plain weights; serve it as a model of its own)"),
    }.items():
        res, _ = probe("serve", ckpt, "--port", "0", *args)
        assert (res.returncode, res.stderr) == (code, f"error: {line}\n")
        assert heavy(res) == "heavy: []"
