"""The replica's forward: logits for a batch whose rows belong to any profiles, with two implementations.

    forward(batch, rows) -> one logits tensor per row   (batch: the collated tokens, rows: CombinedProfiles)

- `OrtForward` ('ort', the CPU default): the encoder as one ONNX Runtime call per batch (the graph of
  `xpeft.serve.onnx_graph`, per-row adapters as inputs), then every head of the batch in a fixed handful of
  torch ops (`batched_heads`). `session.run` holds the GIL for about one handoff a forward, where the eager
  forward takes it back after each of its few hundred torch ops: beside the busy event loops of a Serve replica
  that made the eager forward twice as slow as the same forward alone (BENCHMARKS.md, "the GIL").
- `EagerForward` ('eager'): `MultiProfileModel.forward_mixed` op by op in torch. The only one on CUDA
  (untested: the development machine has no GPU), and the reference the ORT forward is tested against.

Torch and ONNX Runtime only: no Ray, no HTTP.
"""

from __future__ import annotations

import logging
import time
import weakref
from typing import NamedTuple

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence

from xpeft.core.encoder import mean_pool
from xpeft.core.multiprofile import CombinedProfile, MultiProfileModel
from xpeft.data.tokens import MODEL_INPUTS
from xpeft.serve.onnx_graph import cached_graph, open_session

log = logging.getLogger(__name__)

FORWARDS = ("auto", "ort", "eager")


class EagerForward:
    """`MultiProfileModel.forward_mixed`: one encoder pass per kind of adapter (with / without LN), one head
    call per profile."""

    name = "eager"

    def __init__(self, model: MultiProfileModel):
        self.model = model

    def __call__(self, batch: dict[str, torch.Tensor], rows: list[CombinedProfile]) -> list[torch.Tensor]:
        return self.model.forward_mixed(batch, rows)


class OrtForward:
    """The encoder in ONNX Runtime, one session per adapter width b (exported or loaded on first use of that
    b; in practice only the bank's), and the heads batched."""

    name = "ort"

    def __init__(self, model: MultiProfileModel, token_names: tuple[str, ...], threads: int, cache_dir=None):
        self.model = model
        self.token_names = token_names
        self.threads = threads
        self.cache_dir = cache_dir
        lin = model.adapted[0]
        self.L, self.d_in, self.d_out = len(model.adapted), lin.in_features, lin.out_features
        self._sessions: dict[int, object] = {}
        self.inputs = RowInputs(self.L, self.d_in, self.d_out)
        self.exported: list[int] = []  # the b whose graph this forward exported (not found in the cache)
        self.setup_seconds = 0.0  # fingerprint + export or verified load + session creation

    def prepare(self, b: int) -> None:
        """Export (or load from the cache) the graph for adapter width b and open its session."""
        if b in self._sessions:
            return
        start = time.perf_counter()
        graph, exported = cached_graph(self.model.encoder, self.model.target, b, self.token_names, self.cache_dir)
        self._sessions[b] = open_session(graph, self.threads)
        if exported:
            self.exported.append(b)
        self.setup_seconds += time.perf_counter() - start

    def __call__(self, batch: dict[str, torch.Tensor], rows: list[CombinedProfile]) -> list[torch.Tensor]:
        missing = [n for n in self.token_names if n not in batch]
        if missing:
            raise ValueError(f"the batch lacks the token inputs {missing} the encoder graph was exported with")
        per_row = [self.inputs.of(c) for c in rows]
        b = next((r.b for r in per_row if r.b is not None), None) or next(iter(self._sessions), 1)
        self.prepare(b)
        feeds = {n: batch[n].numpy() for n in self.token_names} | self.inputs.gather(per_row, b)
        (hidden,) = self._sessions[b].run(None, feeds)
        return batched_heads(torch.from_numpy(hidden), batch["attention_mask"], rows, [r.num_labels for r in per_row])


class _Row(NamedTuple):
    """One profile's graph inputs as numpy (A, B None: head_only; w, beta None: no LN)."""

    A: np.ndarray | None
    B: np.ndarray | None
    w: np.ndarray | None
    beta: np.ndarray | None
    num_labels: int

    @property
    def b(self) -> int | None:
        return None if self.A is None else self.A.shape[1]


def _numpy(t: torch.Tensor | None, scale: float = 1.0) -> np.ndarray | None:
    """A view of a (CPU, float32, no-grad: combined) tensor; scaled, a copy. No torch op: none waits for the GIL."""
    if t is None:
        return None
    return t.numpy() if scale == 1.0 else t.numpy() * np.float32(scale)


