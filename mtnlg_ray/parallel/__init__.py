"""Parallelism applied to a finished GPT from outside (the torchtitan way).

    dims = build_mesh(job.parallel, world_size, device.type)      # ("pp", "dp", "tp") mesh
    model = parallelize(job.model, dims, job.parallel, device, seed=job.train.seed)

    mesh.py          the ("pp", "dp", "tp") device mesh; the layout checks the driver runs
    parallelized.py  parallelize() and the Parallelized model it returns
    fsdp.py tp.py pp.py   FSDP2 / DDP, Megatron tensor parallel, pipeline stages and schedules

The names below load on first use (PEP 562): the driver of a training run checks layouts with
mesh.py alone and never imports DTensor, torch.distributed.pipelining or DCP (1-2 s of start-up).
"""

from __future__ import annotations

import importlib

_EXPORTS = {"ParallelDims": "mesh", "build_mesh": "mesh", "check_layout": "mesh", "resolve_dims": "mesh",
            "Parallelized": "parallelized", "parallelize": "parallelized"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
