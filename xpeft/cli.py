"""The `xpeft` command. Each subcommand is a thin wrapper over library functions.

xpeft params        trainable parameters and bytes per profile for every mode (Table 1 / Table 4)
xpeft bank random   draw a random bank from a seed and save it (safetensors)
xpeft bank info     show a bank's metadata and fingerprint
xpeft data ...      task data and profile data sets (see `xpeft data --help`)
xpeft profiles ...  list / show profiles in a store
"""

from __future__ import annotations

import argparse
import json
import logging
import sys


def cmd_params(args: argparse.Namespace) -> None:
    from xpeft.accounting import table

    print(table(args.backbone, args.N, args.b, args.num_labels, args.head, args.shared_head))


def cmd_bank_random(args: argparse.Namespace) -> None:
    from xpeft.bank import random_bank, save_bank
    from xpeft.model import encoder_blocks, load_encoder

    enc = load_encoder(args.backbone)
    lin = encoder_blocks(enc)[0].get_submodule(args.target)
    bank = random_bank(
        enc.config.num_hidden_layers,
        args.N,
        args.b,
        lin.in_features,
        lin.out_features,
        args.seed,
        args.target,
        args.scale,
    )
    save_bank(bank, args.out)
    print(f"wrote {bank.describe()} to {args.out}")


def cmd_bank_info(args: argparse.Namespace) -> None:
    from xpeft.bank import load_bank

    bank = load_bank(args.path, verify=args.verify)
    print(json.dumps(bank.metadata(), indent=2))


def cmd_profiles_list(args: argparse.Namespace) -> None:
    from xpeft.store import ProfileStore

    store = ProfileStore(args.store)
    for s in store.summaries(args.offset, args.limit):
        print(json.dumps({k: s[k] for k in ("profile_id", "mode", "mask_type", "metrics", "size_bytes")}))
    print(f"{len(store)} profiles in {args.store}", file=sys.stderr)


def cmd_profiles_show(args: argparse.Namespace) -> None:
    from xpeft.store import ProfileStore

    print(json.dumps(ProfileStore(args.store).summary(args.profile_id), indent=2))


def build_parser() -> argparse.ArgumentParser:
    from xpeft.config import DEFAULT_TARGET

    ap = argparse.ArgumentParser(
        prog="xpeft", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("params", help="parameters and bytes per profile for every mode (Table 1 / 4)")
    p.add_argument("--backbone", default="bert-base-uncased", help="known name or a directory with config.json")
    p.add_argument("--N", type=int, nargs="+", default=[100, 200, 400, 800])
    p.add_argument("--b", type=int, default=48)
    p.add_argument("--num-labels", type=int, default=2)
    p.add_argument("--head", choices=["pooler", "linear"], default="pooler")
    p.add_argument("--shared-head", action="store_true", help="the head is shared (mtl): not stored per profile")
    p.set_defaults(func=cmd_params)

    bank = sub.add_parser("bank", help="create or inspect adapter banks").add_subparsers(dest="bank_cmd", required=True)
    p = bank.add_parser("random", help="draw a random bank from a seed")
    p.add_argument("--backbone", default="minilm")
    p.add_argument("--N", type=int, default=100)
    p.add_argument("--b", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--target", default=DEFAULT_TARGET)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_bank_random)
    p = bank.add_parser("info", help="print a bank's metadata")
    p.add_argument("path")
    p.add_argument("--verify", action="store_true", help="recompute the sha256 fingerprint")
    p.set_defaults(func=cmd_bank_info)

    prof = sub.add_parser("profiles", help="inspect a profile store").add_subparsers(dest="profiles_cmd", required=True)
    p = prof.add_parser("list", help="one JSON line per profile")
    p.add_argument("--store", required=True)
    p.add_argument("--offset", type=int, default=0)
    p.add_argument("--limit", type=int, default=100)
    p.set_defaults(func=cmd_profiles_list)
    p = prof.add_parser("show", help="one profile's config, metrics and size")
    p.add_argument("--store", required=True)
    p.add_argument("profile_id")
    p.set_defaults(func=cmd_profiles_show)

    try:
        from xpeft.data import cli as data_cli
    except ImportError:  # the data commands are optional at import time
        data_cli = None
    if data_cli is not None and hasattr(data_cli, "register"):
        data_cli.register(sub)
    return ap


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"xpeft: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
