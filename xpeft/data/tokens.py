"""Rows of text → token rows → batches: what the fit loop and the serving engine both feed the encoder.

`tokenize` gives each row its token ids without padding; `Collator` makes a batch of token rows either padded to
the longest row (what the serving engine runs) or packed (`pack_length`): the rows laid out back to back into a
few sequences of at most `pack_length` tokens (`pack_rows`), with the layout (`xpeft.core.packing.Packing`) that
lets the model compute exactly what the padded batch gives (block-diagonal attention, positions from 0 per row).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable

import numpy as np
import torch

from xpeft.core.packing import Packing

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def tokenize(examples: Iterable[dict] | object, tokenizer, max_length: int) -> list[dict]:
    """Rows with `text` (and `text_pair`, `label`) → token ids without padding (padding is per batch).

    Accepts a `datasets.Dataset` or any iterable of dicts."""
    rows = []
    for ex in examples:
        pair = ex.get("text_pair") or None
        enc = tokenizer(ex["text"], pair, truncation=True, max_length=max_length)
        row = {k: enc[k] for k in MODEL_INPUTS if k in enc}
        if ex.get("label") is not None:
            row["labels"] = ex["label"]
        rows.append(row)
    return rows


def pack_rows(lengths: list[int], pack_length: int) -> list[list[int]]:
    """The rows of a batch (by their lengths) as sequences of row indices, each sequence's rows in batch order:
    first-fit decreasing into sequences of at most `pack_length` tokens (a longer row gets one of its own), then,
    where it comes out narrower, the same number of sequences filled longest row first into the shortest so far,
    so they are about equally long (the packed batch is as wide as its longest sequence). Which row sits where
    changes nothing the model computes."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    first_fit: list[list[int]] = []
    for i in order:
        fits = (p for p in first_fit if sum(lengths[j] for j in p) + lengths[i] <= pack_length)
        pack = next(fits, None)
        if pack is None:
            pack = []
            first_fit.append(pack)
        pack.append(i)
    loads = [(0, p) for p in range(len(first_fit))]  # a heap of (tokens so far, sequence)
    balanced: list[list[int]] = [[] for _ in first_fit]
    for i in order:
        used, p = heapq.heappop(loads)
        balanced[p].append(i)
        heapq.heappush(loads, (used + lengths[i], p))
    packs = min(balanced, first_fit, key=lambda packs: max(sum(lengths[i] for i in p) for p in packs))
    return [sorted(p) for p in packs]


class Collator:
    """Batches of token rows: padded to the longest row, or packed (`pack_length`, see the module). Labels and
    other per-row keys (e.g. the mtl warm start's `profile_index`) become tensors as they are, one per row."""

    def __init__(self, pad_token_id: int = 0, pack_length: int | None = None):
        if pack_length is not None and pack_length < 1:
            raise ValueError(f"pack_length must be >= 1 token (or None: pad), got {pack_length}")
        self.pad = pad_token_id
        self.pack_length = pack_length

    def __call__(self, rows: list[dict]) -> dict:
        batch = self.packed(rows) if self.pack_length is not None else self.padded(rows)
        if "labels" in rows[0]:
            labels = [r["labels"] for r in rows]
            dtype = torch.float if isinstance(labels[0], float) else torch.long
            batch["labels"] = torch.tensor(labels, dtype=dtype)
        for key in rows[0].keys() - set(MODEL_INPUTS) - {"labels"}:
            batch[key] = torch.tensor([r[key] for r in rows])
        return batch

    def padded(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        T = max(len(r["input_ids"]) for r in rows)
        batch = {}
        for key in MODEL_INPUTS:
            if key not in rows[0]:
                continue
            fill = self.pad if key == "input_ids" else 0
            batch[key] = torch.tensor([list(r[key]) + [fill] * (T - len(r[key])) for r in rows], dtype=torch.long)
        return batch

    def packed(self, rows: list[dict]) -> dict:
        """input_ids (token_type_ids) and attention_mask of the packed sequences, and their `packing`."""
        lengths = [len(r["input_ids"]) for r in rows]
        packs = pack_rows(lengths, self.pack_length)
        P, W, R, T = len(packs), max(sum(lengths[i] for i in p) for p in packs), len(rows), max(lengths)
        keys = [k for k in ("input_ids", "token_type_ids") if k in rows[0]]
        seq = {k: np.full((P, W), self.pad if k == "input_ids" else 0, dtype=np.int64) for k in keys}
        positions, segments, repack = (np.zeros((P, W), dtype=np.int64) for _ in range(3))
        unpack, row_mask = np.zeros((R, T), dtype=np.int64), np.zeros((R, T), dtype=np.int64)
        for p, members in enumerate(packs):
            start = 0
            for s, r in enumerate(members, start=1):
                n = lengths[r]
                at = slice(start, start + n)
                for k in keys:
                    seq[k][p, at] = rows[r][k]
                given = rows[r].get("attention_mask")
                mask = np.ones(n, dtype=np.int64) if given is None else np.asarray(given, dtype=np.int64)
                positions[p, at] = np.arange(n)
                # A token the row masks out (none, from `tokenize`) is padding: no row token attends to it.
                segments[p, at] = s * mask
                unpack[r] = p * W + start
                unpack[r, :n] = np.arange(p * W + start, p * W + start + n)
                repack[p, at] = np.arange(r * T, r * T + n)
                row_mask[r, :n] = mask
                start += n
        tensors = [torch.from_numpy(a) for a in (positions, segments, unpack, repack, row_mask)]
        batch: dict = {k: torch.from_numpy(v) for k, v in seq.items()}
        return {**batch, "attention_mask": tensors[1].gt(0).long(), "packing": Packing(*tensors)}
