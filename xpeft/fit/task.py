"""One fit of a whole task (GLUE / SuperGLUE) or of one profile with its official metric, resumable from a
checkpoint every epoch: what a Ray Train worker and a Ray Tune trial run (xpeft.ray.train, xpeft.ray.tune),
written so that one process runs it too.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import nn

from xpeft.config import RandomBankFields, TrainConfig, XPeftConfig, option
from xpeft.core.bank import load_bank, random_bank_for
from xpeft.core.encoder import load_encoder
from xpeft.core.model import XPeftModel
from xpeft.data.tokens import tokenize
from xpeft.fit.checkpoints import resume_from
from xpeft.fit.loop import FitResult, FitState, Session, fit, per_worker_batch
from xpeft.profiles.record import Profile, profile_from_model

log = logging.getLogger(__name__)

Report = Callable[[dict, XPeftModel, Any, Any, FitState], None]  # (metrics, model, optimizer, scheduler, state)


@dataclass
class FitConfig(RandomBankFields):
    """One fit of one task or profile, on one process or W data-parallel workers."""

    xpeft: XPeftConfig = option(default=XPeftConfig(), help="the profile's mode, masks and head", no_flag=True)
    train: TrainConfig = option(default=TrainConfig(), help="the fit loop's settings", no_flag=True)
    task: str | None = option(None, "GLUE/SuperGLUE task (its official metric); none: a profile (accuracy, F1)")
    num_workers: int = option(1, "data-parallel (DDP) workers; the global batch stays --batch-size")
    use_gpu: bool = option(False, "one GPU per worker (nccl); untested here: no GPU on the dev machine")
    cpus_per_actor: float = option(
        1.0,
        "CPUs each worker (a Ray actor; in a search, each single-process trial) reserves",
        renamed_from=("cpus_per_worker", "cpus_per_trial"),
    )
    storage_path: str = option("runs/train", "where checkpoints go: <storage-path>/<name>/checkpoint_* (path or URI)")
    name: str | None = option(None, "run name; the same name and storage path resume that run")
    max_failures: int = option(2, "worker-group restarts from the latest checkpoint before the run fails")
    keep_checkpoints: int | None = option(2, "checkpoints kept (newest first)")
    eval_every_epoch: bool = option(True, "evaluate after every epoch (Tune's ASHA needs it), else after the last")
    store: str | None = option(None, "a profile store: the fitted profile is written there")
    profile_id: str | None = option(None, "the stored profile's id (with --profiles: the profile to fit)")
    check_replicas: bool = option(False, "return every rank's final trainable tensors (tests)", no_flag=True)

    @property
    def per_worker_batch(self) -> int:
        return per_worker_batch(self.train.batch_size, self.num_workers)

    def run_name(self) -> str:
        x = self.xpeft
        what = f"{x.mode}-{x.mask_type}-N{x.N}" if x.mode == "x_peft" else x.mode
        return self.name or f"{self.task or 'profile'}-{what}-{time.strftime('%Y%m%d-%H%M%S')}"


@dataclass
class TaskData:
    """Tokenized rows (xpeft.data.tokens.tokenize) to fit on and to evaluate on."""

    train: list[dict]
    eval: list[dict] = field(default_factory=list)
    pad_token_id: int = 0


def for_task(xcfg: XPeftConfig, task: str) -> XPeftConfig:
    """The config with the task's head (its number of labels, regression for STS-B) and inputs (pairs or not)."""
    from xpeft.data.tasks import get_task

    spec = get_task(task)
    problem = "regression" if spec.is_regression else "classification"
    return dataclasses.replace(xcfg, num_labels=spec.num_labels, problem_type=problem, text_pair=spec.pair)


def _subset(ds, n: int | None, seed: int):
    return ds.shuffle(seed=seed).select(range(n)) if n is not None and n < len(ds) else ds


def load_task_data(
    task: str,
    tokenizer,
    max_length: int = 128,
    data_dir: str | None = None,
    train_subset: int | None = None,
    eval_subset: int | None = None,
    seed: int = 42,
) -> TaskData:
    """A task's train split (RTE's for axb/axg) and the split the paper reports, tokenized."""
    from xpeft.data.tasks import get_task, load_task

    spec = get_task(task)
    train = _subset(load_task(spec.train_task or task, "train", data_dir), train_subset, seed)
    dev = _subset(load_task(task, spec.eval_split, data_dir), eval_subset, seed)
    if len(dev) and min(dev["label"]) < 0:
        raise ValueError(f"{task} {spec.eval_split} has unlabelled rows; it cannot be scored")
    return TaskData(
        tokenize(train, tokenizer, max_length), tokenize(dev, tokenizer, max_length), tokenizer.pad_token_id or 0
    )