class RowInputs:
    """Each profile's graph inputs as numpy, made on its first forward and kept while the profile lives (they
    go with it when the combined cache lets it go): a forward then gathers them with one np.stack per input
    and no torch op per row. Â, LN are zero-copy views of the profile's tensors; B̂ too unless a LoRA scale
    must be folded in. (A preallocated pool gathered with one np.take per input was measured against this:
    BENCHMARKS.md, "the ORT forward".)"""

    def __init__(self, L: int, d_in: int, d_out: int):
        self.L, self.d_in, self.d_out = L, d_in, d_out
        self._kept: dict[int, _Row] = {}

    def of(self, c: CombinedProfile) -> _Row:
        row = self._kept.get(id(c))
        if row is None:
            row = _Row(
                _numpy(c.A_hat),
                _numpy(c.B_hat, c.scale),
                _numpy(c.ln_weight),
                _numpy(c.ln_bias),
                num_labels=int(c.head.tensors["classifier.bias"].shape[0]),
            )
            self._kept[id(c)] = row
            weakref.finalize(c, self._kept.pop, id(c), None)  # before its id can be reused
        return row

    def gather(self, rows: list[_Row], b: int) -> dict[str, np.ndarray]:
        L, d_in, d_out = self.L, self.d_in, self.d_out
        no_A, no_B = np.zeros((L, b, d_in), np.float32), np.zeros((L, d_out, b), np.float32)
        ones, zeros = np.ones((L, b), np.float32), np.zeros((L, b), np.float32)
        return {
            "A_hat": np.stack([no_A if r.A is None else r.A for r in rows]),
            "B_hat": np.stack([no_B if r.B is None else r.B for r in rows]),
            "ln_weight": np.stack([ones if r.w is None else r.w for r in rows]),
            "ln_bias": np.stack([zeros if r.beta is None else r.beta for r in rows]),
            "use_ln": np.array([r.w is not None for r in rows]),
        }


def batched_heads(
    hidden: torch.Tensor, attention_mask: torch.Tensor, rows: list[CombinedProfile], num_labels: list[int]
) -> list[torch.Tensor]:
    """Each row's logits under its profile's head (`HeadWeights`; `num_labels[i]` classes for row i), in a
    fixed handful of torch ops whatever the number of rows and profiles: a head call per profile is ~6 ops
    each, and every op beside a busy event loop is a wait for the GIL. Heads of different sizes are
    zero-padded to the largest and cut back."""
    keys = list(dict.fromkeys(c.head_key for c in rows))
    heads = [next(c.head for c in rows if c.head_key == k) for k in keys]
    slot = {k: i for i, k in enumerate(keys)}
    which = torch.tensor([slot[c.head_key] for c in rows])
    pooled = mean_pool(hidden, attention_mask)
    poolers = [i for i, c in enumerate(rows) if c.head.kind == "pooler"]
    if poolers:  # tanh(dense(hidden[CLS])) instead of the mean, for these rows
        pooler_keys = list(dict.fromkeys(rows[i].head_key for i in poolers))
        pick = torch.tensor([pooler_keys.index(rows[i].head_key) for i in poolers])
        dense = [heads[slot[k]].tensors for k in pooler_keys]
        W = torch.stack([t["dense.weight"] for t in dense])[pick]  # P × d × d
        bias = torch.stack([t["dense.bias"] for t in dense])[pick]
        at = torch.tensor(poolers)
        cls = torch.tanh(torch.baddbmm(bias.unsqueeze(2), W, hidden[at, 0].unsqueeze(2)).squeeze(2))
        pooled = pooled.index_copy(0, at, cls)
    W = pad_sequence([h.tensors["classifier.weight"] for h in heads], batch_first=True)[which]  # R × C × d
    bias = pad_sequence([h.tensors["classifier.bias"] for h in heads], batch_first=True)[which]
    logits = torch.baddbmm(bias.unsqueeze(2), W, pooled.unsqueeze(2)).squeeze(2)
    if len(set(num_labels)) == 1:
        return list(logits.unbind(0))
    cut = logits.numpy()  # per-row cuts of one array, not a torch op per row
    return [torch.from_numpy(cut[i, :n]) for i, n in enumerate(num_labels)]


def make_forward(
    choice: str, model: MultiProfileModel, device: torch.device, token_names: tuple[str, ...], threads: int,
    cache_dir=None, b: int | None = None,
) -> EagerForward | OrtForward:  # fmt: skip
    """The forward `choice` ('auto': ort on CPU, eager on CUDA) for `model`; with b given (the bank's), the
    ORT graph for it is exported or loaded now, not on the first request."""
    if choice not in FORWARDS:
        raise ValueError(f"forward={choice!r}: choose one of {FORWARDS}")
    if choice == "eager" or (choice == "auto" and device.type != "cpu"):
        return EagerForward(model)
    if device.type != "cpu":
        raise ValueError(
            "forward='ort' runs the encoder on CPU (the onnxruntime wheel); with num_gpus > 0 use forward='eager' "
            "or 'auto'"
        )
    ort = OrtForward(model, token_names, threads, cache_dir)
    if b is not None:
        ort.prepare(b)
    return ort


def token_inputs(tokenizer) -> tuple[str, ...]:
    """The token tensors the collated batches carry for this tokenizer (the graph's token inputs)."""
    return tuple(k for k in MODEL_INPUTS if k in tokenizer("a"))
