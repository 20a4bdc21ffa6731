"""A profile record: masks + LN affine + head (or a shared-head reference) + bank fingerprint + config.

A hard profile's masks are stored bit-packed: M_A then M_B, 2·⌈N/8⌉·L bytes together (M_B alone for the
single-mask ablation). Every other tensor
(soft mask logits, LN affine, a per-profile head, single_adapter's A and B) is one safetensors blob, so
nothing is ever unpickled. `record_bytes` is the honest size: mask bits plus everything else stored.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from xpeft.config import XPeftConfig
from xpeft.core.bank import AdapterBank
from xpeft.core.families import family_name, resolve_target, target_path
from xpeft.core.masks import bits_to_weights, extend_logits, extend_weights, khot, mask_bytes, pack_bits, unpack_bits
from xpeft.core.model import XPeftModel
from xpeft.profiles.fingerprints import record_sha256, record_tensors, sealed

MAX_PROFILE_ID = 200


@dataclass
class Profile:
    profile_id: str
    config: XPeftConfig
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    mask_bits: bytes | None = None  # hard masks: packed M_A then M_B
    head_id: str | None = None  # a shared head (the paper's mtl setting) instead of a head of its own
    bank_fingerprint: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    label_names: list[str] | None = None
    created: float = field(default_factory=time.time)

    @property
    def tensor_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    @property
    def record_bytes(self) -> int:
        """Bytes of trained state stored for this profile: mask bits + every tensor (LN, head...)."""
        return len(self.mask_bits or b"") + self.tensor_bytes

    def record_bytes_by_part(self) -> dict[str, int]:
        parts = {"mask_bits": len(self.mask_bits or b"")}
        for name, t in self.tensors.items():
            role = "head" if name.startswith("head.") else name.rsplit("_", 1)[0]
            parts[role] = parts.get(role, 0) + t.numel() * t.element_size()
        parts["total"] = self.record_bytes
        return parts


def validate_profile_id(profile_id: object) -> str:
    """A profile id is 1–200 printable characters without slashes, backslashes or '..'."""
    if not isinstance(profile_id, str) or not profile_id.strip():
        raise ValueError("a profile id must be a non-empty string")
    bad = (
        len(profile_id) > MAX_PROFILE_ID
        or any(c in profile_id for c in "/\\")
        or ".." in profile_id
        or not profile_id.isprintable()
        or profile_id != profile_id.strip()
    )
    if bad:
        raise ValueError(
            f"invalid profile id {profile_id[:40]!r}: use up to {MAX_PROFILE_ID} printable characters, "
            "no '/', '\\', '..' or surrounding spaces"
        )
    return profile_id


def profile_from_model(
    model: XPeftModel,
    profile_id: str,
    metrics: dict[str, Any] | None = None,
    head_id: str | None = None,
    label_names: list[str] | None = None,
    text_pair: bool | None = None,
) -> Profile:
    """Take a fitted profile out of the model. Hard masks are binarised to k-hot and bit-packed; `text_pair`
    (whether its data had pairs) is recorded in its config when given."""
    validate_profile_id(profile_id)
    cfg = model.cfg
    tensors: dict[str, torch.Tensor] = {}
    bits = None
    state = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
    if cfg.mode == "x_peft" and cfg.mask_type == "hard":
        # M_A then M_B; the single-mask ablation stores M_B alone (its Â is the fixed mean of all the A_i).
        bits = pack_bits(khot(model.mask_logits_B.detach().cpu(), cfg.top_k))
        if cfg.masks == "AB":
            bits = pack_bits(khot(model.mask_logits_A.detach().cpu(), cfg.top_k)) + bits
        state.pop("mask_logits_A", None)
        state.pop("mask_logits_B", None)
    if head_id is not None:
        state = {n: t for n, t in state.items() if not n.startswith("head.")}
    tensors.update(state)
    if cfg.mode == "x_peft" and cfg.k is None:  # stored with the k it was fitted with, not "half of N"
        cfg = replace(cfg, k=cfg.top_k)
    if text_pair is not None:
        cfg = replace(cfg, text_pair=text_pair)
    return Profile(
        profile_id=profile_id,
        config=cfg,
        tensors=tensors,
        mask_bits=bits,
        head_id=head_id,
        bank_fingerprint=model.bank.fingerprint if cfg.mode == "x_peft" else None,
        metrics=dict(metrics or {}),
        label_names=label_names,
    )


def stored_mask_weights(profile: Profile, N: int, L: int) -> tuple[torch.Tensor, torch.Tensor]:
    """M_A, M_B of a stored x_peft profile as L×N combination weights over a bank of N members: k-hot / k for hard
    masks (unpacked from its bits), softmax of the logits for soft ones. The single-mask ablation stores no M_A
    logits: its Â is the mean of the A_i of the bank it was fitted on. A profile fitted on an ancestor of the bank
    (its config's N < N) has its masks zero-extended to the appended members (`extend_weights`)."""
    n = profile.config.N
    if profile.config.mask_type == "hard":
        half, masks = mask_bytes(n, L), len(profile.config.masks)
        if profile.mask_bits is None or len(profile.mask_bits) != masks * half:
            got = 0 if profile.mask_bits is None else len(profile.mask_bits)
            raise ValueError(
                f"profile {profile.profile_id} stores {got} mask bytes but a bank with N={n}, L={L} needs "
                f"{masks * half} ({masks}·⌈N/8⌉·L); it was fitted for a different bank"
            )
        wB = bits_to_weights(unpack_bits(profile.mask_bits[-half:], n, L))
        wA = bits_to_weights(unpack_bits(profile.mask_bits[:half], n, L)) if masks == 2 else torch.full((L, n), 1 / n)
        return extend_weights(wA, N), extend_weights(wB, N)
    logits_B = profile.tensors["mask_logits_B"]
    logits_A = profile.tensors.get("mask_logits_A", torch.zeros_like(logits_B))
    if logits_A.shape != (L, n) or logits_B.shape != (L, n):
        raise ValueError(
            f"profile {profile.profile_id} stores {tuple(logits_B.shape)} mask logits but the bank needs "
            f"L×N = {L}×{n}; it was fitted for a different bank"
        )
    return extend_weights(torch.softmax(logits_A, -1), N), extend_weights(torch.softmax(logits_B, -1), N)


@dataclass(frozen=True)
class Dims:
    """What a model or server that would apply a profile has: its encoder's blocks, hidden size, the linear
    its adapters wrap (its path, `xpeft.core.families`) and that linear's dimensions, and the encoder's family
    (its config's model_type: what a profile's target given as a meaning resolves by)."""

    L: int
    d: int
    target: str
    d_in: int
    d_out: int
    family: str | None = None


def compatibility(profile: Profile, bank: AdapterBank | None, dims: Dims) -> str | None:
    """Why `profile` cannot be applied over `bank` on an encoder of `dims` (None: it can). The one check
    every reader of a stored profile makes: a model, the server, the farm. A profile fitted on the bank or on
    one of its ancestors (a bank it was grown from) can: its masks cover the ancestor's first members."""
    cfg, pid = profile.config, profile.profile_id
    if cfg.mode == "x_peft":
        if bank is None:
            return f"profile {pid} is an x_peft profile but no bank is loaded here"
        n = bank.members_of(profile.bank_fingerprint)
        if n is None:
            return (
                f"profile {pid} was fitted on bank {profile.bank_fingerprint} but the bank here is "
                f"{bank.fingerprint}, which was not grown from it; use bank {str(profile.bank_fingerprint)[:12]}… "
                "(or one grown from it) for it, or refit it on this one"
            )
        if (cfg.N, cfg.b, bank.L) != (n, bank.b, dims.L):
            return f"profile {pid} has N={cfg.N}, b={cfg.b} but its bank has N={n}, b={bank.b}, L={bank.L}"
    if cfg.mode != "head_only" and _target_in(cfg.target, dims.family) != dims.target:
        return f"profile {pid} adapts {cfg.target!r} but this encoder is adapted at {dims.target!r}"
    if cfg.mode == "single_adapter":
        want = {"lora_A": (dims.L, cfg.b, dims.d_in), "lora_B": (dims.L, dims.d_out, cfg.b)}
        got = {k: tuple(profile.tensors[k].shape) if k in profile.tensors else None for k in want}
        if got != want:
            return f"profile {pid} has adapters {got} but this backbone needs {want}"
    return None


def _target_in(target: str, family: str | None) -> str:
    """A profile's recorded target as a path in the family (records hold paths; a meaning, only in records made
    by hand, is resolved; one this family cannot resolve matches nothing)."""
    try:
        return target_path(target, family)
    except ValueError:
        return target


def check_compatible(profile: Profile, bank: AdapterBank | None, dims: Dims) -> None:
    """`compatibility` as a ValueError."""
    problem = compatibility(profile, bank, dims)
    if problem is not None:
        raise ValueError(problem)


def model_dims(model) -> Dims:
    """The Dims of an XPeftModel or MultiProfileModel (whichever target its adapters wrap)."""
    from xpeft.core.encoder import adapted_dims

    target = resolve_target(model.encoder, getattr(model, "target", None) or model.cfg.target)
    L, d_in, d_out = adapted_dims(model.encoder, target)
    return Dims(L, model.encoder.config.hidden_size, target, d_in, d_out, family_name(model.encoder))


def apply_profile(model: XPeftModel, profile: Profile, shared_head: dict[str, torch.Tensor] | None = None) -> None:
    """Load a stored profile into a model built with the same config and bank, or with a bank grown from the
    profile's (the config's N the bank's): its masks zero-extended over the appended members."""
    cfg = model.cfg
    if cfg.mode != profile.config.mode or (cfg.mode == "x_peft" and cfg.mask_type != profile.config.mask_type):
        raise ValueError(
            f"profile {profile.profile_id} is {profile.config.mode}/{profile.config.mask_type} but the model is "
            f"{cfg.mode}/{cfg.mask_type}; build the model from the profile's config"
        )
    check_compatible(profile, getattr(model, "bank", None), model_dims(model))
    state = dict(profile.tensors)
    if profile.head_id is not None:
        if shared_head is None:
            raise ValueError(f"profile {profile.profile_id} uses shared head {profile.head_id}; pass it in")
        state.update({f"head.{k}": v for k, v in shared_head.items()})
    if cfg.mode == "x_peft":
        state.update(mask_state(profile, cfg, model.L))
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in state]
    if missing:
        raise ValueError(f"profile {profile.profile_id} lacks {missing}; it was saved from another mode/head")
    with torch.no_grad():
        for name, value in state.items():
            if name not in params:
                raise ValueError(f"profile {profile.profile_id} has tensor {name!r} this model does not")
            if params[name].shape != value.shape:
                raise ValueError(
                    f"profile {profile.profile_id}: {name} is {tuple(value.shape)} but the model's is "
                    f"{tuple(params[name].shape)}; the profile was fitted for another encoder or bank"
                )
            params[name].copy_(value)


