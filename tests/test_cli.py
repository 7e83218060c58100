"""The `mtnlg` command: help for every subcommand, exit codes, one-line errors."""

import subprocess
import sys

import pytest
import torch

from mtnlg_ray.cli import COMMANDS
from mtnlg_ray.config import ModelConfig
from mtnlg_ray.model.checkpoint import save_checkpoint
from mtnlg_ray.model.gpt import GPT


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
    res = mtnlg("pretrain", str(cfg), "--set", "model.n_heads=8", "--set", "train.nope=1")
    assert res.returncode == 2 and res.stderr.strip() == "error: pretrain.yaml: train.nope: unknown key"


def test_usage_error_exit_2():
    assert mtnlg("pretrain").returncode == 2
    assert mtnlg("frobnicate").returncode == 2


def test_runtime_error_exit_1_and_generate(tmp_path, tiny_tokenizer):
    res = mtnlg("generate", str(tmp_path / "missing"), "--prompt", "x")
    assert res.returncode == 1 and "Traceback" not in res.stderr and "no such checkpoint" in res.stderr
    cfg = ModelConfig(preset="debug", vocab_size=tiny_tokenizer.vocab_size)
    torch.manual_seed(0)
    path = save_checkpoint(GPT(cfg).state_dict(), cfg, tmp_path / "ckpt", tiny_tokenizer.path)
    res = mtnlg("generate", str(path), "--prompt", "import os", "--max-tokens", "5", "--seed", "0", "--temperature", "0.7")
    assert res.returncode == 0 and res.stdout.startswith("import os")
    res = mtnlg("export", str(path), "--out", str(tmp_path / "hf"), "--format", "hf")
    assert res.returncode == 0 and (tmp_path / "hf" / "model.safetensors").is_file()
    res = mtnlg("import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back"))
    assert res.returncode == 0 and (tmp_path / "back" / "manifest.json").is_file()
