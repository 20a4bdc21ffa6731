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
- The same epoch loop (`fit_loop`) runs in one process for Ray Tune trials (xpeft.tuning).

The pieces of the loop are xpeft.train's (make_loader, make_optimizer, make_scheduler, train_step,
evaluate); this module adds the sampler, the sessions, the checkpoints and the driver.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DistributedSampler

from xpeft.bank import load_bank, random_bank
from xpeft.config import TrainConfig, XPeftConfig
from xpeft.fitting import adapted_dims
from xpeft.model import XPeftModel, load_encoder, load_tokenizer
from xpeft.profiles import Profile, profile_from_model
from xpeft.train import (
    classification_metrics,
    evaluate,
    make_loader,
    make_optimizer,
    make_scheduler,
    seed_everything,
    tau_at,
    tokenize,
    total_steps,
    train_step,
)

log = logging.getLogger(__name__)

TINY = "tiny"  # a 2-block random BERT (hidden 32, no dropout): tests and smoke runs, seconds per epoch
STATE_FILE = "state.pt"  # torch.save of state dicts only; read back with weights_only=True
PROGRESS_FILE = "progress.json"
EpochHook = Callable[[int, int], None]  # (epoch, rank), called on every rank at the start of each epoch


# --- configuration and data ------------------------------------------------------------------------------


