"""The news stage of the quality harness (benchmarks/fidelity.py): Figure 4 on the HuffPost news profiles, with
the baseline a product team would compare against, one *global* model.

Rows: head_only, single_adapter, x_peft hard and soft over the sa bank and over the mtl bank (§3.1; the bank
learned from the warm-start profiles, split as the farm splits them), and `global`: one single_adapter and
head fitted on every profile's training rows pooled. Every row is scored on the same profiles, the ones that
get masks after the warm start, by the mean over profiles of holdout accuracy and macro-F1 (Figure 4's pair).

Two phases, each resumable (one JSON line a profile and variant in <out>/news.jsonl):
- validation: every variant of every row (the NEWS table) fitted on a part of each profile's training rows and
  scored on the rest of them (`carve`; the warm start, too, on the carved parts). The holdouts are not read.
- holdout: each row's best variant on validation, fitted on the whole training parts, scored on the holdouts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
import traceback

import numpy as np
from harness.fidelity_pool import append_line, finished, load_lines, run_pool
from harness.fidelity_runs import SMOKE_ROWS, HarnessConfig, fingerprint

from xpeft.config import TrainConfig, XPeftConfig
from xpeft.fit.recipes import FARM_TRAIN

log = logging.getLogger("fidelity")

ROWS = {  # Figure 4's rows: (mode, mask type, the bank)
    "head_only": ("head_only", None, None),
    "single_adapter": ("single_adapter", None, None),
    "sa-hard": ("x_peft", "hard", "sa"),
    "sa-soft": ("x_peft", "soft", "sa"),
    "mtl-hard": ("x_peft", "hard", "mtl"),
    "mtl-soft": ("x_peft", "soft", "mtl"),
    "global": ("single_adapter", None, "global"),
}
# row, variant, XPeftConfig overrides (k below 1: a fraction of the bank), TrainConfig overrides over FARM_TRAIN
NEWS = [
    ("head_only", "FARM_TRAIN", {}, {}),
    ("head_only", "head lr 1e-2", {}, {"head_lr": 1e-2}),
    ("single_adapter", "FARM_TRAIN", {}, {}),
    ("single_adapter", "adapter lr 3e-3", {}, {"adapter_lr": 3e-3}),
    ("sa-hard", "mask lr 0.1", {}, {"mask_lr": 0.1}),
    ("sa-hard", "mask lr 0.3", {}, {"mask_lr": 0.3}),
    ("sa-hard", "mask lr 1", {}, {"mask_lr": 1.0}),
    ("sa-soft", "mask lr 0.1", {}, {"mask_lr": 0.1}),
    ("sa-soft", "mask lr 0.3", {}, {"mask_lr": 0.3}),
    ("sa-soft", "mask lr 1", {}, {"mask_lr": 1.0}),
    ("mtl-hard", "mask lr 0.1", {}, {"mask_lr": 0.1}),
    ("mtl-hard", "mask lr 0.3", {}, {"mask_lr": 0.3}),
    ("mtl-hard", "mask lr 1", {}, {"mask_lr": 1.0}),
    ("mtl-hard", "k N/4", {"k": 0.25}, {}),
    ("mtl-hard", "k 3N/4", {"k": 0.75}, {}),
    ("mtl-soft", "mask lr 0.1", {}, {"mask_lr": 0.1}),
    ("mtl-soft", "mask lr 0.3", {}, {"mask_lr": 0.3}),
    ("mtl-soft", "mask lr 1", {}, {"mask_lr": 1.0}),
    ("global", "3 epochs, batch 32", {}, {"epochs": 3, "batch_size": 32}),
    ("global", "10 epochs, batch 32", {}, {"batch_size": 32}),
]
VARIANTS = {(row, name): (x, t) for row, name, x, t in NEWS}


def carve(d, fraction: float = 0.25, seed: int = 0):
    """A profile's training part split again: a validation part of `fraction` (at least 1 row; none below 3
    rows) and the rest to fit on, as a ProfileData whose `test` is the validation part."""
    from xpeft.data.dataset import ProfileData

    rows = list(d.train)
    order = np.random.default_rng([seed, len(rows), sum(map(ord, d.profile_id))]).permutation(len(rows))
    n_val = max(1, round(fraction * len(rows))) if len(rows) >= 3 else 0
    return ProfileData(d.profile_id, [rows[i] for i in order[n_val:]], [rows[i] for i in order[:n_val]])


def news_data(cfg: HarnessConfig):
    """(warm-start profiles, scored profiles, every profile, the label vocabulary), the farm's split."""
    from xpeft.data.dataset import profile_datas
    from xpeft.data.profiles import load_news_profiles, load_news_profiles_sample
    from xpeft.ray.farm import FarmConfig, split_warm

    table = load_news_profiles_sample() if cfg.smoke else load_news_profiles(cfg.data_dir, cfg.min_articles)
    dataset = profile_datas(table)
    profiles = dataset.profiles
    cap = SMOKE_ROWS["profiles"] if cfg.smoke else cfg.limit
    profiles = profiles[:cap] if cap else profiles
    warm, rest = split_warm(FarmConfig(store="-", setting="mtl", train=FARM_TRAIN), profiles)
    return warm, rest, profiles, dataset.labels


