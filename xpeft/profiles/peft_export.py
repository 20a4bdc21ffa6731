"""A profile as a PEFT LoRA folder: hand one profile to a plain PEFT stack.

A profile's combined adapter is one low-rank pair per block (Â = Σ M_A·A_i, B̂ = Σ M_B·B_i, `xpeft.core.combine`),
which is exactly a LoRA adapter of rank b when nothing sits between Â and B̂: written as `lora_A = Â`, `lora_B = B̂`
(r = b, lora_alpha = b: scale 1), `PeftModel.from_pretrained(backbone, folder)` computes the profile's encoder. A
profile on a part of a fused linear (ModernBERT's value rows of `attn.Wqkv`) is written as LoRA on the whole linear,
its `lora_B` zero outside the part's rows: the same outputs. The head goes next to it as `head.safetensors` (its
kind, classes and label names in the metadata), since a bare encoder has no place for it.

Which profiles can be written: x_peft profiles fitted without the LayerNorm after Â (`--no-layer-norm`), among
them the mtl warm-start profiles (one-hot masks over their own adapter), and single_adapter profiles (their
LoRA alpha kept). An x_peft profile with the LayerNorm computes B̂·LN(Âx), which is not linear in x, so no
LoRA pair equals it: it is refused with that reason. head_only profiles have no adapter to write.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from xpeft.core.bank import AdapterBank
from xpeft.core.combine import combine
from xpeft.core.encoder import adapted_dims, encoder_blocks
from xpeft.core.families import family_name, resolve_target, split_target, target_path
from xpeft.core.peft_bank import PEFT_CONFIG, PEFT_PREFIX, PEFT_WEIGHTS
from xpeft.profiles.record import Dims, Profile, check_compatible, stored_mask_weights

HEAD_FILE = "head.safetensors"
EXPORTABLE = (
    "x_peft profiles fitted without the LayerNorm (--no-layer-norm), the mtl warm-start profiles and "
    "single_adapter profiles can be written as LoRA"
)


def why_not_lora(profile: Profile) -> str | None:
    """Why `profile` cannot be written exactly as a LoRA adapter (None: it can)."""
    cfg = profile.config
    if cfg.mode == "head_only":
        return f"profile {profile.profile_id} is head_only: it has no adapter to write as LoRA; {EXPORTABLE}"
    if cfg.mode == "x_peft" and cfg.layer_norm:
        return (
            f"profile {profile.profile_id} has the LayerNorm after Â: it computes B̂·LN(Âx), which is not linear in "
            f"x, so no LoRA pair B·A equals it; {EXPORTABLE}"
        )
    return None


def lora_pair(profile: Profile, bank: AdapterBank | None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A: L×b×d_in, B: L×d_out×b, lora_alpha) of the profile's adapter, as LoRA computes it: alpha/b·B·A·x."""
    problem = why_not_lora(profile)
    if problem:
        raise ValueError(problem)
    cfg = profile.config
    if cfg.mode == "single_adapter":
        return profile.tensors["lora_A"], profile.tensors["lora_B"], float(cfg.lora_alpha or cfg.b)
    if bank is None:
        raise ValueError(f"profile {profile.profile_id} is an x_peft profile: its bank is needed to combine it")
    A_hat, B_hat = combine(*stored_mask_weights(profile, bank.N, bank.L), bank)
    return A_hat, B_hat, float(cfg.b)


def block_path(encoder) -> str:
    """The module name of the encoder's list of blocks ('encoder.layer' for BERT), as PEFT names modules."""
    blocks = encoder_blocks(encoder)
    return next(name for name, module in encoder.named_modules() if module is blocks)


def export_peft(
    profile: Profile,
    out: str | os.PathLike,
    encoder,
    bank: AdapterBank | None = None,
    shared_head: dict[str, torch.Tensor] | None = None,
    base_model: str | None = None,
) -> Path:
    """Write `profile` for `encoder` (its backbone) as a PEFT LoRA folder `out` (adapter_config.json,
    adapter_model.safetensors) plus `head.safetensors`; `base_model` is recorded as base_model_name_or_path."""
    cfg = profile.config
    target = resolve_target(encoder, target_path(cfg.target, family_name(encoder)))
    L, d_in, d_out = adapted_dims(encoder, target)
    check_compatible(profile, bank, Dims(L, encoder.config.hidden_size, target, d_in, d_out, family_name(encoder)))
    A, B, alpha = lora_pair(profile, bank)
    module, part = split_target(target)
    if part is not None:  # a part of a fused linear: LoRA adapts the whole linear, zero outside the part's rows
        B = B.new_zeros(L, d_out * part[1], B.shape[2]).index_copy(1, torch.arange(d_out) + part[0] * d_out, B)
    if profile.head_id is not None and shared_head is None:
        raise ValueError(f"profile {profile.profile_id} uses shared head {profile.head_id}; pass it in")
    head = shared_head if profile.head_id is not None else {
        k.removeprefix("head."): v for k, v in profile.tensors.items() if k.startswith("head.")
    }  # fmt: skip
    prefix = f"{PEFT_PREFIX}{block_path(encoder)}"
    weights = {}
    for layer in range(L):
        weights[f"{prefix}.{layer}.{module}.lora_A.weight"] = A[layer].detach().float().contiguous()
        weights[f"{prefix}.{layer}.{module}.lora_B.weight"] = B[layer].detach().float().contiguous()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out / PEFT_WEIGHTS), metadata={"format": "pt"})
    base = None if base_model is None else str(base_model)
    (out / PEFT_CONFIG).write_text(json.dumps(lora_config(cfg.b, alpha, module, base), indent=2))
    meta = {
        "profile_id": profile.profile_id,
        "head": cfg.head,
        "num_labels": str(cfg.num_labels),
        "problem_type": cfg.problem_type,
        "label_names": json.dumps(profile.label_names),
        "created": repr(profile.created),
    }
    save_file({k: v.detach().float().contiguous() for k, v in head.items()}, str(out / HEAD_FILE), metadata=meta)
    return out


def lora_config(r: int, alpha: float, target: str, base_model: str | None) -> dict:
    """An adapter_config.json PEFT reads as a LoraConfig (the keys it needs; PEFT fills in the rest)."""
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model,
        "r": r,
        "lora_alpha": alpha,
        "target_modules": [target],
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "layers_to_transform": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "inference_mode": True,
    }
