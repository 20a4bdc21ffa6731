"""Stored profile records → `CombinedProfile`s a replica serves: Â, B̂ per block from the masks and the bank
(`xpeft.core.combine`, one contraction for all the profiles combined together), the LayerNorm affine, and
the head as plain tensors. A profile fitted on an ancestor of the bank (one it was grown from) is combined with
its masks zero-extended to the bank's N (`xpeft.profiles.record.stored_mask_weights`): the same adapter."""

from __future__ import annotations

import torch

from xpeft.config import lora_scale
from xpeft.core.bank import AdapterBank
from xpeft.core.combine import combine
from xpeft.core.head import HeadWeights
from xpeft.core.multiprofile import CombinedProfile
from xpeft.profiles.record import Profile, stored_mask_weights


def head_of(profile: Profile, d: int, shared_head: dict[str, torch.Tensor] | None) -> HeadWeights:
    """A profile's head: its own stored tensors, or the shared head it names (mtl)."""
    state = {k[len("head.") :]: v for k, v in profile.tensors.items() if k.startswith("head.")}
    if profile.head_id is not None:
        if shared_head is None:
            raise ValueError(f"profile {profile.profile_id} uses shared head {profile.head_id}; pass it in")
        state = shared_head
    return HeadWeights.checked(profile.config.head, state, d, profile.config.num_labels)


@torch.no_grad()
def combine_profiles(
    profiles: list[Profile], bank: AdapterBank | None, d: int, shared_heads: dict[str, dict[str, torch.Tensor]]
) -> list[CombinedProfile | ValueError]:
    """Each profile as a CombinedProfile, or the reason it cannot be served (a ValueError naming the profile):
    one failing profile never fails the others. The x_peft ones meet the bank in one contraction."""
    out: list[CombinedProfile | ValueError | None] = [None] * len(profiles)
    bulk: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    for i, p in enumerate(profiles):
        try:
            cfg = p.config
            head = head_of(p, d, shared_heads.get(p.head_id) if p.head_id else None)
            c = CombinedProfile(
                profile_id=p.profile_id,
                A_hat=p.tensors["lora_A"] if cfg.mode == "single_adapter" else None,
                B_hat=p.tensors["lora_B"] if cfg.mode == "single_adapter" else None,
                ln_weight=p.tensors["ln_weight"] if cfg.mode == "x_peft" and cfg.layer_norm else None,
                ln_bias=p.tensors["ln_bias"] if cfg.mode == "x_peft" and cfg.layer_norm else None,
                scale=lora_scale(cfg),
                head=head,
                head_key=f"shared:{p.head_id}" if p.head_id else f"own:{p.profile_id}",
                problem_type=cfg.problem_type,
                label_names=p.label_names,
                text_pair=cfg.text_pair,
                created=p.created,
            )
            if cfg.mode == "x_peft":
                n = bank.members_of(p.bank_fingerprint) if bank is not None else None
                if n is None:
                    raise ValueError(f"it was fitted on bank {p.bank_fingerprint}, not on the bank here nor its parent")
                if n != cfg.N:
                    raise ValueError(f"it has N={cfg.N} but its bank {str(p.bank_fingerprint)[:12]}… has N={n}")
                bulk.append((i, *stored_mask_weights(p, bank.N, bank.L)))
            out[i] = c
        except (ValueError, KeyError, RuntimeError) as e:
            out[i] = ValueError(f"profile {p.profile_id} cannot be served: {e}")
    if bulk:
        A_hat, B_hat = combine(torch.stack([w for _, w, _ in bulk]), torch.stack([w for _, _, w in bulk]), bank)
        for j, (i, _, _) in enumerate(bulk):
            out[i].A_hat, out[i].B_hat = A_hat[j], B_hat[j]
    return out  # type: ignore[return-value]
