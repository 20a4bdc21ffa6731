"""`xpeft tune` (= `ray_jobs/tune_search.py`): Appendix C's search over N / k / b / batch size with Ray Tune and
ASHA, on the fit-task job's flags and data."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging

from xpeft.flags import add_flags, from_flags
from xpeft.jobs.fit_task import fit_config, task_arguments

log = logging.getLogger(__name__)

HELP = "search N / k / b / batch size (Appendix C) with Ray Tune and ASHA"


def arguments(ap: argparse.ArgumentParser) -> None:
    from xpeft.ray.tune import SEARCH_SPACE, SearchConfig

    task_arguments(ap, for_search=True)
    ap.add_argument(
        "--search",
        nargs="+",
        choices=list(SEARCH_SPACE),
        default=list(SEARCH_SPACE),
        help=f"the dimensions searched (Appendix C; default: {' '.join(SEARCH_SPACE)})",
    )
    for dim, values in SEARCH_SPACE.items():
        ap.add_argument(
            f"--space-{dim.replace('_', '-')}", dest=f"space_{dim}", type=int, nargs="+", default=list(values),
            help=f"values of {dim} (default {list(values)}, Appendix C)",
        )  # fmt: skip
    add_flags(ap.add_argument_group("search"), SearchConfig, defaults=SearchConfig(storage_path="runs/tune"))
    ap.add_argument("--restore", action="store_true", help="continue the search --name (default: a new search)")


def run(args: argparse.Namespace) -> None:
    """The paper's hyper-parameter search (Appendix C) with Ray Tune and ASHA on the task's official score."""
    from xpeft.ray.cluster import init_ray
    from xpeft.ray.tune import SearchConfig, restore_search, search

    if args.restore and args.name == "search":
        log.info("--restore without --name continues the search named 'search'")
    fit, data = fit_config(args)
    space = {dim: tuple(getattr(args, f"space_{dim}")) for dim in args.search}
    scfg = from_flags(args, SearchConfig, fit=dataclasses.replace(fit, name=None, store=None), space=space)
    init_ray(num_cpus=args.num_cpus, dashboard=args.distributed)  # Ray Train's cleanup of stopped trials needs it
    result = (restore_search if args.restore else search)(scfg, data, store=args.store)
    print(f"{len(result.trials)} trials in {result.experiment_path}")
    for t in sorted(result.trials, key=lambda t: -(t["score"] if t["score"] is not None else -1e9)):
        error = f", error {t['error']}" if t["error"] else ""
        print(f"  {json.dumps(t['config'])}: score {t['score']}, {t['epochs']} epochs{error}")
    stored = f"; profile {result.profile_id} stored in {args.store}" if result.profile_id else ""
    print(f"best {json.dumps(result.best_config)} score {result.best_score:.4f}{stored}")
