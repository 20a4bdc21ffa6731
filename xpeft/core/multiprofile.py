"""One forward over a batch whose rows belong to different profiles (serving).

A profile is combined from the bank once (`xpeft.core.combine`: mask × bank → Â, B̂ per block) into a
`CombinedProfile` that a server caches. A mixed batch then stacks each row's adapter (`RowAdapters`, the one
per-row stack) and runs the encoder once with per-row batched matmuls (`MultiProfileModel.encode_rows`, which
is also what the exported ONNX graph computes), never one forward per profile nor one per kind of adapter; then
every row's head at once (`xpeft.core.head.row_heads`).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from xpeft.core.encoder import encoder_blocks
from xpeft.core.families import resolve_target, token_inputs
from xpeft.core.head import HeadWeights, row_heads
from xpeft.core.layer import AdaptedLinear, Adapter, adapters, wrap_linear

ROW_INPUTS = ("A_hat", "B_hat", "ln_weight", "ln_bias", "use_ln")  # what `RowAdapters.gather` stacks, in order


@dataclass
class CombinedProfile:
    """A profile ready to serve: its per-block adapters already combined from the bank, and its head."""

    profile_id: str
    A_hat: torch.Tensor | None  # L × b × d_in (None: head_only)
    B_hat: torch.Tensor | None  # L × d_out × b
    ln_weight: torch.Tensor | None  # L × b
    ln_bias: torch.Tensor | None
    scale: float
    head: HeadWeights
    head_key: str  # rows with the same head_key share one head
    problem_type: str
    label_names: list[str] | None
    text_pair: bool | None = None  # fitted on text pairs (None: not recorded); the server checks requests by it
    created: float | None = None  # the stored record's timestamp: which version of the profile this is

    @property
    def nbytes(self) -> int:
        ts = [t for t in (self.A_hat, self.B_hat, self.ln_weight, self.ln_bias) if t is not None]
        return sum(t.numel() * t.element_size() for t in ts)

    @property
    def b(self) -> int | None:
        """The adapter width (None: head_only, no adapter)."""
        return None if self.A_hat is None else int(self.A_hat.shape[1])


class _Row(NamedTuple):
    """One profile's row inputs (A, B None: head_only; w, beta None: no LN)."""

    A: np.ndarray | torch.Tensor | None
    B: np.ndarray | torch.Tensor | None
    w: np.ndarray | torch.Tensor | None
    beta: np.ndarray | torch.Tensor | None


class RowAdapters:
    """Each row's adapter for a batch mixing profiles, stacked as the per-row encoder takes them:

        A_hat      [R, L, b, d_in]   zeros for head_only rows
        B_hat      [R, L, d_out, b]  the LoRA scale folded in; zeros for head_only rows
        ln_weight  [R, L, b]         ones where a row has no LN (unused there)
        ln_bias    [R, L, b]
        use_ln     [R]               LayerNorm after Âx for this row

    On CPU as numpy, for both forwards (ONNX Runtime takes numpy; the eager one wraps it, zero-copy): a profile's
    arrays are views of its tensors made on its first batch and kept while it lives (they go with it when the
    combined cache lets it go), so a batch costs one np.stack per input and no torch op per row, none of them
    waiting for the GIL. On a GPU as torch tensors there. (A preallocated pool gathered with one np.take per input
    was measured against this: BENCHMARKS.md, "the ORT forward".)"""

    def __init__(self, L: int, d_in: int, d_out: int, device: torch.device | str = "cpu"):
        self.L, self.d_in, self.d_out = L, d_in, d_out
        self.device = torch.device(device)
        self.numpy = self.device.type == "cpu"
        self._kept: dict[int, _Row] = {}

    def of(self, c: CombinedProfile) -> _Row:
        row = self._kept.get(id(c))
        if row is None:
            row = _Row(self._own(c.A_hat), self._own(c.B_hat, c.scale), self._own(c.ln_weight), self._own(c.ln_bias))
            self._kept[id(c)] = row
            weakref.finalize(c, self._kept.pop, id(c), None)  # before its id can be reused
        return row

    def _own(self, t: torch.Tensor | None, scale: float = 1.0):
        """A view of a combined (float32, no-grad) tensor; scaled, a copy."""
        if t is None:
            return None
        if self.numpy:  # no torch op: none waits for the GIL
            return t.numpy() if scale == 1.0 else t.numpy() * np.float32(scale)
        return t if scale == 1.0 else t * scale

    def gather(self, rows: list[CombinedProfile], default_b: int = 1) -> dict[str, np.ndarray | torch.Tensor]:
        """The batch's inputs (ROW_INPUTS), row i under rows[i]; `default_b` is the adapter width when every row
        is head_only. A batch has one b: rows of different b cannot share a batched matmul (the engine splits
        them)."""
        got = [self.of(c) for c in rows]
        widths = {r.A.shape[1] for r in got if r.A is not None}
        if len(widths) > 1:
            raise ValueError(f"rows of adapter widths {sorted(widths)} in one batch; forward each width apart")
        b = int(next(iter(widths), default_b))
        L, d_in, d_out = self.L, self.d_in, self.d_out
        if self.numpy:
            stack, use_ln = np.stack, np.array([r.w is not None for r in got])
            no_A, no_B = np.zeros((L, b, d_in), np.float32), np.zeros((L, d_out, b), np.float32)
            ones, zeros = np.ones((L, b), np.float32), np.zeros((L, b), np.float32)
        else:
            stack, use_ln = torch.stack, torch.tensor([r.w is not None for r in got], device=self.device)
            no_A, no_B = torch.zeros(L, b, d_in, device=self.device), torch.zeros(L, d_out, b, device=self.device)
            ones, zeros = torch.ones(L, b, device=self.device), torch.zeros(L, b, device=self.device)
        return {
            "A_hat": stack([no_A if r.A is None else r.A for r in got]),
            "B_hat": stack([no_B if r.B is None else r.B for r in got]),
            "ln_weight": stack([ones if r.w is None else r.w for r in got]),
            "ln_bias": stack([zeros if r.beta is None else r.beta for r in got]),
            "use_ln": use_ln,
        }


