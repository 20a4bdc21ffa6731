"""The `xpeft` command. Each subcommand is a thin wrapper over library functions.

xpeft fit-profiles  fit one profile per profile_id into a store (the farm; = ray_jobs/fit_profiles.py)
xpeft fit-task      fit a task or one profile with Ray Train DDP (= ray_jobs/fit_task.py)
xpeft tune          Appendix C's search with Ray Tune (= ray_jobs/tune_search.py)
xpeft serve         serve a store over HTTP with Ray Serve (= ray_jobs/serve.py)
xpeft classify-batch  score a Parquet table of texts with Ray Data (= ray_jobs/classify_batch.py)
xpeft params        trainable parameters and bytes per profile for every mode (Table 1 / Table 4)
xpeft bank ...      draw a random bank, inspect one, make one from PEFT adapters, grow one (append members)
xpeft data ...      task data and profile data sets
xpeft profiles ...  list / show / delete the profiles of a store, compact it, verify its files, migrate an old one,
                    export one to PEFT
"""

from __future__ import annotations

import argparse
import json
import logging
import sys


def cmd_params(args: argparse.Namespace) -> None:
    from xpeft.core.accounting import table

    print(table(args.backbone, args.N, args.b, args.num_labels, args.head, args.shared_head))


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
        parent = store.load_bank(lineages.the_newest() or "" if args.parent == "newest" else lineages.find(args.parent))
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


def cmd_profiles_export_peft(args: argparse.Namespace) -> None:
    from xpeft.core.encoder import TINY, load_encoder, resolve_backbone
    from xpeft.profiles.peft_export import export_peft, why_not_lora
    from xpeft.profiles.store import ProfileStore

    store = ProfileStore(args.store)
    profile = store.get(args.profile_id)
    problem = why_not_lora(profile)  # before loading a backbone or a bank
    if problem:
        raise ValueError(problem)
    bank = store.load_bank(profile.bank_fingerprint) if profile.config.mode == "x_peft" else None
    head = store.load_head(profile.head_id) if profile.head_id else None
    base = args.backbone if args.backbone == TINY else str(resolve_backbone(args.backbone))
    out = export_peft(profile, args.out, load_encoder(args.backbone), bank, head, base_model=base)
    print(f"wrote profile {profile.profile_id} as a PEFT LoRA folder {out} (and its head, head.safetensors)")


def cmd_profiles_list(args: argparse.Namespace) -> None:
    from xpeft.profiles.store import ProfileStore

    store = ProfileStore(args.store)
    for s in store.summaries(args.offset, args.limit):
        listed = ("profile_id", "mode", "mask_type", "metrics", "record_bytes")
        keys = ("profile_id", "error") if "error" in s else listed
        print(json.dumps({k: s[k] for k in keys}))
    print(f"{len(store)} profiles in {args.store}", file=sys.stderr)
    for part, d in sorted(store.damaged().items()):  # the listing goes on; the damage is reported
        print(
            f"damaged: part {part} ({', '.join(d['files'])}), {d['profiles']} profiles: {d['error']}", file=sys.stderr
        )


def cmd_profiles_show(args: argparse.Namespace) -> None:
    from xpeft.profiles.store import DamagedPartError, ProfileStore

    try:
        print(json.dumps(ProfileStore(args.store).summary(args.profile_id), indent=2))
    except DamagedPartError as e:
        print(f"xpeft: error: {e}", file=sys.stderr)
        raise SystemExit(1) from None


def cmd_profiles_delete(args: argparse.Namespace) -> None:
    from xpeft.profiles.store import ProfileStore

    n = ProfileStore(args.store).delete(args.profile_ids)
    print(
        f"deleted {n} of {len(set(args.profile_ids))} profiles from {args.store} (the others were not stored): gone "
        "from lookups now, from a server within its staleness_s; their bytes after `xpeft profiles compact`"
    )


def cmd_profiles_compact(args: argparse.Namespace) -> None:
    from xpeft.profiles.store import ProfileStore

    store = ProfileStore(args.store)
    result = store.compact(retain_seconds=args.retain_hours * 3600)
    print(json.dumps(result, indent=2))
    for part, d in sorted(store.damaged().items()):
        print(f"damaged: part {part} ({', '.join(d['files'])}) was left as it is", file=sys.stderr)


