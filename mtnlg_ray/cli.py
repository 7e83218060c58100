"""`mtnlg`: one command table, each subcommand a thin call into one library function.

Exit codes: 0 success, 2 usage or config error, 1 runtime failure. User mistakes print one
line (`error: FILE: key: what is wrong`), never a traceback (`--verbose` adds it for bugs).

Each subcommand imports its library inside its handler, after its own arguments are checked:
`mtnlg --help`, a config error or a wrong path answers in about a second, before torch or Ray
(seconds each to import) is loaded.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import textwrap

from mtnlg_ray import __version__, console
from mtnlg_ray.errors import PathError, UserError
from mtnlg_ray.serve.flags import serve_args, serve_job

log = logging.getLogger("mtnlg_ray.cli")  # not __name__, which is __main__ under `python -m mtnlg_ray.cli`


def _job(args, job_name: str):
    from mtnlg_ray import config

    return config.load_job(args.config, getattr(config, job_name), args.set)


def cmd_preprocess(args):
    job = _job(args, "PreprocessJob")  # validate before importing Ray and torch
    from mtnlg_ray.data.shards import run_preprocess

    run_preprocess(job)


def cmd_pretrain(args):
    job = _job(args, "PretrainJob")  # validate before importing Ray and torch
    from mtnlg_ray.train.preflight import plan_pretrain

    start = plan_pretrain(job, args.resume)  # paths, model against data, --resume: still no Ray or torch
    from mtnlg_ray.train.trainer import run_pretrain

    run_pretrain(job, start, stop_ray=True)


def cmd_finetune(args):
    job = _job(args, "FinetuneJob")  # validate before importing Ray and torch
    from mtnlg_ray.train.preflight import check_finetune_inputs

    check_finetune_inputs(job, args.resume)  # paths and --resume; the start point is read with torch
    from mtnlg_ray.train.finetune import run_finetune

    run_finetune(job, args.resume)


def cmd_tune(args):
    job = _job(args, "TuneJob")  # validate before importing Ray and torch
    from mtnlg_ray.train.tune import run_tune

    run_tune(job)


def _require(path: str, what: str) -> None:
    """A missing local input path is a usage error, found before torch or Ray is imported."""
    if "://" not in path and not os.path.exists(path):
        raise PathError(f"{path}: no such {what}")


def cmd_export(args):
    from mtnlg_ray.checkpoint.source import check_exists

    check_exists(args.source)
    from mtnlg_ray.api import export

    out = export(args.source, args.out, fmt=args.format, step=args.step)
    log.info("exported %s -> %s (%s)", args.source, out, args.format)


def cmd_import_hf(args):
    _require(args.source, "GPT-2 directory")
    if args.tokenizer:
        _require(args.tokenizer, "tokenizer file")
    from mtnlg_ray.api import export

    out = export(args.source, args.out, fmt="native", tokenizer=args.tokenizer)
    log.info("imported %s -> %s", args.source, out)


def cmd_generate(args):
    from mtnlg_ray.checkpoint.source import check_exists

    check_exists(args.checkpoint)
    from mtnlg_ray.serve.local import check_sampling, generate

    req = check_sampling(args.max_tokens, args.temperature, args.top_p, args.top_k, args.seed)  # before the model
    generate(args.checkpoint, args.prompt, req, chat=args.chat, system=args.system)


def cmd_chat(args):
    _require(args.checkpoint, "checkpoint, run directory or GPT-2 directory")
    from mtnlg_ray.serve.local import chat, check_sampling

    req = check_sampling(args.max_tokens, args.temperature, args.top_p, args.top_k, args.seed)  # before the model
    chat(args.checkpoint, req, system=args.system)


def cmd_eval(args):
    _require(args.checkpoint, "checkpoint, run directory or GPT-2 directory")
    for path in args.data:
        if "://" not in path and not any(ch in path for ch in "*?["):
            _require(path, "data file or directory")
    from mtnlg_ray.train.heldout import evaluate_file

    r = evaluate_file(args.checkpoint, args.data, kind=args.kind, text_mode=args.text_mode, text_field=args.text_field,
                      max_docs=args.max_docs, seq_len=args.seq_len, batch_size=args.batch_size, device=args.device)
    log.info("%d documents, %d tokens in %d rows (%d tail tokens that fill no row not scored)", r["documents"],
             r["tokens"], r["rows"], r["dropped_tail_tokens"])
    print(f"loss {r['val_loss']:.4f} nats/token  perplexity {r['val_ppl']:.3f}  bits/byte {r.get('val_bpb', 0):.4f}")


def cmd_serve(args):
    from mtnlg_ray.checkpoint.source import check_exists

    check_exists(args.checkpoint)
    job = serve_job(args)  # validated before importing Ray and torch
    if job.serve.lora_adapters:  # each a LoRA run of the served model's shape (config files only)
        from mtnlg_ray.checkpoint.lora_adapter import check_adapters
        from mtnlg_ray.checkpoint.source import open_source

        check_adapters(job.serve.lora_adapters, open_source(job.serve.checkpoint).config())
    from mtnlg_ray.serve.deploy import run_serve

    run_serve(job)


def cmd_quickstart(args):
    from mtnlg_ray.quickstart import run_quickstart

    run_quickstart(args.workdir, quick=args.quick)


def cmd_plot(args):
    _require(args.run_dir, "run directory")
    from mtnlg_ray.train.plot import plot_run

    for path in plot_run(args.run_dir):
        log.info("wrote %s", path)


def _config_cmd(p, kind: str, set_example: str = "train.max_steps=20"):
    from mtnlg_ray.config import shipped

    p.add_argument("config", help=f"job config: a YAML file, or the name of a shipped {kind} config "
                   f"({', '.join(shipped.names(kind))}; `mtnlg configs` lists them)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override a config key, e.g. --set {set_example} (repeatable)")


def _train_cmd(p, kind: str):
    _config_cmd(p, kind)
    p.add_argument("--resume", default="auto", metavar="auto|never|PATH",
                   help="auto: continue the run in scaling.storage_path/name if it has checkpoints; never: refuse "
                   "to start where a run exists; PATH: a new run starts from this checkpoint or run directory "
                   "(the model, tokenizer, seq_len and data must match it)")
    if kind == "pretrain":
        from mtnlg_ray.config.presets import PRESETS

        p.description += f"; model presets (--set model.preset=NAME): {', '.join(PRESETS)}"


def cmd_configs(args):
    from mtnlg_ray.config import shipped

    rows = shipped.listing()
    width = max(len(r.name) for r in rows)
    for r in rows:
        print(f"{r.kind:<10}  {r.name:<{width}}  {textwrap.shorten(r.about, 80, placeholder=' ...')}")
    log.info("\nrun one by name (`mtnlg pretrain debug`) or copy it from %s", shipped.ROOT)


def _export_args(p):
    p.add_argument("source", help="run directory, native checkpoint, or Hugging Face GPT-2 directory")
    p.add_argument("--out", required=True, help="output directory (replaced atomically)")
    p.add_argument("--format", choices=["native", "hf"], default="native",
                   help="native: config.json + model.safetensors + tokenizer.model; hf: a transformers GPT-2 directory")
    p.add_argument("--step", type=int, default=None, help="run directory: checkpoint at this step (default: latest)")


def _import_args(p):
    p.add_argument("source", help="Hugging Face GPT-2 directory (config.json + model.safetensors)")
    p.add_argument("--out", required=True, help="native checkpoint directory to write")
    p.add_argument("--tokenizer", default=None, help="SentencePiece tokenizer.model to bundle")


def _sampling_args(p, max_tokens: int | None, temperature: float):
    """Sampling flags, checked by the server's request schema (serve/schemas.py)."""
    p.add_argument("--max-tokens", type=int, default=max_tokens,
                   help="tokens to generate at most; capped, with a warning, where the context ends" +
                   ("" if max_tokens else " (default: up to the context)"))
    p.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens (default: all)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling: smallest set with this mass (default: off)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: a fresh one each run)")


