"""What growing a bank buys (issue 26): news profiles on an mtl bank learned from 16 authors, grown append-only to
32 and 64 with the adapters of more warm-start authors, and the profiles fitted before the growth carried over.

    python benchmarks/bank_growth.py                   # the measured run: MiniLM, the HuffPost news profiles
    python benchmarks/bank_growth.py --smoke           # seconds: the tiny backbone, the bundled news sample

1. The authors (the farm's profile data sets, in a seeded shuffle) are split into three warm-start groups of
   --growth authors (16, 16, 32: the banks have N = 16, 32, 64) and --scored authors (the next ones).
2. N=16: §3.1's mtl warm start over group 1 (`fit_mtl`): 16 adapters and the shared head every profile of the
   lineage uses. Growing: the same warm start over the next group with that head frozen (`fit_mtl` given the
   head), its adapters appended (`grow_bank`): N=32, then N=64.
3. The scored authors' profiles are fitted on N=16 (x_peft hard masks, k = N/2, the farm's recipe FARM_TRAIN),
   and on every grown bank again (`refitted`); the N=16 profiles are also scored on each grown bank unchanged
   (`carried`: their masks zero-extended, which must give their own predictions: `max_abs_logit_diff`).
Each row: the bank's N, mean holdout accuracy and macro-F1 over the scored authors (Figure 4's pair). Lines go
to <out>/bank_growth.jsonl and a markdown table to stdout (BENCHMARKS.md, "Growing a bank").
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import sys
import tempfile
import time

import numpy as np
import torch

from xpeft.config import TrainConfig, XPeftConfig
from xpeft.core.bank import AdapterBank, grow_bank
from xpeft.core.encoder import load_encoder, load_tokenizer
from xpeft.core.model import XPeftModel
from xpeft.data.dataset import profile_datas
from xpeft.data.profiles import load_news_profiles, load_news_profiles_sample
from xpeft.data.tokens import tokenize
from xpeft.fit.loop import evaluate, predict, profile_metric_fn
from xpeft.fit.profile import BadProfileData, ProfileFitter
from xpeft.fit.recipes import FARM_TRAIN
from xpeft.fit.warm_start import fit_mtl
from xpeft.profiles.record import apply_profile

SMOKE = {"backbone": "tiny", "growth": [2, 2, 4], "scored": 3, "max_steps": 2, "max_length": 32}
SMOKE_ALSO = ("out",)  # --smoke writes into a new temporary folder (tests/test_benchmarks.py)


def arguments() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="minilm", help="the encoder (default minilm)")
    ap.add_argument("--data-dir", default=None, help="where news_category_huffpost/ is (default: ../shared/data)")
    ap.add_argument("--min-articles", type=int, default=10, help="authors with fewer articles are left out")
    ap.add_argument("--growth", type=int, nargs="+", default=[16, 16, 32], help="warm-start authors per step")
    ap.add_argument("--scored", type=int, default=32, help="authors whose profiles are fitted and scored")
    ap.add_argument("--seed", type=int, default=0, help="the authors' shuffle and every fit's seed")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--max-steps", type=int, default=None, help="cap every fit's steps (smoke)")
    ap.add_argument("--max-length", type=int, default=None, help="tokens per text (default: the recipe's)")
    ap.add_argument(
        "--out", default=None, help="folder of bank_growth.jsonl (default results/; --smoke: a new temporary one)"
    )
    ap.add_argument("--smoke", action="store_true", help="seconds: " + ", ".join(f"{k}={v}" for k, v in SMOKE.items()))
    return ap


def authors(args) -> tuple[list[list], list, object]:
    """(the warm-start groups, the scored authors, the label vocabulary)."""
    table = load_news_profiles_sample() if args.smoke else load_news_profiles(args.data_dir, args.min_articles)
    dataset = profile_datas(table)
    profiles = [d for d in dataset.profiles if d.test]
    random.Random(args.seed).shuffle(profiles)
    need = sum(args.growth) + args.scored
    if len(profiles) < need:
        raise SystemExit(f"{len(profiles)} authors with a holdout, {need} needed (--growth, --scored)")
    groups, at = [], 0
    for n in args.growth:
        groups.append(profiles[at : at + n])
        at += n
    return groups, profiles[at : at + args.scored], dataset.labels


class Growth:
    """One backbone, the lineage's shared head, the fits."""

    def __init__(self, args, labels):
        torch.set_num_threads(args.threads)
        self.encoder, self.tokenizer = load_encoder(args.backbone), load_tokenizer(args.backbone)
        over = {k: v for k, v in (("max_steps", args.max_steps), ("max_length", args.max_length)) if v}
        self.tcfg: TrainConfig = dataclasses.replace(FARM_TRAIN, seed=args.seed, **over)
        self.xcfg = XPeftConfig(head="linear", num_labels=labels.num_labels, problem_type=labels.problem_type)
        self.head: dict | None = None

    def fitter(self, bank: AdapterBank | None) -> ProfileFitter:
        mode = "x_peft" if bank is not None else "single_adapter"
        x = dataclasses.replace(self.xcfg, mode=mode, mask_type="hard")
        if bank is not None:
            x = dataclasses.replace(x, N=bank.N, b=bank.b, k=max(1, bank.N // 2))
        return ProfileFitter(self.encoder, self.tokenizer, bank, x, self.tcfg, self.head, "mtl" if self.head else None)

    def members(self, group: list) -> AdapterBank:
        """The mtl warm start over `group`: the first learns the shared head, later ones keep it frozen."""
        bank, head, _ = fit_mtl(self.fitter(None), group)
        self.head = self.head or head
        return bank

    def fit(self, bank: AdapterBank, scored: list) -> dict:
        fitter, out = self.fitter(bank), {}
        for d in scored:
            try:
                out[d.profile_id] = fitter.fit(d).profile
            except BadProfileData as e:
                print(f"left out {d.profile_id}: {e}", file=sys.stderr)
        return out

    def carried(self, profiles: dict, bank: AdapterBank, scored: list, own: AdapterBank) -> tuple[dict, float]:
        """The profiles fitted on `own`, scored on `bank` unchanged, and the largest logit difference between
        the two banks over every holdout row."""
        metrics, diff = {}, 0.0
        for d in scored:
            if d.profile_id not in profiles:
                continue
            p = profiles[d.profile_id]
            rows = tokenize(d.test, self.tokenizer, self.tcfg.max_length)
            logits = []
            for b in (own, bank):
                model = XPeftModel(self.encoder, dataclasses.replace(p.config, N=b.N), b).eval()
                apply_profile(model, p, self.head)
                logits.append(predict(model, rows, self.tcfg.batch_size, self.tokenizer.pad_token_id or 0))
            diff = max(diff, float(np.abs(logits[0] - logits[1]).max()))
            metrics[d.profile_id] = evaluate(model, rows, profile_metric_fn(model), self.tcfg.batch_size)
        return metrics, diff


def row(kind: str, bank: AdapterBank, metrics: dict, seconds: float, **extra) -> dict:
    acc = [m["accuracy"] for m in metrics.values()]
    f1 = [m["f1"] for m in metrics.values()]
    scores = {"authors": len(acc), "accuracy": float(np.mean(acc)), "f1": float(np.mean(f1))}
    return {"profiles": kind, "N": bank.N, "bank": bank.fingerprint, **scores, "seconds": round(seconds, 1), **extra}


def main(argv: list[str] | None = None) -> list[dict]:
    args = arguments().parse_args(argv)
    if args.smoke:
        for k, v in SMOKE.items():
            setattr(args, k, v)
    if args.out is None:
        args.out = tempfile.mkdtemp(prefix="bank-growth-") if args.smoke else "results"
    groups, scored, labels = authors(args)
    run = Growth(args, labels)
    os.makedirs(args.out, exist_ok=True)
    path, lines = os.path.join(args.out, "bank_growth.jsonl"), []
    start = time.perf_counter()
    bank = run.members(groups[0])
    first, old = bank, run.fit(bank, scored)
    lines.append(row("fitted", bank, {k: p.metrics for k, p in old.items()}, time.perf_counter() - start))
    for group in groups[1:]:
        start = time.perf_counter()
        bank = grow_bank(bank, run.members(group))
        grown = time.perf_counter() - start
        metrics, diff = run.carried(old, bank, scored, first)
        lines.append(row("carried", bank, metrics, grown, max_abs_logit_diff=diff))
        start = time.perf_counter()
        refit = run.fit(bank, scored)
        lines.append(row("refitted", bank, {k: p.metrics for k, p in refit.items()}, time.perf_counter() - start))
    with open(path, "a") as f:
        for line in lines:
            f.write(json.dumps({**line, "backbone": args.backbone, "smoke": args.smoke}) + "\n")
    print("| N | profiles | authors | accuracy | macro-F1 | max abs logit diff |\n|---|---|---|---|---|---|")
    for x in lines:
        diff = f"{x['max_abs_logit_diff']:.1e}" if "max_abs_logit_diff" in x else ""
        print(f"| {x['N']} | {x['profiles']} | {x['authors']} | {x['accuracy']:.4f} | {x['f1']:.4f} | {diff} |")
    print(f"(lines appended to {path})")
    return lines


if __name__ == "__main__":
    main()
