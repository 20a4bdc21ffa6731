"""What growing a bank buys (issue 26): news profiles on an mtl bank learned from 16 authors, grown append-only to
32 and 64 with the adapters of more warm-start authors, and the profiles fitted before the growth carried over.

    python benchmarks/bank_growth.py                   # the measured run: MiniLM, the HuffPost news profiles
    python benchmarks/bank_growth.py --epochs 5        # the same banks, the profiles fitted in half the epochs
    python benchmarks/bank_growth.py --epochs 5 --batch-size 8   # half the rows, as many steps as the default
    python benchmarks/bank_growth.py --smoke           # seconds: the tiny backbone, the bundled news sample

1. The authors (the farm's profile data sets, in a seeded shuffle) are split into three warm-start groups of
   --growth authors (16, 16, 32: the banks have N = 16, 32, 64) and --scored authors (the next ones).
2. N=16: §3.1's mtl warm start over group 1 (`fit_mtl`): 16 adapters and the shared head every profile of the
   lineage uses. Growing: the same warm start over the next group with that head frozen (`fit_mtl` given the
   head), its adapters appended (`grow_bank`): N=32, then N=64.
3. On each bank the recipe is chosen on validation data, as for Figure 4: x_peft hard masks with FARM_TRAIN and
   k one of N/2, N/4, N/8 (`K_FRACTIONS`), each fitted on the carved training parts of the first --select scored
   authors (`carve`: a quarter of each one's training rows held out) and scored on the rest of them; the holdouts
   are not read. The best k by mean validation accuracy then fits every scored author (`fitted` on N=16,
   `refitted` on the grown banks); the N=16 profiles are also scored on each grown bank unchanged (`carried`:
   their masks zero-extended, which must give their own predictions: `max_abs_logit_diff`).
4. `majority`: each scored author's most frequent training label predicted for every holdout row, the floor a
   profile must beat (a profile that only learned its author's favourite category scores this).
Each row: mean holdout accuracy and macro-F1 over the scored authors (Figure 4's pair). Every line goes to
<out>/bank_growth.jsonl as it lands, and a run started again with the same arguments goes on from there: the
banks, the shared head and the N=16 profiles wait in <out>/bank_growth_cache/ (verified when read). A markdown
table goes to stdout (BENCHMARKS.md, "Growing a bank").
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import random
import sys
import tempfile
import time
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from harness.fidelity_news import carve, sha256_file
from harness.fidelity_pool import append_line, load_lines
from safetensors.torch import load_file, save_file

from xpeft.config import TrainConfig, XPeftConfig
from xpeft.core.bank import AdapterBank, grow_bank, load_bank, save_bank
from xpeft.core.encoder import load_encoder, load_tokenizer
from xpeft.core.model import XPeftModel
from xpeft.data.dataset import profile_datas
from xpeft.data.profiles import load_news_profiles, load_news_profiles_sample
from xpeft.data.tokens import tokenize
from xpeft.fit.loop import evaluate, predict, profile_metric_fn
from xpeft.fit.profile import BadProfileData, ProfileFitter
from xpeft.fit.recipes import FARM_TRAIN
from xpeft.fit.warm_start import fit_mtl
from xpeft.metrics import compute_metrics
from xpeft.profiles.record import apply_profile, from_row, to_row

SMOKE = {"backbone": "tiny", "growth": [2, 2, 4], "scored": 3, "select": 2, "max_steps": 2, "max_length": 32}
SMOKE_ALSO = ("out",)  # --smoke writes into a new temporary folder (tests/test_benchmarks.py)
RECIPE = ("epochs", "batch_size")  # what --epochs / --batch-size change of the scored profiles' FARM_TRAIN
K_FRACTIONS = {"k N/2": 0.5, "k N/4": 0.25, "k N/8": 0.125}  # the recipes chosen between on validation data


def arguments() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="minilm", help="the encoder (default minilm)")
    ap.add_argument("--data-dir", default=None, help="where news_category_huffpost/ is (default: ../shared/data)")
    ap.add_argument("--min-articles", type=int, default=10, help="authors with fewer articles are left out")
    ap.add_argument("--growth", type=int, nargs="+", default=[16, 16, 32], help="warm-start authors per step")
    ap.add_argument("--scored", type=int, default=32, help="authors whose profiles are fitted and scored")
    ap.add_argument("--select", type=int, default=8, help="scored authors whose carved training parts choose k")
    ap.add_argument("--seed", type=int, default=0, help="the authors' shuffle and every fit's seed")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="the scored profiles' epochs (default: FARM_TRAIN's 10); the warm starts keep FARM_TRAIN, so the "
        "banks are the default run's, reused from its cache",
    )
    ap.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="the scored profiles' batch size (default: FARM_TRAIN's 16); the warm starts keep FARM_TRAIN's",
    )
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
    """One backbone, the lineage's shared head, the fits; what took long is cached in `cache` (verified)."""

    def __init__(self, args, labels, cache: str, profiles_path: str):
        torch.set_num_threads(args.threads)
        self.encoder, self.tokenizer = load_encoder(args.backbone), load_tokenizer(args.backbone)
        over = {k: v for k, v in (("max_steps", args.max_steps), ("max_length", args.max_length)) if v}
        self.warm_tcfg: TrainConfig = dataclasses.replace(FARM_TRAIN, seed=args.seed, **over)
        scored = {k: getattr(args, k) for k in RECIPE if getattr(args, k)}
        self.tcfg = dataclasses.replace(self.warm_tcfg, **scored)
        self.xcfg = XPeftConfig(head="linear", num_labels=labels.num_labels, problem_type=labels.problem_type)
        self.head: dict | None = None
        self.cache, self.profiles_path = cache, profiles_path
        os.makedirs(cache, exist_ok=True)

    def fitter(self, bank: AdapterBank | None, k_fraction: float = 0.5) -> ProfileFitter:
        """A warm start's fitter (no bank: FARM_TRAIN) or the scored profiles' (hard masks, k a fraction of N)."""
        mode = "x_peft" if bank is not None else "single_adapter"
        x = dataclasses.replace(self.xcfg, mode=mode, mask_type="hard")
        tcfg = self.warm_tcfg if bank is None else self.tcfg
        if bank is not None:
            x = dataclasses.replace(x, N=bank.N, b=bank.b, k=max(1, round(bank.N * k_fraction)))
        return ProfileFitter(self.encoder, self.tokenizer, bank, x, tcfg, self.head, "mtl" if self.head else None)

    def members(self, group: list, step: int) -> AdapterBank:
        """The mtl warm start over `group`: the first learns the shared head, later ones keep it frozen."""
        path = os.path.join(self.cache, f"members-{step}.safetensors")
        head_path = os.path.join(self.cache, "head.safetensors")
        if os.path.exists(path) and os.path.exists(head_path + ".sha256"):
            self.head = self.head or self.read_head(head_path)
            return load_bank(path)
        bank, head, _ = fit_mtl(self.fitter(None), group)
        if self.head is None:
            save_file(head, head_path)
            with open(head_path + ".sha256", "w") as f:
                f.write(sha256_file(head_path))
            self.head = head
        save_bank(bank, path)
        return bank

    @staticmethod
    def read_head(path: str) -> dict:
        with open(path + ".sha256") as f:
            if f.read().strip() != sha256_file(path):
                raise SystemExit(f"{path} does not match its fingerprint: delete {os.path.dirname(path)} to refit")
        return load_file(path)

    def fit(self, bank: AdapterBank, datas: list, k_fraction: float) -> dict:
        fitter, out = self.fitter(bank, k_fraction), {}
        for d in datas:
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

    def save_profiles(self, profiles: dict) -> None:
        pq.write_table(pa.Table.from_pylist([to_row(p) for p in profiles.values()]), self.profiles_path)

    def load_profiles(self) -> dict | None:
        if not os.path.exists(self.profiles_path):
            return None
        return {r["profile_id"]: from_row(r) for r in pq.read_table(self.profiles_path).to_pylist()}


