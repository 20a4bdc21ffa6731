"""The replica's forward: logits for a batch whose rows belong to any profiles, with two implementations.

    forward(batch, rows) -> one logits tensor per row   (batch: the collated tokens, rows: CombinedProfiles)

Both stack each row's adapter the same way (`xpeft.core.multiprofile.RowAdapters`), run the same per-row
encoder (`MultiProfileModel.encode_rows`) and the same heads (`xpeft.core.head.row_heads`, every head of the
batch in a fixed handful of torch ops); only where the encoder runs differs:

- `OrtForward` ('ort', the CPU default): the encoder as one ONNX Runtime call per batch (`encode_rows` exported
  as the graph of `xpeft.serve.onnx_graph`, per-row adapters as inputs). `session.run` holds the GIL for about
  one handoff a forward, where the eager forward takes it back after each of its few hundred torch ops: beside
  the busy event loops of a Serve replica that made the eager forward twice as slow as the same forward alone
  (BENCHMARKS.md, "the GIL").
- `EagerForward` ('eager'): `encode_rows` op by op in torch. The only one on CUDA (untested: the development
  machine has no GPU), and the reference the ORT forward is tested against.

Torch and ONNX Runtime only: no Ray, no HTTP.
"""

from __future__ import annotations

import logging
import time

import torch

from xpeft.core.families import token_inputs as encoder_token_inputs
from xpeft.core.head import row_heads
from xpeft.core.multiprofile import CombinedProfile, MultiProfileModel
from xpeft.data.tokens import MODEL_INPUTS
from xpeft.serve.onnx_graph import cached_graph, open_session

log = logging.getLogger(__name__)

FORWARDS = ("auto", "ort", "eager")


class EagerForward:
    """`MultiProfileModel.forward_mixed`: the per-row encoder in torch, then every head."""

    name = "eager"

    def __init__(self, model: MultiProfileModel):
        self.model = model

    def __call__(self, batch: dict[str, torch.Tensor], rows: list[CombinedProfile]) -> list[torch.Tensor]:
        return self.model.forward_mixed(batch, rows)


class OrtForward:
    """The same forward with the encoder in ONNX Runtime (its graph is `MultiProfileModel.encode_rows`, exported),
    one session per adapter width b (exported or loaded on first use of that b; in practice only the bank's)."""

    name = "ort"

    def __init__(self, model: MultiProfileModel, token_names: tuple[str, ...], threads: int, cache_dir=None):
        self.model = model
        self.token_names = token_names
        self.threads = threads
        self.cache_dir = cache_dir
        self._sessions: dict[int, object] = {}
        self.inputs = model.row_adapters(torch.device("cpu"))
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
        inputs = self.inputs.gather(rows, default_b=next(iter(self._sessions), 1))
        b = inputs["A_hat"].shape[2]
        self.prepare(b)
        feeds = {n: batch[n].numpy() for n in self.token_names} | inputs
        (hidden,) = self._sessions[b].run(None, feeds)
        return row_heads(
            torch.from_numpy(hidden), batch["attention_mask"], [c.head for c in rows], [c.head_key for c in rows]
        )


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


def token_inputs(tokenizer, encoder) -> tuple[str, ...]:
    """The token tensors the collated batches carry for this tokenizer that the encoder takes (the graph's token
    inputs): a tokenizer's token_type_ids are left out for an encoder that takes none (`families.token_inputs`)."""
    takes = encoder_token_inputs(encoder)
    return tuple(k for k in MODEL_INPUTS if k in tokenizer("a") and k in takes)