def load_profile_data(source: str, profile_id: str, tokenizer, xcfg: XPeftConfig, max_length: int = 128):
    """One profile of a profile data set with its 30% holdout (§3.1), and the config with the data set's
    classes (every profile's head covers all of them). Returns (TaskData, XPeftConfig, label names)."""
    from xpeft.data.dataset import profile_datas, read_profile_source

    dataset = profile_datas(read_profile_source(source))
    match = [d for d in dataset.profiles if d.profile_id == profile_id]
    if not match:
        raise ValueError(
            f"no profile {profile_id!r} in {source}; it has {len(dataset.profiles)} profiles, e.g. "
            f"{[d.profile_id for d in dataset.profiles[:3]]}"
        )
    d, labels = match[0], dataset.labels
    data = TaskData(
        tokenize(d.train, tokenizer, max_length), tokenize(d.test, tokenizer, max_length), tokenizer.pad_token_id or 0
    )
    xcfg = dataclasses.replace(xcfg, num_labels=labels.num_labels, problem_type=labels.problem_type)
    return data, xcfg, labels.label_names


def build_fit_model(cfg: FitConfig, encoder: nn.Module | None = None) -> XPeftModel:
    """The model of a fit: its encoder, its bank (loaded and verified, or drawn from bank_seed) and its
    initial tensors from the fit's seed.

    `encoder`: a backbone already loaded (instead of loading `cfg.backbone`), so that a harness running many
    fits loads it once. The model gets a copy: the adapters wrap the encoder's linears in place, and the
    loaded one must stay as it was for the next fit."""
    encoder = load_encoder(cfg.backbone) if encoder is None else copy.deepcopy(encoder)
    bank = None
    if cfg.xpeft.mode == "x_peft":
        bank = (
            load_bank(cfg.bank_path)
            if cfg.bank_path
            else random_bank_for(encoder, cfg.xpeft, cfg.bank_seed, cfg.bank_scale)
        )
    return XPeftModel(encoder, cfg.xpeft, bank, seed=cfg.train.seed)


def metric_fn(task: str | None, problem_type: str = "classification"):
    from xpeft.metrics import compute_metrics

    name = task or ("profile_regression" if problem_type == "regression" else "profile")
    return functools.partial(compute_metrics, name)


def score_of(task: str | None, metrics: dict[str, float], problem_type: str = "classification") -> float:
    from xpeft.metrics import main_score

    return main_score(task or ("profile_regression" if problem_type == "regression" else "profile"), metrics)


def fit_task(
    cfg: FitConfig,
    data: TaskData,
    session: Session | None = None,
    checkpoint_dir: str | None = None,
    report: Report | None = None,
    on_epoch_start: Callable[[int, int], None] | None = None,
    *,
    encoder: nn.Module | None = None,
) -> tuple[XPeftModel, FitResult]:
    """Build the model of `cfg` and fit it on `data` (resuming from `checkpoint_dir` if given), scoring the
    task's official metric after every epoch (rank 0) and calling `report(metrics, ...)` on every rank
    after each epoch: Ray Train and Tune report and checkpoint there. Returns the model and the fit.

    `encoder`: an already loaded backbone to fit on (copied, see `build_fit_model`) instead of `cfg.backbone`."""
    session = session or Session()
    model = build_fit_model(cfg, encoder)
    if checkpoint_dir is not None:
        resume = resume_from(checkpoint_dir, model)
        log.info(
            "rank %d resumes at epoch %d (step %d) from %s",
            session.rank,
            resume[0].epoch,
            resume[0].step,
            checkpoint_dir,
        )
    else:
        resume = None
    problem = cfg.xpeft.problem_type

    def end_of_epoch(state: FitState, metrics: dict, optimizer, scheduler) -> None:
        if set(metrics) - {"epoch", "train_loss"}:
            metrics["score"] = score_of(cfg.task, metrics, problem)
        log.info("rank %d epoch %d: %s", session.rank, state.epoch, metrics)
        if report is not None:
            report(metrics, model, optimizer, scheduler, state)

    result = fit(
        model.to(session.device),
        data.train,
        cfg.train,
        eval_rows=data.eval,
        metric_fn=metric_fn(cfg.task, problem),
        eval_every_epoch=cfg.eval_every_epoch,
        pad_token_id=data.pad_token_id,
        session=session,
        resume=resume,
        on_epoch_start=(lambda epoch: on_epoch_start(epoch, session.rank)) if on_epoch_start else None,
        on_epoch_end=end_of_epoch,
    )
    result.metrics.pop("score", None)
    return model, result


def task_profile(model: XPeftModel, cfg: FitConfig, result: FitResult, profile_id: str | None = None) -> Profile:
    """The fitted model as a profile, with the last evaluation (and its score) as metrics."""
    last = dict(result.history[-1]) if result.history else {}
    return profile_from_model(model, profile_id or cfg.profile_id or cfg.run_name(), metrics=last)


def replica_spread(states: list[dict[str, np.ndarray]]) -> float:
    """The largest difference of any trainable tensor between ranks (0 when DDP kept them in sync)."""
    return max(float(np.abs(s[k] - states[0][k]).max()) for s in states for k in s) if states else 0.0
