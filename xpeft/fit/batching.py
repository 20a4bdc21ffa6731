"""How a fit lays out and runs its batches: packed or padded (TrainConfig.packing), bf16 autocast or fp32
(TrainConfig.bf16). Both change the speed of a step, not what it computes: a batch keeps the random rows it
would have had, and the fit packs only a model whose packed forward gives its padded forward's logits.

The pack length is chosen per fit, from its rows: a packed batch of P sequences W tokens wide costs about
P·W·(1 + W / 2d) (d the hidden size): the encoder's linears per token slot, plus the attention, which an explicit
block-diagonal mask makes O(W²) a sequence (on CPU its dropout over W² scores costs more than its matmuls). The
2d was fitted to CPU-time measurements of the fit step on SST-2 rows (MiniLM, d = 384, one thread; indicative,
taken on a shared machine): 4% faster at pack length 64 than at 128 (13.6 and 13.4 token slots a row, sequences
61 and 113 wide) and 2.9x faster than padded batches (41 slots a row), as the formula says. So SST-2 (13 tokens
a row) packs into sequences of 64, the news profiles (40 a row) into sequences of 96.
"""

from __future__ import annotations

import contextlib
import logging
import random
from dataclasses import dataclass

import torch
from torch import nn

from xpeft.config import TrainConfig
from xpeft.core.families import unpackable
from xpeft.data.tokens import Collator, pack_rows

log = logging.getLogger(__name__)

PACK_LENGTHS = (64, 96, 128, 192, 256)  # the pack lengths a fit chooses from (a longer row gets a sequence alone)
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of native bf16 matmuls


@dataclass(frozen=True)
class Batching:
    """The layout and precision a fit (and its evaluation) runs batches with; the default is the plain one."""

    pack_length: int | None = None  # None: padded
    bf16: bool = False

    def collator(self, pad_token_id: int) -> Collator:
        return Collator(pad_token_id, self.pack_length)

    def autocast(self, device: torch.device):
        """bf16 autocast on `device` (fp32 weights and optimizer states stay fp32), or nothing."""
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=torch.bfloat16)

    def describe(self) -> str:
        layout = f"packed (sequences of {self.pack_length} tokens)" if self.pack_length else "padded"
        return f"{layout}, {'bf16 autocast' if self.bf16 else 'fp32'}"


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags (Linux /proc/cpuinfo), None where they cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        return None
    return None


def native_bf16(device: torch.device) -> tuple[bool, str]:
    """Whether `device` computes bf16 natively (so autocast pays), and why (said in the log)."""
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported(including_emulation=False)
        return ok, f"the GPU {'supports' if ok else 'does not support'} bf16"
    if device.type == "cpu":
        flags = cpu_flags()
        if flags is None:
            return False, "the CPU's bf16 support is unknown (no /proc/cpuinfo flags)"
        found = sorted(flags.intersection(BF16_CPU_FLAGS))
        if found:
            return True, f"the CPU has {' and '.join(found)}"
        return False, "the CPU lacks AVX512-BF16 and AMX-BF16 (bf16 matmuls are emulated there, slower than fp32)"
    return False, f"no bf16 detection for {device.type} devices"


def use_bf16(setting: str, device: torch.device) -> tuple[bool, str]:
    """TrainConfig.bf16 ('auto', 'on', 'off') on `device`: whether to autocast, and why."""
    if setting == "off":
        return False, "bf16 off (--bf16 off)"
    native, why = native_bf16(device)
    if setting == "on":
        return True, f"bf16 on (--bf16 on); {why}"
    return native, f"bf16 {'on' if native else 'off'} (--bf16 auto): {why}"


