"""Trainable parameters and bytes per profile, from dimensions alone (no weights): Table 1 and Table 4.

The paper's Table 1 'memory' counts the mask bits only. A stored profile also holds the LayerNorm affine
after Â and, unless the head is shared (the mtl setting), its head; `profile_bytes` reports all of it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from xpeft.core.families import FAMILIES

# Dimensions (d, L, family) of well-known encoders, so accounting needs no download. Others: pass a local path.
KNOWN_DIMS = {
    "bert-base-uncased": (768, 12, "bert"),
    "bert-base-cased": (768, 12, "bert"),
    "bert-large-uncased": (1024, 24, "bert"),
    "roberta-base": (768, 12, "roberta"),
    "minilm": (384, 6, "bert"),
    "sentence-transformers/all-MiniLM-L6-v2": (384, 6, "bert"),
    "answerdotai/ModernBERT-base": (768, 22, "modernbert"),
    "microsoft/deberta-v3-base": (768, 12, "deberta-v2"),
    "distilbert-base-uncased": (768, 6, "distilbert"),
    "xlm-roberta-base": (768, 12, "xlm-roberta"),
    "google/electra-base-discriminator": (768, 12, "electra"),
}

FLOAT_BYTES = 4


@dataclass
class Dims:
    d: int  # adapter input (= output) dimension: the hidden size for the default target
    L: int  # transformer blocks
    family: str | None = None  # the config's model_type (whether the encoder has a pooler)


def dims_of(backbone: str) -> Dims:
    """Hidden size, block count and family of a backbone: a known name, or a directory with config.json (read
    by transformers, so each family's own names for them, DistilBERT's `dim` / `n_layers`, are understood)."""
    if backbone in KNOWN_DIMS:
        return Dims(*KNOWN_DIMS[backbone])
    path = os.path.expanduser(backbone)
    if not os.path.exists(os.path.join(path, "config.json")):
        raise ValueError(
            f"unknown backbone {backbone!r}: pass one of {sorted(KNOWN_DIMS)} or a directory with config.json"
        )
    from transformers import AutoConfig

    conf = AutoConfig.from_pretrained(path)
    return Dims(conf.hidden_size, conf.num_hidden_layers, conf.model_type)


def check_head(head: str, dims: Dims, backbone: str = "this backbone") -> None:
    """A 'pooler' head needs an encoder with a pooler (xpeft.core.families); say which heads fit otherwise."""
    family = FAMILIES.get(dims.family or "")
    if head == "pooler" and family is not None and not family.pooler:
        raise ValueError(
            f"{backbone} ({dims.family}) has no pooler, so it has no 'pooler' head; count --head cls ([CLS] state + "
            "classifier) or --head linear (mean-pool + classifier)"
        )


def head_params(d: int, c: int, head: str = "pooler") -> int:
    """Pooler (d·d + d) + classifier (d·c + c), or the classifier alone for the 'linear' and 'cls' heads."""
    if head not in ("pooler", "linear", "cls"):
        raise ValueError(f"head must be 'pooler', 'linear' or 'cls', got {head!r}")
    classifier = d * c + c
    return classifier + (d * d + d if head == "pooler" else 0)


def trainable_params(mode: str, N: int, b: int, dims: Dims, layer_norm: bool = True, masks: str = "AB") -> int:
    """Trainable parameters per profile excluding the head: Table 1's formulas.

    x_peft: 2(N + b)·L (two masks of N and the LN affine of 2b per block); single_adapter: 2(d·b)·L."""
    if mode == "x_peft":
        return (len(masks) * N + (2 * b if layer_norm else 0)) * dims.L
    if mode == "single_adapter":
        return 2 * dims.d * b * dims.L
    if mode == "head_only":
        return 0
    raise ValueError(f"unknown mode {mode!r}")


def mask_bytes_per_profile(mode: str, mask_type: str, N: int, dims: Dims, masks: str = "AB") -> int:
    """Table 1's memory column: hard 2·⌈N/8⌉·L; soft 2·N·L·4; single_adapter 2(d·b)·L·4 (by the caller)."""
    if mode != "x_peft":
        return 0
    if mask_type == "hard":
        return len(masks) * math.ceil(N / 8) * dims.L
    return len(masks) * N * dims.L * FLOAT_BYTES