def recipe(row: str, variant: str, overrides: dict) -> tuple[dict, TrainConfig]:
    x, t = VARIANTS[(row, variant)]
    return x, dataclasses.replace(FARM_TRAIN, **{**overrides, **t})


def line_key(phase: str, row: str, variant: str, profile_id: str, cfg: HarnessConfig, overrides: dict) -> str:
    x, t = recipe(row, variant, overrides)
    what = {"phase": phase, "row": row, "variant": variant, "profile_id": profile_id, "xpeft": x}
    return json.dumps({**what, "recipe": t.to_dict(), "backbone": cfg.backbone, "limit": cfg.limit}, sort_keys=True)


# --- the learned banks ---------------------------------------------------------------------------------------


def labels_config(labels, **kw) -> XPeftConfig:
    return XPeftConfig(head="linear", num_labels=labels.num_labels, problem_type=labels.problem_type, **kw)


def learned_banks(phase: str, cfg: HarnessConfig, warm: list, labels, overrides: dict) -> dict:
    """The sa and mtl banks of the phase's warm-start profiles (their carved parts for validation) and the mtl
    shared head, fitted with FARM_TRAIN as the farm does; cached in <out>/news_cache/ (verified when read)."""
    import torch
    from safetensors.torch import load_file, save_file

    from xpeft.core.bank import bank_to_object, load_bank, save_bank
    from xpeft.core.encoder import load_encoder, load_tokenizer
    from xpeft.fit.profile import BadProfileData, ProfileFitter
    from xpeft.fit.warm_start import bank_from_single_adapters, fit_mtl

    tcfg = dataclasses.replace(FARM_TRAIN, **overrides)
    datas = [carve(d) for d in warm] if phase == "validation" else warm
    datas = [d for d in datas if d.test]
    tag = json.dumps([phase, tcfg.to_dict(), [d.profile_id for d in datas], cfg.backbone], sort_keys=True)
    stem = os.path.join(cfg.out, "news_cache", f"{phase}-{hashlib.sha1(tag.encode()).hexdigest()[:12]}")
    os.makedirs(os.path.dirname(stem), exist_ok=True)
    if not os.path.exists(stem + "-mtl-head.json"):
        torch.set_num_threads(cfg.threads)
        encoder, tokenizer = load_encoder(cfg.backbone), load_tokenizer(cfg.backbone)
        fitter = ProfileFitter(encoder, tokenizer, None, labels_config(labels, mode="single_adapter"), tcfg)
        log.info("news %s: the sa bank (%d single_adapter fits)", phase, len(datas))
        fitted = []
        for d in datas:
            try:
                fitted.append(fitter.fit(d).profile)
            except BadProfileData as e:
                log.warning("sa warm start leaves out %s: %s", d.profile_id, e)
        save_bank(bank_from_single_adapters(fitted, fitter.xcfg.target), stem + "-sa.safetensors")
        log.info("news %s: the mtl bank (%d profiles trained jointly)", phase, len(datas))
        bank, head, _ = fit_mtl(fitter, datas)
        save_bank(bank, stem + "-mtl.safetensors")
        save_file(head, stem + "-mtl-head.safetensors")
        with open(stem + "-mtl-head.json", "w") as f:
            json.dump({"sha256": sha256_file(stem + "-mtl-head.safetensors")}, f)
    with open(stem + "-mtl-head.json") as f:
        if json.load(f)["sha256"] != sha256_file(stem + "-mtl-head.safetensors"):
            raise ValueError(f"{stem}-mtl-head.safetensors does not match its fingerprint: delete {stem}-* to refit")
    banks = {s: bank_to_object(load_bank(f"{stem}-{s}.safetensors")) for s in ("sa", "mtl")}
    return {"banks": banks, "head": load_file(stem + "-mtl-head.safetensors")}


