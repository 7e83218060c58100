"""Tokenize + pack throughput and memory: the Ray Data pipeline vs a single-process SentencePiece loop.

    python benchmarks/data.py [--copies 1 4] [--actors 2] [--vocab 4096] [--seq-len 256]

Corpus: the interpreter's stdlib `.py` sources, `copies` times (each copy's documents made distinct
by a header line), stored as Parquet files of 50 documents. Both sides read those files, encode every
document, append EOD and cut rows of seq_len + 1 ids, written as Parquet shards.
    single process   one Python process, `SentencePieceProcessor.encode(doc)` per document
    Ray Data         `data/shards.pack`: read_parquet -> TokenizePack on an actor pool of
                     `--actors` actors -> rows streamed to the driver's shard writer (what
                     `mtnlg preprocess` runs); Ray started with 4 logical CPUs, as in the tests
Peak memory is the PSS (shared pages split fairly), sampled every 0.2 s: of the process for the
single-process loop; summed over the driver and all its descendants (GCS, raylet, workers, actors,
object store pages they map) for Ray. It must not grow with the corpus.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mtnlg_ray.data.readers import stdlib_files  # noqa: E402
from mtnlg_ray.data.shards import ShardWriter, pack  # noqa: E402
from mtnlg_ray.data.tokenizer import Tokenizer, train_tokenizer  # noqa: E402


# ------------------------------------------------------------------------------------------ memory
def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            tree.setdefault(ppid, []).append(int(entry))
    return tree


def _pss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class PeakMemory:
    """Peak of the summed PSS of this process (and its descendants: tree=True) while the block runs (bytes)."""

    def __init__(self, tree: bool):
        self.tree = tree

    def __enter__(self):
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            tree, todo, total = _children() if self.tree else {}, [os.getpid()], 0
            while todo:
                pid = todo.pop()
                total += _pss_kb(pid)
                todo += tree.get(pid, [])
            self.peak = max(self.peak, total * 1024)
            self._stop.wait(0.2)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


# ------------------------------------------------------------------------------------------ corpus
def write_corpus(root: Path, copies: int) -> tuple[list[str], int]:
    """Parquet files of documents (column text); returns (files, bytes of text)."""
    docs = [Path(f).read_text(encoding="utf-8", errors="replace") for f in stdlib_files()]
    root.mkdir(parents=True, exist_ok=True)
    files, total, batch = [], 0, []
    for c in range(copies):
        for i, d in enumerate(docs):
            batch.append(f"# copy {c} of document {i}\n{d}")
            total += len(batch[-1].encode())
            if len(batch) == 50:
                files.append(str(root / f"docs-{len(files):04d}.parquet"))
                pq.write_table(pa.table({"text": batch}), files[-1])
                batch = []
    if batch:
        files.append(str(root / f"docs-{len(files):04d}.parquet"))
        pq.write_table(pa.table({"text": batch}), files[-1])
    return files, total


# ---------------------------------------------------------------------------------------- the runs
def single_process(files: list[str], tok: Tokenizer, seq_len: int, out: Path) -> int:
    """The reference: one process, encode per document, pack and write; returns tokens (incl. EOD)."""
    writer, carry, tokens, row = ShardWriter(out, 4096, seq_len + 1), np.array([], np.int32), 0, seq_len + 1
    for f in files:
        ids = [np.asarray(tok.sp.encode(d) + [tok.eod_id], np.int32) for d in pq.read_table(f)["text"].to_pylist()]
        stream = np.concatenate([carry, *ids])
        tokens += sum(len(x) for x in ids)
        n = len(stream) // row
        offsets = pa.array(np.arange(n + 1, dtype=np.int32) * row)
        writer.write(pa.ListArray.from_arrays(offsets, pa.array(stream[: n * row])))
        carry = stream[n * row:]
    writer.close()
    return tokens


def ray_pipeline(files: list[str], tok: Tokenizer, seq_len: int, out: Path, actors: int) -> int:
    import ray

    stats = pack(ray.data.read_parquet(files, override_num_blocks=len(files)), tok.path, seq_len, out, num_actors=actors, splits=("train",))
    return stats["train"]["doc_tokens"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, nargs="+", default=[1, 4], help="corpus sizes, in copies of the stdlib")
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args()

    import ray
    from ray.data.context import DataContext

    tmp = Path(tempfile.mkdtemp(prefix="bench_data_"))
    sample = [Path(f).read_text() for f in stdlib_files()[:300]]
    tok = train_tokenizer(sample, tmp / "tokenizer.model", args.vocab)
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    DataContext.get_current().execution_options.preserve_order = True
    DataContext.get_current().enable_progress_bars = False
    ray_pipeline(write_corpus(tmp / "warm", 1)[0][:2], tok, args.seq_len, tmp / "warm_out", args.actors)  # warm up

    rows = []
    for copies in args.copies:
        files, nbytes = write_corpus(tmp / f"corpus{copies}", copies)
        results = {}
        for name, run in (("single", lambda o: single_process(files, tok, args.seq_len, o)),
                          ("ray", lambda o: ray_pipeline(files, tok, args.seq_len, o, args.actors))):
            with PeakMemory(tree=name == "ray") as mem:
                t = time.perf_counter()
                tokens = run(tmp / f"out_{name}_{copies}")
                wall = time.perf_counter() - t
            results[name] = (tokens, wall, mem.peak)
            print(f"  {name:6s} x{copies}: {tokens} tokens in {wall:.1f} s, peak {mem.peak / 2**20:.0f} MiB", flush=True)
        assert results["single"][0] == results["ray"][0], "both sides must encode the same tokens"
        rows.append((copies, nbytes, results))

    load = os.getloadavg()[0]
    print(f"\ntokenize + pack, vocab {args.vocab} BPE, rows of {args.seq_len + 1}, {os.cpu_count()} cores "
          f"(1-min load average at the end: {load:.1f}), {args.actors} tokenizer actors\n")
    print("| corpus | MB | tokens | single process tok/s | Ray Data tok/s | speed-up | peak MiB single | peak MiB Ray |")
    print("|---|---|---|---|---|---|---|---|")
    for copies, nbytes, r in rows:
        (tok_s, wall_s, mem_s), (_, wall_r, mem_r) = r["single"], r["ray"]
        print(f"| stdlib x{copies} | {nbytes / 1e6:.1f} | {tok_s:,} | {tok_s / wall_s:,.0f} | {tok_s / wall_r:,.0f} | "
              f"{wall_s / wall_r:.2f}x | {mem_s / 2**20:.0f} | {mem_r / 2**20:.0f} |")
    if len(rows) > 1:
        (c0, _, r0), (c1, _, r1) = rows[0], rows[-1]
        print(f"\nRay peak memory x{c1} / x{c0}: {r1['ray'][2] / r0['ray'][2]:.2f} "
              f"(corpus {c1 / c0:.0f}x larger; flat = streaming)")
    ray.shutdown()


if __name__ == "__main__":
    main()