def mask_state(profile: Profile, cfg: XPeftConfig, L: int) -> dict[str, torch.Tensor]:
    """The mask logits a model over a bank of cfg.N members (the profile's own, or one grown from it) loads
    for x_peft `profile`."""
    if profile.mask_bits is not None:
        wA, wB = stored_mask_weights(profile, cfg.N, L)
        # Logits whose top-k is exactly the stored k-hot set: eval's khot() reproduces the stored mask. The
        # single-mask ablation's fixed M_A: log-weights whose softmax is the mean over the profile's bank's members.
        return {"mask_logits_A": wA * cfg.top_k if cfg.masks == "AB" else wA.log(), "mask_logits_B": wB * cfg.top_k}
    # soft: a profile of an ancestor bank gets -inf logits for the appended members
    out = {
        n: extend_logits(profile.tensors[n], cfg.N) for n in ("mask_logits_A", "mask_logits_B") if n in profile.tensors
    }
    if cfg.masks == "B":
        out["mask_logits_A"] = extend_logits(torch.zeros(L, profile.config.N), cfg.N)
    return out


def summary(profile: Profile) -> dict[str, Any]:
    """What a listing shows of a profile: its config, metrics, labels and size in bytes, no tensors."""
    sizes = profile.record_bytes_by_part()
    return {
        "profile_id": profile.profile_id,
        "mode": profile.config.mode,
        "mask_type": profile.config.mask_type if profile.config.mode == "x_peft" else None,
        "config": profile.config.to_dict(),
        "head_id": profile.head_id,
        "bank_fingerprint": profile.bank_fingerprint,
        "metrics": profile.metrics,
        "label_names": profile.label_names,
        "record_bytes": sizes["total"],
        "record_bytes_by_part": sizes,
        "created": profile.created,
    }