def _generate_args(p):
    p.add_argument("checkpoint", help="native checkpoint, run directory, or GPT-2 directory")
    p.add_argument("--prompt", required=True, help="text to continue (special tokens written in it are those tokens)")
    p.add_argument("--chat", action="store_true", help="send the prompt as a user message through the chat "
                   "template and print the reply")
    p.add_argument("--system", default=None, help="with --chat: a system message")
    _sampling_args(p, 64, 0.0)


def _chat_args(p):
    p.add_argument("checkpoint", help="native checkpoint, run directory, or GPT-2 directory (a chat fine-tune)")
    p.add_argument("--system", default=None, help="system message at the start of the conversation")
    _sampling_args(p, None, 0.7)


def _eval_args(p):
    p.add_argument("checkpoint", help="native checkpoint, run directory, or GPT-2 directory")
    p.add_argument("--data", required=True, nargs="+", help="text, JSONL or Parquet files, directories or globs")
    p.add_argument("--kind", choices=["text", "jsonl", "parquet"], default=None,
                   help="file kind (default: from each file's suffix; text otherwise)")
    p.add_argument("--text-mode", choices=["file", "line", "paragraph"], default="file",
                   help="text files: a document per file, line or blank-line-separated paragraph")
    p.add_argument("--text-field", default="text", help="JSONL / Parquet field holding the document")
    p.add_argument("--max-docs", type=int, default=None, help="the first N documents only")
    p.add_argument("--seq-len", type=int, default=None, help="row length as in preprocessing (default: the model's "
                   "max_seq_len)")
    p.add_argument("--batch-size", type=int, default=8, help="rows per forward")
    p.add_argument("--device", default="cpu", help="cpu or cuda")