def profile_bytes(
    mode: str,
    mask_type: str,
    N: int,
    b: int,
    dims: Dims,
    c: int = 2,
    head: str = "pooler",
    shared_head: bool = False,
    layer_norm: bool = True,
    masks: str = "AB",
) -> dict[str, int]:
    """Everything a stored profile holds, in bytes (float32 tensors)."""
    parts = {"mask_bits": 0, "masks_float": 0, "ln": 0, "adapter": 0, "head": 0}
    if mode == "x_peft":
        key = "mask_bits" if mask_type == "hard" else "masks_float"
        parts[key] = mask_bytes_per_profile(mode, mask_type, N, dims, masks)
        parts["ln"] = (2 * b * dims.L if layer_norm else 0) * FLOAT_BYTES
    elif mode == "single_adapter":
        parts["adapter"] = trainable_params(mode, N, b, dims) * FLOAT_BYTES
    if not shared_head:
        parts["head"] = head_params(dims.d, c, head) * FLOAT_BYTES
    parts["total"] = sum(parts.values())
    return parts


def table(backbone: str, Ns: list[int], b: int, c: int, head: str = "pooler", shared_head: bool = False) -> str:
    """Markdown table of every mode: parameters (excl./incl. head) and bytes per profile."""
    dims = dims_of(backbone)
    check_head(head, dims, backbone)
    hp = head_params(dims.d, c, head)
    rows = [
        "| mode | N | trainable excl. head (Table 1) | excl. head (Table 4) | incl. head (Table 4) "
        "| mask bytes (Table 1) | full record bytes |",
        "|---|---|---|---|---|---|---|",
    ]
    cases = [("x_peft", mt, N) for mt in ("hard", "soft") for N in Ns] + [
        ("single_adapter", "-", 0),
        ("head_only", "-", 0),
    ]
    for mode, mt, N in cases:
        p = trainable_params(mode, N, b, dims)
        mb = mask_bytes_per_profile(mode, mt, N, dims) if mode == "x_peft" else p * FLOAT_BYTES
        full = profile_bytes(mode, mt, N, b, dims, c, head, shared_head)["total"]
        rows.append(
            f"| {mode}{f' ({mt})' if mode == 'x_peft' else ''} | {N or '-'} | {fmt_count(p)} ({p:,}) | "
            f"{fmt_millions(p)} | {fmt_millions(p + hp)} ({p + hp:,}) | {fmt_bytes(mb)} ({mb:,}) | "
            f"{fmt_bytes(full)} ({full:,}) |"
        )
    note = (
        f"\nbackbone {backbone}: d={dims.d}, L={dims.L}; b={b}; head '{head}' with c={c} labels = "
        f"{hp:,} parameters{' (shared: not stored per profile)' if shared_head else ' (stored per profile)'}."
    )
    return "\n".join(rows) + note


def fmt_count(n: int) -> str:
    """Table 1's style: thousands cut (not rounded) to one decimal, 3,552 -> 3.5K, 10,752 -> 10.7K."""
    if n >= 1_000_000:
        return f"{math.floor(n / 1e5) / 10:.1f}M"
    if n >= 1000:
        return f"{math.floor(n / 1e2) / 10:.1f}K"
    return str(n)


def fmt_millions(n: int) -> str:
    """Table 4's style: millions rounded to three decimals, 3,552 -> 0.004M."""
    return f"{n / 1e6:.3f}M"


def fmt_bytes(n: int) -> str:
    return fmt_count(n) if n >= 1000 else f"{n}B"
