"""`xpeft fit-profiles` (= `ray_jobs/fit_profiles.py`): the profile farm, one profile per profile_id of a data set
into a store, then the run report and plots."""

from __future__ import annotations

import argparse
import logging
import os
import time

from xpeft.config import TrainConfig, XPeftConfig
from xpeft.flags import add_flags, from_flags
from xpeft.jobs.common import DATA_FROM_DATA, PROFILE_SOURCES

log = logging.getLogger(__name__)

HELP = "fit one X-PEFT profile per profile_id into a store (the farm)"


def arguments(ap: argparse.ArgumentParser) -> None:
    from xpeft.fit.recipes import FARM_TRAIN
    from xpeft.ray.farm import FarmConfig

    src = ap.add_mutually_exclusive_group()
    src.add_argument(
        "--demo",
        action="store_true",
        help="fit the bundled news sample (36 authors) with the mtl setting and hard masks (default: off; or --data)",
    )
    src.add_argument(
        "--data",
        help=f"the profile data set (text, label, profile_id[, split]): {PROFILE_SOURCES} (default: none; or --demo)",
    )
    ap.add_argument(
        "--data-dir", default=None, help="HuffPost for --data news (default: XPEFT_DATA_DIR, ../shared/data)"
    )
    ap.add_argument("--min-articles", type=int, default=10, help="--data news: authors with >= this many (default: 10)")
    ap.add_argument("--max-profiles", type=int, default=None, help="fit only the first n profiles by id (default: all)")
    ap.add_argument(
        "--drop-invalid",
        action="store_true",
        help="leave out rows with null labels, empty texts, invalid profile ids or unknown splits (default: refuse)",
    )
    ap.add_argument(
        "--store", default=None, help="the profile store: a directory or URI (default runs/<data>-<setting>)"
    )
    ap.add_argument("--report-dir", default=None, help="where the report and plots go (default <store>/reports/<time>)")
    ap.add_argument("--no-plots", action="store_true", help="skip the plots (Figures 3 and 6; default: drawn)")
    ap.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else embedded local)")
    add_flags(ap.add_argument_group("farm"), FarmConfig, skip=("store",))
    add_flags(
        ap.add_argument_group("profiles (X-PEFT)"),
        XPeftConfig,
        defaults=XPeftConfig(head="linear"),
        skip=DATA_FROM_DATA,
    )
    add_flags(ap.add_argument_group("fit (xpeft.fit.recipes.FARM_TRAIN)"), TrainConfig, defaults=FARM_TRAIN)


def run(args: argparse.Namespace) -> None:
    """Fit one profile per profile_id of the data set into the store, write the report and plots."""
    from xpeft.data.dataset import SAMPLE_SOURCE, profile_datas, read_profile_source
    from xpeft.fit.recipes import FARM_TRAIN
    from xpeft.profiles.store import ProfileStore
    from xpeft.ray.cluster import init_ray
    from xpeft.ray.farm import FarmConfig, run_farm
    from xpeft.ray.report import finish_run

    if args.demo:
        args.data, args.setting, args.store = SAMPLE_SOURCE, "mtl", args.store or "runs/demo"
    if not args.data:
        raise ValueError("give the profiles: --demo or --data (news-sample, news or a Parquet path)")
    dataset = profile_datas(
        read_profile_source(args.data, args.data_dir, args.min_articles), drop_invalid=args.drop_invalid
    )
    datas = dataset.profiles[: args.max_profiles] if args.max_profiles else dataset.profiles
    labels = dataset.labels
    xcfg = from_flags(args, XPeftConfig, num_labels=labels.num_labels, problem_type=labels.problem_type)
    log.info("%d profiles; %s", len(datas), labels.describe())
    if dataset.dropped:
        log.warning("rows left out (--drop-invalid): %s", dataset.dropped)
    name = os.path.splitext(os.path.basename(args.data))[0]
    store_uri = args.store or f"runs/{name}-{args.setting}-{args.mode}"
    train = from_flags(args, TrainConfig, base=FARM_TRAIN)
    cfg = from_flags(args, FarmConfig, store=store_uri, xpeft=xcfg, train=train, label_names=labels.label_names)
    init_ray(args.address, log_to_driver=False)
    report = run_farm(cfg, datas)
    store = ProfileStore(store_uri)
    report_dir = args.report_dir or os.path.join(store_uri, "reports", time.strftime("%Y%m%d-%H%M%S"))
    paths, _, drawn = finish_run(report, cfg.to_dict(), store, datas, labels.label_names, report_dir, not args.no_plots)
    print(open(paths["md"]).read().split("## Per profile")[0])
    plots = [] if drawn.get("skipped") else list(drawn.values())
    print("report and plots:", ", ".join([*paths.values(), *plots]))
    print(f"profiles stored in {store_uri}: {len(store)}")
