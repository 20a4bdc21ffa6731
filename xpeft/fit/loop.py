"""The one fit loop that everything reuses: a farm actor's profile, a Ray Train worker, a Tune trial, the mtl
warm start.

Plain and visible, as in nanoGPT: AdamW with one learning rate per role (mask, ln, adapter, head), linear
decay, epochs over a DistributedSampler (one shard per rank; one rank without data parallelism), a loss per
step. Each batch keeps its random rows but not their padding: they are packed back to back into a few
sequences (TrainConfig.packing, where the model's packed forward equals its padded one; else padded to the
longest row), and the forward runs under bf16 autocast where the device has native bf16 (TrainConfig.bf16;
both in xpeft.fit.batching). Hooks add what a caller needs at epoch boundaries: Ray Train's checkpoint and
report, a test's injected failure. `FitState` is what a checkpoint keeps, so a fit resumes where it stopped
and continues as the uninterrupted one would.

Seeding: the fit owns the randomness of shuffling, dropout and the Gumbel noise, reseeded each epoch from
(TrainConfig.seed, epoch, rank); the initial trainable tensors come from the seed the model was built with
(`XPeftModel(..., seed=)`, which every caller here passes TrainConfig.seed). So the same seed and data give
the same loss curve on CPU, whatever the global RNG's state before.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from xpeft.config import TrainConfig
from xpeft.fit.batching import Batching, batching_for, to_device

log = logging.getLogger(__name__)

MetricFn = Callable[[np.ndarray, np.ndarray], dict[str, float]]


@dataclass
class FitState:
    """Where a fit is (what a checkpoint keeps besides the tensors): epochs and steps done, the loss per step
    (averaged over ranks) and one metrics dict per epoch."""

    epoch: int = 0
    step: int = 0
    losses: list[float] = field(default_factory=list)
    history: list[dict[str, float]] = field(default_factory=list)


@dataclass
class FitResult:
    """What a fit returns; `losses` and `history` include the epochs before a resume."""

    losses: list[float] = field(default_factory=list)  # one per optimiser step
    history: list[dict[str, float]] = field(default_factory=list)  # per epoch: epoch, train_loss, eval metrics
    metrics: dict[str, float] = field(default_factory=dict)  # the last evaluation
    steps: int = 0
    epochs: int = 0
    seconds: float = 0.0  # this attempt's loop
    examples: int = 0  # rows this rank trained on in this attempt
    resumed_from_epoch: int | None = None
    world_size: int = 1
    per_worker_batch: int = 0
    torch_threads: int = 1
    packed: bool = False  # the batches were packed (TrainConfig.packing, where the model packs exactly)
    bf16: bool = False  # the forward ran under bf16 autocast (TrainConfig.bf16)


@dataclass
class Session:
    """Where the loop runs: its rank and world size, its device, how the model is wrapped (DDP) and how a
    per-step loss list is averaged over ranks. The default is one process."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    prepare: Callable[[nn.Module], nn.Module] = lambda model: model
    mean: Callable[[list[float]], list[float]] = lambda values: values


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_loader(
    rows: list[dict],
    batch_size: int,
    shuffle: bool,
    seed: int = 0,
    pad_token_id: int = 0,
    sampler=None,
    batching: Batching = Batching(),
) -> DataLoader:
    """Batches of `rows` (xpeft.data.tokens.tokenize), padded or packed as `batching` says."""
    g = torch.Generator().manual_seed(seed)
    return DataLoader(
        rows,
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        generator=g,
        collate_fn=batching.collator(pad_token_id),
    )


