"""`TorchProcessGroup`: Ray Train's torch backend (`ray.train.torch.TorchConfig`) without torch
in the driver and the controller.

TorchConfig's module imports torch, so a trainer built with it makes the driver and Ray Train's
controller import torch (about 2 s each on 2 cores, on the start-up's critical path) although
neither runs a tensor op. This config does what TorchConfig's backend does for CPU (gloo) and GPU
(nccl) workers, with the torch work in functions that run on the workers: pick the master
address on worker 0, set the torch.distributed environment (RANK, LOCAL_RANK, ...), join the
process group, make each worker's GPU its current device, and tear the group down at the end.

A single worker joins no process group: everything the loop does treats world size 1 without
one (no collectives, DCP's no_dist), and it saves gloo's TCP thread, which wakes 100 times a
second beside the training threads.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import ray
from ray.train._internal.utils import get_address_and_port
from ray.train.backend import Backend, BackendConfig
from ray.train.v2._internal.util import TrainingFramework

log = logging.getLogger(__name__)
SHUTDOWN_TIMEOUT_S = 30  # as Ray's TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S default


@dataclass
class TorchProcessGroup(BackendConfig):
    """backend: "gloo" (CPU workers) or "nccl" (GPU workers); timeout_s: collective timeout."""

    backend: str = "gloo"
    timeout_s: int = 1800

    @property
    def backend_cls(self):
        return _Backend

    @property
    def train_func_context(self):
        return _CurrentDevice

    @property
    def framework(self):
        return TrainingFramework.TORCH


class _Backend(Backend):
    share_cuda_visible_devices: bool = True  # each GPU worker sees its node's GPUs (as TorchConfig)

    def on_start(self, worker_group, backend_config: TorchProcessGroup) -> None:
        addr, port = worker_group.execute_single(0, get_address_and_port)
        world = len(worker_group)
        worker_group.execute(_set_env, addr=addr, port=port)
        if world == 1:
            return
        ray.get([worker_group.execute_single_async(i, _join, backend=backend_config.backend, world_rank=i,
                                                   world_size=world, timeout_s=backend_config.timeout_s)
                 for i in range(world)])

    def on_shutdown(self, worker_group, backend_config: TorchProcessGroup) -> None:
        try:
            ray.get(worker_group.execute_async(_leave), timeout=SHUTDOWN_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            log.warning("torch process group shutdown timed out after %d s", SHUTDOWN_TIMEOUT_S)


class _CurrentDevice:
    """Around the train function on each worker: its GPU (if any) is torch's current device."""

    def __enter__(self):
        from ray.train.torch.config import TorchConfigContextManager

        TorchConfigContextManager().__enter__()

    def __exit__(self, *exc) -> bool:
        return False


# ------------------------------------------------------------------------- run on the workers
def _set_env(addr: str, port: int) -> None:
    """torch.distributed's env:// variables (torchrun's names) and the master address."""
    from ray.train.torch.config import _set_torch_distributed_env_vars

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = addr, str(port)
    _set_torch_distributed_env_vars()


def _join(backend: str, world_rank: int, world_size: int, timeout_s: int) -> None:
    from ray.train.torch.config import _setup_torch_process_group

    _setup_torch_process_group(backend=backend, world_rank=world_rank, world_size=world_size, init_method="env://",
                               timeout_s=timeout_s)


def _leave() -> None:
    from ray.train.torch.config import _shutdown_torch

    _shutdown_torch(destroy_process_group=True)