def cmd_profiles_verify(args: argparse.Namespace) -> None:
    from xpeft.profiles.store import ProfileStore
    from xpeft.profiles.verify import verify

    result = verify(ProfileStore(args.store), args.fingerprint_heads, args.drop_damaged, args.records)
    for fp, why in result.banks.items():
        print(f"bank {fp}: {why}" if why == "ok" else f"bank {fp}: damaged")
    for head_id in result.fingerprinted:
        print(f"fingerprinted: {head_id}")
    for head_id, why in result.heads.items():
        print(f"head {head_id}: {'ok' if why == 'ok' else 'refused'}")
    if result.dropped:
        print(f"dropped the damaged parts: {result.dropped} profiles, which can be fitted again")
    if result.records:
        print(f"records: {result.records['read']} read, {result.records['unfingerprinted']} without a fingerprint")
    for problem in result.problems:
        print(f"xpeft: damaged: {problem}", file=sys.stderr)
    if result.problems:
        raise SystemExit(1)


def cmd_profiles_migrate(args: argparse.Namespace) -> None:
    from xpeft.profiles.migrate import migrate

    print(json.dumps(migrate(args.old, args.new, skip_unreadable=args.skip_unreadable).to_dict(), indent=2))


def add_params(sub) -> None:
    p = sub.add_parser("params", help="parameters and bytes per profile for every mode (Table 1 / 4)")
    p.add_argument(
        "--backbone",
        default="bert-base-uncased",
        help="a known name or a directory with config.json (default: bert-base-uncased, the paper's)",
    )
    p.add_argument("--N", type=int, nargs="+", default=[100, 200, 400, 800], help="bank sizes N (default: Table 1's)")
    p.add_argument("--b", type=int, default=48, help="the adapters' bottleneck b (default 48)")
    p.add_argument("--num-labels", type=int, default=2, help="classes c of the head (default 2)")
    p.add_argument("--head", choices=["pooler", "linear"], default="pooler", help="the head (default pooler)")
    p.add_argument(
        "--shared-head",
        action="store_true",
        help="the head is shared (mtl): not stored per profile (default: each profile has its own)",
    )
    p.set_defaults(func=cmd_params)


def add_bank(sub) -> None:
    from xpeft.config import DEFAULT_TARGET

    bank = sub.add_parser("bank", help="create or inspect adapter banks").add_subparsers(dest="bank_cmd", required=True)
    p = bank.add_parser("random", help="draw a random bank for a backbone from a seed")
    p.add_argument("--backbone", default="minilm", help="'minilm' (bundled), 'tiny', a local path (default minilm)")
    p.add_argument("--N", type=int, default=100, help="adapters N (default 100)")
    p.add_argument("--b", type=int, default=48, help="bottleneck b (default 48)")
    p.add_argument("--seed", type=int, default=0, help="the bank's seed (default 0)")
    p.add_argument("--scale", type=float, default=1.0, help="scale of the adapters (default 1)")
    p.add_argument("--target", default=DEFAULT_TARGET, help=f"the linear the adapters wrap (default {DEFAULT_TARGET})")
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
        help="the linear inside each block the bank adapts (e.g. attention.self.value); "
        "default: the one linear every adapter adapts",
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
    p.add_argument("--out", help="the child bank file (.safetensors) to write")
    p.add_argument("--store", help="the profile store: the parent may be one of its banks; the child is stored there")
    p.add_argument("--random", type=int, default=0, metavar="K", help="append K random members (default 0)")
    p.add_argument("--seed", type=int, default=1, help="the random members' seed (default 1)")
    p.add_argument("--scale", type=float, default=1.0, help="the random members' scale (default 1)")
    p.add_argument(
        "--from-peft", nargs="+", default=[], metavar="DIR", help="append PEFT LoRA folders, one member each"
    )
    p.add_argument(
        "--from-profiles", nargs="+", default=[], metavar="ID", help="append single_adapter profiles of --store"
    )
    p.add_argument(
        "--from-bank",
        nargs="+",
        default=[],
        metavar="FILE",
        help="append every member of these bank files (e.g. one learned by an mtl warm start over new profiles)",
    )
    p.set_defaults(func=cmd_bank_grow)