def per_worker_batch(global_batch: int, num_workers: int) -> int:
    """The global batch is split evenly over data-parallel workers; an uneven split would change the
    number of updates, which stays fixed across runs."""
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    if global_batch % num_workers:
        raise ValueError(
            f"global batch size {global_batch} does not split over {num_workers} workers; the global batch "
            f"stays fixed across runs, so pick a batch size divisible by {num_workers} or another worker count"
        )
    return global_batch // num_workers


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with one parameter group per role (`model.param_groups()`: mask, ln, adapter, head), so each
    can have its own lr."""
    lrs = {"mask": cfg.mask_lr, "ln": cfg.ln_lr, "adapter": cfg.adapter_lr, "head": cfg.head_lr}
    groups = [
        {"params": params, "lr": lrs[role] or cfg.lr, "name": role}
        for role, params in model.param_groups().items()
        if params
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float):
    """Linear warmup (optional) then linear decay to zero, as the paper's 'linear decay'."""
    warmup = int(total_steps * warmup_ratio)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def total_steps(n_batches: int, cfg: TrainConfig) -> int:
    steps = n_batches * cfg.epochs
    return min(steps, cfg.max_steps) if cfg.max_steps else steps


def anneal(start: float, final: float | None, step: int, steps: int) -> float:
    """A linear schedule from `start` to `final` over the fit (`start` throughout when `final` is None)."""
    if final is None or steps <= 1:
        return start
    return start + (final - start) * step / (steps - 1)


def train_step(model: nn.Module, batch: dict, optimizer, scheduler, autocast=contextlib.nullcontext) -> float:
    """One optimiser step on `batch`; its forward (and loss) under `autocast()` (bf16), the backward after."""
    with autocast():
        out = model(**batch)
    optimizer.zero_grad(set_to_none=True)
    out["loss"].backward()
    optimizer.step()
    scheduler.step()
    return out["loss"].item()


EpochStart = Callable[[int], None]  # (epoch), before it
EpochEnd = Callable[[FitState, dict, Any, Any], None]  # (state, the epoch's metrics, optimizer, scheduler)


def fit(
    model: nn.Module,
    rows: list[dict],
    cfg: TrainConfig,
    *,
    eval_rows: list[dict] | None = None,
    metric_fn: MetricFn | None = None,
    eval_every_epoch: bool = False,
    pad_token_id: int = 0,
    session: Session | None = None,
    resume: tuple[FitState, dict, dict] | None = None,
    on_epoch_start: EpochStart | None = None,
    on_epoch_end: EpochEnd | None = None,
) -> FitResult:
    """Fit `model`'s trainable tensors on tokenized rows (xpeft.data.tokens.tokenize); returns the loss curve and the
    metrics of the last evaluation (after every epoch with `eval_every_epoch`, else after the last; rank 0).

    `session` shards the rows over data-parallel ranks (global batch `cfg.batch_size` whatever the world
    size); `resume` = (state, optimizer state, scheduler state) of a checkpoint continues that fit."""
    if len(rows) == 0:
        raise ValueError("no training examples: a fit needs at least one labelled row")
    session = session or Session()
    batch = per_worker_batch(cfg.batch_size, session.world_size)
    if cfg.gradient_checkpointing:
        enable = getattr(model.encoder, "activation_checkpointing_enable", None)
        (enable or model.encoder.gradient_checkpointing_enable)()
    batching = batching_for(model, rows, cfg, session.device, pad_token_id, batch)
    sampler = DistributedSampler(rows, num_replicas=session.world_size, rank=session.rank, shuffle=True, seed=cfg.seed)
    loader = make_loader(rows, batch, True, cfg.seed, pad_token_id, sampler, batching)
    steps = total_steps(len(loader), cfg)
    wrapped = session.prepare(model)
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, steps, cfg.warmup_ratio)
    state, result = FitState(), FitResult(world_size=session.world_size, per_worker_batch=batch)
    result.packed, result.bf16 = batching.pack_length is not None, batching.bf16
    if resume is not None:
        state, opt_state, sched_state = resume
        optimizer.load_state_dict(opt_state)
        scheduler.load_state_dict(sched_state)
        result.resumed_from_epoch = state.epoch
    epochs = math.ceil(steps / len(loader))
    schedules = hasattr(model, "tau")  # an XPeftModel: Gumbel temperature and noise, restored after the fit
    start = time.perf_counter()
    for epoch in range(state.epoch, epochs):
        if on_epoch_start is not None:
            on_epoch_start(epoch)
        seed_everything(cfg.seed + 1009 * (epoch + 1) + session.rank)  # the same noise after a resume
        sampler.set_epoch(epoch)
        wrapped.train()
        losses = session.mean(
            _epoch(model, wrapped, loader, cfg, state, steps, optimizer, scheduler, session, result, batching)
        )
        state.losses += losses
        state.epoch = epoch + 1
        metrics: dict[str, float] = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)) if losses else math.nan}
        if eval_rows and session.rank == 0 and (eval_every_epoch or epoch + 1 == epochs):
            metric = metric_fn or profile_metric_fn(model)
            metrics.update(evaluate(model, eval_rows, metric, batch, pad_token_id, batching=batching))
        state.history.append(metrics)
        if on_epoch_end is not None:
            on_epoch_end(state, metrics, optimizer, scheduler)
    if schedules:
        model.tau, model.nu = model.cfg.tau, model.cfg.nu
    evaluated = [h for h in state.history if set(h) - {"epoch", "train_loss"}]
    result.losses, result.history, result.steps, result.epochs = state.losses, state.history, state.step, state.epoch
    result.metrics = {k: v for k, v in (evaluated[-1] if evaluated else {}).items() if k not in ("epoch", "train_loss")}
    result.seconds = time.perf_counter() - start
    result.torch_threads = torch.get_num_threads()
    return result


