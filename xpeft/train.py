"""The single-process fit loop that everything reuses (the farm's actors, Ray Train's workers, Tune's trials).

Plain and visible, as in nanoGPT: AdamW with one learning rate per role (mask, ln, adapter, head), linear
decay, epochs over a shuffled loader with per-batch (dynamic) padding, a loss per step. Same seed, same
data ⇒ the same loss curve on CPU.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler

from xpeft.config import TrainConfig
from xpeft.model import XPeftModel

log = logging.getLogger(__name__)

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@dataclass
class FitResult:
    losses: list[float] = field(default_factory=list)  # one per optimiser step
    metrics: dict[str, float] = field(default_factory=dict)  # on the eval set, after the last epoch
    steps: int = 0
    seconds: float = 0.0
    examples: int = 0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def tokenize(examples: Iterable[dict] | object, tokenizer, max_length: int) -> list[dict]:
    """Rows with `text` (and `text_pair`, `label`) → token ids without padding (padding is per batch).

    Accepts a `datasets.Dataset` or any iterable of dicts."""
    rows = []
    for ex in examples:
        pair = ex.get("text_pair") or None
        enc = tokenizer(ex["text"], pair, truncation=True, max_length=max_length)
        row = {k: enc[k] for k in MODEL_INPUTS if k in enc}
        if ex.get("label") is not None:
            row["labels"] = ex["label"]
        rows.append(row)
    return rows


class Collator:
    """Pads a list of token rows to the longest in the batch."""

    def __init__(self, pad_token_id: int = 0):
        self.pad = pad_token_id

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        T = max(len(r["input_ids"]) for r in rows)
        batch = {}
        for key in MODEL_INPUTS:
            if key not in rows[0]:
                continue
            fill = self.pad if key == "input_ids" else 0
            batch[key] = torch.tensor([list(r[key]) + [fill] * (T - len(r[key])) for r in rows], dtype=torch.long)
        if "labels" in rows[0]:
            labels = [r["labels"] for r in rows]
            dtype = torch.float if isinstance(labels[0], float) else torch.long
            batch["labels"] = torch.tensor(labels, dtype=dtype)
        return batch


def make_loader(
    rows: list[dict],
    batch_size: int,
    shuffle: bool,
    seed: int = 0,
    pad_token_id: int = 0,
    sampler: Sampler | None = None,
) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(
        rows,
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        generator=g,
        collate_fn=Collator(pad_token_id),
    )


def make_optimizer(model: XPeftModel, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with one parameter group per role, so masks, LN, adapters and head can have their own lr."""
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


def tau_at(step: int, steps: int, cfg: TrainConfig, tau0: float) -> float:
    if cfg.tau_final is None or steps <= 1:
        return tau0
    return tau0 + (cfg.tau_final - tau0) * step / (steps - 1)


def train_step(model: XPeftModel, batch: dict, optimizer, scheduler) -> float:
    out = model(**batch)
    optimizer.zero_grad(set_to_none=True)
    out["loss"].backward()
    optimizer.step()
    scheduler.step()
    return out["loss"].item()


def fit(
    model: XPeftModel,
    train_rows: list[dict],
    cfg: TrainConfig,
    eval_rows: list[dict] | None = None,
    metric_fn: Callable[[np.ndarray, np.ndarray], dict[str, float]] | None = None,
    pad_token_id: int = 0,
    on_epoch_end: Callable[[int, FitResult], None] | None = None,
) -> FitResult:
    """Fit the profile's trainable tensors on tokenized rows (see `tokenize`); evaluate after training."""
    if len(train_rows) == 0:
        raise ValueError("no training examples: a profile needs at least one labelled text")
    seed_everything(cfg.seed)
    if cfg.gradient_checkpointing:
        enable = getattr(model.encoder, "activation_checkpointing_enable", None)
        (enable or model.encoder.gradient_checkpointing_enable)()
    loader = make_loader(train_rows, cfg.batch_size, shuffle=True, seed=cfg.seed, pad_token_id=pad_token_id)
    steps = total_steps(len(loader), cfg)
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, steps, cfg.warmup_ratio)
    result = FitResult()
    tau0 = model.tau
    start = time.perf_counter()
    model.train()
    device = model_device(model)
    for epoch in range(math.ceil(steps / max(1, len(loader)))):
        for batch in loader:
            if result.steps >= steps:
                break
            model.tau = tau_at(result.steps, steps, cfg, tau0)
            batch = {k: v.to(device) for k, v in batch.items()}
            result.losses.append(train_step(model, batch, optimizer, scheduler))
            result.steps += 1
            result.examples += len(batch["input_ids"])
            if cfg.log_every and result.steps % cfg.log_every == 0:
                log.info("step %d/%d loss %.4f", result.steps, steps, np.mean(result.losses[-cfg.log_every :]))
        if on_epoch_end is not None:
            on_epoch_end(epoch, result)
    model.tau = tau0
    result.seconds = time.perf_counter() - start
    if eval_rows:
        result.metrics = evaluate(model, eval_rows, metric_fn or classification_metrics, cfg.batch_size, pad_token_id)
    return result


def model_device(model: nn.Module) -> torch.device:
    """Where the model's weights are (the batches go there)."""
    return next(model.parameters()).device


@torch.no_grad()
def predict(model: XPeftModel, rows: list[dict], batch_size: int = 64, pad_token_id: int = 0) -> np.ndarray:
    """Logits for tokenized rows, in order."""
    model.eval()
    loader = make_loader(rows, batch_size, shuffle=False, pad_token_id=pad_token_id)
    device = model_device(model)
    outs = []
    for batch in loader:
        batch.pop("labels", None)
        outs.append(model(**{k: v.to(device) for k, v in batch.items()})["logits"].float().cpu().numpy())
    return np.concatenate(outs) if outs else np.zeros((0, model.cfg.num_labels), dtype=np.float32)


def evaluate(
    model: XPeftModel,
    rows: list[dict],
    metric_fn: Callable[[np.ndarray, np.ndarray], dict[str, float]],
    batch_size: int = 64,
    pad_token_id: int = 0,
) -> dict[str, float]:
    logits = predict(model, rows, batch_size, pad_token_id)
    labels = np.array([r["labels"] for r in rows])
    preds = logits.squeeze(-1) if model.cfg.problem_type == "regression" else logits.argmax(-1)
    return metric_fn(preds, labels)


def classification_metrics(preds: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Accuracy and macro-F1 (Figure 4's pair) for a classifier."""
    from sklearn.metrics import f1_score

    return {
        "accuracy": float((preds == labels).mean()) if len(labels) else float("nan"),
        "f1": float(f1_score(labels, preds, average="macro", zero_division=0)) if len(labels) else float("nan"),
    }


def regression_metrics(preds: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Mean squared error and Pearson / Spearman correlation for a regression target."""
    from scipy.stats import pearsonr, spearmanr

    preds, labels = np.asarray(preds, dtype=float), np.asarray(labels, dtype=float)
    if not len(labels):
        return {"mse": float("nan"), "pearson": float("nan"), "spearmanr": float("nan")}
    constant = len(labels) < 2 or np.ptp(labels) == 0 or np.ptp(preds) == 0
    return {
        "mse": float(np.mean((preds - labels) ** 2)),
        "pearson": float("nan") if constant else float(pearsonr(preds, labels)[0]),
        "spearmanr": float("nan") if constant else float(spearmanr(preds, labels)[0]),
    }
