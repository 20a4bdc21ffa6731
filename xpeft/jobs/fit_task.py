"""`xpeft fit-task` (= `ray_jobs/fit_task.py`): one fit of a GLUE/SuperGLUE task or of one profile with Ray Train
DDP workers. Its flags and its data loading are also the search's (`xpeft.jobs.tune`)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

from xpeft.config import TrainConfig, XPeftConfig
from xpeft.flags import add_flags, from_flags
from xpeft.jobs.common import DATA_FROM_DATA, PROFILE_SOURCES

HELP = "fit a GLUE/SuperGLUE task or one profile with Ray Train DDP"


def task_arguments(ap: argparse.ArgumentParser, for_search: bool = False) -> None:
    from xpeft.fit.task import FitConfig

    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--task",
        help="GLUE/SuperGLUE task: cola sst2 mrpc qqp stsb mnli qnli rte wnli cb boolq axb axg "
        "(default: none; or --data)",
    )
    src.add_argument(
        "--data",
        help=f"a profile data set ({PROFILE_SOURCES}); with --profile-id, the profile to fit "
        "(default: none; or --task)",
    )
    ap.add_argument("--data-dir", default=None, help="GLUE/SuperGLUE files (default ../shared/data or XPEFT_DATA_DIR)")
    ap.add_argument("--train-subset", type=int, default=None, help="fit on n training rows, seeded (default: all)")
    ap.add_argument("--eval-subset", type=int, default=None, help="evaluate on n rows of the split (default: all)")
    ap.add_argument(
        "--recipe",
        choices=["paper", "task"],
        default="paper",
        help="paper: TrainConfig(), the paper's §3 settings; task: xpeft.fit.recipes.TASK_TRAIN (default: paper)",
    )
    ap.add_argument("--num-cpus", type=int, default=None, help="CPUs of the embedded local Ray (default: all)")
    skip = ("task", "storage_path", "name") if for_search else ("task",)
    add_flags(ap.add_argument_group("fit"), FitConfig, skip=skip)
    add_flags(ap.add_argument_group("model (X-PEFT)"), XPeftConfig, skip=DATA_FROM_DATA)
    group = ap.add_argument_group("training (each flag overrides the --recipe's value)")
    add_flags(group, TrainConfig, unset=True)


def fit_config(args: argparse.Namespace):
    """(FitConfig, TaskData) from the flags: the data is loaded and tokenized here, once, on the driver."""
    from xpeft.core.encoder import load_tokenizer
    from xpeft.fit.recipes import TASK_TRAIN
    from xpeft.fit.task import FitConfig, for_task, load_profile_data, load_task_data

    train = from_flags(args, TrainConfig, base=TASK_TRAIN if args.recipe == "task" else TrainConfig())
    xcfg = from_flags(args, XPeftConfig)
    tokenizer = load_tokenizer(args.backbone)
    if args.task:
        xcfg = for_task(xcfg, args.task)
        data = load_task_data(
            args.task, tokenizer, train.max_length, args.data_dir, args.train_subset, args.eval_subset, train.seed
        )
    else:
        if not args.profile_id:
            raise ValueError("--data needs --profile-id: the profile to fit")
        data, xcfg, _ = load_profile_data(args.data, args.profile_id, tokenizer, xcfg, train.max_length)
    return from_flags(args, FitConfig, xpeft=xcfg, train=train, task=args.task), data


def run(args: argparse.Namespace) -> None:
    """Fit x_peft (soft/hard), single_adapter or head_only with Ray Train DDP workers."""
    from xpeft.ray.cluster import init_ray
    from xpeft.ray.train import fit_distributed

    cfg, data = fit_config(args)
    init_ray(num_cpus=args.num_cpus)
    start = time.perf_counter()
    report = fit_distributed(cfg, data)
    wall = time.perf_counter() - start
    resumed = f", resumed at epoch {report.resumed_from_epoch}" if report.resumed_from_epoch is not None else ""
    what = cfg.xpeft.mode + (f"/{cfg.xpeft.mask_type}" if cfg.xpeft.mode == "x_peft" else "")
    print(
        f"fitted {cfg.task or args.profile_id} with {what}: {len(data.train)} train rows, {report.world_size} "
        f"worker(s) x batch {report.per_worker_batch} x {report.torch_threads} threads, {report.epochs} epochs, "
        f"{report.steps} steps{resumed}"
    )
    shown = json.dumps({k: round(v, 4) for k, v in report.metrics.items()})
    loss = f"loss {report.losses[0]:.4f} -> {report.losses[-1]:.4f}"
    print(f"{loss}; eval on {len(data.eval)} rows: {shown}; score {report.score}")
    print(f"wall time {wall:.1f} s (training loop {report.seconds:.1f} s); checkpoint {report.checkpoint_path}")
    if report.profile is not None:
        print(f"profile {report.profile.profile_id} ({report.profile.record_bytes} bytes) stored in {cfg.store}")
    if args.json:
        body = {k: v for k, v in dataclasses.asdict(report).items() if k not in ("profile", "replica_states")}
        with open(args.json, "w") as f:
            json.dump({**body, "wall_seconds": wall, "train_rows": len(data.train)}, f, indent=1)


def arguments(ap: argparse.ArgumentParser) -> None:
    task_arguments(ap)
    ap.add_argument("--json", default=None, help="also write the report (loss curve, history) here (default: none)")
