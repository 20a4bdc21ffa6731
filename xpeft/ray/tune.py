"""The paper's hyper-parameter search (Appendix C) as one Ray Tune run.

Search space: N ∈ {100, 200, 400, 800}, k ∈ {1, 10, 20, 30, 40, 50, 60, 70, 80, 100}, b ∈ {12, 24, 48, 96},
batch size ∈ {8, 16, 32, 64, 128}; any of them can be narrowed. Trials are drawn at random (`num_samples`)
or enumerated (`grid`), stopped early by ASHA on the task's official score (reported every epoch), and
each is a single-process fit (default) or a Ray Train run over `fit.num_workers` workers. Both run
xpeft.fit.task.fit_task's epoch loop, which checkpoints every epoch, so `restore_search` (Tuner.restore)
picks an interrupted search up where its trials left off.

A hard mask selects a proper subset of the bank (k < N), so when N and k are both searched they are drawn
as one choice over the pairs that allow it, and the pairs left out are logged (Appendix C's space has one:
k = N = 100). A space with no usable pair, or a b < 1, is refused before anything starts, and the trainable
validates its own config before it loads a model.

Distributed trials and ASHA: a trial that ASHA stops takes its Ray Train controller down with it, and the
workers' placement group (scoped to the job, not the trial) is then removed by Ray Train's placement-group
cleaner, which queries the Ray State API. That needs the dashboard and a cluster address the cleaner can
resolve: on a machine where several local Ray clusters run side by side (or without the dashboard) the
cleaner fails, the stopped trial's workers keep their CPUs and later trials wait for them. Single-process
trials (the default) do not have this problem.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from itertools import product
from typing import Any

from xpeft.config import option
from xpeft.fit.checkpoints import save_checkpoint
from xpeft.fit.loop import Session, per_worker_batch
from xpeft.fit.task import FitConfig, TaskData, fit_task
from xpeft.ray.train import fit_distributed, from_checkpoint, profile_from_checkpoint

log = logging.getLogger(__name__)

# Appendix C's search space.
SEARCH_SPACE: dict[str, tuple[int, ...]] = {
    "N": (100, 200, 400, 800),
    "k": (1, 10, 20, 30, 40, 50, 60, 70, 80, 100),
    "b": (12, 24, 48, 96),
    "batch_size": (8, 16, 32, 64, 128),
}
# Tune's own bookkeeping, left out of the best trial's metrics.
_TUNE_KEYS = {
    "timestamp",
    "should_checkpoint",
    "done",
    "time_this_iter_s",
    "time_total_s",
    "pid",
    "time_since_restore",
    "iterations_since_restore",
    "checkpoint_dir_name",
    "date",
    "hostname",
    "node_ip",
    "trial_id",
    "experiment_tag",
}
METRIC = "score"  # the task's Table 2/3 number (xpeft.metrics.main_score), higher is better
BEST_FILE = "best.json"


@dataclass
class SearchConfig:
    """A search: the trials' common fit (task, mode, mask type, learning rates, epochs...) and the space."""

    fit: FitConfig = option(FitConfig(), "the trials' common fit", no_flag=True)
    space: dict[str, tuple[int, ...]] = option(dict(SEARCH_SPACE), "the values searched per dimension", no_flag=True)
    num_samples: int = option(20, "random search: trials drawn from the space (ignored with --grid)")
    grid: bool = option(False, "every combination of the space instead (800 trials on the full space)")
    distributed: bool = option(False, "each trial a Ray Train run over --num-workers workers")
    grace_period: int = option(1, "ASHA: epochs every trial gets before it can be stopped")
    reduction_factor: int = option(2, "ASHA: keep the best 1/reduction_factor of the trials at each rung")
    max_concurrent_trials: int | None = option(None, "trials running at once (default: as the cluster allows)")
    storage_path: str = option("runs/tune", "where the search is kept: <storage-path>/<name> (path or URI)")
    name: str = option("search", "the search's name; --restore continues the one of that name")

    def experiment_path(self) -> str:
        return os.path.join(_absolute(self.storage_path), self.name)


@dataclass
class SearchResult:
    best_config: dict[str, int]  # the winning trial's N, k, b, batch_size
    best_score: float
    best_metrics: dict[str, float]
    trials: list[dict[str, Any]]  # per trial: its config, last score, epochs run, error
    experiment_path: str
    profile_id: str | None = None


def _absolute(path: str) -> str:
    return path if "://" in path else os.path.abspath(path)