def holdout(profiles: dict) -> dict:
    """Each fitted profile's holdout metrics, by id (what `row` averages)."""
    return {pid: p.metrics for pid, p in profiles.items()}


def majority(scored: list) -> dict:
    """Each author's most frequent training label, predicted for every holdout row."""
    out = {}
    for d in scored:
        top = Counter(r["label"] for r in d.train).most_common(1)[0][0]
        truth = [r["label"] for r in d.test]
        out[d.profile_id] = compute_metrics("profile", [top] * len(truth), truth)
    return out


def row(kind: str, N: int | None, metrics: dict, seconds: float, **extra) -> dict:
    acc = [m["accuracy"] for m in metrics.values()]
    f1 = [m["f1"] for m in metrics.values()]
    scores = {"authors": len(acc), "accuracy": float(np.mean(acc)), "f1": float(np.mean(f1))}
    return {"profiles": kind, "N": N, **scores, "seconds": round(seconds, 1), **extra}


class Lines:
    """bank_growth.jsonl: each line written as it lands, keyed by the run's arguments, so a run started again
    with the same ones takes up what it finished."""

    BANKS = ("backbone", "min_articles", "growth", "seed", "max_steps", "max_length", "smoke")  # what the banks are

    def __init__(self, path: str, args):
        self.path = path
        self.banks = json.dumps({k: getattr(args, k) for k in self.BANKS}, sort_keys=True)
        keep = (*self.BANKS, "scored", "select", *(k for k in RECIPE if getattr(args, k)))
        self.run = json.dumps({k: getattr(args, k) for k in keep}, sort_keys=True)
        self.done = {x["key"]: x for x in load_lines(path) if x.get("run") == self.run}

    def get(self, key: str) -> dict | None:
        return self.done.get(key)

    def put(self, key: str, line: dict) -> dict:
        line = {**line, "key": key, "run": self.run}
        append_line(self.path, line)
        self.done[key] = line
        return line


