"""`mtnlg serve`'s command line: vLLM's flag names for the serving keys, and the ServeJob they make.

A flag is the same field as its config key (SERVE_FLAGS): it overrides the `--config` file and is
overridden by `--set`. No Ray and no torch here: `mtnlg serve` validates the job before either loads.
"""

from __future__ import annotations

import argparse
import os

from mtnlg_ray.config import ServeJob, apply_overrides, load_yaml, shipped, validate
from mtnlg_ray.errors import ConfigError

# `mtnlg serve` flags (vLLM's names where vLLM has one) -> the serve keys they set
SERVE_FLAGS = {"host": "host", "port": "port", "api_key": "api_key", "served_model_name": "model_name",
               "max_model_len": "max_context", "max_num_seqs": "max_batch_slots", "chat_template": "chat_template",
               "max_loras": "max_loras", "quantization": "quantization"}


def serve_job(args):
    """The ServeJob of `mtnlg serve CHECKPOINT [--config] [--set] [flags]`: a flag sets its key
    (SERVE_FLAGS), after the config file and before --set."""
    data = load_yaml(shipped.resolve("serve", args.config)) if args.config else {}
    source = os.path.basename(args.config) if args.config else "mtnlg serve"
    section = data.setdefault("serve", {})
    if not isinstance(section, dict):
        raise ConfigError(f"{source}: serve: must be a mapping")
    section["checkpoint"] = args.checkpoint
    section.update({key: getattr(args, flag) for flag, key in SERVE_FLAGS.items() if getattr(args, flag) is not None})
    scaling = {k: v for k, v in (("min_replicas", args.min_replicas), ("max_replicas", args.max_replicas))
               if v is not None}
    if scaling:
        section.setdefault("autoscaling", {}).update(scaling)
    for item in args.lora_modules or []:  # vLLM's --lora-modules name=path ...
        name, eq, path = item.partition("=")
        if not eq or not name or not path:
            raise ConfigError(f"--lora-modules: {item!r} is not NAME=PATH")
        if not isinstance(section.get("lora_adapters", {}), dict):
            raise ConfigError(f"{source}: serve.lora_adapters: must be a mapping")
        section.setdefault("lora_adapters", {})[name] = path
    return validate(ServeJob, apply_overrides(data, args.set), source)


def serve_args(p: argparse.ArgumentParser) -> None:
    """`mtnlg serve`'s arguments (vLLM's flag names) on `p`."""
    p.add_argument("checkpoint", help="native checkpoint, run directory, or GPT-2 directory")
    p.add_argument("--config", default=None, help="ServeJob YAML; the flags below override it")
    p.add_argument("--host", default=None, help="HTTP host (default: serve.host, 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="HTTP port, 0 = any free one (default: serve.port, 8000)")
    p.add_argument("--min-replicas", type=int, default=None, help="autoscaling lower bound (default: 1)")
    p.add_argument("--max-replicas", type=int, default=None, help="autoscaling upper bound (default: 1)")
    p.add_argument("--api-key", default=None, help="clients send 'Authorization: Bearer KEY' (serve.api_key; "
                   "default: $MTNLG_API_KEY, else none)")
    p.add_argument("--served-model-name", default=None, metavar="NAME",
                   help="the model name clients send (serve.model_name, default: mtnlg)")
    p.add_argument("--max-model-len", type=int, default=None, metavar="N",
                   help="context per sequence (serve.max_context, default: the model's max_seq_len)")
    p.add_argument("--max-num-seqs", type=int, default=None, metavar="N",
                   help="sequences decoded together per replica (serve.max_batch_slots, default: 8)")
    p.add_argument("--chat-template", default=None, metavar="FILE",
                   help="Jinja2 chat template file (serve.chat_template, default: the checkpoint's, else built in)")
    p.add_argument("--lora-modules", nargs="+", default=None, metavar="NAME=PATH",
                   help="LoRA fine-tune runs served unmerged beside the model, each chosen by `model`: NAME "
                   "(serve.lora_adapters)")
    p.add_argument("--max-loras", type=int, default=None, metavar="N",
                   help="LoRA adapters a replica holds; a runtime load beyond it unloads the least recently used "
                   "(serve.max_loras, default: 4)")
    p.add_argument("--quantization", choices=["none", "int8"], default=None,
                   help="int8: decode with int8 weights, CPU (serve.quantization, default: none)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a ServeJob key, e.g. --set serve.max_batch_slots=16 (repeatable)")
