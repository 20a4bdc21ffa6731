"""Fitting profiles, without Ray: one profile at a time against a loaded encoder and bank, and the two
warm starts of §3.1 that produce a learned bank (`x_peft with sa`, `x_peft with mtl`).

The farm's actors (xpeft.farm) hold one `ProfileFitter` each and call `fit` for every profile they get.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from xpeft.bank import AdapterBank, bank_from_adapters
from xpeft.config import TrainConfig, XPeftConfig
from xpeft.data.labels import LabelVocabulary, label_counts
from xpeft.layer import Adapter
from xpeft.masks import pack_bits
from xpeft.model import XPeftModel, encoder_blocks, task_loss
from xpeft.profiles import Profile, profile_from_model
from xpeft.train import (
    classification_metrics,
    evaluate,
    fit,
    make_loader,
    make_scheduler,
    regression_metrics,
    seed_everything,
    tokenize,
    total_steps,
)

log = logging.getLogger(__name__)


@dataclass
class ProfileData:
    """One profile's examples: rows of {"text", "label"}; `test` is its 30% holdout (§3.1)."""

    profile_id: str
    train: list[dict]
    test: list[dict]

    @property
    def size(self) -> int:
        return len(self.train) + len(self.test)


@dataclass
class FitOutcome:
    profile: Profile
    metrics: dict[str, float]
    seconds: float
    n_train: int
    n_test: int
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> rows left out


class BadProfileData(ValueError):
    """The profile's data cannot be fitted; the message says why (recorded in the run report)."""


def clean(data: ProfileData, num_labels: int, regression: bool = False) -> tuple[ProfileData, dict[str, int]]:
    """Drop rows that cannot be used, counting why; reject a profile that has too little left. (A data set read
    through `profile_datas` has none: its bad rows were refused before the run; this guards direct callers.)"""
    dropped: Counter[str] = Counter()

    def ok(row: dict, split: str) -> bool:
        text = row.get("text")
        if not isinstance(text, str) or not text.strip():
            dropped[f"{split}: empty text"] += 1
            return False
        label = row.get("label")
        good = isinstance(label, int | float) and math.isfinite(label) if regression else isinstance(label, int)
        if not good or (not regression and not 0 <= label < num_labels):
            dropped[f"{split}: unknown label {label!r}"] += 1
            return False
        return True

    train = [r for r in data.train if ok(r, "train")]
    test = [r for r in data.test if ok(r, "test")]
    if len(train) < 2:
        raise BadProfileData(
            f"profile {data.profile_id} has {len(train)} usable training examples (needs >= 2)"
            + (f"; dropped {dict(dropped)}" if dropped else "")
        )
    if not test:
        raise BadProfileData(f"profile {data.profile_id} has no usable holdout examples to evaluate on")
    seen = {r["label"] for r in train}
    unseen = [] if regression else [r for r in test if r["label"] not in seen]
    if unseen:  # kept: a shared head can still predict them, and dropping them would flatter the metric
        dropped["test: label never seen in training (kept)"] = len(unseen)
    return replace(data, train=train, test=test), dict(dropped)


class ProfileFitter:
    """Fits profiles one after another on one loaded encoder (frozen, so safe to reuse) and one bank."""

    def __init__(
        self,
        encoder: nn.Module,
        tokenizer,
        bank: AdapterBank | None,
        xcfg: XPeftConfig,
        tcfg: TrainConfig,
        shared_head: dict[str, torch.Tensor] | None = None,
        head_id: str | None = None,
        label_names: list[str] | None = None,
        device: torch.device | str = "cpu",
    ):
        self.device = torch.device(device)
        if self.device.type != "cpu":  # once for every profile: the frozen encoder and bank live there
            encoder = encoder.to(self.device)
            if bank is not None:
                bank = bank.to(self.device)
        self.encoder, self.tokenizer, self.bank = encoder, tokenizer, bank
        self.xcfg, self.tcfg = xcfg, tcfg
        self.shared_head, self.head_id = shared_head, head_id
        self.label_names = label_names
        self.pad = tokenizer.pad_token_id or 0

    def build(self) -> XPeftModel:
        model = XPeftModel(self.encoder, self.xcfg, self.bank if self.xcfg.mode == "x_peft" else None)
        if self.shared_head is not None:  # mtl: the head is reused untouched
            model.head.load_state_dict(self.shared_head)
            model.head.requires_grad_(False)
        return model.to(self.device)

    @property
    def regression(self) -> bool:
        return self.xcfg.problem_type == "regression"

    def fit(self, data: ProfileData) -> FitOutcome:
        start = time.perf_counter()
        data, dropped = clean(data, self.xcfg.num_labels, self.regression)
        seed_everything(self.tcfg.seed)
        model = self.build()
        train = tokenize(data.train, self.tokenizer, self.tcfg.max_length)
        test = tokenize(data.test, self.tokenizer, self.tcfg.max_length)
        metric_fn = regression_metrics if self.regression else classification_metrics
        result = fit(model, train, self.tcfg, eval_rows=test, metric_fn=metric_fn, pad_token_id=self.pad)
        metrics = {**result.metrics, "n_train": len(train), "n_test": len(test), "final_loss": result.losses[-1]}
        metrics["label_counts"] = label_counts([r["label"] for r in data.train], self.label_names, self.regression)
        profile = profile_from_model(model, data.profile_id, metrics, self.head_id, self.label_names)
        return FitOutcome(profile, metrics, time.perf_counter() - start, len(train), len(test), dropped)


