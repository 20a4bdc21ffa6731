"""Fit one set of masks with data parallelism: Ray Train's TorchTrainer over DDP workers (§3: the paper
fits every GLUE task "with data parallelism" on 4 GPUs).

- The global batch stays `TrainConfig.batch_size` whatever the number of workers W (the paper keeps the
  batch size constant so that every run gets the same number of updates): each worker takes
  batch_size // W rows per step from a DistributedSampler seeded with the run's seed, and DDP averages
  the gradients, so step s sees the same examples and the same mean gradient as one process would.
- Every epoch, rank 0 evaluates with the task's official metric (xpeft.metrics) and writes a checkpoint
  (trainable tensors, optimizer, scheduler, loss curve so far; no pickle) to RunConfig(storage_path).
  A worker group restarted after a failure (FailureConfig(max_failures)) resumes from the latest one.
  Each epoch reseeds from (seed, epoch, rank), so a resumed run continues as the uninterrupted run would.

The loop is xpeft.fit's (`fit_task` over `fit`); this module adds the Ray Train session, the checkpoints'
storage and the driver.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import tempfile
from dataclasses import dataclass

import numpy as np
import torch

from xpeft.fit.checkpoints import load_trainable_state, read_checkpoint, save_checkpoint, trainable_state
from xpeft.fit.loop import FitResult, Session
from xpeft.fit.task import FitConfig, TaskData, build_fit_model, fit_task, replica_spread, task_profile
from xpeft.profiles.record import Profile

log = logging.getLogger(__name__)


@dataclass
class TrainReport(FitResult):
    """A data-parallel fit: the loop's result plus the run's checkpoint, the ranks' agreement and the profile."""

    score: float | None = None  # the Table 2/3 number of the last evaluation (xpeft.metrics.main_score)
    replica_max_abs_diff: float = 0.0  # largest difference of any trainable tensor between ranks at the end
    replica_states: list[dict[str, np.ndarray]] | None = None  # per rank (cfg.check_replicas; Ray returns no tensors)
    checkpoint_path: str | None = None
    profile: Profile | None = None


def ray_train_session() -> Session:
    """This Ray Train worker's rank, world, device; DDP wrapping; losses averaged over ranks."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    ctx = ray.train.get_context()
    world, device = ctx.get_world_size(), ray.train.torch.get_device()

    def mean(values: list[float]) -> list[float]:
        if world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return (t / world).tolist()

    prepare = functools.partial(
        ray.train.torch.prepare_model,
        # Masked-out adapters and frozen parts get no gradient; the encoder's buffers are constants.
        parallel_strategy_kwargs={"find_unused_parameters": True, "broadcast_buffers": False},
    )
    return Session(ctx.get_world_rank(), world, device, prepare, mean)


def _gather_states(session: Session, model) -> list[dict[str, np.ndarray]]:
    state = trainable_state(model)
    flat = torch.cat([t.flatten() for t in state.values()]).to(session.device)
    gathered = [flat]
    if session.world_size > 1:
        import torch.distributed as dist

        gathered = [torch.empty_like(flat) for _ in range(session.world_size)]
        dist.all_gather(gathered, flat)
    out = []
    for g in gathered:
        parts, offset = {}, 0
        for name, t in state.items():
            parts[name] = g[offset : offset + t.numel()].view_as(t).cpu().numpy()
            offset += t.numel()
        out.append(parts)
    return out


def from_checkpoint(checkpoint, run):
    """`run(directory)` on a Ray checkpoint's files (`run(None)` without one)."""
    if checkpoint is None:
        return run(None)
    with checkpoint.as_directory() as d:
        return run(d)


def report_epoch(metrics: dict, model, optimizer, scheduler, state) -> None:
    """Every rank reports (it is a barrier); rank 0 attaches the checkpoint."""
    import ray.train

    if ray.train.get_context().get_world_rank() != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as d:
        save_checkpoint(d, model, optimizer, scheduler, state)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def _train_worker(config: dict) -> dict:
    """Ray Train's train_loop_per_worker: `fit_task` in this worker's session, from the latest checkpoint."""
    import ray
    import ray.train

    cfg, data = config["cfg"], config["data"]
    data = ray.get(data) if isinstance(data, ray.ObjectRef) else data
    session = ray_train_session()
    model, result = from_checkpoint(
        ray.train.get_checkpoint(),
        lambda d: fit_task(cfg, data, session, d, report_epoch, config.get("on_epoch_start")),
    )
    states = _gather_states(session, model)
    last = result.history[-1] if result.history else {}
    return {
        **dataclasses.asdict(result),
        "score": last.get("score"),
        "replica_max_abs_diff": replica_spread(states),
        "replica_states": states if cfg.check_replicas else None,
    }


def make_trainer(cfg: FitConfig, data: TaskData, on_epoch_start=None, callbacks=None):
    """A TorchTrainer for `cfg` (gloo on CPU, nccl on GPU)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg.per_worker_batch  # noqa: B018 (refuses a global batch that does not split over the workers)
    storage = cfg.storage_path if "://" in cfg.storage_path else os.path.abspath(cfg.storage_path)
    resources = {"CPU": cfg.cpus_per_actor, **({"GPU": 1} if cfg.use_gpu else {})}
    return TorchTrainer(
        _train_worker,
        train_loop_config={"cfg": cfg, "data": ray.put(data), "on_epoch_start": on_epoch_start},
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=cfg.run_name(),
            storage_path=storage,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            callbacks=callbacks,
        ),
    )


def fit_distributed(cfg: FitConfig, data: TaskData, on_epoch_start=None, callbacks=None) -> TrainReport:
    """Fit on `cfg.num_workers` DDP workers; returns the loss curve, metrics and (with `cfg.store`) the profile.

    `on_epoch_start(epoch, rank)` runs on every rank before each epoch (tests inject failures with it)."""
    if cfg.name is None:
        cfg = dataclasses.replace(cfg, name=cfg.run_name())  # one name for the run and its restarts
    result = make_trainer(cfg, data, on_epoch_start, callbacks).fit()
    report = TrainReport(**result.return_value)
    report.checkpoint_path = result.checkpoint.path if result.checkpoint else None
    if cfg.store and result.checkpoint is not None:
        report.profile = profile_from_checkpoint(cfg, result.checkpoint, store=cfg.store)
    return report


def profile_from_checkpoint(cfg: FitConfig, checkpoint, profile_id: str | None = None, store: str | None = None):
    """Rebuild the model of `cfg`, load a checkpoint's trainable tensors and take the profile out of it;
    with `store`, write it there together with the bank it was fitted on (so the store can serve it)."""
    model = build_fit_model(cfg)
    with checkpoint.as_directory() as d:
        tensors, state = read_checkpoint(d)
    load_trainable_state(model, tensors["model"])
    profile = task_profile(model, cfg, FitResult(history=state.history), profile_id)
    if store:
        from xpeft.profiles.store import ProfileStore

        profiles = ProfileStore(store)
        if profile.bank_fingerprint and profile.bank_fingerprint not in profiles.bank_fingerprints():
            profiles.save_bank(model.bank)
        profiles.write([profile])
        log.info("profile %s written to %s", profile.profile_id, store)
    return profile
