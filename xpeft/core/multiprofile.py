"""One forward over a batch whose rows belong to different profiles (serving).

A profile is combined from the bank once (`xpeft.core.combine`: mask × bank → Â, B̂ per block) into a
`CombinedProfile` that a server caches; a mixed batch then stacks each row's Â/B̂ and runs the encoder once
with per-row batched matmuls (`layer.AdaptedLinear`), never one forward per profile. Heads are tiny next to
the encoder and run per group of rows that share one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from xpeft.core.encoder import encoder_blocks, mean_pool
from xpeft.core.layer import AdaptedLinear, Adapter, adapters, wrap_linear


@dataclass
class HeadWeights:
    """A stored head as plain tensors, applied functionally: what `Head` computes in eval mode, without
    building (and randomly initialising) an nn.Module for every profile a server reads."""

    kind: str  # 'linear' or 'pooler' (see `Head`)
    tensors: dict[str, torch.Tensor]

    @classmethod
    def checked(cls, kind: str, state: dict[str, torch.Tensor], d: int, num_labels: int) -> HeadWeights:
        """The head of `state`, or a ValueError naming what does not fit (before it can fail a batch)."""
        want = {"classifier.weight": (num_labels, d), "classifier.bias": (num_labels,)}
        if kind == "pooler":
            want |= {"dense.weight": (d, d), "dense.bias": (d,)}
        got = {k: tuple(v.shape) for k, v in state.items()}
        if got != want:
            raise ValueError(f"a {kind} head for d={d}, {num_labels} labels needs tensors {want}, got {got}")
        return cls(kind, dict(state))

    def to(self, device: torch.device | str) -> HeadWeights:
        return HeadWeights(self.kind, {k: v.to(device) for k, v in self.tensors.items()})

    def __call__(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        t = self.tensors
        if self.kind == "pooler":
            pooled = torch.tanh(F.linear(hidden[:, 0], t["dense.weight"], t["dense.bias"]))
        else:
            pooled = mean_pool(hidden, attention_mask)
        return F.linear(pooled, t["classifier.weight"], t["classifier.bias"])


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
    head_key: str  # rows with the same head_key share one head forward
    problem_type: str
    label_names: list[str] | None
    text_pair: bool | None = None  # fitted on text pairs (None: not recorded); the server checks requests by it
    created: float | None = None  # the stored record's timestamp: which version of the profile this is

    @property
    def nbytes(self) -> int:
        ts = [t for t in (self.A_hat, self.B_hat, self.ln_weight, self.ln_bias) if t is not None]
        return sum(t.numel() * t.element_size() for t in ts)


class MultiProfileModel(nn.Module):
    """A frozen encoder whose target linears take per-row adapters. Holds no profile of its own."""

    def __init__(self, encoder: nn.Module, target: str):
        super().__init__()
        self.encoder = encoder.eval()
        for p in encoder.parameters():
            p.requires_grad_(False)
        self.target = target
        self.adapted: list[AdaptedLinear] = [wrap_linear(block, target) for block in encoder_blocks(encoder)]
        self.d = encoder.config.hidden_size

    def _row_adapters(self, rows: list[CombinedProfile]) -> list[Adapter] | None:
        if all(p.A_hat is None for p in rows):
            return None
        ref = next(p for p in rows if p.A_hat is not None)
        b, d_in = ref.A_hat.shape[1:]
        d_out = ref.B_hat.shape[1]
        adapters = []
        for layer in range(len(self.adapted)):
            A = torch.stack(
                [p.A_hat[layer] if p.A_hat is not None else torch.zeros(b, d_in, device=ref.A_hat.device) for p in rows]
            )
            # B̂ = 0 switches the adapter off for head_only rows (and scale folds into B̂ per row).
            B = torch.stack(
                [
                    p.B_hat[layer] * p.scale if p.B_hat is not None else torch.zeros(d_out, b, device=ref.A_hat.device)
                    for p in rows
                ]
            )
            has_ln = [p.ln_weight is not None for p in rows]
            ln_w = ln_b = None
            if any(has_ln):
                # Rows without LN are single_adapter rows; they need the raw Âx, which LN would change, so a
                # batch mixing LN and non-LN adapters is split by the caller (see `forward_mixed`).
                ln_w = torch.stack([p.ln_weight[layer] for p in rows])
                ln_b = torch.stack([p.ln_bias[layer] for p in rows])
            adapters.append(Adapter(A, B, ln_w, ln_b))
        return adapters

    @torch.no_grad()
    def forward_mixed(self, batch: dict[str, torch.Tensor], rows: list[CombinedProfile]) -> list[torch.Tensor]:
        """Logits for each row of `batch`, row i under profile rows[i]. One encoder forward per kind of
        adapter present (with or without LayerNorm), whatever the number of profiles."""
        n = len(rows)
        if n != batch["input_ids"].shape[0]:
            raise ValueError(f"{n} profiles for {batch['input_ids'].shape[0]} rows")
        kinds: dict[bool, list[int]] = {}
        for i, p in enumerate(rows):
            kinds.setdefault(p.ln_weight is not None, []).append(i)
        hidden = torch.empty(n, batch["input_ids"].shape[1], self.d, device=batch["input_ids"].device)
        for idx in kinds.values():
            sub = {k: v[idx] for k, v in batch.items()}
            with adapters(self.adapted, self._row_adapters([rows[i] for i in idx])):
                hidden[idx] = self.encoder(**sub).last_hidden_state
        logits: list[torch.Tensor | None] = [None] * n
        groups: dict[str, list[int]] = {}
        for i, p in enumerate(rows):
            groups.setdefault(p.head_key, []).append(i)
        for idx in groups.values():
            out = rows[idx[0]].head(hidden[idx], batch["attention_mask"][idx])
            for j, i in enumerate(idx):
                logits[i] = out[j]
        return logits