def _quickstart_args(p):
    p.add_argument("--workdir", default="demo_run", help="where every stage writes (kept afterwards)")
    p.add_argument("--quick", action="store_true", help="fewer steps (what the test runs)")


# name: (handler, add-arguments, one-line help, example)
COMMANDS = {
    "preprocess": (cmd_preprocess, lambda p: _config_cmd(p, "preprocess", "pack.seq_len=512"),
                   "clean, dedup, train a tokenizer, write Parquet shards",
                   "mtnlg preprocess stdlib --set output_dir=data_out/py"),
    "pretrain": (cmd_pretrain, lambda p: _train_cmd(p, "pretrain"), "pretrain on Ray Train (FSDP / TP / PP)",
                 "mtnlg pretrain debug --set train.max_steps=50"),
    "finetune": (cmd_finetune, lambda p: _train_cmd(p, "finetune"), "fine-tune (full or LoRA) from a checkpoint",
                 "mtnlg finetune code --set train.max_steps=20"),
    "tune": (cmd_tune, lambda p: _config_cmd(p, "tune", "finetune.train.max_steps=20"),
             "hyperparameter search on Ray Tune (ASHA)", "mtnlg tune code"),
    "configs": (cmd_configs, lambda p: None, "list the shipped job configs, which every job command takes by name",
                "mtnlg configs"),
    "export": (cmd_export, _export_args, "consolidate a run or checkpoint (native or Hugging Face GPT-2)",
               "mtnlg export runs/pretrain --out ckpt/ --format native"),
    "import-hf": (cmd_import_hf, _import_args, "import a Hugging Face GPT-2 directory",
                  "mtnlg import-hf ./gpt2 --out ckpt/gpt2"),
    "generate": (cmd_generate, _generate_args, "generate text from a checkpoint",
                 "mtnlg generate ckpt/ --prompt 'def fib(n):' --max-tokens 64"),
    "chat": (cmd_chat, _chat_args, "chat in the terminal with a checkpoint's chat template",
             "mtnlg chat demo_run/export --system 'You write Python.'"),
    "eval": (cmd_eval, _eval_args, "held-out loss and perplexity of a checkpoint on text, JSONL or Parquet",
             "mtnlg eval ckpt/ --data held_out.jsonl --max-docs 500"),
    "serve": (cmd_serve, serve_args, "serve an OpenAI-compatible HTTP API on Ray Serve",
              "mtnlg serve ckpt/ --port 8000 --api-key secret --served-model-name mtnlg --max-num-seqs 16"),
    "quickstart": (cmd_quickstart, _quickstart_args, "the main job end to end on the built-in corpus",
                   "mtnlg quickstart --workdir demo_run"),
    "plot": (cmd_plot, lambda p: p.add_argument("run_dir", help="run directory with metrics.jsonl"),
             "draw loss curves (PNG) of a run", "mtnlg plot runs/pretrain"),
}