def _epoch(
    model, wrapped, loader, cfg: TrainConfig, state: FitState, steps: int, optimizer, scheduler, session, result,
    batching: Batching,
):  # fmt: skip
    """One pass over the loader (or up to `steps`): the loss of each step on this rank."""
    schedules = hasattr(model, "tau")
    autocast = partial(batching.autocast, session.device)
    losses = []
    for rows_batch in loader:
        if state.step >= steps:
            break
        if schedules:
            model.tau = anneal(model.cfg.tau, cfg.tau_final, state.step, steps)
            model.nu = anneal(model.cfg.nu, cfg.nu_final, state.step, steps)
        rows_batch = to_device(rows_batch, session.device)
        losses.append(train_step(wrapped, rows_batch, optimizer, scheduler, autocast))
        state.step += 1
        result.examples += len(rows_batch["labels"])
        if cfg.log_every and state.step % cfg.log_every == 0:
            log.info("step %d/%d loss %.4f", state.step, steps, np.mean(losses[-cfg.log_every :]))
    return losses


def model_device(model: nn.Module) -> torch.device:
    """Where the model's weights are (the batches go there)."""
    return next(model.parameters()).device


@torch.no_grad()
def predict(
    model: nn.Module, rows: list[dict], batch_size: int = 64, pad_token_id: int = 0, batching: Batching = Batching()
) -> np.ndarray:
    """Logits for tokenized rows, in order (`batching`: packed or padded, bf16 or fp32; a fit passes its own)."""
    was_training = model.training
    model.eval()
    loader = make_loader(rows, batch_size, shuffle=False, pad_token_id=pad_token_id, batching=batching)
    device = model_device(model)
    outs = []
    for batch in loader:
        batch.pop("labels", None)
        with batching.autocast(device):
            logits = model(**to_device(batch, device))["logits"]
        outs.append(logits.float().cpu().numpy())
    model.train(was_training)
    return np.concatenate(outs) if outs else np.zeros((0, model.cfg.num_labels), dtype=np.float32)


def evaluate(
    model: nn.Module,
    rows: list[dict],
    metric_fn: MetricFn,
    batch_size: int = 64,
    pad_token_id: int = 0,
    batching: Batching = Batching(),
) -> dict[str, float]:
    logits = predict(model, rows, batch_size, pad_token_id, batching)
    labels = np.array([r["labels"] for r in rows])
    preds = logits.squeeze(-1) if model.cfg.problem_type == "regression" else logits.argmax(-1)
    return metric_fn(preds, labels)


def profile_metric_fn(model: nn.Module) -> MetricFn:
    """A profile's metrics (xpeft.metrics): accuracy and macro-F1 (Figure 4's pair), or MSE and correlations
    for a regression target."""
    from xpeft.metrics import compute_metrics

    task = "profile_regression" if model.cfg.problem_type == "regression" else "profile"
    return partial(compute_metrics, task)