# --- the warm starts of §3.1 ---------------------------------------------------------------------------


def bank_from_single_adapters(profiles: list[Profile], target: str) -> AdapterBank:
    """`x_peft with sa`: the adapters of profiles fitted with single_adapter become the learned bank."""
    adapters = []
    for p in profiles:
        if p.config.mode != "single_adapter":
            raise ValueError(f"profile {p.profile_id} is {p.config.mode}, not single_adapter")
        scale = (p.config.lora_alpha or p.config.b) / p.config.b
        adapters.append((p.tensors["lora_A"], p.tensors["lora_B"] * scale))
    return bank_from_adapters(adapters, target=target, source="single_adapter")


class MultiTaskAdapters(nn.Module):
    """`x_peft with mtl`: one LoRA adapter per warm-start profile, one shared head, trained jointly; each
    row of a batch goes through its own profile's adapter (the per-row path of xpeft.layer)."""

    def __init__(self, fitter: ProfileFitter, M: int):
        super().__init__()
        single = replace(fitter.xcfg, mode="single_adapter")
        base = XPeftModel(fitter.encoder, single, None)  # wraps the target linears, builds a head
        self.model = base
        L, b = base.L, single.b
        d_in, d_out = base.adapted[0].in_features, base.adapted[0].out_features
        A = torch.empty(L, M, b, d_in)
        for layer in range(L):
            for m in range(M):
                nn.init.kaiming_uniform_(A[layer, m], a=5**0.5)
        self.lora_A = nn.Parameter(A)
        self.lora_B = nn.Parameter(torch.zeros(L, M, d_out, b))
        base.lora_A.requires_grad_(False)
        base.lora_B.requires_grad_(False)
        self.scale = (single.lora_alpha or b) / b

    def forward(self, input_ids, attention_mask, profile_index, token_type_ids=None, labels=None):
        base = self.model
        adapters = [
            Adapter(self.lora_A[layer, profile_index], self.lora_B[layer, profile_index], scale=self.scale)
            for layer in range(base.L)
        ]
        base.set_adapters(adapters)
        hidden = base.encode(input_ids, attention_mask, token_type_ids)
        logits = base.head(hidden, attention_mask)
        return {"logits": logits, "loss": task_loss(logits, labels, base.cfg.problem_type)}


