"""One table of the modes xpeft serves (as PEFT's TEST_CASES) and one helper that makes a fitted profile of
any of them, so every test module meets every mode the same way (tests/test_modes.py runs the shared checks).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from conftest import tiny_encoder

from xpeft.config import XPeftConfig
from xpeft.core.bank import AdapterBank, random_bank
from xpeft.core.model import XPeftModel
from xpeft.profiles.record import Profile, profile_from_model

L, N, K, B, D = 2, 20, 5, 4, 32  # the tiny encoder of conftest: 2 blocks, hidden 32
BANK = random_bank(L, N, B, D, seed=7)
SHARED_HEAD_ID = "shared-1"
# The tensors a fit trains besides the head, by mode: the profile's own (tests/test_core.py checks that only
# these and the head change in a step, and that the backbone and the bank stay frozen).
MASKS_LN = frozenset({"mask_logits_A", "mask_logits_B", "ln_weight", "ln_bias"})
MASK_B_LN = frozenset({"mask_logits_B", "ln_weight", "ln_bias"})  # the single-mask ablation: M_A is never trained
MASKS = frozenset({"mask_logits_A", "mask_logits_B"})
LORA = frozenset({"lora_A", "lora_B"})


@dataclass(frozen=True)
class Case:
    """A mode: its config (over N, k, b of this table), the tensors its fit trains besides the head, and whether
    its head is shared (the mtl setting)."""

    name: str
    config: dict = field(default_factory=dict)
    trains: frozenset[str] = MASKS_LN
    shared_head: bool = False
    label_names: tuple[str, ...] | None = None

    def xpeft(self) -> XPeftConfig:
        return XPeftConfig(**{"N": N, "k": K, "b": B, "head": "linear", **self.config})


CASES = [
    Case("hard", {"mode": "x_peft", "mask_type": "hard", "num_labels": 3}, label_names=("neg", "neu", "pos")),
    Case("soft", {"mode": "x_peft", "mask_type": "soft"}),
    Case("hard-no-ln", {"mode": "x_peft", "mask_type": "hard", "layer_norm": False}, MASKS),
    Case("hard-B", {"mode": "x_peft", "mask_type": "hard", "masks": "B"}, MASK_B_LN),
    Case("soft-B", {"mode": "x_peft", "mask_type": "soft", "masks": "B"}, MASK_B_LN),
    Case("single", {"mode": "single_adapter"}, LORA),
    Case("single-alpha", {"mode": "single_adapter", "lora_alpha": 8.0}, LORA),
    Case("head-only", {"mode": "head_only", "num_labels": 4}, frozenset()),
    Case("pooler", {"mode": "x_peft", "mask_type": "hard", "head": "pooler"}),
    Case("regress", {"mode": "x_peft", "mask_type": "hard", "num_labels": 1, "problem_type": "regression"}),
    Case("mtl-a", {"mode": "x_peft", "mask_type": "hard"}, shared_head=True),
    Case("mtl-b", {"mode": "x_peft", "mask_type": "hard"}, shared_head=True),
]
BY_NAME = {c.name: c for c in CASES}


def shared_head_state(case: Case, encoder=None) -> dict[str, torch.Tensor]:
    """The shared head of the table (seed 99), for the cases that use one."""
    model = XPeftModel(encoder or tiny_encoder(), case.xpeft(), BANK if case.xpeft().mode == "x_peft" else None)
    g = torch.Generator().manual_seed(99)
    with torch.no_grad():
        for p in model.head.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return {k: v.clone() for k, v in model.head.state_dict().items()}


def fitted_profile(
    case: Case | str, profile_id: str | None = None, seed: int = 0, encoder=None, bank: AdapterBank = BANK
) -> tuple[XPeftModel, Profile]:
    """A model whose trainable tensors are random (as if fitted; the shared head from seed 99), in eval mode,
    and the profile taken out of it."""
    case = BY_NAME[case] if isinstance(case, str) else case
    cfg = case.xpeft()
    model = XPeftModel(encoder or tiny_encoder(), cfg, bank if cfg.mode == "x_peft" else None)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.trainable_parameters().values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        if case.shared_head:
            model.head.load_state_dict(shared_head_state(case, encoder))
    profile = profile_from_model(
        model,
        profile_id or case.name,
        metrics={"accuracy": 0.5 + seed / 100},
        head_id=SHARED_HEAD_ID if case.shared_head else None,
        label_names=list(case.label_names) if case.label_names else None,
    )
    return model.eval(), profile


def store_cases(store, encoder, cases: list[Case] = CASES, other_bank: AdapterBank | None = None) -> None:
    """Write the fitted profiles of `cases` (seed: their index) to `store`, with the table's bank and shared
    head; with `other_bank`, also 'other-bank': a hard profile fitted on another bank, which it cannot serve."""
    store.save_bank(BANK)
    profiles = []
    for i, case in enumerate(cases):
        model, profile = fitted_profile(case, seed=i, encoder=encoder)
        if case.shared_head:
            store.save_head(SHARED_HEAD_ID, {k: v.clone() for k, v in model.head.state_dict().items()})
        profiles.append(profile)
    if other_bank is not None:
        profiles.append(fitted_profile("hard", "other-bank", seed=50, encoder=encoder, bank=other_bank)[1])
    store.write(profiles)
