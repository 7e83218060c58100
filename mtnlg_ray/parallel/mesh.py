"""The device mesh: pipeline x data x tensor parallel, checked against the world size.

Ranks are laid out as a 3-D grid of shape (pp, dp, tp) with tp fastest, as in Megatron-LM:
the tp ranks of one group are neighbours (same node, fastest links), pipeline stages are the
slowest dimension (they only exchange activations at stage boundaries). For 8 ranks with
pp=2, dp=2, tp=2, rank r sits at (pp, dp, tp) = (r // 4, r // 2 % 2, r % 2).

`check_layout` validates a layout before any worker starts (the trainer calls it); `build_mesh`
runs the same checks on a worker and builds the `DeviceMesh` with `init_device_mesh`. torch is
imported by build_mesh only: the driver and Ray Train's controller check layouts without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from mtnlg_ray.config import ModelConfig, ParallelConfig
from mtnlg_ray.errors import ConfigError

if TYPE_CHECKING:
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh


@dataclass
class ParallelDims:
    """The resolved layout and, with more than one rank, its mesh with dims ("pp", "dp", "tp")."""

    pp: int
    dp: int
    tp: int
    world_size: int
    mesh: DeviceMesh | None = None  # None when world_size == 1 (no process group needed)

    def _local_rank(self, dim: str) -> int:
        return 0 if self.mesh is None else self.mesh[dim].get_local_rank()

    @property
    def pp_rank(self) -> int:
        return self._local_rank("pp")

    @property
    def dp_rank(self) -> int:
        """Index of this rank's data shard: ranks with the same dp_rank must read the same batches."""
        return self._local_rank("dp")

    @property
    def tp_rank(self) -> int:
        return self._local_rank("tp")

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    def group(self, dim: str) -> dist.ProcessGroup | None:
        """The process group of one mesh dim ("pp", "dp" or "tp"); None without a mesh."""
        return None if self.mesh is None else self.mesh[dim].get_group()


def resolve_dims(cfg: ParallelConfig, world_size: int) -> tuple[int, int, int]:
    """(pp, dp, tp) with dp = -1 filled in; raises ConfigError when the product is not world_size."""
    tp, pp, dp = cfg.tp, cfg.pp, cfg.dp
    if dp == -1:
        if world_size % (tp * pp):
            raise ConfigError(f"parallel: tp={tp} x pp={pp} = {tp * pp} does not divide world size {world_size}")
        dp = world_size // (tp * pp)
    elif dp < 1:
        raise ConfigError(f"parallel.dp: must be a positive number or -1 (got {dp})")
    if tp * pp * dp != world_size:
        raise ConfigError(f"parallel: tp={tp} x pp={pp} x dp={dp} = {tp * pp * dp} does not match world size {world_size}")
    return pp, dp, tp


def check_layout(model_cfg: ModelConfig, cfg: ParallelConfig, world_size: int) -> None:
    """Every check `build_mesh` makes, without a process group (run before launching workers)."""
    pp, dp, tp = resolve_dims(cfg, world_size)
    if model_cfg.n_heads % tp:
        raise ConfigError(f"parallel.tp: must divide model.n_heads={model_cfg.n_heads} (got {tp})")
    if model_cfg.d_mlp % tp:
        raise ConfigError(f"parallel.tp: must divide the MLP width {model_cfg.d_mlp} (got {tp})")
    if model_cfg.vocab_size is not None and model_cfg.padded_vocab_size % tp:
        raise ConfigError(f"parallel.tp: must divide the padded vocabulary {model_cfg.padded_vocab_size} (got {tp})")
    if cfg.sequence_parallel and model_cfg.max_seq_len % tp:
        raise ConfigError(f"parallel.sequence_parallel: tp={tp} must divide model.max_seq_len={model_cfg.max_seq_len}")
    if pp > 1:
        stages = pp * virtual_stages(cfg)
        if model_cfg.n_layers < stages:
            raise ConfigError(
                f"parallel.pp: {stages} pipeline stages need at least as many layers (model.n_layers={model_cfg.n_layers})"
            )
        if model_cfg.tie_embeddings:
            raise ConfigError(
                "parallel.pp: tied embeddings live on the first and last stage; set model.tie_embeddings: false for pp > 1"
            )
        # 1f1b with fewer chunks per step than stages runs those steps under GPipe (parallel/pp.py)
        rounds = max(1, cfg.pp_microbatches // pp)  # interleaved 1F1B runs whole rounds of micro-batches
        if cfg.pp_schedule == "interleaved_1f1b" and cfg.pp_microbatches % rounds:
            raise ConfigError(
                f"parallel.pp_microbatches: interleaved_1f1b runs rounds of {rounds} (= pp_microbatches // pp={pp}), "
                f"which must divide it (got {cfg.pp_microbatches})"
            )
    if cfg.data_parallel == "ddp" and dp > 1 and tp > 1:
        raise ConfigError("parallel.data_parallel: ddp does not combine with tp > 1; use fsdp")


def virtual_stages(cfg: ParallelConfig) -> int:
    """Pipeline stages held by each pp rank: 2 for the interleaved schedule, else 1."""
    return 2 if cfg.pp > 1 and cfg.pp_schedule == "interleaved_1f1b" else 1


def build_mesh(cfg: ParallelConfig, world_size: int, device_type: str, model_cfg: ModelConfig | None = None) -> ParallelDims:
    """Resolve the layout and build the ("pp", "dp", "tp") DeviceMesh over the default process group.

    With `model_cfg`, the model-dependent checks of `check_layout` run too (parallelize() runs
    them anyway). world_size == 1 needs no process group and gets mesh None.
    """
    if model_cfg is not None:
        check_layout(model_cfg, cfg, world_size)
    pp, dp, tp = resolve_dims(cfg, world_size)
    if world_size == 1:
        return ParallelDims(pp, dp, tp, 1, None)
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_initialized():
        raise RuntimeError(f"build_mesh: world size {world_size} needs an initialised torch.distributed process group")
    if dist.get_world_size() != world_size:
        raise ConfigError(f"parallel: world size {world_size} does not match the process group's {dist.get_world_size()}")
    mesh = init_device_mesh(device_type, (pp, dp, tp), mesh_dim_names=("pp", "dp", "tp"))
    return ParallelDims(pp, dp, tp, world_size, mesh)
