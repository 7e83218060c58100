"""`mtnlg eval` (train/heldout.py): on a file of documents, the number training's validation gives on
the rows preprocessing packs from those documents (its TokenizePack, the blended stream, load_eval_set, evaluate)."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from mtnlg_ray.checkpoint import native
from mtnlg_ray.cli import main
from mtnlg_ray.config import ModelConfig, ParallelConfig
from mtnlg_ray.data.dataset import BlendedRows, open_split
from mtnlg_ray.data.shards import TokenizePack
from mtnlg_ray.model.gpt import GPT
from mtnlg_ray.parallel import parallelize
from mtnlg_ray.parallel.mesh import build_mesh
from mtnlg_ray.train.evaluate import evaluate, load_eval_set
from mtnlg_ray.train.heldout import evaluate_file, read_documents
from mtnlg_ray.train.metrics import token_byte_lengths

SEQ_LEN = 64
FILES = ("bisect.py", "fnmatch.py", "colorsys.py")  # about 100 rows of 65 tokens


def training_validation(ckpt, tok, docs: list[str], out: Path) -> tuple[dict, int]:
    """(val metrics, rows) as a training run computes them: preprocessing's packing (one batch of
    documents: its tail fills no row and is dropped) into val shards, read as the workers read them,
    evaluated by the trainer's evaluate on the model built by parallelize."""
    from mtnlg_ray.api import from_pretrained

    table = TokenizePack(tok.path.read_bytes(), SEQ_LEN)(pa.table({"text": docs, "split": ["val"] * len(docs)}))
    (out / "val").mkdir(parents=True)
    for i, shard in enumerate(table["shard"].to_pylist()):
        (out / "val" / f"part-{i:05d}.parquet").write_bytes(shard)
    rows = sum(table["rows"].to_pylist())
    split = open_split(out, {"seq_len": SEQ_LEN, "splits": {"val": {"rows": rows}}}, "val")
    eval_set = load_eval_set(BlendedRows([split], [1.0], 0, rows), 4, "all")
    model_cfg = ModelConfig(preset="debug", vocab_size=tok.vocab_size, max_seq_len=SEQ_LEN)
    dims = build_mesh(ParallelConfig(), 1, "cpu")
    state = from_pretrained(ckpt)[1].state_dict()
    model = parallelize(model_cfg, dims, ParallelConfig(), torch.device("cpu"), init_state=state)
    metrics = evaluate(model, eval_set, dims, torch.device("cpu"), torch.from_numpy(token_byte_lengths(tok)))
    return metrics, rows


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("heldout")
    torch.manual_seed(0)
    cfg = ModelConfig(preset="debug", vocab_size=tiny_tokenizer.vocab_size, max_seq_len=SEQ_LEN)
    ckpt = native.save(GPT(cfg).state_dict(), cfg, root / "ckpt", tiny_tokenizer.path)
    lib = Path(sysconfig.get_paths()["stdlib"])
    docs = [(lib / name).read_text(encoding="utf-8") for name in FILES]
    data = root / "held_out.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs) + "not json\n")
    return ckpt, docs, data, root


def test_eval_is_training_validation_on_the_same_rows(ray_session, setup, tiny_tokenizer, capsys):
    ckpt, docs, data, root = setup
    ours = evaluate_file(str(ckpt), [str(data)], seq_len=SEQ_LEN, batch_size=16)
    theirs, rows = training_validation(ckpt, tiny_tokenizer, docs, root / "val")
    assert ours["val_loss"] == pytest.approx(theirs["val_loss"], rel=1e-6)
    assert ours["val_bpb"] == pytest.approx(theirs["val_bpb"], rel=1e-6)
    assert (ours["rows"], ours["documents"]) == (rows, len(FILES)) and ours["dropped_tail_tokens"] > 0
    # the CLI prints the same numbers in one line; --max-docs keeps the first documents
    assert main(["eval", str(ckpt), "--data", str(data), "--seq-len", str(SEQ_LEN)]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line == (f"loss {ours['val_loss']:.4f} nats/token  perplexity {ours['val_ppl']:.3f}  "
                    f"bits/byte {ours['val_bpb']:.4f}")
    assert read_documents([str(data)], max_docs=2) == docs[:2]


def test_eval_errors_are_one_line(setup, tmp_path, capsys):
    ckpt, _, _, _ = setup
    assert main(["eval", str(ckpt), "--data", str(tmp_path / "missing.txt")]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'missing.txt'}: no such data file or directory\n"
    (tmp_path / "empty.jsonl").write_text("{}\n")
    assert main(["eval", str(ckpt), "--data", str(tmp_path / "empty.jsonl")]) == 1
    assert "no documents to evaluate" in capsys.readouterr().err
