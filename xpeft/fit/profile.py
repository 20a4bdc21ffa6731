"""Fitting profiles, without Ray: one profile at a time against a loaded encoder and bank.

The farm's actors (xpeft.ray.farm) hold one `ProfileFitter` each and call `fit` for every profile they get.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections import Counter
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from xpeft.config import TrainConfig, XPeftConfig
from xpeft.core.bank import AdapterBank
from xpeft.core.model import XPeftModel
from xpeft.data.dataset import ProfileData
from xpeft.data.labels import label_counts
from xpeft.data.tokens import tokenize
from xpeft.fit.loop import FitResult, Session, fit
from xpeft.profiles.record import Profile, profile_from_model

log = logging.getLogger(__name__)


@dataclass
class FittedProfile:
    """What fitting one profile gives: the profile to store, its fit, and the rows it left out."""

    profile: Profile
    fit: FitResult
    seconds: float
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

    def with_configs(self, xcfg: XPeftConfig, tcfg: TrainConfig) -> ProfileFitter:
        """This fitter's encoder, bank and head with another mask config or fit (an on-demand fit's overrides)."""
        other = copy.copy(self)
        other.xcfg, other.tcfg = xcfg, tcfg
        return other

    @property
    def regression(self) -> bool:
        return self.xcfg.problem_type == "regression"

    def build(self) -> XPeftModel:
        bank = self.bank if self.xcfg.mode == "x_peft" else None
        model = XPeftModel(self.encoder, self.xcfg, bank, seed=self.tcfg.seed)
        if self.shared_head is not None:  # mtl: the head is reused untouched
            model.head.load_state_dict(self.shared_head)
            model.head.requires_grad_(False)
        return model.to(self.device)

    def fit(self, data: ProfileData) -> FittedProfile:
        start = time.perf_counter()
        data, dropped = clean(data, self.xcfg.num_labels, self.regression)
        model = self.build()
        train = tokenize(data.train, self.tokenizer, self.tcfg.max_length)
        test = tokenize(data.test, self.tokenizer, self.tcfg.max_length)
        result = fit(
            model, train, self.tcfg, eval_rows=test, pad_token_id=self.pad, session=Session(device=self.device)
        )
        metrics = {**result.metrics, "n_train": len(train), "n_test": len(test), "final_loss": result.losses[-1]}
        metrics |= {"epochs": result.epochs, "batch_size": self.tcfg.batch_size, "steps": result.steps}  # the fit
        metrics["label_counts"] = label_counts([r["label"] for r in data.train], self.label_names, self.regression)
        profile = profile_from_model(
            model, data.profile_id, metrics, self.head_id, self.label_names, text_pair=data.text_pair
        )
        return FittedProfile(profile, result, time.perf_counter() - start, dropped)
