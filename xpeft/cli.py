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
                    export one to PEFT, refit profiles on a newer bank
"""

from __future__ import annotations

import argparse
import json
import logging
import sys


def cmd_params(args: argparse.Namespace) -> None:
    from xpeft.core.accounting import table

    print(table(args.backbone, args.N, args.b, args.num_labels, args.head, args.shared_head))


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
    p.add_argument(
        "--head",
        choices=["pooler", "linear", "cls"],
        default="pooler",
        help="pooler (encoders with one), linear (mean-pool + classifier) or cls ([CLS] state + classifier); "
        "default pooler",
    )
    p.add_argument(
        "--shared-head",
        action="store_true",
        help="the head is shared (mtl): not stored per profile (default: each profile has its own)",
    )
    p.set_defaults(func=cmd_params)


def add_profiles(sub, chosen: tuple[str, ...] | None = None) -> None:
    prof = sub.add_parser(
        "profiles", help="inspect, delete, compact, verify or migrate a profile store, refit profiles on a newer bank"
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
    p = prof.add_parser(
        "refit",
        help="fit stored profiles again on a newer bank (the newest, or --bank-fingerprint): --refit ID... or "
        "--refit-older-than BANK; the fit-profiles flags and data; resumable",
    )
    if chosen in (None, ("profiles", "refit")):
        from xpeft.jobs import fit_profiles

        fit_profiles.arguments(p)
    p.set_defaults(func=cmd_profiles_refit)


def cmd_profiles_refit(args: argparse.Namespace) -> None:
    from xpeft.jobs import run

    if not args.refit and not args.refit_older_than:
        raise ValueError("choose the profiles to refit: --refit ID... or --refit-older-than BANK")
    run("fit-profiles", args)


def add_jobs(sub, chosen: tuple[str, ...] | None = None) -> None:
    from xpeft.jobs import JOBS

    for name, job in JOBS.items():
        p = sub.add_parser(name, help=job.HELP, description=job.HELP)
        if chosen is None or chosen[:1] == (name,):
            job.arguments(p)
        p.set_defaults(job=name)


def chosen_command(argv: list[str]) -> tuple[str, ...]:
    """The (sub)command words of a command line, the first two words that are not flags: `profiles refit`."""
    return tuple(a for a in argv if not a.startswith("-"))[:2]


def build_parser(chosen: tuple[str, ...] | None = None) -> argparse.ArgumentParser:
    """Every subcommand with its flags; given the words of the one a command line `chosen`, only its flags are
    built: a job's flags come from configs whose modules import torch and Ray, seconds that `xpeft profiles
    list` need not pay (every subcommand is still listed, with its help)."""
    from xpeft import bank_cli
    from xpeft.data import cli as data_cli

    ap = argparse.ArgumentParser(
        prog="xpeft", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("-v", "--verbose", action="store_true", help="log at INFO level (default: warnings only)")
    sub = ap.add_subparsers(dest="command", required=True)
    add_jobs(sub, chosen)
    add_params(sub)
    bank_cli.register(sub)
    data_cli.register(sub)
    add_profiles(sub, chosen)
    return ap


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(chosen_command(argv)).parse_args(argv)
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
