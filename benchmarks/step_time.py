"""Rows per second of the fit step (forward + backward + AdamW) on real SST-2 rows: the old loop (random batches
padded to their longest row, fp32) beside the new one (the same random batches packed, bf16 autocast where the
device has native bf16: TrainConfig.packing / .bf16), one line per mode ending in `new/old X.XX`; the frozen
encoder's bare forward and forward + backward per row as the limit; and the x_peft / single_adapter step ratio
at N = 400 (weights first keeps X-PEFT's cost flat in N).

    python benchmarks/step_time.py                          # bundled MiniLM, 768 SST-2 rows, batch 32, 2 threads
    python benchmarks/step_time.py --pack-lengths 64 128 256 512   # the new loop at these pack lengths too
    python benchmarks/step_time.py --smoke                  # tiny random backbone, a few steps: seconds

SST-2 rows come from ../shared/data (XPEFT_DATA_DIR) where it is, else the bundled 400-row sample.
"""

from __future__ import annotations

import argparse
import logging
import random
import statistics
import time
from dataclasses import replace
from functools import partial

import torch
from harness.common import SMOKE_HELP

from xpeft.config import TrainConfig, XPeftConfig
from xpeft.core.bank import random_bank_for
from xpeft.core.encoder import load_encoder, load_tokenizer
from xpeft.core.layer import AdaptedLinear, adapters
from xpeft.core.model import XPeftModel, task_loss
from xpeft.core.packing import encode_packed
from xpeft.data.tasks import SAMPLE, default_data_dir, load_task
from xpeft.data.tokens import tokenize
from xpeft.fit.batching import Batching, batching_for, to_device, use_bf16
from xpeft.fit.loop import make_optimizer, make_scheduler, train_step
from xpeft.fit.task import FitConfig
from xpeft.flags import add_flags, from_flags

TCFG = TrainConfig(lr=1e-3, mask_lr=3e-1, ln_lr=1e-2, head_lr=1e-3, adapter_lr=1e-3)  # TASK_TRAIN's rates


class PerTokenXPeft(XPeftModel):
    """The implementation weights-first avoids, for comparison: every one of the N adapters runs on every
    token and the outputs are mixed with the mask weights (Σ_i w_i·A_i x, LN, then Σ_i w_i·B_i h)."""

    def forward(self, input_ids, attention_mask, token_type_ids=None, labels=None, packing=None):
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
        try:  # no combined adapter: clear what the last training forward left set (see xpeft.core.layer.adapters)
            with adapters(self.adapted, None):
                hidden = self.encode(input_ids, attention_mask, token_type_ids, packing)
        finally:
            for h in handles:
                h.remove()
        logits = self.head(hidden, attention_mask if packing is None else packing.row_mask)
        return {"logits": logits, "loss": task_loss(logits, labels, self.cfg.problem_type)}