def _report(err: UserError) -> None:
    """A user's mistake: `error: ...`, one line per problem (a config reports all of its problems)."""
    for line in str(err).splitlines() or [type(err).__name__]:
        print(f"error: {line}", file=sys.stderr)


def job_main(doc: str, job_name: str, run, argv: list[str] | None = None) -> int:
    """The body of every `jobs/*.py` entrypoint (`ray job submit -- python jobs/X.py --config ...`):
    parse --config / --set, validate the job, call `run(job)`, print what it returns; one-line errors."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--config", required=True, help=f"{job_name} YAML, or a shipped config's name (mtnlg configs)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    _verbosity_args(parser)
    args = parser.parse_args(argv)
    console.configure(1 if args.verbose else -1 if args.quiet else 0)
    console.dashboard = args.dashboard
    try:
        out = run(_job(args, job_name))
    except UserError as err:
        _report(err)
        return err.exit_code
    if isinstance(out, (str, os.PathLike)):  # where the job wrote (Train and Tune results print themselves)
        print(out)
    return 0


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and examples as written; each option's default after its help, where it has one."""

    def _get_help_string(self, action):
        text, default = action.help or "", action.default
        unset = default is None or default is False or default == [] or default is argparse.SUPPRESS
        if action.option_strings and not unset and "%(default)" not in text and "(default:" not in text:
            text += " (default: %(default)s)"
        return text


def _verbosity_args(p, after_command: bool = False):
    """-q / -v; after the subcommand too (`mtnlg pretrain X -q`): there the defaults are SUPPRESS,
    so a subparser leaves the value given before the subcommand alone."""
    group = p.add_mutually_exclusive_group()
    unset = {"default": argparse.SUPPRESS} if after_command else {}
    group.add_argument("-q", "--quiet", action="store_true", **unset,
                       help="warnings, errors and results (such as generated text) only")
    group.add_argument("-v", "--verbose", action="store_true", **unset,
                       help="debug lines, Ray's own INFO lines and Ray Data's progress; tracebacks for bugs")
    p.add_argument("--dashboard", action="store_true", **unset,
                   help="start the local Ray with its dashboard (http://127.0.0.1:8265); a running cluster "
                        "(RAY_ADDRESS) keeps its own")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mtnlg", description="MT-NLG-style GPT pretraining, fine-tuning and serving on Ray.",
        formatter_class=_HelpFormatter,
        epilog="examples:\n" + "\n".join(f"  {ex}" for _, _, _, ex in COMMANDS.values()),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _verbosity_args(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (handler, add_args, help_, example) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_, epilog=f"example:\n  {example}",
                           formatter_class=_HelpFormatter)
        add_args(p)
        _verbosity_args(p, after_command=True)
        p.set_defaults(handler=handler)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quiet and args.verbose:  # one before the subcommand, one after
        parser.error("-q/--quiet and -v/--verbose exclude each other")
    console.configure(1 if args.verbose else -1 if args.quiet else 0)
    console.dashboard = args.dashboard
    try:
        args.handler(args)
    except UserError as err:
        _report(err)
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


def run() -> None:
    """The `mtnlg` console script: `main()`, then `exit_now` with its code."""
    exit_now(main())


def exit_now(code: int) -> None:
    """End the process once the command is done: stop the Ray it started, flush the console, and
    leave with os._exit. Everything a command writes is closed before it returns; what this skips
    is the interpreter's teardown of torch's, Ray's and Arrow's modules, 1.5 s after every
    training run on 2 cores."""
    if "ray" in sys.modules:
        import ray

        ray.shutdown()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
