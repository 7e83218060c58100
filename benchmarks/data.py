"""Tokenize + pack throughput and memory: the Ray Data pipeline vs a single-process SentencePiece loop.

    python benchmarks/data.py [--copies 1 4] [--workers 2] [--vocab 4096] [--seq-len 256]

Corpus: the interpreter's stdlib `.py` sources, `copies` times (each copy's documents made distinct
by a header line), stored as Parquet files of 50 documents. Every run reads those files, encodes every
document, appends EOD and cuts rows of seq_len + 1 ids, written as Parquet shards; all must give the
same tokens.
    single process   one Python process, `SentencePieceProcessor.encode(doc)` per document (the
                     reference of the target)
    Ray Data         what `mtnlg preprocess` runs after cleaning: its corpus reader
                     (`data/readers.read_corpus`, kind parquet), then `data/shards.pack`:
                     blocks of 256 documents -> `tokenize_pack` tasks, `--workers` at a time
                     (encode + pack + Parquet bytes) -> the driver writes the files in order;
                     Ray started with 4 logical CPUs, as in the tests
    Ray actor pool   the same with `pack.compute: actors` (`--workers` TokenizePack actors)
    1 process, cuts  the single-process loop with the pipeline's encoder (`data/tokenizer.
                     encode_documents`: long documents cut at word starts, the same ids): how much
                     of the speed-up is the encoder's and how much the parallel pipeline's
    2 threads        one process calling SentencePiece's own batch encode on all cores, a file at a time
CPU-s: user + system CPU seconds of the process (single) or of the driver and all its descendants
(Ray): the work each side does, which load from other jobs on the machine changes less than the wall
time. Peak memory is the PSS (shared pages split fairly), sampled every 0.2 s in a separate run of
each side (the sampling costs CPU): of the process for the single-process loop; summed over the
driver and all its descendants (GCS, raylet, workers, actors, object store pages they map) for Ray.
It must not grow with the corpus.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mtnlg_ray.config import CorpusConfig  # noqa: E402
from mtnlg_ray.data.readers import read_corpus, stdlib_files  # noqa: E402
from mtnlg_ray.data.shards import ShardWriter, pack  # noqa: E402
from mtnlg_ray.data.tokenizer import Tokenizer, cuts_are_exact, encode_documents, train_tokenizer  # noqa: E402


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


def tree_cpu_s() -> float:
    """CPU seconds (user + system) of this process and all its descendants, reaped ones included."""
    tree, todo, ticks = _children(), [os.getpid()], 0
    while todo:
        pid = todo.pop()
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
        todo += tree.get(pid, [])
    return ticks / os.sysconf("SC_CLK_TCK")


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
def single_process(files: list[str], tok: Tokenizer, seq_len: int, out: Path, threads: int = 0,
                   cuts: bool = False) -> int:
    """The reference: one process encodes every document (EOD appended), packs and writes; returns
    tokens (incl. EOD). threads=0: `encode(doc)` per document (the loop the target is set against);
    threads=n: SentencePiece's own batch encode of each file's documents on n threads; cuts: the
    pipeline's `encode_documents` on one thread."""
    writer, carry, tokens, row = ShardWriter(out, 4096, seq_len + 1), np.array([], np.int32), 0, seq_len + 1
    exact = cuts and cuts_are_exact(tok.path.read_bytes())
    for f in files:
        texts = pq.read_table(f)["text"].to_pylist()
        if cuts:
            ids = encode_documents(tok.sp, texts, exact)
        elif threads:
            ids = tok.sp.encode(texts, return_type="numpy", add_eos=True, num_threads=threads)
        else:
            ids = [tok.sp.encode(d, return_type="numpy", add_eos=True) for d in texts]
        stream = np.concatenate([carry, *ids]).astype(np.int32, copy=False)
        tokens += sum(len(x) for x in ids)
        n = len(stream) // row
        offsets = pa.array(np.arange(n + 1, dtype=np.int32) * row)
        writer.write(pa.ListArray.from_arrays(offsets, pa.array(stream[: n * row])))
        carry = stream[n * row:]
    writer.close()
    return tokens