def sha256_file(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


# --- one fit -------------------------------------------------------------------------------------------------


class NewsWorker:
    """Fits news profiles (the farm's ProfileFitter) and the global model on one loaded backbone."""

    def __init__(self, cfg: HarnessConfig, overrides: dict, learned: dict | None, labels):
        import torch

        from xpeft.core.bank import bank_from_object
        from xpeft.core.encoder import load_encoder, load_tokenizer

        torch.set_num_threads(cfg.threads)
        self.cfg, self.overrides, self.labels = cfg, overrides, labels
        self.encoder, self.tokenizer = load_encoder(cfg.backbone), load_tokenizer(cfg.backbone)
        self.banks = {s: bank_from_object(b) for s, b in (learned or {}).get("banks", {}).items()}
        self.head = (learned or {}).get("head")

    def fit(self, item: tuple) -> list[dict]:
        phase, row, variant, keys, data = item
        ids = list(keys)
        try:
            if row == "global":
                return self.fit_global(phase, variant, keys, *data)
            return [self.fit_profile(phase, row, variant, keys[ids[0]], data)]
        except Exception as e:  # noqa: BLE001 - one fit's crash is that fit's result, not the stage's end
            log.exception("news fit failed: %s %s %s", phase, row, variant)
            return self.died(item, f"{type(e).__name__}: {e}", traceback.format_exc()[-4000:])

    @staticmethod
    def died(item: tuple, reason: str, trace: str = "") -> list[dict]:
        phase, row, variant, keys, _ = item
        line = {"stage": "news", "phase": phase, "row": row, "variant": variant, "failed": reason, "traceback": trace}
        return [{**line, "key": key, "profile_id": pid} for pid, key in keys.items()]

    def fit_profile(self, phase: str, row: str, variant: str, key: str, data) -> dict:
        from xpeft.fit.profile import BadProfileData, ProfileFitter
        from xpeft.ray.farm import resolve_k

        mode, mask_type, setting = ROWS[row]
        x, tcfg = recipe(row, variant, self.overrides)
        xcfg = labels_config(self.labels, mode=mode, mask_type=mask_type or "hard")
        bank = self.banks.get(setting)
        if bank is not None:
            k = x.get("k")
            k = max(1, int(k * bank.N)) if k is not None and k < 1 else k
            xcfg, _ = resolve_k(dataclasses.replace(xcfg, N=bank.N, b=bank.b, k=k), bank, setting)
        head = self.head if setting == "mtl" else None
        fitter = ProfileFitter(self.encoder, self.tokenizer, bank, xcfg, tcfg, head, "shared" if head else None)
        line = {
            "key": key,
            "stage": "news",
            "phase": phase,
            "row": row,
            "variant": variant,
            "profile_id": data.profile_id,
        }
        try:
            out = fitter.fit(data)
        except BadProfileData as e:
            return {**line, "skipped": str(e)}
        m, p = out.profile.metrics, out.profile
        masks = None
        if p.mask_bits is not None:
            masks = hashlib.sha1(p.mask_bits).hexdigest()[:16]
        elif "mask_logits_B" in p.tensors:
            masks = fingerprint(
                t.softmax(-1).numpy() for k, t in sorted(p.tensors.items()) if k.startswith("mask_logits")
            )
        return {
            **line,
            "accuracy": m["accuracy"],
            "f1": m["f1"],
            "n_train": m["n_train"],
            "n_test": m["n_test"],
            "final_loss": m["final_loss"],
            "seconds": out.seconds,
            "record_bytes": p.record_bytes,
            "masks": masks,
            "k": xcfg.top_k if xcfg.mode == "x_peft" and xcfg.mask_type == "hard" else None,
            "recipe": tcfg.to_dict(),
        }

    def fit_global(self, phase: str, variant: str, keys: dict, pooled: list, scored: list) -> list[dict]:
        """One single_adapter and head on every profile's training rows pooled, scored on each profile's
        holdout (validation part) as the per-profile rows are."""
        from xpeft.fit.loop import predict, profile_metric_fn
        from xpeft.fit.task import FitConfig, TaskData, fit_task, tokenize

        _, tcfg = recipe("global", variant, self.overrides)
        xcfg = labels_config(self.labels, mode="single_adapter")
        pad = self.tokenizer.pad_token_id or 0
        rows = tokenize([r for d in pooled for r in d.train], self.tokenizer, tcfg.max_length)
        fcfg = FitConfig(xpeft=xcfg, train=tcfg, backbone=self.cfg.backbone, eval_every_epoch=False)
        model, result = fit_task(fcfg, TaskData(rows, [], pad), encoder=self.encoder)
        tests = {d.profile_id: tokenize(d.test, self.tokenizer, tcfg.max_length) for d in scored}
        preds = predict(model, [r for t in tests.values() for r in t], 64, pad).argmax(-1)
        predicted = {"majority_share": float(np.bincount(preds).max() / len(preds)) if len(preds) else None}
        metric, lines, at = profile_metric_fn(model), [], 0
        for pid, test in tests.items():
            line = {"key": keys[pid], "stage": "news", "phase": phase, "row": "global", "variant": variant}
            line |= {"profile_id": pid, "n_train": len(rows), "n_test": len(test), "recipe": tcfg.to_dict()}
            if not test:
                lines.append({**line, "skipped": f"profile {pid} has no rows to score"})
                continue
            m = metric(preds[at : at + len(test)], np.array([r["labels"] for r in test]))
            at += len(test)
            line |= {"accuracy": m["accuracy"], "f1": m["f1"], "seconds": result.seconds, "record_bytes": None}
            lines.append({**line, "predicted": predicted})
        return lines


# --- the stage -----------------------------------------------------------------------------------------------


def items_of(phase: str, rows_variants: list[tuple[str, str]], rest, everyone, cfg, overrides, done) -> list[tuple]:
    """The phase's fits not finished yet: one item a (row, variant, profile), one a global variant."""
    scored = [carve(d) for d in rest] if phase == "validation" else rest
    pooled = [carve(d) for d in everyone] if phase == "validation" else everyone
    items = []
    for row, variant in rows_variants:
        keys = {d.profile_id: line_key(phase, row, variant, d.profile_id, cfg, overrides) for d in scored}
        if row == "global":
            if set(keys.values()) - done:
                items.append((phase, row, variant, keys, (pooled, scored)))
            continue
        items += [
            (phase, row, variant, {d.profile_id: keys[d.profile_id]}, d)
            for d in scored
            if keys[d.profile_id] not in done
        ]
    return items


def chosen(lines: list[dict]) -> dict[str, tuple[str, float]]:
    """Each row's variant with the best mean validation accuracy (ties: the first in NEWS), and that mean."""
    means = {}
    for row, variant, _, _ in NEWS:
        acc = [
            r["accuracy"]
            for r in lines
            if r.get("phase") == "validation" and (r["row"], r["variant"]) == (row, variant) and "accuracy" in r
        ]
        if acc and (row not in means or np.mean(acc) > means[row][1]):
            means[row] = (variant, float(np.mean(acc)))
    return means


def run_news(cfg: HarnessConfig, overrides: dict) -> str:
    """Both phases of the news stage, resumable; returns the JSONL's path."""
    path = os.path.join(cfg.out, "news.jsonl")
    warm, rest, everyone, labels = news_data(cfg)
    log.info("news: %d profiles, %d warm-start, %d scored", len(everyone), len(warm), len(rest))
    for phase in ("validation", "holdout"):
        latest = {r["key"]: r for r in load_lines(path)}
        if phase == "validation":
            pairs = [(row, variant) for row, variant, _, _ in NEWS]
        else:
            pairs = [(row, v) for row, (v, _) in chosen(list(latest.values())).items()]
        items = items_of(phase, pairs, rest, everyone, cfg, overrides, finished(path))
        log.info("news %s: %d fits to go", phase, sum(len(i[3]) for i in items))
        if not items:
            continue
        needs_banks = any(ROWS[i[1]][2] in ("sa", "mtl") for i in items)
        learned = learned_banks(phase, cfg, warm, labels, overrides) if needs_banks else None
        start, count = time.perf_counter(), iter(range(1, 1 + sum(len(i[3]) for i in items)))

        def on_line(line: dict, phase=phase, start=start, count=count) -> None:
            append_line(path, line)
            n = next(count)
            if "failed" in line:
                log.warning(
                    "news %s %s %s %s FAILED: %s",
                    phase,
                    line["row"],
                    line["variant"],
                    line["profile_id"],
                    line["failed"],
                )
            elif n % 20 == 0:
                log.info("news %s: %d fits in %.0f s", phase, n, time.perf_counter() - start)

        run_pool(cfg, NewsWorker, (cfg, overrides, learned, labels), items, on_line)
    return path
