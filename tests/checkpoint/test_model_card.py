"""The model card every export writes: shape, parameters, tokenizer, training facts (kept through a native
export), the final validation loss from the run's metrics, loading instructions."""

import json

from ckpt_assets import CFG, save_into, trained
from transformers import GPT2LMHeadModel

from mtnlg_ray.api import export
from mtnlg_ray.checkpoint import manifest, model_card
from mtnlg_ray.checkpoint.source import open_source


def test_a_runs_export_describes_its_training_and_keeps_it(tmp_path):
    run = tmp_path / "runs" / "demo"
    ckpt = save_into(run, 2, *trained())
    records = [{"step": 1, "loss": 5.9, "val_loss": 5.75}, {"step": 2, "loss": 5.5, "val_loss": 5.4321},
               {"step": 3, "loss": 5.0, "val_loss": 4.0}]  # step 3: after this checkpoint
    (ckpt / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    facts = model_card.training_facts(open_source(run))
    assert facts == {"kind": "pretrain", "step": 2, "tokens": 64, "data": [], "val_loss": 5.4321, "val_step": 2}

    out = export(run, tmp_path / "ckpt")
    card = (out / "README.md").read_text()
    assert "- steps: 2" in card and "- final validation loss: 5.4321 nats/token (step 2)" in card
    assert f"layers {CFG.n_layers}, width {CFG.d_model}, heads {CFG.n_heads}" in card
    assert f'from_pretrained("{out}")' in card and "--format hf" in card
    assert "README.md" not in json.loads((out / manifest.MANIFEST).read_text())["files"]  # edit it freely
    (out / "README.md").write_text("my own card")
    manifest.verify(out)

    hf_dir = export(out, tmp_path / "hf", fmt="hf")  # the native export kept the facts
    card = (hf_dir / "README.md").read_text()
    assert "- final validation loss: 5.4321 nats/token (step 2)" in card and "AutoTokenizer" in card
    params = sum(p.numel() for p in GPT2LMHeadModel.from_pretrained(hf_dir).parameters())
    assert f"- parameters: {params:,} " in card


def test_training_data_of_pretraining_and_fine_tuning_jobs():
    assert model_card._data({"data": {"datasets": [{"path": "data/a", "weight": 2.0}]}}) == ["data/a (weight 2.0)"]
    assert model_card._data({"sft": {"task": "stdlib_code", "train_paths": []}}) == [
        "stdlib_code: the Python standard library"]
    assert model_card._data({}) == []