# --- rows for the profile store --------------------------------------------------------------------------


def to_row(profile: Profile) -> dict[str, Any]:
    """The profile as a row of the store's table; its tensors carry the record's fingerprint
    (xpeft.profiles.fingerprints), so a damaged byte anywhere in the record is refused when it is read."""
    cfg = profile.config
    row = {
        "profile_id": profile.profile_id,
        "mode": cfg.mode,
        "mask_type": cfg.mask_type if cfg.mode == "x_peft" else None,
        "config": json.dumps(cfg.to_dict(), sort_keys=True),
        "mask_bits": profile.mask_bits,
        "tensors": b"",
        "head_id": profile.head_id,
        "bank_fingerprint": profile.bank_fingerprint,
        "metrics": json.dumps(profile.metrics, sort_keys=True),
        "label_names": json.dumps(profile.label_names) if profile.label_names is not None else None,
        "record_bytes": profile.record_bytes,
        "created": profile.created,
    }
    row["tensors"] = sealed(profile.tensors, {"fingerprint": record_sha256(row, profile.tensors)})
    return row


def from_row(row: dict[str, Any]) -> Profile:
    """A stored row as a Profile; a FingerprintError (a ValueError) when its bytes do not match its fingerprint."""
    return Profile(
        profile_id=row["profile_id"],
        config=XPeftConfig.from_dict(json.loads(row["config"])),
        tensors=record_tensors(row),
        mask_bits=row["mask_bits"],
        head_id=row["head_id"],
        bank_fingerprint=row["bank_fingerprint"],
        metrics=json.loads(row["metrics"]) if row["metrics"] else {},
        label_names=json.loads(row["label_names"]) if row["label_names"] else None,
        created=row["created"],
    )
