"""What ModernBERT and DeBERTa-v3 cost before anyone brings their weights: the fit step of x_peft against
single_adapter and the serving forward (ONNX Runtime and eager) per row, for encoders of the real sizes built from
their configs with random weights (no download), beside bert-base's shape and the bundled MiniLM.

    python benchmarks/encoder_families.py            # minilm, bert-base, modernbert-base, deberta-v3-base; 2 threads
    python benchmarks/encoder_families.py --smoke    # the same shapes shrunk to hidden 32: seconds

Per backbone: the fit step (forward + backward + AdamW, the fit loop's own batching: packed where the family's
packed forward is exact, else padded) on random batches of SST-2 training rows, in ms a row, single_adapter and
x_peft hard (N = 100, k = 50, b = 48) and their ratio; then one mixed-profile serving forward of --serve-rows rows,
each its own hard profile, in ms a row, with the ONNX graph (exported once, as a replica does) and eager. Rows are
tokenized by MiniLM's (BERT's uncased) tokenizer: every family's vocabulary holds its ids, and random weights make
no token mean more than another. Timings are wall-clock medians over --reps forwards; the machine must be idle.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from harness.common import SMOKE_HELP
from step_time import random_batches, rows_per_second, sst2_rows

from xpeft.config import TrainConfig, XPeftConfig
from xpeft.core.bank import random_bank_for
from xpeft.core.combine import combine
from xpeft.core.encoder import load_encoder, load_tokenizer
from xpeft.core.families import token_inputs
from xpeft.core.head import HeadWeights
from xpeft.core.masks import khot
from xpeft.core.model import XPeftModel
from xpeft.core.multiprofile import CombinedProfile, MultiProfileModel
from xpeft.data.tokens import Collator
from xpeft.fit.batching import batching_for
from xpeft.serve.forward import make_forward

# name -> (transformers config class, its real size). ModernBERT-base's sizes are ModernBertConfig's defaults;
# DeBERTa-v3-base's are microsoft/deberta-v3-base's config.json (DebertaV2Config's defaults are v2-xlarge's).
SHAPES = {
    "bert-base": ("BertConfig", {}),
    "modernbert-base": ("ModernBertConfig", {"pad_token_id": 0}),
    "deberta-v3-base": ("DebertaV2Config", {
        "vocab_size": 128100, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
        "intermediate_size": 3072, "max_position_embeddings": 512, "relative_attention": True,
        "position_buckets": 256, "pos_att_type": ["p2c", "c2p"], "norm_rel_ebd": "layer_norm", "share_att_key": True,
        "position_biased_input": False, "type_vocab_size": 0, "max_relative_positions": -1, "layer_norm_eps": 1e-7,
        "pad_token_id": 0,
    }),
}  # fmt: skip
SHRUNK = {"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2, "intermediate_size": 64,
          "local_attention": 8, "position_buckets": 16}  # fmt: skip
N, K, B = 100, 50, 48


def random_encoder(name: str, shrink: bool):
    """The encoder of `name`: the bundled MiniLM, or a family's real-size shape with random weights, in eval mode."""
    import transformers

    if name == "minilm":
        return load_encoder("tiny" if shrink else "minilm")
    config_class, sizes = SHAPES[name]
    # A setting a family does not have (BERT's local_attention) is kept on its config unused.
    config = getattr(transformers, config_class)(**{**sizes, **(SHRUNK if shrink else {})})
    torch.manual_seed(0)
    return transformers.AutoModel.from_config(config).eval()


def fit_ms_per_row(encoder, rows, args) -> tuple[str, dict[str, float]]:
    """(the fit's batching, ms a row of the fit step per mode)."""
    batches = random_batches(rows, args.batch_size, args.warmup + args.steps, seed=0)
    bank = random_bank_for(encoder, XPeftConfig(N=N, b=B))
    out, layout = {}, ""
    for mode in ("single_adapter", "x_peft"):
        cfg = XPeftConfig(mode=mode, mask_type="hard", N=N, k=K, b=B, head="cls")
        model = XPeftModel(encoder, cfg, bank if mode == "x_peft" else None, seed=0).train()
        batching = batching_for(model, rows, TrainConfig(batch_size=args.batch_size), torch.device("cpu"))
        layout = batching.describe()
        out[mode] = 1000 / rows_per_second(model, batches, batching, args.warmup, 0)
        for module in model.adapted:  # unwrap for the next mode: the encoder is shared
            module.adapter = None
    return layout, out