def packing_mismatch(model: nn.Module, rows: list[dict], pad_token_id: int = 0) -> str | None:
    """Why a packed batch of `model` does not give the padded batch's logits (None: it does, up to fp32
    rounding). Checked on three of `rows` packed into two sequences (so two rows share one, and one sequence
    has a padded tail), in eval mode (no dropout, no Gumbel noise: the RNG is untouched) and fp32; or known from
    the encoder's config where a few rows could not show it (`xpeft.core.families.unpackable`)."""
    known = unpackable(model.encoder) if isinstance(getattr(model, "encoder", None), nn.Module) else None
    if known is not None:
        return known
    probe = [{k: v for k, v in r.items() if k != "labels"} for r in (rows * 3)[:3]]
    pack_length = len(probe[0]["input_ids"]) + len(probe[1]["input_ids"])
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            padded, packed = (
                model(**to_device(Collator(pad_token_id, length)(probe), device))["logits"]
                for length in (None, pack_length)
            )
    except Exception as e:  # any failure of the packed forward means: pad (the reason is logged)
        return f"its packed forward fails ({type(e).__name__}: {e})"
    finally:
        model.train(was_training)
    if packed.shape != padded.shape or not torch.allclose(packed, padded, rtol=1e-4, atol=1e-5):
        diff = (packed - padded).abs().max().item() if packed.shape == padded.shape else "shape"
        return f"its packed logits differ from the padded ones (max abs difference {diff})"
    return None


def batching_for(
    model: nn.Module,
    rows: list[dict],
    cfg: TrainConfig,
    device: torch.device,
    pad_token_id: int = 0,
    batch_size: int | None = None,
) -> Batching:
    """The Batching of a fit of `model` on `rows` under `cfg` (batches of `batch_size` rows, default
    cfg.batch_size), decided once per fit and logged: packed where cfg.packing and the model's packed forward
    equals its padded one, at the pack length that suits rows this long; bf16 per cfg.bf16 and the device."""
    bf16, why_bf16 = use_bf16(cfg.bf16, device)
    pack_length = None
    if cfg.packing:
        mismatch = packing_mismatch(model, rows, pad_token_id)
        if mismatch is None:
            lengths = [len(r["input_ids"]) for r in rows]
            pack_length = pack_length_for(lengths, batch_size or cfg.batch_size, model_width(model))
        else:
            log.warning("padding batches, not packing: for %s, %s", type(model).__name__, mismatch)
    batching = Batching(pack_length, bf16)
    log.info("fit batches: %s; %s", batching.describe(), why_bf16)
    return batching


def packed_cost(batch_lengths: list[list[int]], pack_length: int | None, d: int) -> float:
    """The encoder's cost of these batches packed at `pack_length` (None: padded), in token slots weighted by
    1 + W / 2d for the attention over sequences W wide (see the module)."""
    cost = 0.0
    for lengths in batch_lengths:
        packs = [[i] for i in range(len(lengths))] if pack_length is None else pack_rows(lengths, pack_length)
        width = max(sum(lengths[i] for i in p) for p in packs)
        cost += len(packs) * width * (1 + width / (2 * d))
    return cost


def pack_length_for(lengths: list[int], batch_size: int, d: int, samples: int = 32) -> int:
    """The cheapest of PACK_LENGTHS for random batches of rows this long (a fixed sample: the global RNG is
    untouched, so the fit's curve does not depend on it)."""
    rng = random.Random(0)
    batches = [rng.sample(lengths, min(batch_size, len(lengths))) for _ in range(samples)]
    return min(PACK_LENGTHS, key=lambda length: packed_cost(batches, length, d))


def model_width(model: nn.Module) -> int:
    """The hidden size d of the model's encoder (its first module with a config that says; else 768)."""
    sizes = (getattr(getattr(m, "config", None), "hidden_size", None) for m in model.modules())
    return next((d for d in sizes if isinstance(d, int)), 768)


def to_device(batch: dict, device: torch.device) -> dict:
    """A collated batch (tensors and a packed batch's `packing`) on `device`."""
    return {k: v.to(device) for k, v in batch.items()}
