"""Time per training step (forward + backward + AdamW) for every mode, with the ratio to single_adapter.

Weights first means the X-PEFT step adds one N-way contraction per block (mask × bank), not N adapters
per token, so its cost should barely grow with N. Default: bundled MiniLM, batch 32 × 128 tokens, CPU.

    python benchmarks/step_time.py                      # head_only, single_adapter, x_peft soft/hard N=100/400/800
    python benchmarks/step_time.py --steps 3 --N 100    # quicker
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from xpeft.config import TrainConfig, XPeftConfig
from xpeft.core.bank import random_bank_for
from xpeft.core.encoder import load_encoder
from xpeft.core.model import XPeftModel
from xpeft.fit.loop import make_optimizer, make_scheduler, train_step


class PerTokenXPeft(XPeftModel):
    """The implementation weights-first avoids, for comparison: every one of the N adapters runs on every
    token and the outputs are mixed with the mask weights (Σ_i w_i·A_i x, LN, then Σ_i w_i·B_i h)."""

    def forward(self, input_ids, attention_mask, token_type_ids=None, labels=None):
        wA, wB = self.mask_weights()
        handles = []
        for layer, module in enumerate(self.adapted):

            def hook(mod, args, out, layer=layer):
                x = args[0]
                h = torch.einsum("n,btnr->btr", wA[layer], torch.einsum("btd,nrd->btnr", x, self.bank.A[layer]))
                h = torch.nn.functional.layer_norm(h, h.shape[-1:], self.ln_weight[layer], self.ln_bias[layer])
                y = torch.einsum("btnd,n->btd", torch.einsum("btr,ndr->btnd", h, self.bank.B[layer]), wB[layer])
                return out + y

            handles.append(module.base.register_forward_hook(hook))
        try:
            hidden = self.encode(input_ids, attention_mask, token_type_ids)
        finally:
            for h in handles:
                h.remove()
        logits = self.head(hidden, attention_mask)
        from xpeft.core.model import task_loss

        return {"logits": logits, "loss": task_loss(logits, labels, self.cfg.problem_type)}


def cases(Ns: list[int]) -> list[tuple[str, XPeftConfig]]:
    out = [("head_only", XPeftConfig(mode="head_only")), ("single_adapter", XPeftConfig(mode="single_adapter"))]
    for N in Ns:
        for mt in ("soft", "hard"):
            out.append((f"x_peft {mt} N={N}", XPeftConfig(mask_type=mt, N=N, k=min(50, N))))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="minilm")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--N", type=int, nargs="+", default=[100, 400, 800])
    ap.add_argument("--steps", type=int, default=5, help="timed steps per mode (after 2 warm-up steps)")
    ap.add_argument("--rounds", type=int, default=1, help="repeat the whole table, interleaving modes")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--per-token", type=int, nargs="*", default=[], help="also time the per-token version at these N")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    encoder = load_encoder(args.backbone)
    banks = {N: random_bank_for(encoder, XPeftConfig(N=N, b=48), seed=0) for N in args.N}
    g = torch.Generator().manual_seed(0)
    batch = {
        "input_ids": torch.randint(1000, 20000, (args.batch, args.tokens), generator=g),
        "attention_mask": torch.ones(args.batch, args.tokens, dtype=torch.long),
        "labels": torch.randint(0, 2, (args.batch,), generator=g),
    }
    tcfg = TrainConfig(lr=1e-3, mask_lr=1e-1, ln_lr=1e-1)
    times: dict[str, list[float]] = {}
    todo = cases(args.N) + [(f"x_peft per-token N={N}", XPeftConfig(mask_type="soft", N=N)) for N in args.per_token]
    for N in args.per_token:
        banks.setdefault(N, random_bank_for(encoder, XPeftConfig(N=N, b=48), seed=0))
    for _ in range(args.rounds):
        for name, cfg in todo:
            cls = PerTokenXPeft if "per-token" in name else XPeftModel
            model = cls(encoder, cfg, banks.get(cfg.N) if cfg.mode == "x_peft" else None).train()
            opt = make_optimizer(model, tcfg)
            sched = make_scheduler(opt, 1000, 0.0)
            for step in range(2 + args.steps):
                t = time.perf_counter()
                train_step(model, batch, opt, sched)
                if step >= 2:
                    times.setdefault(name, []).append(time.perf_counter() - t)
            model.set_adapters(None)
    ref = statistics.median(times["single_adapter"])
    print(
        f"backbone {args.backbone}, batch {args.batch} x {args.tokens} tokens, {args.threads} threads, "
        f"{args.steps * args.rounds} timed steps per mode (median)"
    )
    print("| mode | s/step | x single_adapter |")
    print("|---|---|---|")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {med:.3f} | {med / ref:.2f}x |")


if __name__ == "__main__":
    main()
