"""The two warm starts of §3.1 that give a learned bank: `x_peft with sa` (the adapters of profiles fitted
with single_adapter) and `x_peft with mtl` (one adapter per warm-start profile and one shared head, trained
jointly), and the mtl warm-start profiles stored as profiles over their own bank member.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch
from torch import nn

from xpeft.config import XPeftConfig, lora_scale
from xpeft.core.bank import AdapterBank, bank_from_adapters
from xpeft.core.layer import Adapter
from xpeft.core.masks import pack_bits
from xpeft.core.model import XPeftModel
from xpeft.core.packing import Packing
from xpeft.data.dataset import ProfileData
from xpeft.data.tokens import tokenize
from xpeft.fit.batching import batching_for
from xpeft.fit.loop import Session, evaluate, fit, profile_metric_fn
from xpeft.fit.profile import ProfileFitter, clean
from xpeft.profiles.record import Profile

log = logging.getLogger(__name__)


def bank_from_single_adapters(profiles: list[Profile], target: str | None = None) -> AdapterBank:
    """`x_peft with sa`: the adapters of profiles fitted with single_adapter become the learned bank, on the
    linear they adapt (the path their records hold; `target` a meaning or path they must agree with)."""
    pairs = []
    for p in profiles:
        if p.config.mode != "single_adapter":
            raise ValueError(f"profile {p.profile_id} is {p.config.mode}, not single_adapter")
        pairs.append((p.tensors["lora_A"], p.tensors["lora_B"] * lora_scale(p.config)))
    recorded = sorted({p.config.target for p in profiles})
    if len(recorded) > 1:
        raise ValueError(f"the single_adapter profiles adapt different linears {recorded}; a bank has one target")
    return bank_from_adapters(pairs, target=recorded[0] if recorded else target, source="single_adapter")


class MultiTaskAdapters(nn.Module):
    """`x_peft with mtl`: one LoRA adapter per warm-start profile, one shared head, trained jointly; each
    row of a batch goes through its own profile's adapter (the per-row path of xpeft.core.layer)."""

    def __init__(self, fitter: ProfileFitter, M: int, seed: int):
        super().__init__()
        single = replace(fitter.xcfg, mode="single_adapter")
        base = XPeftModel(fitter.encoder, single, None, seed=seed)  # wraps the target linears, builds a head
        self.model, self.cfg = base, single
        L, b = base.L, single.b
        d_in, d_out = base.adapted[0].in_features, base.adapted[0].out_features
        A = torch.empty(L, M, b, d_in)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for layer in range(L):
                for m in range(M):
                    nn.init.kaiming_uniform_(A[layer, m], a=5**0.5)
        self.lora_A = nn.Parameter(A)
        self.lora_B = nn.Parameter(torch.zeros(L, M, d_out, b))
        base.lora_A.requires_grad_(False)
        base.lora_B.requires_grad_(False)
        if fitter.shared_head is not None:  # growing an mtl bank: new members learn under the lineage's head
            base.head.load_state_dict(fitter.shared_head)
            base.head.requires_grad_(False)
        self.scale = lora_scale(single)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        head = [p for p in self.model.head.parameters() if p.requires_grad]
        return {"adapter": [self.lora_A, self.lora_B], "head": head}

    def forward(
        self, input_ids, attention_mask, profile_index, token_type_ids=None, labels=None, packing: Packing | None = None
    ):
        base = self.model
        per_row = [
            Adapter(
                self.lora_A[layer, profile_index], self.lora_B[layer, profile_index], scale=self.scale, packing=packing
            )
            for layer in range(base.L)
        ]
        return base.forward_with(per_row, input_ids, attention_mask, token_type_ids, labels, packing)


def fit_mtl(
    fitter: ProfileFitter, datas: list[ProfileData]
) -> tuple[AdapterBank, dict[str, torch.Tensor], dict[str, dict[str, float]]]:
    """Train one adapter per profile and a shared head jointly; return the learned bank (N = len(datas)),
    the shared head's state and each warm-start profile's holdout metrics under its own adapter. A fitter given
    a shared head keeps it frozen and trains the adapters alone: members to append to that head's mtl bank
    (`xpeft.core.bank.grow_bank`), so the profiles of the grown bank share one head."""
    tcfg = fitter.tcfg
    cleaned = [clean(d, fitter.xcfg.num_labels, fitter.regression)[0] for d in datas]
    mtl = MultiTaskAdapters(fitter, len(cleaned), tcfg.seed).to(fitter.device)
    rows = [
        {**r, "profile_index": m}
        for m, d in enumerate(cleaned)
        for r in tokenize(d.train, fitter.tokenizer, tcfg.max_length)
    ]
    result = fit(mtl, rows, tcfg, pad_token_id=fitter.pad, session=Session(device=fitter.device))
    log.info(
        "mtl warm start: %d profiles, %d rows, %d steps, final loss %.4f",
        len(cleaned),
        len(rows),
        result.steps,
        result.losses[-1],
    )
    mtl.eval()
    pairs = [(mtl.lora_A[:, m].detach(), mtl.lora_B[:, m].detach() * mtl.scale) for m in range(len(cleaned))]
    head = {k: v.detach().cpu().clone() for k, v in mtl.model.head.state_dict().items()}
    bank = bank_from_adapters(pairs, target=mtl.model.cfg.target, source="mtl")  # the resolved path
    metrics, base = {}, mtl.model
    tests = [tokenize(d.test, fitter.tokenizer, tcfg.max_length) for d in cleaned]
    batching = batching_for(base, [r for t in tests for r in t], tcfg, fitter.device, fitter.pad)
    for m, d in enumerate(cleaned):
        base.lora_A.data.copy_(mtl.lora_A[:, m].detach())
        base.lora_B.data.copy_(mtl.lora_B[:, m].detach())
        metrics[d.profile_id] = evaluate(base, tests[m], profile_metric_fn(base), tcfg.batch_size, fitter.pad, batching)
    return bank, head, metrics


def bank_member_profile(
    bank: AdapterBank,
    member: int,
    xcfg: XPeftConfig,
    profile_id: str,
    metrics: dict | None = None,
    head_id: str | None = None,
    label_names: list[str] | None = None,
    text_pair: bool | None = None,
) -> Profile:
    """A warm-start profile whose own adapter became bank member `member` (the mtl setting), stored as an
    X-PEFT profile: hard masks one-hot at `member` in every block (k = 1), no LayerNorm (its adapter was
    trained without one), the shared head. It computes exactly what the joint training computed for it, in
    2·⌈N/8⌉·L bytes instead of an adapter."""
    if not 0 <= member < bank.N:
        raise ValueError(f"bank member {member} out of range: the bank has N={bank.N} adapters")
    cfg = replace(xcfg, mode="x_peft", mask_type="hard", N=bank.N, k=1, b=bank.b, layer_norm=False, masks="AB")
    cfg = replace(cfg, text_pair=text_pair if text_pair is not None else cfg.text_pair)
    onehot = torch.zeros(bank.L, bank.N)
    onehot[:, member] = 1.0
    return Profile(
        profile_id=profile_id,
        config=cfg,
        mask_bits=pack_bits(onehot) + pack_bits(onehot),
        head_id=head_id,
        bank_fingerprint=bank.fingerprint,
        metrics=dict(metrics or {}),
        label_names=label_names,
    )
