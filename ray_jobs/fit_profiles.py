"""Fit one X-PEFT profile per profile_id into a profile store: the profile farm's main job.

    python ray_jobs/fit_profiles.py --demo                       # bundled sample, embedded local Ray
    python ray_jobs/fit_profiles.py --profiles news --setting mtl --store runs/news
    ray job submit --working-dir . -- python ray_jobs/fit_profiles.py --data s3://bucket/profiles.parquet \
        --store s3://bucket/xpeft-store

Without RAY_ADDRESS it starts an embedded local Ray; under `ray job submit` it joins the cluster.
The logic lives in xpeft.farm; this script only parses arguments.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from xpeft.config import TrainConfig, XPeftConfig  # noqa: E402
from xpeft.recipes import FARM_TRAIN  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--demo", action="store_true", help="the bundled news-profile sample (36 authors), mtl, hard")
    src.add_argument("--data", help="Parquet profile data set (text, label, profile_id[, split]); local path or URI")
    src.add_argument("--profiles", choices=["news", "news-sample"], help="build the HuffPost news profiles")
    ap.add_argument("--data-dir", default=None, help="where ../shared/data-style files are (for --profiles news)")
    ap.add_argument("--min-articles", type=int, default=10)
    ap.add_argument("--max-profiles", type=int, default=None, help="fit only the first n profiles (by id)")
    ap.add_argument(
        "--drop-invalid",
        action="store_true",
        help="leave out rows with null labels, empty texts, invalid profile ids or unknown splits (default: refuse)",
    )
    ap.add_argument("--store", default=None, help="profile store: directory or pyarrow.fs URI (default runs/<name>)")
    ap.add_argument("--report-dir", default=None, help="default: <store>/reports/<time>")
    ap.add_argument("--setting", choices=["random", "sa", "mtl"], default="random")
    ap.add_argument("--warm-start", type=float, default=0.45, help="profiles for the sa/mtl bank: count or fraction")
    ap.add_argument("--mode", choices=["x_peft", "single_adapter", "head_only"], default="x_peft")
    ap.add_argument("--mask-type", choices=["hard", "soft"], default="hard")
    ap.add_argument("--N", type=int, default=100)
    ap.add_argument("--k", type=int, default=None, help="adapters a hard mask selects per block (k < N); default N/2")
    ap.add_argument("--b", type=int, default=48)
    ap.add_argument("--head", choices=["linear", "pooler"], default="linear")
    ap.add_argument("--bank", default=None, help="an existing bank (safetensors) instead of a random one")
    ap.add_argument("--bank-seed", type=int, default=0)
    ap.add_argument("--backbone", default="minilm", help="'minilm' (bundled), a local path or a hub name")
    for name, value in FARM_TRAIN.to_dict().items():
        if name in ("max_steps", "tau_final", "log_every", "gradient_checkpointing"):
            continue
        kind = float if isinstance(value, float) or value is None else type(value)
        ap.add_argument(f"--{name.replace('_', '-')}", type=kind, default=value)
    ap.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else embedded local)")
    ap.add_argument("--num-actors", type=int, default=None, help="default: cluster CPUs // cpus-per-actor")
    ap.add_argument("--cpus-per-actor", type=float, default=1.0)
    ap.add_argument(
        "--gpus-per-actor", type=float, default=0.0, help="> 0: each actor fits on the GPU Ray gives it (0.25: 4 a GPU)"
    )
    ap.add_argument("--max-retries", type=int, default=2)
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.demo:
        args.profiles, args.setting = "news-sample", "mtl"
        args.store = args.store or "runs/demo"
    if not (args.data or args.profiles):
        ap.error("give the profiles: --demo, --data PATH or --profiles news")
    return args


def load_table(args: argparse.Namespace):
    from xpeft.data.profiles import load_news_profiles, load_news_profiles_sample

    if args.profiles == "news-sample":
        return load_news_profiles_sample()
    if args.profiles == "news":
        return load_news_profiles(args.data_dir, args.min_articles)
    import pyarrow.parquet as pq

    return pq.read_table(args.data)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from xpeft.cluster import init_ray
    from xpeft.farm import FarmConfig, run_farm
    from xpeft.fitting import profile_datas
    from xpeft.report import finish_run
    from xpeft.store import ProfileStore

    try:
        dataset = profile_datas(load_table(args), drop_invalid=args.drop_invalid)
        datas = dataset.profiles[: args.max_profiles] if args.max_profiles else dataset.profiles
        labels = dataset.labels
        train = TrainConfig(**{k: getattr(args, k) for k in FARM_TRAIN.to_dict() if hasattr(args, k)})
        xcfg = XPeftConfig(
            mode=args.mode,
            mask_type=args.mask_type,
            N=args.N,
            k=args.k,
            b=args.b,
            head=args.head,
            num_labels=labels.num_labels,
            problem_type=labels.problem_type,
        )
    except ValueError as e:
        raise SystemExit(f"fit_profiles.py: error: {e}") from None
    logging.info("%d profiles; %s", len(datas), labels.describe())
    if dataset.dropped:
        logging.warning("rows left out (--drop-invalid): %s", dataset.dropped)
    store_uri = args.store or f"runs/{args.profiles or 'profiles'}-{args.setting}-{args.mode}"
    cfg = FarmConfig(
        store=store_uri,
        xpeft=xcfg,
        train=train,
        setting=args.setting,
        warm_start=args.warm_start,
        bank_path=args.bank,
        bank_seed=args.bank_seed,
        backbone=args.backbone,
        num_actors=args.num_actors,
        cpus_per_actor=args.cpus_per_actor,
        gpus_per_actor=args.gpus_per_actor,
        max_retries=args.max_retries,
        label_names=labels.label_names,
        progress=not args.no_progress,
    )
    init_ray(args.address, log_to_driver=False)
    try:
        report = run_farm(cfg, datas)
    except ValueError as e:
        raise SystemExit(f"fit_profiles.py: error: {e}") from None
    store = ProfileStore(store_uri)
    report_dir = args.report_dir or os.path.join(store_uri, "reports", time.strftime("%Y%m%d-%H%M%S"))
    paths, _, drawn = finish_run(report, cfg.to_dict(), store, datas, labels.label_names, report_dir, not args.no_plots)
    print(open(paths["md"]).read().split("## Per profile")[0])
    plots = [] if drawn.get("skipped") else list(drawn.values())
    print("report and plots:", ", ".join([*paths.values(), *plots]))
    print(f"profiles stored in {store_uri}: {len(store)}")


if __name__ == "__main__":
    main()