def mode_config(name: str, N: int) -> XPeftConfig:
    if name in ("head_only", "single_adapter"):
        return XPeftConfig(mode=name)
    return XPeftConfig(mask_type="soft" if "soft" in name else "hard", N=N, k=min(50, N // 2))


def sst2_rows(n: int, data_dir: str | None, tokenizer, max_length: int, seed: int) -> list[dict]:
    """`n` random SST-2 training rows (all the sample's where it has fewer), tokenized."""
    if data_dir is None:
        data_dir = str(default_data_dir()) if (default_data_dir() / "glue" / "SST-2").is_dir() else SAMPLE
    ds = load_task("sst2", "train", data_dir)
    picked = random.Random(seed).sample(range(len(ds)), min(n, len(ds)))
    return tokenize(ds.select(picked), tokenizer, max_length)


def random_batches(rows: list[dict], batch: int, count: int, seed: int) -> list[list[dict]]:
    """`count` batches of `batch` rows, as the fit's shuffled epochs draw them."""
    rng, order, out = random.Random(seed), [], []
    while len(out) < count:
        if len(order) < batch:
            order += rng.sample(range(len(rows)), len(rows))
        out.append([rows[i] for i in order[:batch]])
        order = order[batch:]
    return out


def rows_per_second(
    model, batches: list[list[dict]], batching: Batching, warmup: int, pad: int, clock=time.perf_counter
) -> float:
    """Fit steps (collation included, as the loop's DataLoader collates in process) on `batches`; the first
    `warmup` untimed."""
    optimizer = make_optimizer(model, TCFG)
    scheduler = make_scheduler(optimizer, 10**6, 0.0)
    collate, device = batching.collator(pad), torch.device("cpu")
    autocast = partial(batching.autocast, device)
    rows, start = 0, clock()
    for i, rows_batch in enumerate(batches):
        if i == warmup:
            rows, start = 0, clock()
        train_step(model, to_device(collate(rows_batch), device), optimizer, scheduler, autocast)
        rows += len(rows_batch)
    return rows / (clock() - start)


def encoder_limit(
    encoder, batches, batching: Batching, warmup: int, pad: int, backward: bool, clock=time.perf_counter
) -> float:
    """Rows/s of the frozen encoder alone (no adapters, no head): the forward, or forward + backward to its
    embeddings (the backward an adapter in the first block needs)."""
    collate, rows, start = batching.collator(pad), 0, clock()
    for module in encoder.modules():  # a training forward leaves its adapters set (see xpeft.core.layer.adapters)
        if isinstance(module, AdaptedLinear):
            module.adapter = None
    hook = encoder.embeddings.register_forward_hook(lambda m, a, out: out.requires_grad_()) if backward else None
    try:
        for i, rows_batch in enumerate(batches):
            if i == warmup:
                rows, start = 0, clock()
            batch = collate(rows_batch)
            packing = batch.pop("packing", None)
            with torch.set_grad_enabled(backward), batching.autocast(torch.device("cpu")):
                if packing is None:
                    inputs = {k: v for k, v in batch.items() if k != "labels"}
                    hidden = encoder(**inputs).last_hidden_state
                else:
                    hidden = encode_packed(encoder, batch["input_ids"], batch.get("token_type_ids"), packing)
            if backward:
                hidden.float().sum().backward()
            rows += len(rows_batch)
    finally:
        if hook is not None:
            hook.remove()
    return rows / (clock() - start)


def padding_stats(batches: list[list[dict]], pack_length: int | None, pad: int) -> float:
    """Tokens the encoder sees per row (padding included) with this layout."""
    collate = Batching(pack_length).collator(pad)
    return sum(collate(b)["input_ids"].numel() for b in batches) / sum(len(b) for b in batches)


SMOKE = {  # sizes, and every path once: the per-token model and a pack length beside the default loops
    **{"backbone": "tiny", "rows": 48, "batch_size": 8, "steps": 2, "warmup": 1, "rounds": 1, "threads": 1},
    **{"N": 8, "ratio_N": 16, "per_token": [8], "pack_lengths": [32]},
}


def arguments() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(ap, FitConfig, only=("backbone",))
    add_flags(ap, TrainConfig, only=("batch_size", "max_length", "seed", "packing", "bf16"), defaults=TCFG)
    ap.set_defaults(batch_size=32)
    ap.add_argument("--rows", type=int, default=768, help="random SST-2 training rows (default: 768)")
    ap.add_argument("--data-dir", default=None, help="GLUE files (default: ../shared/data, else the bundled sample)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per mode and loop (default: 20)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps before them (default: 3)")
    ap.add_argument("--rounds", type=int, default=1, help="repeat, interleaving old and new (default: 1)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    ap.add_argument("--N", type=int, default=100, help="bank size of the x_peft lines (default: 100)")
    ap.add_argument("--ratio-N", type=int, default=400, help="N of the x_peft / single_adapter ratio (default: 400)")
    ap.add_argument("--pack-lengths", type=int, nargs="*", default=[], help="also time these (default: none)")
    ap.add_argument("--per-token", type=int, nargs="*", default=[], help="per-token X-PEFT at these N (default: none)")
    ap.add_argument(
        "--cpu-time",
        action="store_true",
        help="rows per CPU-second of this process instead of per wall second: steadier beside other work "
        "(default: wall)",
    )
    ap.add_argument("--smoke", action="store_true", help=SMOKE_HELP)
    return ap


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    args = arguments().parse_args()
    if args.smoke:
        vars(args).update(SMOKE)
    torch.set_num_threads(args.threads)
    tokenizer, encoder = load_tokenizer(args.backbone), load_encoder(args.backbone)
    pad = tokenizer.pad_token_id or 0
    rows = sst2_rows(args.rows, args.data_dir, tokenizer, args.max_length, args.seed)
    batches = random_batches(rows, args.batch_size, args.warmup + args.steps, args.seed)
    banks = {N: random_bank_for(encoder, XPeftConfig(N=N), seed=0) for N in {args.N, args.ratio_N, *args.per_token}}
    new_cfg = from_flags(args, TrainConfig, base=TCFG)
    clock = time.process_time if args.cpu_time else time.perf_counter

    def model(name: str, N: int, cls=XPeftModel) -> XPeftModel:
        cfg = mode_config(name, N)
        return cls(encoder, cfg, banks[N] if cfg.mode == "x_peft" else None, seed=args.seed).train()

    new = batching_for(model("single_adapter", args.N), rows, new_cfg, torch.device("cpu"), pad)
    old = Batching()
    mean = sum(len(r["input_ids"]) for r in rows) / len(rows)
    print(
        f"backbone {args.backbone}, {len(rows)} SST-2 training rows ({mean:.1f} tokens a row), batch "
        f"{args.batch_size}, {args.threads} threads, fit step = forward + backward + AdamW, {args.steps} timed "
        f"steps per mode and loop x {args.rounds} rounds, {'CPU' if args.cpu_time else 'wall'} time"
    )
    print(f"old: {old.describe()}: {padding_stats(batches, None, pad):.1f} tokens a row")
    print(f"new: {new.describe()}: {padding_stats(batches, new.pack_length, pad):.1f} tokens a row")
    if not new.bf16:
        print(f"bf16 is off in the new loop: {use_bf16(new_cfg.bf16, torch.device('cpu'))[1]}")
    loops = {"old": old, "new": new} | {f"pack {n}": replace(new, pack_length=n) for n in args.pack_lengths}
    modes = ["single_adapter", f"x_peft hard N={args.N}", f"x_peft soft N={args.N}"]
    speed: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.rounds):
        for name in modes:
            for loop, batching in loops.items():
                speed.setdefault((name, loop), []).append(
                    rows_per_second(model(name, args.N), batches, batching, args.warmup, pad, clock)
                )
    print("\nfit step, rows/s (median over rounds):")
    for name in modes:
        o, n = (statistics.median(speed[(name, loop)]) for loop in ("old", "new"))
        extra = "".join(f"   {loop} {statistics.median(speed[(name, loop)]):7.1f}" for loop in loops if " " in loop)
        print(f"{name:24s} old {o:7.1f}   new {n:7.1f}{extra}   new/old {n / o:.2f}")
    print("\nthe limit: the frozen encoder alone, rows/s (no adapters, no head, no optimiser):")
    for what, backward in (("forward", False), ("forward + backward", True)):
        o, n = (encoder_limit(encoder, batches, b, args.warmup, pad, backward, clock) for b in (old, new))
        print(f"{what:24s} old {o:7.1f}   new {n:7.1f}   new/old {n / o:.2f}")
    ratio_modes = ["single_adapter", f"x_peft soft N={args.ratio_N}", f"x_peft hard N={args.ratio_N}"]
    ratio_modes += [f"x_peft per-token N={N}" for N in args.per_token]
    seconds = {}
    for name in ratio_modes:
        N, cls = (
            int(name.rsplit("=", 1)[-1]) if "=" in name else args.N,
            PerTokenXPeft if "per-token" in name else XPeftModel,
        )
        steps = rows_per_second(model(name, N, cls), batches, new, args.warmup, pad, clock)
        seconds[name] = args.batch_size / steps
    print(f"\nx_peft / single_adapter step time (new loop), N = {args.ratio_N}:")
    for name in ratio_modes:
        print(
            f"{name:24s} {seconds[name]:.3f} s/step   {seconds[name] / seconds['single_adapter']:.2f}x single_adapter"
        )


if __name__ == "__main__":
    main()