def validate_space(scfg: SearchConfig) -> list[tuple[int, int]]:
    """Refuse a space that cannot be searched before any trial starts, saying which values to drop; returns
    the (N, k) pairs left out because a hard mask must select a proper subset (k < N)."""
    unknown = set(scfg.space) - set(SEARCH_SPACE)
    if unknown:
        raise ValueError(f"cannot search over {sorted(unknown)}; the space has {list(SEARCH_SPACE)}")
    for name, values in scfg.space.items():
        if not values:
            raise ValueError(f"the {name} grid is empty; give at least one value")
        bad = [v for v in values if not isinstance(v, int) or v < 1]
        if bad:
            raise ValueError(f"{name} must be a positive integer, but the grid has {bad}; drop them")
    if scfg.distributed:
        for batch in scfg.space.get("batch_size", (scfg.fit.train.batch_size,)):
            per_worker_batch(batch, scfg.fit.num_workers)
    pairs, dropped = nk_pairs(scfg)
    if not pairs:
        raise ValueError(
            f"no (N, k) of this search lets a hard mask select a proper subset of the bank (k < N): "
            f"dropped {dropped}. Keep some k below max(N)"
        )
    return dropped


def nk_pairs(scfg: SearchConfig) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """The (N, k) pairs of the space a hard mask can use (k < N) and the ones it cannot (k >= N would select
    every adapter: every profile's masks identical). Soft masks ignore k: every pair is kept."""
    x = scfg.fit.xpeft
    Ns, ks = scfg.space.get("N", (x.N,)), scfg.space.get("k", (x.top_k,))
    every = list(product(Ns, ks))
    if not (x.mode == "x_peft" and x.mask_type == "hard"):
        return every, []
    return [(n, k) for n, k in every if k < n], [(n, k) for n, k in every if k >= n]


def tune_space(scfg: SearchConfig) -> dict[str, Any]:
    """Tune's param_space: each dimension a choice (or grid); N and k, when searched, as one choice over
    the pairs a hard mask can use, so an impossible trial is never drawn."""
    from ray import tune

    pick = tune.grid_search if scfg.grid else tune.choice
    space = {name: pick(list(values)) for name, values in scfg.space.items() if name not in ("N", "k")}
    pairs, dropped = nk_pairs(scfg)
    if dropped:
        log.warning(
            "left out %d (N, k) pairs with k >= N (a hard mask selects a proper subset): %s", len(dropped), dropped
        )
    if "N" in scfg.space and "k" in scfg.space:
        space["N_k"] = pick([list(p) for p in pairs])
    elif "N" in scfg.space:
        space["N"] = pick(sorted({n for n, _ in pairs}))
    elif "k" in scfg.space:
        space["k"] = pick(sorted({k for _, k in pairs}))
    return space


def trial_params(config: dict[str, Any]) -> dict[str, int]:
    """A trial's N, k, b, batch_size from Tune's config (the joint N_k choice split back into N and k)."""
    params = {k: v for k, v in config.items() if k in SEARCH_SPACE}
    if "N_k" in config:
        params["N"], params["k"] = (int(v) for v in config["N_k"])
    return params


def trial_config(base: FitConfig, params: dict[str, int]) -> FitConfig:
    """The fit of one trial; raises ValueError at once for an impossible one (k > N, b < 1)."""
    try:
        xpeft = dataclasses.replace(base.xpeft, **{k: params[k] for k in ("N", "k", "b") if k in params})
        train = dataclasses.replace(base.train, batch_size=params.get("batch_size", base.train.batch_size))
        per_worker_batch(train.batch_size, base.num_workers)
    except ValueError as e:
        raise ValueError(f"trial {params} is impossible: {e}") from None
    name = "-".join([base.profile_id or base.task or "profile"] + [f"{k}{v}" for k, v in sorted(params.items())])
    # Every epoch is scored: ASHA compares trials at each rung.
    return dataclasses.replace(base, xpeft=xpeft, train=train, store=None, profile_id=name, eval_every_epoch=True)


def _trial(params: dict, scfg: SearchConfig, data: TaskData) -> None:
    """The trainable: validate, then fit, reporting the score every epoch to Tune (and ASHA)."""
    from ray import tune

    cfg = trial_config(scfg.fit, trial_params(params))  # before anything loads: impossible trials fail in ms
    if scfg.distributed:
        from ray.tune.integration.ray_train import TuneReportCallback

        trial_dir = os.path.join(scfg.experiment_path(), "train")
        cfg = dataclasses.replace(cfg, storage_path=trial_dir, name=tune.get_context().get_trial_id())
        fit_distributed(cfg, data, callbacks=[TuneReportCallback()])
        return

    def report(metrics: dict, model, optimizer, scheduler, state) -> None:
        with tempfile.TemporaryDirectory() as d:
            save_checkpoint(d, model, optimizer, scheduler, state)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))

    import torch

    session = Session(device=torch.device("cuda" if cfg.use_gpu and torch.cuda.is_available() else "cpu"))
    from_checkpoint(tune.get_checkpoint(), lambda d: fit_task(cfg, data, session, d, report))


DRIVER_CPU = 0.01  # a distributed trial only waits on its Ray Train run (Tune refuses an empty request)


