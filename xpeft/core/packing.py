"""Packed batches: a batch's rows laid out back to back in a few sequences instead of each padded to the longest.

Short rows waste most of a padded batch (SST-2 rows average ~14 tokens; random batches of 32 pad to ~41 a row).
Packed, the encoder sees each row exactly as it would alone: attention is block-diagonal (a token attends only
to its own row's tokens; padding only to padding), positions restart at 0 for every row, and each row keeps its
token type ids. After the encoder one gather (`unpack`) puts every row's token states back into the padded
[rows, T, d] layout with its row mask, so the head and the loss see what a padded batch gives them. In exact
arithmetic packed == padded; the fit loop checks it on the model before it packs (xpeft.fit.batching).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class Packing:
    """Where each row's tokens sit in a packed batch of P sequences of W tokens (R rows, the longest T)."""

    position_ids: torch.Tensor  # P × W: each row's positions from 0; 0 on padding
    segments: torch.Tensor  # P × W: 1, 2, … for the rows of a sequence; 0 on padding
    unpack: torch.Tensor  # R × T: flat index into P·W of row r's token t (past the row's end: its first token)
    repack: torch.Tensor  # P × W: flat index into R·T of the row token at each packed position (0 on padding)
    row_mask: torch.Tensor  # R × T: 1 on each row's tokens (the padded batch's attention_mask)

    def to(self, device: torch.device | str) -> Packing:
        return Packing(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    @property
    def rows(self) -> int:
        return self.row_mask.shape[0]


def unpack(packed: torch.Tensor, packing: Packing) -> torch.Tensor:
    """P × W × … → R × T × …: each row's token states in the padded layout (one gather)."""
    return packed.flatten(0, 1)[packing.unpack]


def repack(rows: torch.Tensor, packing: Packing) -> torch.Tensor:
    """R × T × … → P × W × …: the inverse of `unpack` on every packed position that holds a row's token."""
    return rows.flatten(0, 1)[packing.repack]


def block_diagonal_mask(segments: torch.Tensor, implementation: str) -> torch.Tensor:
    """The 4D attention mask of a packed batch (P × 1 × W × W) in the form the encoder's attention takes as is:
    boolean (True: attend) for `sdpa`, additive for `eager`. Padding attends to padding, so no query row is
    empty (an empty one is NaN in softmax, and NaN reaches the gradients)."""
    same = segments[:, None, :, None] == segments[:, None, None, :]
    if implementation == "sdpa":
        return same
    if implementation == "eager":
        return torch.zeros(same.shape, device=segments.device).masked_fill_(~same, torch.finfo(torch.float32).min)
    raise ValueError(
        f"packed batches need an explicit 4D attention mask, which attention implementation {implementation!r} "
        "does not take; load the encoder with attn_implementation='sdpa' or 'eager', or fit with --no-packing"
    )


def encode_packed(encoder: torch.nn.Module, input_ids, token_type_ids, packing: Packing) -> torch.Tensor:
    """The encoder's last hidden states of a packed batch, unpacked to R × T × d."""
    implementation = getattr(encoder.config, "_attn_implementation", None) or "eager"
    kwargs = {
        "input_ids": input_ids,
        "attention_mask": block_diagonal_mask(packing.segments, implementation),
        "position_ids": packing.position_ids,
    }
    if token_type_ids is not None:
        kwargs["token_type_ids"] = token_type_ids
    return unpack(encoder(**kwargs).last_hidden_state, packing)