@dataclass
class FitConfig:
    """One fit of one profile or task, on one process or W workers."""

    xpeft: XPeftConfig = field(default_factory=XPeftConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    task: str | None = None  # GLUE/SuperGLUE name: its official metric; None: accuracy + macro-F1 (profiles)
    backbone: str = "minilm"  # 'minilm' (bundled), 'tiny', a local path or a hub name
    bank_path: str | None = None  # a saved bank; None: a random bank drawn from bank_seed
    bank_seed: int = 0
    bank_scale: float = 1.0
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    storage_path: str = "runs/train"  # checkpoints: <storage_path>/<name>/checkpoint_*
    name: str | None = None  # run name; the same name and storage_path resume a run
    max_failures: int = 0  # worker-group restarts (from the latest checkpoint) before the run fails
    keep_checkpoints: int | None = 2
    eval_every_epoch: bool = True  # evaluate after every epoch (Tune's ASHA needs it), else after the last
    store: str | None = None  # profile store URI: the fitted profile is written there
    profile_id: str | None = None
    check_replicas: bool = False  # return every rank's final trainable tensors (tests)

    @property
    def per_worker_batch(self) -> int:
        return per_worker_batch(self.train.batch_size, self.num_workers)

    def run_name(self) -> str:
        x = self.xpeft
        what = f"{x.mode}-{x.mask_type}-N{x.N}" if x.mode == "x_peft" else x.mode
        return self.name or f"{self.task or 'profile'}-{what}-{time.strftime('%Y%m%d-%H%M%S')}"


@dataclass
class TaskData:
    """Tokenized rows (xpeft.train.tokenize) to fit on and to evaluate on."""

    train: list[dict]
    eval: list[dict] = field(default_factory=list)
    pad_token_id: int = 0


@dataclass
class FitReport:
    """What a fit returns. `losses` and `history` include the epochs before a resume."""

    losses: list[float]  # per optimiser step: the mean loss over the global batch
    history: list[dict[str, float]]  # per epoch: epoch, train_loss, score and the task's metrics
    metrics: dict[str, float]  # the last evaluation
    score: float | None  # the Table 2/3 number of the last evaluation (xpeft.metrics.main_score)
    epochs: int
    steps: int
    resumed_from_epoch: int | None  # the epoch the last attempt started at; None: it started fresh
    world_size: int
    per_worker_batch: int
    seconds: float  # the last attempt's loop (without worker start-up)
    torch_threads: int  # intra-op threads per worker (Ray sets them from the worker's CPUs)
    replica_max_abs_diff: float  # largest difference of any trainable tensor between ranks at the end
    replica_states: list[dict[str, np.ndarray]] | None = None  # per rank (Ray returns no tensors)
    checkpoint_path: str | None = None
    profile: Profile | None = None


def per_worker_batch(global_batch: int, num_workers: int) -> int:
    """The global batch is split evenly; an uneven split would change the number of updates."""
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    if global_batch % num_workers:
        raise ValueError(
            f"global batch size {global_batch} does not split over {num_workers} workers; the global batch "
            f"stays fixed across runs, so pick a batch size divisible by {num_workers} or another worker count"
        )
    return global_batch // num_workers


def for_task(xcfg: XPeftConfig, task: str) -> XPeftConfig:
    """The config with the task's head: its number of labels, regression for STS-B."""
    from xpeft.data.tasks import get_task

    spec = get_task(task)
    problem = "regression" if spec.is_regression else "classification"
    return dataclasses.replace(xcfg, num_labels=spec.num_labels, problem_type=problem)


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


def load_profile_data(path: str, profile_id: str, tokenizer, max_length: int = 128) -> TaskData:
    """One profile of a profile data set (text, label, profile_id[, split]) with its 30% holdout (§3.1)."""
    import pyarrow.parquet as pq

    from xpeft.fitting import profile_datas

    datas = profile_datas(pq.read_table(path)).profiles
    match = [d for d in datas if d.profile_id == profile_id]
    if not match:
        raise ValueError(
            f"no profile {profile_id!r} in {path}; it has {len(datas)} profiles, e.g. "
            f"{[d.profile_id for d in datas[:3]]}"
        )
    d = match[0]
    return TaskData(
        tokenize(d.train, tokenizer, max_length), tokenize(d.test, tokenizer, max_length), tokenizer.pad_token_id or 0
    )


# --- model, metric, checkpoints ----------------------------------------------------------------------------


def tiny_bert(vocab_size: int = 30522) -> nn.Module:
    """A 2-block BERT with random weights and no dropout (deterministic, so runs compare exactly)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertModel(cfg).eval()


def load_backbone(name: str) -> nn.Module:
    return tiny_bert() if name == TINY else load_encoder(name)


def backbone_tokenizer(name: str):
    """The tokenizer for a backbone ('tiny' shares MiniLM's vocabulary)."""
    return load_tokenizer("minilm" if name == TINY else name)


def build_fit_model(cfg: FitConfig) -> XPeftModel:
    encoder = load_backbone(cfg.backbone)
    bank = None
    if cfg.xpeft.mode == "x_peft":
        if cfg.bank_path:
            bank = load_bank(cfg.bank_path)
        else:
            L, d_in, d_out = adapted_dims(encoder, cfg.xpeft.target)
            bank = random_bank(
                L,
                cfg.xpeft.N,
                cfg.xpeft.b,
                d_in,
                d_out,
                seed=cfg.bank_seed,
                target=cfg.xpeft.target,
                scale=cfg.bank_scale,
            )
    return XPeftModel(encoder, cfg.xpeft, bank)


def metric_fn(task: str | None) -> Callable[[np.ndarray, np.ndarray], dict[str, float]]:
    if task is None:
        return classification_metrics
    from xpeft.metrics import compute_metrics

    return functools.partial(compute_metrics, task)


def score_of(task: str | None, metrics: dict[str, float]) -> float:
    from xpeft.metrics import main_score

    return main_score(task or "profile", metrics)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(state):
        raise ValueError(
            f"checkpoint holds {sorted(state)} but the model trains {sorted(params)}; it was written by a "
            "run with another mode, mask layout or head: use a new run name or the original config"
        )
    with torch.no_grad():
        for name, p in params.items():
            if p.shape != state[name].shape:
                raise ValueError(
                    f"checkpoint {name} is {tuple(state[name].shape)} but the model's is "
                    f"{tuple(p.shape)}; the run was made with another N, b or encoder"
                )
            p.copy_(state[name])


def save_checkpoint(directory: str, model: nn.Module, optimizer, scheduler, progress: dict) -> None:
    state = {"model": trainable_state(model), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
    torch.save(state, os.path.join(directory, STATE_FILE))
    with open(os.path.join(directory, PROGRESS_FILE), "w") as f:
        json.dump(progress, f)


def read_checkpoint(directory: str) -> tuple[dict, dict]:
    """(state dicts, progress) of a checkpoint written by `save_checkpoint`; never unpickles objects."""
    state = torch.load(os.path.join(directory, STATE_FILE), map_location="cpu", weights_only=True)
    with open(os.path.join(directory, PROGRESS_FILE)) as f:
        return state, json.load(f)


def profile_from_checkpoint(
    cfg: FitConfig, checkpoint, profile_id: str | None = None, store: str | None = None
) -> Profile:
    """Rebuild the model of `cfg`, load a checkpoint's trainable tensors and take the profile out of it;
    with `store`, write it there together with the bank it was fitted on (so the store can serve it)."""
    with checkpoint.as_directory() as d:
        state, progress = read_checkpoint(d)
    model = build_fit_model(cfg)
    load_trainable_state(model, state["model"])
    metrics = dict(progress["history"][-1]) if progress["history"] else {}
    profile = profile_from_model(model, profile_id or cfg.profile_id or cfg.run_name(), metrics=metrics)
    if store:
        from xpeft.store import ProfileStore

        profiles = ProfileStore(store)
        if profile.bank_fingerprint and profile.bank_fingerprint not in profiles.bank_fingerprints():
            profiles.save_bank(model.bank)
        profiles.write([profile])
        log.info("profile %s written to %s", profile.profile_id, store)
    return profile


# --- the epoch loop, shared by Ray Train workers and single-process Tune trials -----------------------------


@dataclass
class Session:
    """Where the loop runs: its rank and world, how it reports, where it resumes from.

    `Session.local()` is one process (world size 1); `Session.ray_train()` is a Ray Train worker."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    report: Callable[[dict, Any], None] = lambda metrics, checkpoint: None
    get_checkpoint: Callable[[], Any] = lambda: None
    prepare: Callable[[nn.Module], nn.Module] = lambda model: model

    @classmethod
    def local(cls, report=None, get_checkpoint=None, use_gpu: bool = False) -> Session:
        device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        return cls(
            0, 1, device, report or cls.report, get_checkpoint or cls.get_checkpoint, lambda model: model.to(device)
        )

    @classmethod
    def ray_train(cls) -> Session:
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        prepare = functools.partial(
            ray.train.torch.prepare_model,
            # Masked-out adapters and frozen parts get no gradient; the encoder's buffers are constants.
            parallel_strategy_kwargs={"find_unused_parameters": True, "broadcast_buffers": False},
        )
        return cls(
            ctx.get_world_rank(),
            ctx.get_world_size(),
            ray.train.torch.get_device(),
            lambda m, c: ray.train.report(m, checkpoint=c),
            ray.train.get_checkpoint,
            prepare,
        )

    def mean(self, values: list[float]) -> list[float]:
        """The per-step losses averaged over ranks (each rank saw 1/W of the global batch)."""
        if self.world_size == 1:
            return values
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return (t / self.world_size).tolist()

    def gather(self, flat: torch.Tensor) -> list[torch.Tensor]:
        if self.world_size == 1:
            return [flat]
        import torch.distributed as dist

        out = [torch.empty_like(flat) for _ in range(self.world_size)]
        dist.all_gather(out, flat)
        return [t.cpu() for t in out]


def _evaluate(cfg: FitConfig, model: XPeftModel, data: TaskData) -> dict[str, float]:
    metrics = evaluate(model, data.eval, metric_fn(cfg.task), cfg.train.batch_size, data.pad_token_id)
    model.train()
    return {**metrics, "score": score_of(cfg.task, metrics)}


def _unwrap(model: nn.Module) -> XPeftModel:
    return model.module if hasattr(model, "module") else model


def _replicas(session: Session, model: XPeftModel) -> tuple[float, list[dict[str, np.ndarray]]]:
    state = trainable_state(model)
    flat = torch.cat([t.flatten() for t in state.values()]).to(session.device)
    gathered = session.gather(flat)
    diff = max(float((g - gathered[0]).abs().max()) for g in gathered)
    states = []
    for g in gathered:
        parts, offset = {}, 0
        for name, t in state.items():
            parts[name] = g[offset : offset + t.numel()].view_as(t).numpy()
            offset += t.numel()
        states.append(parts)
    return diff, states


def fit_loop(cfg: FitConfig, data: TaskData, session: Session, on_epoch_start: EpochHook | None = None) -> dict:
    """Fit `cfg` on `data` in `session`; every rank runs this. Returns FitReport fields (rank 0's are the
    run's; the loss curve and history are identical on every rank)."""
    if not data.train:
        raise ValueError("no training examples: a fit needs at least one labelled row")
    rank, world = session.rank, session.world_size
    batch = per_worker_batch(cfg.train.batch_size, world)
    seed = cfg.train.seed
    seed_everything(seed)
    module = build_fit_model(cfg)
    model = session.prepare(module)
    module = _unwrap(model)
    sampler = DistributedSampler(data.train, num_replicas=world, rank=rank, shuffle=True, seed=seed)
    loader = make_loader(data.train, batch, shuffle=True, seed=seed, pad_token_id=data.pad_token_id, sampler=sampler)
    steps = total_steps(len(loader), cfg.train)
    optimizer = make_optimizer(module, cfg.train)
    scheduler = make_scheduler(optimizer, steps, cfg.train.warmup_ratio)
    progress: dict[str, Any] = {"epoch": 0, "step": 0, "losses": [], "history": []}
    resumed_from = None
    checkpoint = session.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state, progress = read_checkpoint(d)
        load_trainable_state(module, state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        resumed_from = progress["epoch"]
        log.info("rank %d resumes at epoch %d (step %d) from %s", rank, resumed_from, progress["step"], checkpoint.path)
    epochs = math.ceil(steps / len(loader))
    tau0 = module.tau
    start = time.perf_counter()
    for epoch in range(progress["epoch"], epochs):
        if on_epoch_start is not None:
            on_epoch_start(epoch, rank)
        seed_everything(seed + 1009 * (epoch + 1) + rank)  # Gumbel noise, dropout: same after a resume
        sampler.set_epoch(epoch)
        model.train()
        losses = []
        for batch_rows in loader:
            if progress["step"] >= steps:
                break
            module.tau = tau_at(progress["step"], steps, cfg.train, tau0)
            batch_rows = {k: v.to(session.device) for k, v in batch_rows.items()}
            losses.append(train_step(model, batch_rows, optimizer, scheduler))
            progress["step"] += 1
        losses = session.mean(losses)
        progress["losses"] += losses
        progress["epoch"] = epoch + 1
        metrics = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)) if losses else float("nan")}
        if rank == 0 and data.eval and (cfg.eval_every_epoch or epoch + 1 == epochs):
            metrics.update(_evaluate(cfg, module, data))
        progress["history"].append(metrics)
        _report(session, metrics, module, optimizer, scheduler, progress)
        log.info("rank %d epoch %d/%d: %s", rank, epoch + 1, epochs, metrics)
    module.tau = tau0
    diff, states = _replicas(session, module)
    last = progress["history"][-1] if progress["history"] else {}
    return {
        "losses": progress["losses"],
        "history": progress["history"],
        "metrics": {k: v for k, v in last.items() if k not in ("epoch", "train_loss", "score")},
        "score": last.get("score"),
        "epochs": progress["epoch"],
        "steps": progress["step"],
        "resumed_from_epoch": resumed_from,
        "world_size": world,
        "per_worker_batch": batch,
        "seconds": time.perf_counter() - start,
        "torch_threads": torch.get_num_threads(),
        "replica_max_abs_diff": diff,
        "replica_states": states if cfg.check_replicas else None,
    }


def _report(session: Session, metrics: dict, model, optimizer, scheduler, progress: dict) -> None:
    """Every rank reports (it is a barrier); rank 0 attaches the checkpoint."""
    if session.rank != 0:
        session.report(metrics, None)
        return
    from ray.train import Checkpoint

    with tempfile.TemporaryDirectory() as d:
        save_checkpoint(d, model, optimizer, scheduler, progress)
        session.report(metrics, Checkpoint.from_directory(d))


def _train_worker(config: dict) -> dict:
    """Ray Train's train_loop_per_worker."""
    import ray

    data = config["data"]
    data = ray.get(data) if isinstance(data, ray.ObjectRef) else data
    return fit_loop(config["cfg"], data, Session.ray_train(), config.get("on_epoch_start"))


# --- the driver --------------------------------------------------------------------------------------------


def make_trainer(cfg: FitConfig, data: TaskData, on_epoch_start: EpochHook | None = None, callbacks=None):
    """A TorchTrainer for `cfg` (gloo on CPU, nccl on GPU)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    per_worker_batch(cfg.train.batch_size, cfg.num_workers)
    storage = cfg.storage_path if "://" in cfg.storage_path else os.path.abspath(cfg.storage_path)
    resources = {"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})}
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


def fit_distributed(
    cfg: FitConfig, data: TaskData, on_epoch_start: EpochHook | None = None, callbacks=None
) -> FitReport:
    """Fit on `cfg.num_workers` DDP workers; returns the loss curve, metrics and (with `cfg.store`) the profile.

    `on_epoch_start(epoch, rank)` runs on every rank before each epoch (tests inject failures with it)."""
    if cfg.name is None:
        cfg = dataclasses.replace(cfg, name=cfg.run_name())  # one name for the run and its restarts
    result = make_trainer(cfg, data, on_epoch_start, callbacks).fit()
    report = FitReport(**result.return_value)
    report.checkpoint_path = result.checkpoint.path if result.checkpoint else None
    if cfg.store and result.checkpoint is not None:
        report.profile = profile_from_checkpoint(cfg, result.checkpoint, store=cfg.store)
    return report