def check_cluster_fits(scfg: SearchConfig) -> None:
    """A distributed trial holds DRIVER_CPU while its workers wait for theirs: on a cluster too small for
    both, the search would hang instead of failing."""
    import ray

    if not (scfg.distributed and ray.is_initialized()):
        return
    need = DRIVER_CPU + scfg.fit.num_workers * scfg.fit.cpus_per_actor
    have = ray.cluster_resources().get("CPU", 0)
    if need > have:
        raise ValueError(
            f"a distributed trial needs {need:g} CPUs ({scfg.fit.num_workers} workers x "
            f"{scfg.fit.cpus_per_actor:g} + {DRIVER_CPU} for the trial) but the cluster has {have:g}; "
            f"lower cpus_per_actor (e.g. {(have - DRIVER_CPU) / scfg.fit.num_workers:.2f}) or num_workers, "
            "or run single-process trials"
        )


def _trainable(scfg: SearchConfig, data: TaskData):
    from ray import tune

    trainable = tune.with_parameters(_trial, scfg=scfg, data=data)
    if scfg.distributed:  # the trial's workers ask for their own resources
        return tune.with_resources(trainable, {"cpu": DRIVER_CPU})
    return tune.with_resources(trainable, {"cpu": scfg.fit.cpus_per_actor, "gpu": 1 if scfg.fit.use_gpu else 0})


def make_tuner(scfg: SearchConfig, data: TaskData):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    validate_space(scfg)
    check_cluster_fits(scfg)
    if not data.eval:
        raise ValueError("a search scores its trials on evaluation rows, but TaskData.eval is empty")
    space = tune_space(scfg)
    # max_t one past the last epoch: a trial that completes returns by itself instead of being stopped by
    # ASHA at its last report, which would kill a distributed trial's Ray Train run before it frees its
    # workers' placement group.
    scheduler = ASHAScheduler(
        max_t=scfg.fit.train.epochs + 1, grace_period=scfg.grace_period, reduction_factor=scfg.reduction_factor
    )
    return tune.Tuner(
        _trainable(scfg, data),
        param_space=space,
        tune_config=tune.TuneConfig(
            metric=METRIC,
            mode="max",
            scheduler=scheduler,
            num_samples=1 if scfg.grid else scfg.num_samples,
            max_concurrent_trials=scfg.max_concurrent_trials,
            # A reused actor would keep a stopped distributed trial's run alive.
            reuse_actors=not scfg.distributed,
        ),
        run_config=tune.RunConfig(name=scfg.name, storage_path=_absolute(scfg.storage_path)),
    )


def search(scfg: SearchConfig, data: TaskData, store: str | None = None) -> SearchResult:
    """Run the search; write best.json beside it and (with `store`) the best trial's profile."""
    return summarize(scfg, make_tuner(scfg, data).fit(), store)


def restore_search(scfg: SearchConfig, data: TaskData, store: str | None = None) -> SearchResult:
    """Continue the search stored at scfg.storage_path/scfg.name: finished trials are kept, unfinished ones
    resume from their last checkpoint, errored ones are restarted."""
    from ray import tune

    path = scfg.experiment_path()
    if not tune.Tuner.can_restore(path):
        raise FileNotFoundError(f"no Tune experiment to restore at {path}; start it with search() first")
    validate_space(scfg)
    tuner = tune.Tuner.restore(path, trainable=_trainable(scfg, data), resume_unfinished=True, restart_errored=True)
    return summarize(scfg, tuner.fit(), store)


def _checkpoint_of(result):
    if result.checkpoint is not None:
        return result.checkpoint
    path = (result.metrics or {}).get("checkpoint_path")  # a distributed trial reports its run's checkpoint
    if path:
        from ray.train import Checkpoint

        return Checkpoint(path)
    return None


def summarize(scfg: SearchConfig, results, store: str | None = None) -> SearchResult:
    trials = []
    for r in results:
        m = r.metrics or {}
        trials.append(
            {
                "config": trial_params(r.config),
                "score": m.get(METRIC),
                "epochs": m.get("training_iteration", 0),
                "error": str(r.error).splitlines()[0] if r.error else None,
            }
        )
    scored = [t for t in trials if t["score"] is not None]
    if not scored:
        errors = sorted({t["error"] for t in trials if t["error"]})
        raise RuntimeError(f"no trial of {scfg.experiment_path()} reported a score; errors: {errors}")
    best = results.get_best_result(metric=METRIC, mode="max", scope="last")
    config = trial_params(best.config)
    metrics = {k: v for k, v in best.metrics.items() if isinstance(v, int | float) and k not in _TUNE_KEYS}
    out = SearchResult(config, float(best.metrics[METRIC]), metrics, trials, results.experiment_path)
    checkpoint = _checkpoint_of(best)
    if store and checkpoint is not None:
        cfg = trial_config(scfg.fit, config)
        profile = profile_from_checkpoint(cfg, checkpoint, scfg.fit.profile_id or cfg.profile_id, store)
        out.profile_id = profile.profile_id
    with open(os.path.join(results.experiment_path, BEST_FILE), "w") as f:
        json.dump(dataclasses.asdict(out), f, indent=1, default=str)
    stopped = sum(t["epochs"] < scfg.fit.train.epochs for t in scored)
    log.info(
        "best of %d trials (%d stopped early by ASHA): %s score %.4f", len(trials), stopped, config, out.best_score
    )
    return out
