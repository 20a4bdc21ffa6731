"""`xpeft bank ...`: draw a random bank, inspect one, make one from PEFT adapters, grow one (append members)."""

from __future__ import annotations

import argparse
import json


def cmd_bank_random(args: argparse.Namespace) -> None:
    from xpeft.config import XPeftConfig
    from xpeft.core.bank import random_bank_for, save_bank
    from xpeft.core.encoder import load_encoder

    cfg = XPeftConfig(N=args.N, b=args.b, target=args.target, mask_type="soft")
    bank = random_bank_for(load_encoder(args.backbone), cfg, args.seed, args.scale)
    save_bank(bank, args.out)
    print(f"wrote {bank.describe()} to {args.out}")


def cmd_bank_info(args: argparse.Namespace) -> None:
    from xpeft.core.bank import load_bank

    bank = load_bank(args.path, verify=not args.no_verify)
    print(json.dumps({**bank.metadata(), "verified": not args.no_verify}, indent=2))


def cmd_bank_from_peft(args: argparse.Namespace) -> None:
    from xpeft.core.bank import save_bank
    from xpeft.core.encoder import load_encoder
    from xpeft.core.peft_bank import bank_from_peft

    encoder = load_encoder(args.backbone) if args.backbone else None
    bank = bank_from_peft(args.adapters, args.target, encoder, args.drop_other_targets)
    save_bank(bank, args.out)
    print(f"wrote {bank.describe()} to {args.out}")
    for i, path in enumerate(args.adapters):
        print(f"  member {i}: {path}")


def cmd_bank_grow(args: argparse.Namespace) -> None:
    from xpeft.core.bank import AdapterBank, grow_bank, load_bank, random_bank, save_bank
    from xpeft.core.peft_bank import bank_from_peft
    from xpeft.fit.warm_start import bank_from_single_adapters
    from xpeft.profiles.lineage import Lineages
    from xpeft.profiles.store import ProfileStore

    if not args.out and not args.store:
        raise ValueError("say where the grown bank goes: --out FILE, --store STORE (into its banks/), or both")
    store = ProfileStore(args.store) if args.store else None
    if store is not None and not args.parent.endswith(".safetensors"):
        lineages = Lineages.of(store)
        fp = lineages.the_newest() if args.parent == "newest" else lineages.find(args.parent)
        if fp is None:
            raise ValueError(f"the store {store.uri} holds no bank to grow: give a bank file as the parent")
        parent = store.load_bank(fp)
    else:
        parent = load_bank(args.parent)
    new: list[AdapterBank] = []
    if args.random:
        dims = (parent.L, args.random, parent.b, parent.d_in, parent.d_out)
        new.append(random_bank(*dims, seed=args.seed, target=parent.target, scale=args.scale))
    if args.from_peft:
        new.append(bank_from_peft(args.from_peft, parent.target))
    if args.from_profiles:
        if store is None:
            raise ValueError("--from-profiles reads single_adapter profiles of a store: give --store")
        new.append(bank_from_single_adapters([store.get(pid) for pid in args.from_profiles], parent.target))
    new += [load_bank(path) for path in args.from_bank]
    if not new:
        raise ValueError("nothing to append: give --random K, --from-peft DIR..., --from-profiles ID... or --from-bank")
    child = grow_bank(parent, *new)
    if args.out:
        save_bank(child, args.out)
        print(f"wrote {child.describe()} to {args.out}")
    if store is not None:
        store.save_bank(child)
        print(f"stored {child.describe()} in {store.uri}: its profiles and its parent's are served from it")


def register(sub) -> None:
    from xpeft.config import DEFAULT_TARGET

    bank = sub.add_parser("bank", help="create or inspect adapter banks").add_subparsers(dest="bank_cmd", required=True)
    p = bank.add_parser("random", help="draw a random bank for a backbone from a seed")
    p.add_argument("--backbone", default="minilm", help="'minilm' (bundled), 'tiny', a local path (default minilm)")
    p.add_argument("--N", type=int, default=100, help="adapters N (default 100)")
    p.add_argument("--b", type=int, default=48, help="bottleneck b (default 48)")
    p.add_argument("--seed", type=int, default=0, help="the bank's seed (default 0)")
    p.add_argument("--scale", type=float, default=1.0, help="scale of the adapters (default 1)")
    p.add_argument(
        "--target",
        default=DEFAULT_TARGET,
        help=f"the linear the adapters wrap: a meaning (value, query, attention_output, ffn_output) or its path "
        f"inside a block (default {DEFAULT_TARGET})",
    )
    p.add_argument("--out", required=True, help="the .safetensors file to write")
    p.set_defaults(func=cmd_bank_random)
    p = bank.add_parser("info", help="print a bank's metadata, after verifying its fingerprint")
    p.add_argument("path", help="a bank file (.safetensors)")
    p.add_argument("--no-verify", action="store_true", help="skip recomputing the sha256 fingerprint (default: verify)")
    p.set_defaults(func=cmd_bank_info)
    p = bank.add_parser(
        "from-peft", help="a bank from LoRA adapters saved by PEFT (adapter_config.json + adapter_model.safetensors)"
    )
    p.add_argument("adapters", nargs="+", help="PEFT adapter folders, one per bank member (member i = folder i)")
    p.add_argument("--out", required=True, help="the bank file (.safetensors) to write")
    p.add_argument(
        "--backbone",
        default=None,
        help="check the bank against this backbone ('minilm', 'tiny', a local path); default: no check",
    )
    p.add_argument(
        "--target",
        default=None,
        help="the linear inside each block the bank adapts (e.g. attention.self.value; with --backbone also a "
        "meaning such as value); default: the one linear every adapter adapts",
    )
    p.add_argument(
        "--drop-other-targets",
        action="store_true",
        help="keep only --target's pairs of adapters that adapt more linears (default: refuse them)",
    )
    p.set_defaults(func=cmd_bank_from_peft)
    p = bank.add_parser(
        "grow",
        help="a child bank: the parent's members unchanged and in order, new members appended (profiles fitted on "
        "the parent are served from the child, their masks zero-extended)",
        description="Grow a bank append-only. Sources are appended in the order --random, --from-peft, "
        "--from-profiles, --from-bank. The child records its parent's fingerprint and N; every load verifies them.",
    )
    p.add_argument(
        "parent",
        help="the bank to grow: a bank file (.safetensors), or with --store a bank of the store by fingerprint (a "
        "unique prefix will do) or 'newest'",
    )
    p.add_argument("--out", help="the child bank file (.safetensors) to write (default: none)")
    p.add_argument(
        "--store", help="the store: the parent may be one of its banks, the child is stored there (default: none)"
    )
    p.add_argument("--random", type=int, default=0, metavar="K", help="append K random members (default 0)")
    p.add_argument("--seed", type=int, default=1, help="the random members' seed (default 1)")
    p.add_argument("--scale", type=float, default=1.0, help="the random members' scale (default 1)")
    p.add_argument(
        "--from-peft",
        nargs="+",
        default=[],
        metavar="DIR",
        help="append PEFT LoRA folders, one member each (default: none)",
    )
    p.add_argument(
        "--from-profiles",
        nargs="+",
        default=[],
        metavar="ID",
        help="append single_adapter profiles of --store (default: none)",
    )
    p.add_argument(
        "--from-bank",
        nargs="+",
        default=[],
        metavar="FILE",
        help="append every member of these bank files (one an mtl warm start learned over new profiles; default: none)",
    )
    p.set_defaults(func=cmd_bank_grow)