def served_profiles(encoder, n: int) -> list[CombinedProfile]:
    """`n` hard profiles (random k-hot masks over one random bank) with 'cls' heads, combined as a server does."""
    bank = random_bank_for(encoder, XPeftConfig(N=N, b=B))
    d, g = encoder.config.hidden_size, torch.Generator().manual_seed(0)
    masks = [khot(torch.randn(n, bank.L, N, generator=g), K) for _ in range(2)]
    A_hat, B_hat = combine(masks[0], masks[1], bank)
    head = {"classifier.weight": torch.randn(2, d, generator=g) / d**0.5, "classifier.bias": torch.zeros(2)}
    return [
        CombinedProfile(f"p{i}", A_hat[i], B_hat[i], torch.ones(bank.L, B), torch.zeros(bank.L, B), 1.0,
                        HeadWeights.checked("cls", head, d, 2), f"p{i}", "classification", None)
        for i in range(n)
    ]  # fmt: skip


def forward_ms_per_row(encoder, rows, args) -> dict[str, float]:
    """ms a row of one mixed-profile forward of args.serve_rows rows, with ONNX Runtime and eager torch."""
    target = random_bank_for(encoder, XPeftConfig(N=N, b=B)).target
    model = MultiProfileModel(encoder, target)
    names = token_inputs(encoder)
    profiles = served_profiles(encoder, args.serve_rows)
    picked = [{k: r[k] for k in names} for r in rows[: args.serve_rows]]
    batch = Collator(0)(picked)
    out = {}
    with tempfile.TemporaryDirectory(prefix="xpeft-families-onnx-") as cache, torch.no_grad():
        for choice in ("ort", "eager"):
            forward = make_forward(choice, model, torch.device("cpu"), names, args.threads, cache, B)
            forward(batch, profiles)  # warm
            times = []
            for _ in range(args.reps):
                start = time.perf_counter()
                forward(batch, profiles)
                times.append(time.perf_counter() - start)
            out[choice] = 1000 * statistics.median(times) / len(picked)
    return out


SMOKE = {"rows": 32, "batch_size": 8, "steps": 2, "warmup": 1, "reps": 2, "shrink": True}


def arguments() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbones", nargs="+", default=["minilm", *SHAPES], help="minilm and/or " + ", ".join(SHAPES))
    ap.add_argument("--rows", type=int, default=256, help="random SST-2 training rows (default: 256)")
    ap.add_argument("--batch-size", type=int, default=16, help="rows per fit step (default: 16)")
    ap.add_argument("--steps", type=int, default=6, help="timed fit steps per mode (default: 6)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed fit steps before them (default: 2)")
    ap.add_argument("--serve-rows", type=int, default=8, help="rows (and profiles) of the serving forward (default: 8)")
    ap.add_argument("--reps", type=int, default=10, help="timed serving forwards (default: 10)")
    ap.add_argument("--threads", type=int, default=2, help="torch and ONNX Runtime threads (default: 2)")
    ap.add_argument("--max-length", type=int, default=128, help="tokens per row after truncation (default: 128)")
    ap.add_argument("--smoke", action="store_true", help=SMOKE_HELP + "; here: every shape shrunk to hidden 32")
    ap.set_defaults(shrink=False)
    return ap


def main(argv=None) -> None:
    args = arguments().parse_args(argv)
    if args.smoke:
        vars(args).update(SMOKE)
    torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer("minilm")
    rows = sst2_rows(args.rows, None, tokenizer, args.max_length, seed=0)
    mean = sum(len(r["input_ids"]) for r in rows) / len(rows)
    print(
        f"{len(rows)} SST-2 training rows ({mean:.1f} tokens a row), fit batch {args.batch_size}, {args.steps} timed "
        f"steps; serving forward of {args.serve_rows} rows and profiles, median of {args.reps}; {args.threads} "
        f"threads; x_peft hard N={N}, k={K}, b={B}; 'cls' heads"
        + ("; shapes shrunk to hidden 32" if args.shrink else "")
    )
    print("\n| backbone | d | L | parameters | fit batches | single_adapter ms/row | x_peft ms/row | x_peft / single "
          "| ORT forward ms/row | eager forward ms/row |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in args.backbones:
        encoder = random_encoder(name, args.shrink)
        params = sum(p.numel() for p in encoder.parameters())
        forward = forward_ms_per_row(encoder, rows, args)  # before the fit wraps the shared encoder's linears
        layout, fit = fit_ms_per_row(encoder, rows, args)
        c = encoder.config
        print(
            f"| {name} | {c.hidden_size} | {c.num_hidden_layers} | {params / 1e6:.1f}M | {layout} | "
            f"{fit['single_adapter']:.2f} | {fit['x_peft']:.2f} | {fit['x_peft'] / fit['single_adapter']:.2f} | "
            f"{forward['ort']:.2f} | {forward['eager']:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
