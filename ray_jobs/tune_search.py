"""The paper's hyper-parameter search (Appendix C) with Ray Tune and ASHA on the task's official score.

    python ray_jobs/tune_search.py --task rte --recipe task --epochs 3 --num-samples 12
    python ray_jobs/tune_search.py --task sst2 --train-subset 2000 --search N k --space-N 100 200 \
        --space-k 10 50 --grid --name sst2-Nk --store runs/store
    python ray_jobs/tune_search.py --task sst2 --train-subset 2000 --search N k --space-N 100 200 \
        --space-k 10 50 --grid --name sst2-Nk --restore          # continue an interrupted search

Searched by default: N ∈ {100, 200, 400, 800}, k ∈ {1, 10, …, 100}, b ∈ {12, 24, 48, 96}, batch size ∈
{8, …, 128}; `--search` picks the dimensions and `--space-X` narrows one (the rest come from the fit flags).
Each trial is a single-process fit, or a Ray Train run over --num-workers workers with --distributed.
The best config goes to <storage-path>/<name>/best.json and, with --store, its profile to the store.

Without RAY_ADDRESS it starts an embedded local Ray; under `ray job submit` it joins the cluster.
The logic lives in xpeft.tuning; this script only parses arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fit_task import add_fit_arguments, fit_config  # noqa: E402

from xpeft.cluster import init_ray  # noqa: E402
from xpeft.tuning import SEARCH_SPACE  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_fit_arguments(ap)
    ap.add_argument(
        "--search",
        nargs="+",
        choices=list(SEARCH_SPACE),
        default=list(SEARCH_SPACE),
        help="the dimensions to search (default all four)",
    )
    for dim, values in SEARCH_SPACE.items():
        ap.add_argument(
            f"--space-{dim.replace('_', '-')}",
            dest=f"space_{dim}",
            type=int,
            nargs="+",
            default=list(values),
            help=f"values of {dim} (default {list(values)})",
        )
    ap.add_argument("--num-samples", type=int, default=20, help="random search: trials drawn from the space")
    ap.add_argument("--grid", action="store_true", help="every combination of the space instead")
    ap.add_argument("--distributed", action="store_true", help="each trial a Ray Train run over --num-workers")
    ap.add_argument("--grace-period", type=int, default=1, help="ASHA: epochs before a trial can be stopped")
    ap.add_argument("--reduction-factor", type=int, default=2)
    ap.add_argument("--max-concurrent-trials", type=int, default=None)
    ap.add_argument("--cpus-per-trial", type=float, default=1.0)
    ap.add_argument("--restore", action="store_true", help="continue the search --name at --storage-path")
    ap.set_defaults(storage_path="runs/tune")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from xpeft.tuning import SearchConfig, restore_search, search

    if args.restore and not args.name:
        raise SystemExit("--restore needs --name: the search to continue")
    fit, data = fit_config(args)
    name = args.name or f"search-{args.task or args.profile_id}-{time.strftime('%Y%m%d-%H%M%S')}"
    scfg = SearchConfig(
        fit=dataclasses.replace(fit, name=None, store=None),
        space={dim: tuple(getattr(args, f"space_{dim}")) for dim in args.search},
        num_samples=args.num_samples,
        grid=args.grid,
        distributed=args.distributed,
        grace_period=args.grace_period,
        reduction_factor=args.reduction_factor,
        max_concurrent_trials=args.max_concurrent_trials,
        cpus_per_trial=args.cpus_per_trial,
        storage_path=args.storage_path,
        name=name,
    )
    init_ray(num_cpus=args.num_cpus, dashboard=args.distributed)  # Ray Train's cleanup of stopped trials needs it
    result = (restore_search if args.restore else search)(scfg, data, store=args.store)
    print(f"{len(result.trials)} trials in {result.experiment_path}")
    for t in sorted(result.trials, key=lambda t: -(t["score"] if t["score"] is not None else -1e9)):
        print(
            f"  {json.dumps(t['config'])}: score {t['score']}, {t['epochs']} epochs"
            + (f", error {t['error']}" if t["error"] else "")
        )
    print(
        f"best {json.dumps(result.best_config)} score {result.best_score:.4f}"
        + (f"; profile {result.profile_id} stored in {args.store}" if result.profile_id else "")
    )


if __name__ == "__main__":
    main()
