"""Many LoRA adapters served over one base GPT without merging them (S-LoRA / Punica, as vLLM's multi-LoRA).

Each nn.Linear an adapter targets becomes a `MultiLoraLinear`: the base layer, unchanged, plus a bank of
`max_loras` adapter slots, each adapter's scale alpha / r folded into its B:

    A: (S, r, in)     B: (S, out, r)      r: the largest rank loaded (smaller ranks are zero-padded: exact)

Before a forward the caller says which slot each row of the batch uses (`LoraBank.set_rows`, None = the
base model); every wrapped layer then computes, for the n rows that have an adapter,

    y[rows] += (x[rows] A[s]^T) B[s]^T          two batched matmuls: (n, T, in) -> (n, T, r) -> (n, T, out)

so requests for different adapters and for the base model share one batch. A batch without adapter rows
runs the base layer alone; a slot whose adapter does not target a layer is zero there (adds nothing).
Layers are wrapped when the first adapter that targets them is loaded: a model serving no adapter is the
plain GPT. Training is model/lora.py's `LoraLinear`; this module is for inference only.

Plain torch: no Ray, no torch.distributed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class LoraWeights:
    """One adapter as a LoRA fine-tune trained it: A (r, in) and B (out, r) by the linear's module name
    ("blocks.0.attn.q_proj"); the update is alpha / rank * B @ A."""

    rank: int
    alpha: float
    layers: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class _Rows:
    """Which rows of the current batch use an adapter, shared by every wrapped layer of one model."""

    def __init__(self):
        self.rows: torch.Tensor | None = None  # (n,) batch rows with an adapter; None: no row has one
        self.slots: torch.Tensor | None = None  # (n,) their bank slots


class MultiLoraLinear(nn.Module):
    """A base linear (any module mapping (..., in) -> (..., out)) plus a bank of adapter slots."""

    def __init__(self, base: nn.Linear, max_loras: int, batch: _Rows):
        super().__init__()
        self.base, self.batch, self.max_loras = base, batch, max_loras
        self.in_features, self.out_features = base.in_features, base.out_features
        w = base.weight
        kw = dict(dtype=w.dtype if w.is_floating_point() else torch.float32, device=w.device)  # int8 base: float32
        self.register_buffer("lora_A", torch.zeros(max_loras, 0, self.in_features, **kw))
        self.register_buffer("lora_B", torch.zeros(max_loras, self.out_features, 0, **kw))

    @property
    def weight(self) -> torch.Tensor:  # the base weight (code that inspects a linear's weight still finds it)
        return self.base.weight

    def grow_rank(self, rank: int) -> None:
        """Zero-pad every slot to `rank` (x A^T gains zero columns, B zero columns: the product is unchanged)."""
        r = self.lora_A.shape[1]
        if rank > r:
            self.lora_A = nn.functional.pad(self.lora_A, (0, 0, 0, rank - r))  # (S, rank, in)
            self.lora_B = nn.functional.pad(self.lora_B, (0, rank - r))  # (S, out, rank)

    def set_slot(self, slot: int, a: torch.Tensor | None = None, b: torch.Tensor | None = None,
                 scale: float = 1.0) -> None:
        """Write A (r, in) and scale * B (out, r) into `slot` (None: clear it)."""
        self.lora_A[slot].zero_()
        self.lora_B[slot].zero_()
        if a is not None:
            r = a.shape[0]
            self.lora_A[slot, :r] = a.to(self.lora_A)
            self.lora_B[slot, :, :r] = (b.float() * scale).to(self.lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # (B, T, out)
        rows, slots = self.batch.rows, self.batch.slots
        if rows is None or self.lora_A.shape[1] == 0:
            return y
        xs = x.index_select(0, rows)  # (n, T, in)
        h = torch.bmm(xs, self.lora_A.index_select(0, slots).transpose(1, 2))  # (n, T, r)
        update = torch.bmm(h, self.lora_B.index_select(0, slots).transpose(1, 2))  # (n, T, out)
        return y.index_put_((rows,), update, accumulate=True)  # rows are distinct: y[rows] += update

    def extra_repr(self) -> str:
        return f"max_loras={self.max_loras}, rank={self.lora_A.shape[1]}"


class LoraBank:
    """The adapters loaded into `model` (at most `max_loras`), by name; `set_rows` before each forward."""

    def __init__(self, model: nn.Module, max_loras: int):
        self.model, self.max_loras = model, max_loras
        self.batch = _Rows()
        self.slots: dict[str, int] = {}  # name -> slot
        self.identity: dict[str, bytes] = {}  # name -> what this load is (prefix-cache hashes start from it)
        self._loads = 0
        self.layers: dict[str, MultiLoraLinear] = {}  # module name -> its wrapper
        self._device = next(model.parameters()).device

    def __contains__(self, name: str) -> bool:
        return name in self.slots

    def __len__(self) -> int:
        return len(self.slots)

    def load(self, name: str, weights: LoraWeights) -> None:
        """Put an adapter in a free slot. ValueError (one line) when every slot is taken, the name is loaded,
        or a layer it targets is missing or of another shape."""
        if name in self.slots:
            raise ValueError(f"LoRA adapter {name!r} is already loaded")
        free = sorted(set(range(self.max_loras)) - set(self.slots.values()))
        if not free:
            raise ValueError(f"all {self.max_loras} LoRA adapter slots are taken (max_loras)")
        layers = {path: self._layer(path) for path in weights.layers}  # checks every layer before writing any
        for path, (a, b) in weights.layers.items():
            layer = layers[path]
            if a.shape[1] != layer.in_features or b.shape[0] != layer.out_features or a.shape[0] != b.shape[1]:
                raise ValueError(f"{path}: adapter A {tuple(a.shape)}, B {tuple(b.shape)} do not fit the model's "
                                 f"linear ({layer.in_features} -> {layer.out_features})")
        slot = free[0]
        for path, (a, b) in weights.layers.items():
            layers[path].grow_rank(a.shape[0])
        for path, (a, b) in weights.layers.items():
            layers[path].set_slot(slot, a.to(self._device), b.to(self._device), weights.scale)
        self._loads += 1
        self.slots[name], self.identity[name] = slot, f"lora:{self._loads}:{name}".encode()

    def unload(self, name: str) -> None:
        slot = self.slots.pop(name)  # KeyError: not loaded
        del self.identity[name]
        for layer in self.layers.values():
            layer.set_slot(slot)

    def set_rows(self, names: list[str | None]) -> None:
        """The adapter of each row of the next forward's batch (None: the base model)."""
        picked = [(i, self.slots[n]) for i, n in enumerate(names) if n is not None]
        if not picked:
            self.batch.rows = self.batch.slots = None
            return
        rows, slots = zip(*picked)
        self.batch.rows = torch.tensor(rows, device=self._device)
        self.batch.slots = torch.tensor(slots, device=self._device)

    def _layer(self, path: str) -> MultiLoraLinear:
        """The wrapper of linear `path`, wrapping it at the first adapter that targets it."""
        if path in self.layers:
            return self.layers[path]
        parent_name, _, child = path.rpartition(".")
        try:
            parent = self.model.get_submodule(parent_name)
            base = getattr(parent, child)
        except AttributeError:
            raise ValueError(f"{path}: the adapter targets a layer the model does not have") from None
        if not hasattr(base, "in_features") or isinstance(base, MultiLoraLinear):
            raise ValueError(f"{path}: the adapter targets a layer that is not a linear")
        wrapper = MultiLoraLinear(base, self.max_loras, self.batch)  # all slots zero: earlier adapters skip it
        setattr(parent, child, wrapper)
        self.layers[path] = wrapper
        return wrapper