def ray_pipeline(files: list[str], tok: Tokenizer, seq_len: int, out: Path, workers: int,
                 compute: str = "tasks") -> int:
    """What `mtnlg preprocess` runs after cleaning: its corpus reader, then `pack` (no split column: all train)."""
    docs = read_corpus(CorpusConfig(kind="parquet", paths=files, text_field="text"))
    stats = pack(docs, tok.path, seq_len, out, num_workers=workers, splits=("train",), compute=compute)
    return stats["train"]["doc_tokens"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, nargs="+", default=[1, 4], help="corpus sizes, in copies of the stdlib")
    parser.add_argument("--workers", type=int, default=2, help="tokenizer tasks at a time")
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
    corpora = {copies: write_corpus(tmp / f"corpus{copies}", copies) for copies in args.copies}
    # warm-up, one Ray run per corpus size: starts Ray's worker processes (Ray Data imported), as the
    # read and clean stages of `mtnlg preprocess` have by the time it packs, and takes Ray's resident
    # memory (object store pages, worker heaps), which rises over a session's first runs whatever their
    # size, to its plateau, so that the peaks below compare corpus sizes and not run order
    for copies, (files, _) in corpora.items():
        ray_pipeline(files, tok, args.seq_len, tmp / f"warm_{copies}", args.workers)

    cores = len(os.sched_getaffinity(0))
    results: dict[int, dict[str, list]] = {copies: {} for copies in corpora}

    def runs(copies: int) -> dict:
        files = corpora[copies][0]
        return {"single": lambda o: single_process(files, tok, args.seq_len, o),
                "cuts": lambda o: single_process(files, tok, args.seq_len, o, cuts=True),
                "threads": lambda o: single_process(files, tok, args.seq_len, o, cores),
                "ray": lambda o: ray_pipeline(files, tok, args.seq_len, o, args.workers),
                "actors": lambda o: ray_pipeline(files, tok, args.seq_len, o, args.workers, "actors")}

    def timed(copies: int, name: str) -> None:  # without the memory sampler
        t, cpu = time.perf_counter(), tree_cpu_s()
        tokens = runs(copies)[name](tmp / f"out_{name}_{copies}")
        wall, cpu = time.perf_counter() - t, tree_cpu_s() - cpu
        results[copies][name] = [tokens, wall, 0, cpu]
        print(f"  {name:7s} x{copies}: {tokens} tokens in {wall:.1f} s ({cpu:.1f} CPU-s), "
              f"load {os.getloadavg()[0]:.1f}", flush=True)

    for copies in corpora:
        for name in ("single", "cuts", "threads", "ray"):
            timed(copies, name)
        # peak memory in runs of their own: one PSS sample of Ray's ~12 processes costs ~40 ms of
        # CPU (the kernel walks their mappings), a fifth of a core at 0.2 s, which would slow Ray's run
        for name in ("single", "ray"):
            with PeakMemory(tree=name == "ray") as mem:
                runs(copies)[name](tmp / f"mem_{name}_{copies}")
            results[copies][name][2] = mem.peak
            print(f"  {name:7s} x{copies}: peak {mem.peak / 2**20:.0f} MiB", flush=True)
    # the actor pools last: Ray replaces their processes when they exit, work that would land in the
    # other runs (their CPU-s are not counted: the actors are not this process's descendants)
    for copies in corpora:
        timed(copies, "actors")
        assert len({r[0] for r in results[copies].values()}) == 1, "all must encode the same tokens"
    rows = [(copies, nbytes, results[copies]) for copies, (_, nbytes) in corpora.items()]

    load = os.getloadavg()[0]
    print(f"\ntokenize + pack, vocab {args.vocab} BPE, rows of {args.seq_len + 1}, {cores} cores "
          f"(1-min load average at the end: {load:.1f}), {args.workers} tokenizer tasks at a time\n")
    print(f"| corpus | MB | tokens | single process tok/s | Ray Data tok/s | speed-up | Ray actor pool tok/s | "
          f"speed-up | 1 process, cuts tok/s | Ray / cuts | 1 process, {cores} threads tok/s | CPU-s single | "
          "CPU-s Ray | peak MiB single | peak MiB Ray |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for copies, nbytes, r in rows:
        (tok_s, wall_s, mem_s, cpu_s), (_, wall_r, mem_r, cpu_r) = r["single"], r["ray"]
        wall_a, wall_c, wall_t = r["actors"][1], r["cuts"][1], r["threads"][1]
        print(f"| stdlib x{copies} | {nbytes / 1e6:.1f} | {tok_s:,} | {tok_s / wall_s:,.0f} | {tok_s / wall_r:,.0f} | "
              f"{wall_s / wall_r:.2f}x | {tok_s / wall_a:,.0f} | {wall_s / wall_a:.2f}x | {tok_s / wall_c:,.0f} | "
              f"{wall_c / wall_r:.2f}x | {tok_s / wall_t:,.0f} | {cpu_s:.1f} | {cpu_r:.1f} | "
              f"{mem_s / 2**20:.0f} | {mem_r / 2**20:.0f} |")
    if len(rows) > 1:
        (c0, _, r0), (c1, _, r1) = rows[0], rows[-1]
        print(f"\nRay peak memory x{c1} / x{c0}: {r1['ray'][2] / r0['ray'][2]:.2f} "
              f"(corpus {c1 / c0:.0f}x larger; flat = streaming)")
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)  # corpora and shards: ~100 MB per size


if __name__ == "__main__":
    main()