def fit_mtl(
    fitter: ProfileFitter, datas: list[ProfileData]
) -> tuple[AdapterBank, dict[str, torch.Tensor], dict[str, dict[str, float]]]:
    """Train one adapter per profile and a shared head jointly; return the learned bank (N = len(datas)),
    the shared head's state and each warm-start profile's holdout metrics under its own adapter."""
    cleaned = [clean(d, fitter.xcfg.num_labels, fitter.regression)[0] for d in datas]
    seed_everything(fitter.tcfg.seed)
    mtl = MultiTaskAdapters(fitter, len(cleaned))
    rows = []
    for m, d in enumerate(cleaned):
        for r in tokenize(d.train, fitter.tokenizer, fitter.tcfg.max_length):
            rows.append({**r, "profile_index": m})
    loader = make_loader(rows, fitter.tcfg.batch_size, shuffle=True, seed=fitter.tcfg.seed, pad_token_id=fitter.pad)
    collate = loader.collate_fn
    loader.collate_fn = lambda rs: {**collate(rs), "profile_index": torch.tensor([r["profile_index"] for r in rs])}
    tcfg = fitter.tcfg
    steps = total_steps(len(loader), tcfg)
    groups = [
        {"params": [mtl.lora_A, mtl.lora_B], "lr": tcfg.adapter_lr or tcfg.lr},
        {"params": list(mtl.model.head.parameters()), "lr": tcfg.head_lr or tcfg.lr},
    ]
    opt = torch.optim.AdamW(groups, weight_decay=tcfg.weight_decay)
    sched = make_scheduler(opt, steps, tcfg.warmup_ratio)
    mtl.train()
    step = 0
    while step < steps:
        for batch in loader:
            if step >= steps:
                break
            loss = mtl(**batch)["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
    log.info(
        "mtl warm start: %d profiles, %d rows, %d steps, final loss %.4f", len(cleaned), len(rows), steps, loss.item()
    )
    mtl.eval()
    target = fitter.xcfg.target
    adapters = [(mtl.lora_A[:, m].detach(), mtl.lora_B[:, m].detach() * mtl.scale) for m in range(len(cleaned))]
    bank = bank_from_adapters(adapters, target=target, source="mtl")
    head = {k: v.detach().clone() for k, v in mtl.model.head.state_dict().items()}
    metrics = {}
    base = mtl.model
    for m, d in enumerate(cleaned):
        base.lora_A.data.copy_(mtl.lora_A[:, m].detach())
        base.lora_B.data.copy_(mtl.lora_B[:, m].detach())
        test = tokenize(d.test, fitter.tokenizer, tcfg.max_length)
        metric_fn = regression_metrics if fitter.regression else classification_metrics
        metrics[d.profile_id] = evaluate(base, test, metric_fn, tcfg.batch_size, fitter.pad)
    return bank, head, metrics


def bank_member_profile(
    bank: AdapterBank,
    member: int,
    xcfg: XPeftConfig,
    profile_id: str,
    metrics: dict | None = None,
    head_id: str | None = None,
    label_names: list[str] | None = None,
) -> Profile:
    """A warm-start profile whose own adapter became bank member `member` (the mtl setting), stored as an
    X-PEFT profile: hard masks one-hot at `member` in every block (k = 1), no LayerNorm (its adapter was
    trained without one), the shared head. It computes exactly what the joint training computed for it, in
    2·⌈N/8⌉·L bytes instead of an adapter."""
    if not 0 <= member < bank.N:
        raise ValueError(f"bank member {member} out of range: the bank has N={bank.N} adapters")
    cfg = replace(xcfg, mode="x_peft", mask_type="hard", N=bank.N, k=1, b=bank.b, layer_norm=False, masks="AB")
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


def adapted_dims(encoder: nn.Module, target: str) -> tuple[int, int, int]:
    """(L, d_in, d_out) of the target linear in each block, to draw a bank that fits the encoder."""
    lin = encoder_blocks(encoder)[0].get_submodule(target)
    base = getattr(lin, "base", lin)
    return encoder.config.num_hidden_layers, base.in_features, base.out_features


@dataclass
class ProfileDataset:
    """A checked profile data set, one ProfileData per profile, and the classes every profile's head covers."""

    profiles: list[ProfileData]
    labels: LabelVocabulary
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> rows left out (drop_invalid=True)


def profile_datas(table, test_fraction: float = 0.3, seed: int = 42, drop_invalid: bool = False) -> ProfileDataset:
    """Check a profile table (text, label, profile_id[, split][, text_pair]) and split it into one ProfileData
    per profile, labels encoded by the data set's vocabulary (`xpeft.data.labels`).

    Bad rows (null labels, empty texts, invalid ids, unknown splits) are refused before anything is fitted,
    or left out with `drop_invalid`. Without a `split` column each profile gets the seeded, stratified 70/30
    holdout of §3.1."""
    from xpeft.data.labels import check_profile_table
    from xpeft.data.profiles import holdout_split

    checked = check_profile_table(table, drop_invalid=drop_invalid)
    t = checked.table
    if "split" not in t.column_names:
        t = holdout_split(t, test_fraction, seed)
    columns = [c for c in ("text", "text_pair", "label", "profile_id", "split") if c in t.column_names]
    by_profile: dict[str, list[dict]] = {}
    for r in t.select(columns).to_pylist():
        by_profile.setdefault(r["profile_id"], []).append(r)
    datas = []
    for pid, rs in sorted(by_profile.items()):
        keep = [c for c in ("text", "text_pair", "label") if c in columns]
        train = [{c: r[c] for c in keep} for r in rs if r["split"] != "test"]
        test = [{c: r[c] for c in keep} for r in rs if r["split"] == "test"]
        datas.append(ProfileData(pid, train, test))
    return ProfileDataset(datas, checked.labels, checked.dropped)