def add_profiles(sub) -> None:
    prof = sub.add_parser(
        "profiles", help="inspect, delete, compact, verify or migrate a profile store"
    ).add_subparsers(dest="profiles_cmd", required=True)
    p = prof.add_parser("list", help="one JSON line per profile")
    p.add_argument("--store", required=True, help="the profile store: a directory or a URI")
    p.add_argument("--offset", type=int, default=0, help="skip this many (ids sorted; default 0)")
    p.add_argument("--limit", type=int, default=100, help="at most this many (default 100)")
    p.set_defaults(func=cmd_profiles_list)
    p = prof.add_parser("show", help="one profile's config, metrics and size")
    p.add_argument("--store", required=True, help="the profile store: a directory or a URI")
    p.add_argument("profile_id", help="the profile's id")
    p.set_defaults(func=cmd_profiles_show)
    p = prof.add_parser(
        "export-peft", help="write a profile's combined adapter as a PEFT LoRA folder, and its head (safetensors)"
    )
    p.add_argument("--store", required=True, help="the profile store: a directory or a URI")
    p.add_argument("profile_id", help="the profile's id")
    p.add_argument("--out", required=True, help="the folder to write (adapter_config.json, adapter_model.safetensors, "
                   "head.safetensors)")  # fmt: skip
    p.add_argument(
        "--backbone", default="minilm", help="the backbone the profile was fitted on (default: minilm, the bundled one)"
    )
    p.set_defaults(func=cmd_profiles_export_peft)
    p = prof.add_parser("delete", help="delete profiles: gone from lookups at once, their bytes after compact")
    p.add_argument("--store", required=True, help="the profile store: a directory or a URI")
    p.add_argument("profile_ids", nargs="+", metavar="ID", help="the profiles' ids")
    p.set_defaults(func=cmd_profiles_delete)
    p = prof.add_parser("compact", help="rewrite the store's parts and remove old versions' files")
    p.add_argument("--store", required=True, help="the profile store: a directory or a URI")
    p.add_argument("--retain-hours", type=float, default=0.0, help="keep versions newer than this readable (default 0)")
    p.set_defaults(func=cmd_profiles_compact)
    p = prof.add_parser(
        "verify", help="check every bank, shared head and part of a store against its fingerprint; exit 1 on damage"
    )
    p.add_argument("--store", required=True, help="the profile store: a directory or a URI")
    p.add_argument(
        "--fingerprint-heads",
        action="store_true",
        help="give shared heads written before heads were fingerprinted their fingerprint, as they are (default: off)",
    )
    p.add_argument(
        "--drop-damaged",
        action="store_true",
        help="drop the parts of the table that cannot be read; their profiles can be fitted again (default: off)",
    )
    p.add_argument(
        "--records", action="store_true", help="also read and verify every record, a full read (default: off)"
    )
    p.set_defaults(func=cmd_profiles_verify)
    p = prof.add_parser("migrate", help="convert a store of the old layout (profiles/part-*.parquet) into NEW")
    p.add_argument("old", help="the old store: a directory or a URI")
    p.add_argument("new", help="the new store: a directory or URI that does not exist yet or is empty")
    p.add_argument(
        "--skip-unreadable",
        action="store_true",
        help="migrate what can be read, report the unreadable part files (default: off, stop at the first one)",
    )
    p.set_defaults(func=cmd_profiles_migrate)


def add_jobs(sub) -> None:
    from xpeft.jobs import JOBS

    for name, job in JOBS.items():
        p = sub.add_parser(name, help=job.HELP, description=job.HELP)
        job.arguments(p)
        p.set_defaults(job=name)


def build_parser() -> argparse.ArgumentParser:
    from xpeft.data import cli as data_cli

    ap = argparse.ArgumentParser(
        prog="xpeft", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("-v", "--verbose", action="store_true", help="log at INFO level (default: warnings only)")
    sub = ap.add_subparsers(dest="command", required=True)
    add_jobs(sub)
    add_params(sub)
    add_bank(sub)
    data_cli.register(sub)
    add_profiles(sub)
    return ap


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if getattr(args, "job", None):
        from xpeft.jobs import run

        run(args.job, args)
        return
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"xpeft: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
