"""Quality study: which bank init / scale, target, learning rates, LN init make x_peft train well.

Runs head_only, single_adapter and x_peft variants on a subset of SST-2 with the bundled MiniLM and prints
dev accuracy per variant. Example:
    python benchmarks/quality_study.py --train 2000 --epochs 2 --variants all
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import time

import torch

from xpeft.config import TrainConfig, XPeftConfig
from xpeft.core.bank import random_bank_for
from xpeft.core.encoder import load_encoder, load_tokenizer
from xpeft.core.model import build_model
from xpeft.fit.loop import fit, tokenize

DATA = os.environ.get("XPEFT_DATA_DIR", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))


def read_sst2(split: str, n: int | None, seed: int = 0) -> list[dict]:
    path = os.path.join(DATA, "glue", "SST-2", f"{split}.tsv")
    with open(path, encoding="utf-8") as f:
        rows = [
            {"text": r["sentence"], "label": int(r["label"])}
            for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        ]
    if n:
        g = torch.Generator().manual_seed(seed)
        rows = [rows[i] for i in torch.randperm(len(rows), generator=g)[:n].tolist()]
    return rows


def variants() -> dict[str, tuple[dict, dict, dict]]:
    """name -> (XPeftConfig kwargs, TrainConfig kwargs, bank kwargs)."""
    base_t = {"lr": 1e-3, "head_lr": 1e-3}
    v = {
        "head_only": ({"mode": "head_only"}, base_t, {}),
        "single_adapter": ({"mode": "single_adapter"}, {"lr": 1e-3}, {}),
    }
    for mt in ("soft", "hard"):
        for mlr in (1e-2, 1e-1, 3e-1):
            v[f"{mt}_mlr{mlr}"] = ({"mask_type": mt}, {**base_t, "mask_lr": mlr, "ln_lr": 1e-2}, {})
    return v


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--train", type=int, default=2000)
    ap.add_argument("--dev", type=int, default=None)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--N", type=int, default=100)
    ap.add_argument("--k", type=int, default=None, help="default: half the bank (N/2)")
    ap.add_argument("--target", default="attention.self.value")
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--extra", default="{}", help="json: name -> [xcfg, tcfg, bankcfg] more variants")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("XPEFT_THREADS", "2")))
    tok = load_tokenizer(None)
    train = tokenize(read_sst2("train", args.train), tok, 128)
    dev = tokenize(read_sst2("dev", args.dev), tok, 128)
    vs = variants()
    vs.update({k: tuple(x) for k, x in json.loads(args.extra).items()})
    results = {}
    for name, (xk, tk, bk) in vs.items():
        if args.only and name not in args.only:
            continue
        xcfg = XPeftConfig(**{"N": args.N, "k": args.k, "target": args.target, **xk})
        tcfg = TrainConfig(**{"epochs": args.epochs, "batch_size": args.batch, **tk})
        enc = load_encoder(None)
        bank = None
        if xcfg.mode == "x_peft":
            bank = random_bank_for(enc, xcfg, seed=bk.get("seed", 0), scale=bk.get("scale", 1.0))
        model = build_model(xcfg, bank, encoder=enc, seed=tcfg.seed)
        if "ln_init" in bk and xcfg.mode == "x_peft":
            with torch.no_grad():
                model.ln_weight.fill_(bk["ln_init"])
        t = time.perf_counter()
        res = fit(model, train, tcfg, eval_rows=dev)
        results[name] = {
            "acc": res.metrics["accuracy"],
            "final_loss": sum(res.losses[-20:]) / 20,
            "s": time.perf_counter() - t,
        }
        r = results[name]
        print(f"{name:30s} acc={r['acc']:.4f} loss={r['final_loss']:.4f} {r['s']:.0f}s", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