def choose_k(run: Growth, bank: AdapterBank, select: list, lines: Lines) -> str:
    """The k of K_FRACTIONS with the best mean accuracy (then macro-F1; a tie: the larger k) on the carved
    validation parts of `select`."""
    carved = [c for c in map(carve, select) if c.test]
    if not carved:
        raise SystemExit(f"none of the {len(select)} --select authors has 3 training rows to carve")
    scores = {}
    for name, fraction in K_FRACTIONS.items():
        key = f"validation N={bank.N} {name}"
        line = lines.get(key)
        if line is None:
            start = time.perf_counter()
            fitted = run.fit(bank, carved, fraction)
            metrics = holdout(fitted)
            line = lines.put(key, row("validation", bank.N, metrics, time.perf_counter() - start, variant=name))
        scores[name] = (line["accuracy"], line["f1"])
    return max(scores, key=scores.get)


def main(argv: list[str] | None = None) -> list[dict]:
    args = arguments().parse_args(argv)
    if args.smoke:
        for k, v in SMOKE.items():
            setattr(args, k, v)
    if args.out is None:
        args.out = tempfile.mkdtemp(prefix="bank-growth-") if args.smoke else "results"
    groups, scored, labels = authors(args)
    os.makedirs(args.out, exist_ok=True)
    lines = Lines(os.path.join(args.out, "bank_growth.jsonl"), args)
    cache = os.path.join(args.out, "bank_growth_cache", hashlib.sha1(lines.banks.encode()).hexdigest()[:12])
    profiles = os.path.join(cache, f"profiles-first-bank-{hashlib.sha1(lines.run.encode()).hexdigest()[:12]}.parquet")
    run = Growth(args, labels, cache, profiles)
    select = scored[: args.select]
    table = [lines.get("majority") or lines.put("majority", row("majority", None, majority(scored), 0.0))]

    start = time.perf_counter()
    first = bank = run.members(groups[0], 0)
    chosen = choose_k(run, bank, select, lines)
    old = run.load_profiles()
    if old is None:
        old = run.fit(bank, scored, K_FRACTIONS[chosen])
        run.save_profiles(old)
    metrics = holdout(old)
    seconds = time.perf_counter() - start
    table.append(lines.get("fitted") or lines.put("fitted", row("fitted", bank.N, metrics, seconds, k=chosen)))
    for step, group in enumerate(groups[1:], 1):
        start = time.perf_counter()
        bank = grow_bank(bank, run.members(group, step))
        key = f"carried N={bank.N}"
        if lines.get(key) is None:
            metrics, diff = run.carried(old, bank, scored, first)
            seconds = time.perf_counter() - start
            lines.put(key, row("carried", bank.N, metrics, seconds, k=table[1]["k"], max_abs_logit_diff=diff))
        table.append(lines.get(key))
        key = f"refitted N={bank.N}"
        if lines.get(key) is None:
            chosen = choose_k(run, bank, select, lines)
            start = time.perf_counter()
            refit = run.fit(bank, scored, K_FRACTIONS[chosen])
            metrics = holdout(refit)
            lines.put(key, row("refitted", bank.N, metrics, time.perf_counter() - start, k=chosen))
        table.append(lines.get(key))
    report(table, lines.path)
    return table


def report(table: list[dict], path: str) -> None:
    print("| N | profiles | k | authors | accuracy | macro-F1 | max abs logit diff |\n|---|---|---|---|---|---|---|")
    for x in table:
        diff = f"{x['max_abs_logit_diff']:.1e}" if "max_abs_logit_diff" in x else ""
        N, k = x["N"] or "–", x.get("k", "")
        print(f"| {N} | {x['profiles']} | {k} | {x['authors']} | {x['accuracy']:.4f} | {x['f1']:.4f} | {diff} |")
    floor = table[0]
    for x in table[1:]:
        if x["accuracy"] <= floor["accuracy"] or x["f1"] <= floor["f1"]:
            scores = f"{x['accuracy']:.4f}/{x['f1']:.4f} against {floor['accuracy']:.4f}/{floor['f1']:.4f}"
            print(f"WARNING: the {x['profiles']} profiles on N={x['N']} do not beat the majority class ({scores})")
    print(f"(lines appended to {path})")


if __name__ == "__main__":
    main()
