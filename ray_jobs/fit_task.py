"""Fit x_peft (soft/hard), single_adapter or head_only on a GLUE/SuperGLUE task or one profile with Ray Train
DDP workers: checkpoints every epoch, resume after a crash, the task's official metric.

    python ray_jobs/fit_task.py --task sst2 --train-subset 1000 --epochs 1 --num-workers 2
    python ray_jobs/fit_task.py --task rte --mode x_peft --mask-type hard --N 200 --recipe task \
        --store runs/store --num-workers 4 --use-gpu
    python ray_jobs/fit_task.py --profiles profiles.parquet --profile-id "Jane Doe" --head linear

Defaults are the paper's (§3): AdamW lr 1e-5 with linear decay, 10 epochs, global batch 64, max length 128,
seed 42. `--recipe task` uses xpeft.recipes.TASK_TRAIN (per-role learning rates for short runs); explicit
flags override either. The global batch stays the same whatever --num-workers is. Rerunning with the same
--name and --storage-path resumes that run from its latest checkpoint.

Without RAY_ADDRESS it starts an embedded local Ray; under `ray job submit` it joins the cluster.
The logic lives in xpeft.distributed; this script only parses arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from xpeft.config import MASK_TYPES, MODES, TrainConfig, XPeftConfig  # noqa: E402

TRAIN_FLAGS = (
    "lr",
    "mask_lr",
    "ln_lr",
    "head_lr",
    "adapter_lr",
    "weight_decay",
    "warmup_ratio",
    "epochs",
    "batch_size",
    "max_length",
    "seed",
    "max_steps",
    "tau_final",
)


def add_fit_arguments(ap: argparse.ArgumentParser) -> None:
    """The flags of one fit (shared with tune_search.py)."""
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--task", help="GLUE/SuperGLUE task: cola sst2 mrpc qqp stsb mnli qnli rte wnli cb boolq axb axg")
    src.add_argument("--profiles", help="a profile data set (Parquet: text, label, profile_id[, split])")
    ap.add_argument("--profile-id", help="with --profiles: the profile to fit; also the stored profile's id")
    ap.add_argument("--num-labels", type=int, default=None, help="with --profiles: default max label + 1")
    ap.add_argument("--data-dir", default=None, help="GLUE/SuperGLUE files (default ../shared/data or XPEFT_DATA_DIR)")
    ap.add_argument("--train-subset", type=int, default=None, help="fit on n training rows (seeded sample)")
    ap.add_argument("--eval-subset", type=int, default=None, help="evaluate on n rows of the reported split")
    ap.add_argument("--backbone", default="minilm", help="'minilm' (bundled all-MiniLM-L6-v2), 'tiny', a path")
    ap.add_argument("--mode", choices=MODES, default="x_peft")
    ap.add_argument("--mask-type", choices=MASK_TYPES, default="hard")
    ap.add_argument("--N", type=int, default=100)
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--b", type=int, default=48)
    ap.add_argument("--tau", type=float, default=1.0)
    ap.add_argument("--nu", type=float, default=1.0)
    ap.add_argument("--masks", choices=["AB", "B"], default="AB", help="'B': the single-mask ablation (§3.2)")
    ap.add_argument("--head", choices=["pooler", "linear"], default="pooler")
    ap.add_argument("--bank", default=None, help="a saved bank (safetensors) instead of a random one")
    ap.add_argument("--bank-seed", type=int, default=0)
    ap.add_argument(
        "--recipe",
        choices=["paper", "task"],
        default="paper",
        help="paper: TrainConfig() (§3); task: xpeft.recipes.TASK_TRAIN",
    )
    for name in TRAIN_FLAGS:
        kind = int if name in ("epochs", "batch_size", "max_length", "seed", "max_steps") else float
        ap.add_argument(f"--{name.replace('_', '-')}", type=kind, default=None, help="overrides the recipe")
    ap.add_argument("--num-workers", type=int, default=1, help="DDP workers per fit (global batch unchanged)")
    ap.add_argument("--use-gpu", action="store_true", help="one GPU per worker, nccl")
    ap.add_argument("--cpus-per-worker", type=float, default=1.0)
    ap.add_argument("--storage-path", default="runs/train", help="checkpoints (a directory or URI)")
    ap.add_argument("--name", default=None, help="run name; an existing run of that name is resumed")
    ap.add_argument("--max-failures", type=int, default=2, help="worker-group restarts from the last checkpoint")
    ap.add_argument("--store", default=None, help="profile store to write the fitted profile to")
    ap.add_argument("--num-cpus", type=int, default=None, help="CPUs of the embedded local Ray")


def train_config(args: argparse.Namespace) -> TrainConfig:
    from xpeft.recipes import TASK_TRAIN

    base = TASK_TRAIN if args.recipe == "task" else TrainConfig()
    overrides = {k: getattr(args, k) for k in TRAIN_FLAGS if getattr(args, k) is not None}
    return dataclasses.replace(base, **overrides)


def fit_config(args: argparse.Namespace, num_labels: int | None = None):
    """(FitConfig, TaskData) from the flags: the data is loaded and tokenized here, once, on the driver."""
    from xpeft.distributed import FitConfig, backbone_tokenizer, for_task, load_profile_data, load_task_data

    train = train_config(args)
    xcfg = XPeftConfig(
        mode=args.mode,
        mask_type=args.mask_type,
        N=args.N,
        k=args.k,
        b=args.b,
        tau=args.tau,
        nu=args.nu,
        masks=args.masks,
        head=args.head,
    )
    tokenizer = backbone_tokenizer(args.backbone)
    if args.task:
        xcfg = for_task(xcfg, args.task)
        data = load_task_data(
            args.task, tokenizer, train.max_length, args.data_dir, args.train_subset, args.eval_subset, train.seed
        )
    else:
        if not args.profile_id:
            raise SystemExit("--profiles needs --profile-id: the profile to fit")
        data = load_profile_data(args.profiles, args.profile_id, tokenizer, train.max_length)
        labels = [r["labels"] for r in data.train + data.eval]
        xcfg = dataclasses.replace(xcfg, num_labels=args.num_labels or max(2, max(labels) + 1))
    cfg = FitConfig(
        xpeft=xcfg,
        train=train,
        task=args.task,
        backbone=args.backbone,
        bank_path=args.bank,
        bank_seed=args.bank_seed,
        num_workers=args.num_workers,
        use_gpu=args.use_gpu,
        cpus_per_worker=args.cpus_per_worker,
        storage_path=args.storage_path,
        name=args.name,
        max_failures=args.max_failures,
        store=args.store,
        profile_id=args.profile_id,
    )
    return cfg, data


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_fit_arguments(ap)
    ap.add_argument("--json", default=None, help="also write the report (loss curve, history) to this file")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from xpeft.cluster import init_ray
    from xpeft.distributed import fit_distributed

    cfg, data = fit_config(args)
    init_ray(num_cpus=args.num_cpus)
    start = time.perf_counter()
    report = fit_distributed(cfg, data)
    wall = time.perf_counter() - start
    resumed = f", resumed at epoch {report.resumed_from_epoch}" if report.resumed_from_epoch is not None else ""
    print(
        f"fitted {cfg.task or args.profile_id} with {cfg.xpeft.mode}"
        f"{'/' + cfg.xpeft.mask_type if cfg.xpeft.mode == 'x_peft' else ''}: {len(data.train)} train rows, "
        f"{report.world_size} worker(s) x batch {report.per_worker_batch} x {report.torch_threads} threads, "
        f"{report.epochs} epochs, "
        f"{report.steps} steps{resumed}"
    )
    print(
        f"loss {report.losses[0]:.4f} -> {report.losses[-1]:.4f}; eval on {len(data.eval)} rows: "
        f"{json.dumps({k: round(v, 4) for k, v in report.metrics.items()})}; score {report.score}"
    )
    print(f"wall time {wall:.1f} s (training loop {report.seconds:.1f} s); checkpoint {report.checkpoint_path}")
    if report.profile is not None:
        print(f"profile {report.profile.profile_id} ({report.profile.record_bytes} bytes) stored in {cfg.store}")
    if args.json:
        body = {k: v for k, v in dataclasses.asdict(report).items() if k not in ("profile", "replica_states")}
        with open(args.json, "w") as f:
            json.dump({**body, "wall_seconds": wall, "train_rows": len(data.train)}, f, indent=1)


if __name__ == "__main__":
    main()
