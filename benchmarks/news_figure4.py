"""Figure 4 on the HuffPost news profiles: averaged holdout accuracy and macro-F1 per mode, with the
bundled MiniLM, through the farm (Ray actors). Every mode is scored on the same profiles: the ones that
get masks after the warm start (the first M profiles build the learned bank).

    python benchmarks/news_figure4.py --modes head_only single_adapter mtl-hard mtl-soft sa-hard --out results/news
    python benchmarks/news_figure4.py --throughput 20      # profiles/min with 1 vs 2 actors on 20 profiles
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from dataclasses import replace

import ray

from xpeft.config import XPeftConfig
from xpeft.data.dataset import profile_datas
from xpeft.data.profiles import load_news_profiles
from xpeft.fit.recipes import FARM_TRAIN
from xpeft.ray.farm import FarmConfig, run_farm, split_warm
from xpeft.ray.report import summarize

MODES = {
    "head_only": ("random", {"mode": "head_only"}),
    "single_adapter": ("random", {"mode": "single_adapter"}),
    "random-hard": ("random", {"mask_type": "hard"}),
    "sa-hard": ("sa", {"mask_type": "hard"}),
    "sa-soft": ("sa", {"mask_type": "soft"}),
    "mtl-hard": ("mtl", {"mask_type": "hard"}),
    "mtl-soft": ("mtl", {"mask_type": "soft"}),
}


def reuse_warm_start(src: str, dst: str, warm_ids: set[str]) -> None:
    """Copy a finished mtl warm start (bank, shared head, farm state, warm-start profiles) into a new store."""
    from xpeft.profiles.store import ProfileStore

    if not os.path.exists(os.path.join(src, "state", "farm.json")):
        raise SystemExit(f"--reuse-warm-start {src}: no state/farm.json there; give the store of an mtl run")
    os.makedirs(dst, exist_ok=True)
    for part in ("banks", "heads", "state"):
        shutil.copytree(os.path.join(src, part), os.path.join(dst, part), dirs_exist_ok=True)
    old = ProfileStore(src)
    ProfileStore(dst).write([old.get(p) for p in sorted(warm_ids & set(old.ids()))])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--min-articles", type=int, default=10)
    ap.add_argument("--modes", nargs="+", default=["head_only", "single_adapter", "mtl-hard"])
    ap.add_argument("--warm-start", type=float, default=0.45)
    ap.add_argument("--epochs", type=int, default=FARM_TRAIN.epochs)
    ap.add_argument(
        "--warm-epochs",
        type=int,
        default=None,
        help="epochs of the sa / mtl warm start (default: the main job's, --epochs)",
    )
    ap.add_argument("--k", type=int, default=None, help="default: the main job's, half the bank (N/2)")
    ap.add_argument("--mask-lr", type=float, default=FARM_TRAIN.mask_lr)
    ap.add_argument("--num-actors", type=int, default=2)
    ap.add_argument("--throughput", type=int, default=0, help="only measure profiles/min, 1 vs 2 actors, on n profiles")
    ap.add_argument("--out", default="results/news")
    ap.add_argument(
        "--reuse-warm-start",
        default=None,
        help="the store of an earlier mtl run: its bank, shared head and warm-start profiles are copied into "
        "each mtl mode's store, so the joint warm start is not run again (the farm resumes after it)",
    )
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    dataset = profile_datas(load_news_profiles(args.data_dir, args.min_articles))
    datas, labels = dataset.profiles, dataset.labels
    train = replace(FARM_TRAIN, epochs=args.epochs, mask_lr=args.mask_lr)
    base = XPeftConfig(head="linear", num_labels=labels.num_labels, k=args.k)
    os.makedirs(args.out, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if args.throughput:
        part = sorted(datas, key=lambda d: d.profile_id)[: args.throughput]
        # 1 actor with 1 CPU (1 torch thread), 1 actor with both CPUs (2 threads), 2 actors with 1 CPU each
        for actors, cpus in ((1, 1), (1, 2), (2, 1)):
            cfg = FarmConfig(
                store=f"{args.out}/tp-{stamp}-{actors}x{cpus}",
                xpeft=base,
                train=train,
                num_actors=actors,
                cpus_per_actor=cpus,
                progress=False,
            )
            rep = run_farm(cfg, part)
            print(
                f"{actors} actor(s) x {cpus} CPU: {len(rep.fitted)} profiles in {rep.seconds:.1f} s = "
                f"{rep.profiles_per_minute:.2f} profiles/min; RSS per actor "
                f"{[round(b / 2**20) for b in rep.memory['rss_bytes_per_actor']]} MiB; "
                f"object store {rep.memory.get('object_store')}",
                flush=True,
            )
        return
    probe = FarmConfig(store="-", train=train, setting="mtl", warm_start=args.warm_start)
    warm, rest = split_warm(probe, datas)
    rest_ids = {d.profile_id for d in rest}
    results = {}
    for name in args.modes:
        setting, kw = MODES[name]
        x = replace(base, **kw)
        cfg = FarmConfig(
            store=f"{args.out}/{name}-{stamp}",
            xpeft=x,
            train=train,
            setting=setting,
            warm_start=args.warm_start,
            warm_train=replace(train, epochs=args.warm_epochs) if args.warm_epochs else None,
            num_actors=args.num_actors,
            progress=False,
            label_names=labels.label_names,
        )
        if args.reuse_warm_start and setting == "mtl":
            reuse_warm_start(args.reuse_warm_start, cfg.store, {d.profile_id for d in warm})
        t = time.perf_counter()
        # Every mode is scored on `rest`; a warm-start setting fits all profiles (the first M build the bank,
        # the rest get masks: one run), a random-bank setting needs only `rest`.
        rep = run_farm(cfg, datas if setting in ("sa", "mtl") else rest)
        scored = {p: m for p, m in rep.fitted.items() if p in rest_ids}
        results[name] = {
            **summarize(scored),
            "all_profiles": summarize(rep.fitted),
            "wall_s": time.perf_counter() - t,
            "profiles_per_minute": rep.profiles_per_minute,
            "bank_N": rep.bank.get("N"),
            "rss_mib_per_actor": [round(b / 2**20) for b in rep.memory.get("rss_bytes_per_actor", [])],
        }
        print(name, json.dumps(results[name]), flush=True)
        with open(f"{args.out}/figure4-{stamp}.json", "w") as f:  # after every mode: a long run keeps its part
            json.dump({"args": vars(args), "warm": len(warm), "rest": len(rest), "results": results}, f, indent=1)
    print(f"\nFigure 4 on {len(rest)} news profiles (bank from {len(warm)} warm-start profiles for sa/mtl)")
    print("| mode | mean accuracy | mean macro-F1 | mean record bytes | profiles fitted in the run | wall s |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        print(
            f"| {name} | {r['accuracy']:.4f} | {r['f1']:.4f} | {r['mean_record_bytes']:.0f} | "
            f"{r['all_profiles']['profiles']} | {r['wall_s']:.0f} |"
        )


if __name__ == "__main__":
    main()
