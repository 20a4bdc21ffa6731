"""The wrapped linear: y = W x + B̂ · LN(Â x).

Weights first: Â (b × d_in) and B̂ (d_out × b) are combined from the bank before the forward (mask × bank,
in `xpeft.core.model`), so each token meets one low-rank adapter whatever N is, never N of them.

An `Adapter` holds the combined tensors for one forward. Unbatched (Â: b×d_in) it serves a whole batch of
one profile (training); per row (Â: R×b×d_in) every row of the batch has its own adapter (serving a batch
that mixes profiles), computed with batched matmuls, as PEFT's Poly tuner does for its per-task LoRAs.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from xpeft.core.packing import Packing, repack, unpack


@dataclass
class Adapter:
    """A combined adapter for one forward. Per-row when A_hat has a leading row dimension."""

    A_hat: torch.Tensor  # b × d_in, or R × b × d_in
    B_hat: torch.Tensor  # d_out × b, or R × d_out × b
    ln_weight: torch.Tensor | None = None  # b, or R × b; None: no LayerNorm after Â
    ln_bias: torch.Tensor | None = None
    scale: float = 1.0
    ln_eps: float = 1e-5
    # Per row only: R × 1 × 1 bools, LayerNorm for the rows where True and the raw Âx elsewhere, so rows with
    # and without LN share one forward (the exported serving graph, xpeft.serve.onnx_graph). None: every row.
    ln_rows: torch.Tensor | None = None
    # Per row only: the layout of a packed batch (xpeft.core.packing), whose sequences hold several rows: the
    # per-row matmuls run on the rows' tokens unpacked, and their output is packed back. None: one row a sequence.
    packing: Packing | None = None

    @property
    def per_row(self) -> bool:
        return self.A_hat.dim() == 3


class AdaptedLinear(nn.Module):
    """A frozen `nn.Linear` plus whatever adapter the model sets for the current forward. With `part` (i, n) the
    adapter adds to the i-th of n equal parts of the outputs only (a fused projection's value rows, say), and
    `out_features` is that part's."""

    def __init__(self, base: nn.Linear, part: tuple[int, int] | None = None):
        super().__init__()
        self.base = base
        self.adapter: Adapter | None = None
        self.part = part
        if part is not None and base.out_features % part[1]:
            raise ValueError(f"a linear of {base.out_features} outputs has no {part[1]} equal parts")

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features if self.part is None else self.base.out_features // self.part[1]

    def _into_part(self, delta: torch.Tensor) -> torch.Tensor:
        """The adapter's output placed at its part of the base's outputs (zeros elsewhere)."""
        if self.part is None:
            return delta
        size = self.out_features
        return F.pad(delta, (self.part[0] * size, self.base.out_features - (self.part[0] + 1) * size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        a = self.adapter
        if a is None:
            return out
        if a.per_row:
            # x: R × T × d_in (a packed batch's P × W × d_in, unpacked to it); each row r uses its own Â_r, B̂_r.
            if a.packing is not None:
                x = unpack(x, a.packing)
            h = torch.bmm(x, a.A_hat.transpose(1, 2))
            if a.ln_weight is not None:
                # int(): b as a constant, which the ONNX exporter's LayerNormalization needs (b is static there)
                normed = F.layer_norm(h, (int(h.shape[-1]),), eps=a.ln_eps)
                normed = normed * a.ln_weight.unsqueeze(1) + a.ln_bias.unsqueeze(1)
                h = normed if a.ln_rows is None else torch.where(a.ln_rows, normed, h)
            delta = torch.bmm(h, a.B_hat.transpose(1, 2))
            if a.packing is not None:
                delta = repack(delta, a.packing)
        else:
            h = F.linear(x, a.A_hat)
            if a.ln_weight is not None:
                h = F.layer_norm(h, h.shape[-1:], a.ln_weight, a.ln_bias, eps=a.ln_eps)
            delta = F.linear(h, a.B_hat)
        return out + a.scale * self._into_part(delta)


@contextmanager
def adapters(
    modules: Sequence[AdaptedLinear], per_block: Sequence[Adapter] | None, keep: bool = False
) -> Iterator[None]:
    """Set one adapter per block for the forwards inside the block, and clear them after (as PEFT's
    `_enable_peft_forward_hooks`), so no adapter outlives its call or leaks into another profile's forward.

    `keep=True` leaves them set: a training forward's autograd graph holds the combined tensors anyway, and
    gradient checkpointing re-runs the blocks' forwards during `backward()`, after this forward returned, so
    they must still find their adapter then (the next forward replaces it)."""
    if per_block is not None and len(per_block) != len(modules):
        raise ValueError(f"{len(per_block)} adapters for {len(modules)} adapted blocks")
    for i, module in enumerate(modules):
        module.adapter = None if per_block is None else per_block[i]
    try:
        yield
    finally:
        if not keep:
            for module in modules:
                module.adapter = None


def get_submodule_parent(root: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    return parent, name


def find_linear(block: nn.Module, target: str) -> nn.Linear | AdaptedLinear:
    """`block.<target>`: an nn.Linear, or the AdaptedLinear already wrapping one; a ValueError naming the
    block's linears when there is no such linear."""
    try:
        module = block.get_submodule(target)
    except AttributeError:
        linears = [n for n, m in block.named_modules() if isinstance(m, nn.Linear)]
        raise ValueError(
            f"target {target!r} is not a module of this encoder's blocks; linears there are {linears}"
        ) from None
    if not isinstance(module, nn.Linear | AdaptedLinear):
        raise ValueError(f"target {target!r} is a {type(module).__name__}, not an nn.Linear")
    return module


def wrap_linear(block: nn.Module, target: str) -> AdaptedLinear:
    """Replace `block.<target>` (an nn.Linear; a resolved target, `xpeft.core.families`, so possibly a part of a
    fused one, `attn.Wqkv[2/3]`) by an AdaptedLinear around it, in place."""
    from xpeft.core.families import split_target

    path, part = split_target(target)
    module = find_linear(block, path)
    if isinstance(module, AdaptedLinear):
        if module.part != part:
            raise ValueError(f"{path} is already adapted on part {module.part}, not {part}")
        return module
    parent, name = get_submodule_parent(block, path)
    wrapped = AdaptedLinear(module, part)
    setattr(parent, name, wrapped)
    return wrapped
