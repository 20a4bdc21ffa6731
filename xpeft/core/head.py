"""The task head, written once: `head_forward` is what fitting (`Head`, an nn.Module with parameters), the eager
mixed-profile forward and the ONNX Runtime forward (`row_heads`: a head per row, stacked) all compute, so a new
head kind is added here and every path has it.

'pooler' is the paper's head: BERT's pooler (dense + tanh on [CLS], initialised from the encoder's pretrained
pooler; an encoder without one is refused it, `xpeft.core.model.encoder_pooler`) and a classifier (Table 4 counts
d·d + d + d·c + c). 'linear' is a small head for the profile farm: mean-pooled tokens and a classifier (d·c + c).
'cls' reads the first token's state, [CLS] (ModernBERT's `classifier_pooling="cls"`), into a classifier (d·c + c). A
head's tensors are named as in `Head`'s state dict (`dense.weight`, `dense.bias`, `classifier.weight`,
`classifier.bias`), which is also how profiles store them: one head's (`classifier.weight` c × d) for a batch of one
profile, or one per row (R × c × d).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from xpeft.core.encoder import mean_pool

HEAD_KINDS = ("pooler", "linear", "cls")


def row_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x·Wᵀ + b for x (R × d_in), with one W for every row (d_out × d_in) or a W per row (R × d_out × d_in)."""
    if weight.dim() == 2:
        return F.linear(x, weight, bias)
    return torch.baddbmm(bias.unsqueeze(2), weight, x.unsqueeze(2)).squeeze(2)


def head_forward(
    kind: str,
    tensors: dict[str, torch.Tensor],
    hidden: torch.Tensor,
    attention_mask: torch.Tensor,
    dropout: nn.Module | None = None,
) -> torch.Tensor:
    """Logits (R × c) from the encoder's last hidden state (R × T × d) under the head of `kind` with `tensors`:
    one head's, or one per row (see the module's docstring)."""
    if kind == "pooler":
        pooled = torch.tanh(row_linear(hidden[:, 0], tensors["dense.weight"], tensors["dense.bias"]))
    elif kind == "cls":
        pooled = hidden[:, 0]
    else:
        pooled = mean_pool(hidden, attention_mask)
    if dropout is not None:
        pooled = dropout(pooled)
    return row_linear(pooled, tensors["classifier.weight"], tensors["classifier.bias"])


class Head(nn.Module):
    """The head a fit trains: `head_forward` over its own parameters (and dropout before the classifier)."""

    def __init__(self, kind: str, d: int, num_labels: int, dropout: float, pretrained_pooler: nn.Module | None):
        super().__init__()
        self.kind = kind
        self.dense = nn.Linear(d, d) if kind == "pooler" else None
        if self.dense is not None and pretrained_pooler is not None:
            self.dense.load_state_dict(pretrained_pooler.dense.state_dict())
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(d, num_labels)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return head_forward(self.kind, dict(self.named_parameters()), hidden, attention_mask, self.dropout)


@dataclass
class HeadWeights:
    """A stored head as plain tensors: what a server holds per profile, without building (and randomly
    initialising) an nn.Module for every profile it reads. Calling it is `head_forward` in eval mode."""

    kind: str  # one of HEAD_KINDS
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

    @property
    def num_labels(self) -> int:
        return int(self.tensors["classifier.bias"].shape[0])

    def to(self, device: torch.device | str) -> HeadWeights:
        return HeadWeights(self.kind, {k: v.to(device) for k, v in self.tensors.items()})

    def __call__(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return head_forward(self.kind, self.tensors, hidden, attention_mask)


def row_heads(
    hidden: torch.Tensor, attention_mask: torch.Tensor, heads: Sequence[HeadWeights], keys: Sequence[str]
) -> list[torch.Tensor]:
    """Each row's logits under its own head (`heads[i]`; rows with the same `keys[i]` share one): `head_forward`
    once per head kind present, with the heads stacked per row. That is a fixed handful of torch ops whatever the
    number of rows and profiles (a head call per profile is ~6 ops each, and every op beside a busy event loop is
    a wait for the GIL). Classifiers of different sizes are zero-padded to the largest and cut back."""
    by_key = dict(zip(keys, heads, strict=True))  # in order of first appearance (a key names one head)
    slot = {k: i for i, k in enumerate(by_key)}
    distinct = list(by_key.values())
    kinds = sorted({h.kind for h in distinct})
    device = hidden.device
    if len(kinds) == 1:
        which = torch.tensor([slot[k] for k in keys], device=device)
        logits = head_forward(kinds[0], _stacked(distinct, which), hidden, attention_mask)
    else:  # rows of each kind apart, then back in their places
        logits = hidden.new_zeros(len(keys), max(h.num_labels for h in distinct))
        for kind in kinds:
            rows = [i for i, k in enumerate(keys) if distinct[slot[k]].kind == kind]
            mine = list(dict.fromkeys(slot[keys[i]] for i in rows))
            which = torch.tensor([mine.index(slot[keys[i]]) for i in rows], device=device)
            at = torch.tensor(rows, device=device)
            out = head_forward(kind, _stacked([distinct[j] for j in mine], which), hidden[at], attention_mask[at])
            logits = logits.index_copy(0, at, F.pad(out, (0, logits.shape[1] - out.shape[1])))
    classes = [h.num_labels for h in distinct]
    num_labels = [classes[slot[k]] for k in keys]
    if len(set(num_labels)) == 1:
        return list(logits.unbind(0))
    if device.type != "cpu":
        return [logits[i, :n] for i, n in enumerate(num_labels)]
    cut = logits.numpy()  # per-row cuts of one array, not a torch op per row
    return [torch.from_numpy(cut[i, :n]) for i, n in enumerate(num_labels)]


def _stacked(heads: list[HeadWeights], which: torch.Tensor) -> dict[str, torch.Tensor]:
    """The heads' tensors stacked (classifiers zero-padded to the most classes), then one per row (`which`)."""
    return {name: pad_sequence([h.tensors[name] for h in heads], batch_first=True)[which] for name in heads[0].tensors}
