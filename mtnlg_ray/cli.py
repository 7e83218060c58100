"""`mtnlg`: one command table, each subcommand a thin call into one library function.

Exit codes: 0 success, 2 usage or config error, 1 runtime failure. User mistakes print one
line (`error: FILE: key: what is wrong`), never a traceback (`--verbose` adds it for bugs).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import textwrap

from mtnlg_ray.errors import UserError


def _job(args, job_name: str):
    from mtnlg_ray import config

    return config.load_job(args.config, getattr(config, job_name), args.set)


def cmd_preprocess(args):
    job = _job(args, "PreprocessJob")  # validate before importing Ray and torch
    from mtnlg_ray.data.shards import run_preprocess

    run_preprocess(job)


def cmd_pretrain(args):
    job = _job(args, "PretrainJob")  # validate before importing Ray and torch
    from mtnlg_ray.train.trainer import run_pretrain

    run_pretrain(job)


def cmd_finetune(args):
    job = _job(args, "FinetuneJob")  # validate before importing Ray and torch
    from mtnlg_ray.train.finetune import run_finetune

    run_finetune(job)


def cmd_tune(args):
    job = _job(args, "TuneJob")  # validate before importing Ray and torch
    from mtnlg_ray.train.tune import run_tune

    run_tune(job)


def cmd_export(args):
    from mtnlg_ray.api import export

    out = export(args.source, args.out, fmt=args.format, step=args.step)
    print(f"exported {args.source} -> {out} ({args.format})")


def cmd_import_hf(args):
    from mtnlg_ray.api import export

    out = export(args.source, args.out, fmt="native", tokenizer=args.tokenizer)
    print(f"imported {args.source} -> {out}")


def cmd_generate(args):
    from mtnlg_ray.api import generate_text

    text = generate_text(args.checkpoint, args.prompt, max_tokens=args.max_tokens, temperature=args.temperature,
                         top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    print(text)


def cmd_serve(args):
    from mtnlg_ray.serve.app import run_serve

    run_serve(args)


def cmd_quickstart(args):
    from mtnlg_ray.quickstart import run_quickstart

    run_quickstart(args.workdir, quick=args.quick)


def cmd_plot(args):
    from mtnlg_ray.train.plot import plot_run

    for path in plot_run(args.run_dir):
        print(f"wrote {path}")


def _config_cmd(p):
    p.add_argument("config", help="job config YAML (see jobs/configs/)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.max_steps=20 (repeatable)")


def _export_args(p):
    p.add_argument("source", help="run directory, native checkpoint, or Hugging Face GPT-2 directory")
    p.add_argument("--out", required=True, help="output directory (replaced atomically)")
    p.add_argument("--format", choices=["native", "hf"], default="native")
    p.add_argument("--step", type=int, default=None, help="run directory: checkpoint at this step (default latest)")


def _import_args(p):
    p.add_argument("source", help="Hugging Face GPT-2 directory (config.json + model.safetensors)")
    p.add_argument("--out", required=True, help="native checkpoint directory to write")
    p.add_argument("--tokenizer", default=None, help="SentencePiece tokenizer.model to bundle")


def _generate_args(p):
    p.add_argument("checkpoint", help="native checkpoint, run directory, or GPT-2 directory")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)


def _serve_args(p):
    p.add_argument("checkpoint", help="native checkpoint, run directory, or GPT-2 directory")
    p.add_argument("--config", default=None, help="ServeJob YAML; the flags below override it")
    p.add_argument("--host", default=None)
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--min-replicas", type=int, default=None)
    p.add_argument("--max-replicas", type=int, default=None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")


def _quickstart_args(p):
    p.add_argument("--workdir", default="demo_run", help="where every stage writes (kept afterwards)")
    p.add_argument("--quick", action="store_true", help="fewer steps (what the test runs)")


# name: (handler, add-arguments, one-line help, example)
COMMANDS = {
    "preprocess": (cmd_preprocess, _config_cmd, "clean, dedup, train a tokenizer, write Parquet shards",
                   "mtnlg preprocess jobs/configs/preprocess/stdlib.yaml --set output_dir=data_out/py"),
    "pretrain": (cmd_pretrain, _config_cmd, "pretrain on Ray Train (FSDP / TP / PP)",
                 "mtnlg pretrain jobs/configs/pretrain/debug.yaml --set train.max_steps=50"),
    "finetune": (cmd_finetune, _config_cmd, "fine-tune (full or LoRA) from a checkpoint",
                 "mtnlg finetune jobs/configs/finetune/code.yaml"),
    "tune": (cmd_tune, _config_cmd, "hyperparameter search on Ray Tune (ASHA)",
             "mtnlg tune jobs/configs/finetune/tune_code.yaml"),
    "export": (cmd_export, _export_args, "consolidate a run or checkpoint (native or Hugging Face GPT-2)",
               "mtnlg export runs/pretrain --out ckpt/ --format native"),
    "import-hf": (cmd_import_hf, _import_args, "import a Hugging Face GPT-2 directory",
                  "mtnlg import-hf ./gpt2 --out ckpt/gpt2"),
    "generate": (cmd_generate, _generate_args, "generate text from a checkpoint",
                 "mtnlg generate ckpt/ --prompt 'def fib(n):' --max-tokens 64"),
    "serve": (cmd_serve, _serve_args, "serve an OpenAI-compatible HTTP API on Ray Serve",
              "mtnlg serve ckpt/ --port 8000 --min-replicas 1 --max-replicas 2"),
    "quickstart": (cmd_quickstart, _quickstart_args, "the main job end to end on the built-in corpus",
                   "mtnlg quickstart --workdir demo_run"),
    "plot": (cmd_plot, lambda p: p.add_argument("run_dir", help="run directory with metrics.jsonl"),
             "draw loss curves (PNG) of a run", "mtnlg plot runs/pretrain"),
}


def job_main(doc: str, job_name: str, run, argv: list[str] | None = None) -> int:
    """The body of every `jobs/*.py` entrypoint (`ray job submit -- python jobs/X.py --config ...`):
    parse --config / --set, validate the job, call `run(job)`, print what it returns; one-line errors."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--config", required=True, help=f"{job_name} YAML (jobs/configs/)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    args = parser.parse_args(argv)
    try:
        out = run(_job(args, job_name))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    if isinstance(out, (str, os.PathLike)):  # where the job wrote (Train and Tune results print themselves)
        print(out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mtnlg", description="MT-NLG-style GPT pretraining, fine-tuning and serving on Ray.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n" + "\n".join(f"  {ex}" for _, _, _, ex in COMMANDS.values()),
    )
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-q", "--quiet", action="store_true", help="only warnings and results")
    verbosity.add_argument("-v", "--verbose", action="store_true", help="debug logs; tracebacks for bugs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (handler, add_args, help_, example) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_, epilog=f"example:\n  {example}",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        add_args(p)
        p.set_defaults(handler=handler)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO
    logging.basicConfig(level=level, format="%(message)s")
    if args.quiet:
        os.environ.setdefault("MTNLG_QUIET", "1")
    try:
        args.handler(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # a bug, not a user mistake: one line, the traceback with --verbose
        if args.verbose:
            raise
        print(f"error: {type(err).__name__}: {textwrap.shorten(str(err), 300)} (rerun with --verbose "
              "for the traceback)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