class MultiProfileModel(nn.Module):
    """A frozen encoder whose target linears take per-row adapters. Holds no profile of its own."""

    def __init__(self, encoder: nn.Module, target: str):
        super().__init__()
        self.encoder = encoder.eval()
        for p in encoder.parameters():
            p.requires_grad_(False)
        self.target = resolve_target(encoder, target)  # the linear's path (a meaning resolved for the family)
        self.token_inputs = token_inputs(encoder)
        self.adapted: list[AdaptedLinear] = [wrap_linear(block, self.target) for block in encoder_blocks(encoder)]
        self.d = encoder.config.hidden_size
        lin = self.adapted[0]
        self.L, self.d_in, self.d_out = len(self.adapted), lin.in_features, lin.out_features
        self._rows: RowAdapters | None = None

    def encode_rows(
        self,
        tokens: dict[str, torch.Tensor],
        A_hat: torch.Tensor,
        B_hat: torch.Tensor,
        ln_weight: torch.Tensor,
        ln_bias: torch.Tensor,
        use_ln: torch.Tensor,
    ) -> torch.Tensor:
        """The last hidden state, row r under its own adapter (the inputs of `RowAdapters`), in one encoder pass
        whatever the mix of modes: `use_ln` switches the LayerNorm per row. The exported graph is this method."""
        ln_rows = use_ln.reshape(-1, 1, 1)
        per_block = [
            Adapter(A_hat[:, i], B_hat[:, i], ln_weight[:, i], ln_bias[:, i], ln_rows=ln_rows) for i in range(self.L)
        ]
        with adapters(self.adapted, per_block):  # only the token inputs this encoder takes (no type ids for some)
            return self.encoder(**{k: v for k, v in tokens.items() if k in self.token_inputs}).last_hidden_state

    def row_adapters(self, device: torch.device) -> RowAdapters:
        if self._rows is None or self._rows.device != device:
            self._rows = RowAdapters(self.L, self.d_in, self.d_out, device)
        return self._rows

    @torch.no_grad()
    def forward_mixed(self, batch: dict[str, torch.Tensor], rows: list[CombinedProfile]) -> list[torch.Tensor]:
        """Logits for each row of `batch`, row i under profile rows[i]: one encoder pass, then every head."""
        if len(rows) != batch["input_ids"].shape[0]:
            raise ValueError(f"{len(rows)} profiles for {batch['input_ids'].shape[0]} rows")
        device = batch["input_ids"].device
        inputs = self.row_adapters(device).gather(rows)
        hidden = self.encode_rows(batch, **{k: torch.as_tensor(v, device=device) for k, v in inputs.items()})
        return row_heads(hidden, batch["attention_mask"], [c.head for c in rows], [c.head_key for c in rows])
