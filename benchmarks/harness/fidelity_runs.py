"""The quality harness's runs (benchmarks/fidelity.py): what one fit of a GLUE-style task is, the plans of the
parity, study and grid stages, how runs execute (in this process or on Ray actors, one JSON line a finished
run, a crash recorded as a failed run), and the tiny synthetic data of `--smoke`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

import numpy as np
from harness.fidelity_pool import append_line, finished, run_pool

from xpeft.config import TrainConfig, XPeftConfig, option
from xpeft.fit.recipes import TASK_TRAIN

log = logging.getLogger("fidelity")

GLUE5 = ("sst2", "cola", "mrpc", "stsb", "rte")
SEEDS = (0, 1, 2)
# What --smoke changes in every run: a tiny random backbone (see HarnessConfig.backbone), a few synthetic rows.
SMOKE_TRAIN = {"max_steps": 2, "max_length": 32}
SMOKE_ROWS = {"train": 48, "scored": 24, "profiles": 8}


@dataclass
class HarnessConfig:
    """The harness's own settings (the fits' settings are the recipes', TrainConfig's flags override them)."""

    out: str | None = option(
        None, "where the .jsonl, fidelity.md and figures go (results/fidelity; --smoke: a temp dir)"
    )
    data_dir: str | None = option(None, "GLUE/SuperGLUE and news files (default: XPEFT_DATA_DIR or ../shared/data)")
    backbone: str = option("minilm", "'minilm' (the bundled all-MiniLM-L6-v2), 'tiny' or a local path")
    workers: int = option(1, "runs at a time: 1 runs them in this process, more on Ray actors (one CPU each)")
    threads: int = option(2, "torch threads per run (on 2 cores: --workers 1 --threads 2 for the long stages)")
    device: Literal["cpu", "cuda"] = option("cpu", "where each run fits (cuda: the workers share one GPU)")
    train_rows: int = option(16000, "parity and study: SST-2 training rows (after the validation rows)")
    val_rows: int = option(4000, "parity and study: validation rows carved from SST-2's training set")
    grid_epochs: int = option(3, "grid: epochs per fit (the issue asks >= 3)")
    tasks: list[str] | None = option(None, "grid: only these tasks (default: sst2 cola mrpc stsb rte)")
    seeds: list[int] | None = option(None, "parity and grid: only these of the stage's seeds (default: all: 0 1 2)")
    limit: int | None = option(None, "cap every run's training and scored rows, and news' profiles (quick checks)")
    min_articles: int = option(10, "news: authors with at least this many articles are profiles")
    smoke: bool = option(False, "seconds: a tiny random backbone and synthetic rows through every stage (tests)")
    plan: bool = option(False, "print the stage's runs and their estimated CPU time; fit nothing")


# --- the plans -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """One fit of a GLUE-style task: the task, the mode, the seed, the config and recipe overrides, and its data
    (`val_rows` carved from the training set and scored, or the task's whole dev set when None)."""

    stage: str
    task: str
    mode: str
    mask_type: str | None = None
    N: int | None = None
    seed: int = 0
    name: str = ""  # the study's variant, parity's loop
    xpeft: tuple = ()  # (key, value) overrides of XPeftConfig
    train: tuple = ()  # (key, value) overrides of the recipe (TASK_TRAIN)
    train_rows: int | None = None  # None: the whole training set (after the validation rows)
    val_rows: int | None = None  # None: scored on the dev set

    @property
    def row(self) -> str:
        return f"x_peft {self.N} ({self.mask_type})" if self.mode == "x_peft" else self.mode

    @classmethod
    def from_dict(cls, d: dict) -> Run:
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        return cls(
            **{**d, "xpeft": tuple(map(tuple, d.get("xpeft", ()))), "train": tuple(map(tuple, d.get("train", ())))}
        )


MODES = {  # the modes by the names the tables use: (mode, mask type, N)
    "single_adapter": ("single_adapter", None, None),
    "head_only": ("head_only", None, None),
    "soft": ("x_peft", "soft", 100),
    "hard": ("x_peft", "hard", 100),
}
K50 = {"k": 50}  # the paper's k for every hard mask of Table 2, N = 400 included

# Parity (issue 24, item 1): the fit loop before (padded random batches, fp32) and after (packed rows, bf16 where
# the CPU has it natively), the same runs otherwise.
LOOPS = {"old loop": {"packing": False, "bf16": "off"}, "new loop": {}}
PARITY_MODES = ("single_adapter", "soft", "hard")
PARITY_TRAIN = {"epochs": 2, "batch_size": 32}

# The study (issue 24, item 3): SST-2, validation carved from train, hard masks first (they trail most). Each
# variant runs for the modes named, so every hard variant sits beside soft / single_adapter at its settings.
H, HS, ALL = ("hard",), ("hard", "soft"), ("hard", "soft", "single_adapter")
STUDY = [  # variant, XPeftConfig overrides, TrainConfig overrides (over TASK_TRAIN), modes
    ("recipe (TASK_TRAIN)", {}, {}, ALL),
    # more steps: masks may need more than an adapter
    ("4 epochs", {}, {"epochs": 4}, ALL),
    ("6 epochs", {}, {"epochs": 6}, HS),
    # the mask learning rate and warm-up
    ("mask lr 1", {}, {"mask_lr": 1.0}, HS),
    ("mask lr 0.1", {}, {"mask_lr": 0.1}, HS),
    ("warm-up 10%", {}, {"warmup_ratio": 0.1}, ALL),
    ("mask lr 1, warm-up 10%", {}, {"mask_lr": 1.0, "warmup_ratio": 0.1}, H),
    # the Gumbel top-k estimator's temperature and noise, annealed over the fit
    ("tau 1 -> 0.1", {}, {"tau_final": 0.1}, H),
    ("nu 1 -> 0", {}, {"nu_final": 0.0}, H),
    ("tau 1 -> 0.1, nu 1 -> 0", {}, {"tau_final": 0.1, "nu_final": 0.0}, H),
    ("tau 2 -> 0.5", {"tau": 2.0}, {"tau_final": 0.5}, H),
    ("nu 0.5", {"nu": 0.5}, {}, H),
    # the bank and k
    ("N 400 (k 50)", {"N": 400, "k": 50}, {}, HS),
    ("k 30", {"k": 30}, {}, H),
    ("k 75", {"k": 75}, {}, H),
    # the masks' init and the LayerNorm after A-hat
    ("mask init N(0, 0.1)", {"mask_init": 0.1}, {}, HS),
    ("mask init N(0, 1)", {"mask_init": 1.0}, {}, H),
    ("LN lr 0.1", {}, {"ln_lr": 0.1}, HS),
    ("LN lr 1e-3", {}, {"ln_lr": 1e-3}, H),
    ("no LN", {"layer_norm": False}, {}, HS),
    # Figure 5 (b): one mask (M_B) against two
    ("M_B only", {"masks": "B"}, {}, ("soft",)),
]


def _run(stage: str, task: str, mode_name: str, seed: int = 0, name: str = "", xpeft=None, train=None, **data) -> Run:
    mode, mask_type, N = MODES[mode_name]
    x = {**(K50 if mask_type == "hard" else {}), **(xpeft or {})}
    N = x.pop("N", N)
    return Run(
        stage,
        task,
        mode,
        mask_type,
        N,
        seed,
        name,
        tuple(sorted(x.items())),
        tuple(sorted((train or {}).items())),
        **data,
    )


def _seeds(cfg: HarnessConfig) -> tuple[int, ...]:
    unknown = sorted(set(cfg.seeds or ()) - set(SEEDS))
    if unknown:
        raise ValueError(f"--seeds {unknown}: the stages run seeds {list(SEEDS)}; choose among them")
    return tuple(s for s in SEEDS if cfg.seeds is None or s in cfg.seeds)


def plan_parity(cfg: HarnessConfig) -> list[Run]:
    """Seed by seed: a stage stopped early still has every mode, old loop beside new, at the seeds it reached."""
    data = {"train_rows": cfg.train_rows, "val_rows": cfg.val_rows}
    return [
        _run("parity", "sst2", m, seed, loop, train={**PARITY_TRAIN, **over}, **data)
        for seed in _seeds(cfg)
        for m in PARITY_MODES
        for loop, over in LOOPS.items()
    ]


def plan_study(cfg: HarnessConfig) -> list[Run]:
    data = {"train_rows": cfg.train_rows, "val_rows": cfg.val_rows}
    return [_run("study", "sst2", m, 0, name, x, t, **data) for name, x, t, modes in STUDY for m in modes]


def plan_grid(cfg: HarnessConfig) -> list[Run]:
    """Table 2 at full size: head_only, single_adapter, soft and hard (k = 50) at N = 100 on the five GLUE tasks,
    soft and hard at N = 400 on SST-2; seeds 0, 1, 2 where the dev set is small (RTE, MRPC), else seed 0. Seed 0
    of every task first, so a grid stopped early has each task's row at one seed before any task's second."""
    epochs = {"epochs": cfg.grid_epochs}
    runs = []
    for seed in _seeds(cfg):
        for task in cfg.tasks or GLUE5:
            if seed and task not in ("rte", "mrpc"):
                continue
            runs += [_run("grid", task, m, seed, train=epochs) for m in ("head_only", "single_adapter", "soft", "hard")]
            if task == "sst2":
                runs += [_run("grid", task, m, seed, xpeft={"N": 400}, train=epochs) for m in ("soft", "hard")]
    return runs


PLANS: dict[str, Callable[[HarnessConfig], list[Run]]] = {"parity": plan_parity, "study": plan_study, "grid": plan_grid}


def resolve(run: Run, cfg: HarnessConfig, overrides: dict) -> tuple[XPeftConfig, TrainConfig]:
    """The run's configs: its task's head and inputs; the recipe with the command line's TrainConfig flags (and
    --smoke's), then the run's own overrides (parity's old loop stays old whatever the flags). Raises on a
    setting that cannot be built (the run is recorded as failed)."""
    from xpeft.fit.task import for_task

    xcfg = XPeftConfig(mode=run.mode, mask_type=run.mask_type or "hard", N=run.N or 100, **dict(run.xpeft))
    tcfg = dataclasses.replace(TASK_TRAIN, **{**overrides, **dict(run.train), "seed": run.seed})
    return for_task(xcfg, run.task), tcfg


def run_key(run: Run, cfg: HarnessConfig, overrides: dict) -> str:
    """What makes a run the same run: its plan entry, the resolved configs (a changed recipe is a new run), and
    its data. A run whose configs cannot be built is keyed on its plan entry alone."""
    what = {"run": dataclasses.asdict(run), "limit": cfg.limit, "backbone": cfg.backbone}
    try:
        x, t = resolve(run, cfg, overrides)
        what |= {"xpeft": x.to_dict(), "recipe": t.to_dict()}
    except Exception as e:  # noqa: BLE001 - recorded as the run's failure when it is fitted
        what |= {"unresolved": repr(e)}
    return json.dumps(what, sort_keys=True, default=str)


# --- the data ------------------------------------------------------------------------------------------------

WORDS = {
    1: "good great fun happy love brilliant warm".split(),
    0: "bad awful boring sad hate dull terrible".split(),
}
FILLER = "the a movie film story plot actor and of it was".split()


def synthetic_rows(task: str, n: int, seed: int) -> list[dict]:
    """Rows of `task`'s shape (text pairs, classes, or a 0–5 score) whose label the words give away, for smoke
    runs without data files."""
    from xpeft.data.tasks import get_task

    spec = get_task(task)
    rng = np.random.default_rng([seed, sum(map(ord, task))])
    rows = []
    for _ in range(n):
        y = int(rng.integers(2))
        words = [*rng.choice(WORDS[y], 3), *rng.choice(FILLER, 4)]
        rng.shuffle(words)
        label = float(4 * y + rng.random()) if spec.is_regression else y % spec.num_labels
        rows.append(
            {"text": " ".join(words), "text_pair": "the story of the film" if spec.pair else None, "label": label}
        )
    return rows


def task_rows(run: Run, cfg: HarnessConfig) -> tuple[list[dict], list[dict]]:
    """(rows to fit on, rows to score): validation rows carved from a seeded shuffle of the training set, or
    the task's whole dev set (eval split). The dev set is never looked at when `val_rows` is set."""
    from xpeft.data.tasks import get_task, load_task

    if cfg.smoke:
        n_train = min(run.train_rows or SMOKE_ROWS["train"], SMOKE_ROWS["train"])
        return synthetic_rows(run.task, n_train, 0), synthetic_rows(run.task, SMOKE_ROWS["scored"], 1)
    spec = get_task(run.task)
    train = list(load_task(run.task, "train", cfg.data_dir))
    if run.val_rows:
        order = np.random.default_rng(0).permutation(len(train))
        scored = [train[i] for i in order[: run.val_rows]]
        train = [train[i] for i in order[run.val_rows :]]
    else:
        scored = list(load_task(run.task, spec.eval_split, cfg.data_dir))
    if run.train_rows is not None and run.train_rows > len(train):
        raise ValueError(f"{run.task} has {len(train)} training rows after validation, fewer than {run.train_rows}")
    train = train[: run.train_rows] if run.train_rows else train
    if cfg.limit:
        train, scored = train[: cfg.limit], scored[: cfg.limit]
    return train, scored


# --- one run -------------------------------------------------------------------------------------------------


def fingerprint(weights: Iterable) -> str:
    """A short hash of mask weights (L×N) to 1 % of the uniform weight 1/N: equal masks, equal fingerprints."""
    h = hashlib.sha1()
    for w in weights:
        w = np.asarray(w, dtype=np.float64)
        h.update(np.round(w * w.shape[-1], 2).tobytes())
    return h.hexdigest()[:16]


def curve(losses: list[float], points: int = 100) -> list[float]:
    """The loss curve as at most `points` means of consecutive steps (what the figures plot)."""
    if not losses:
        return []
    return [float(np.mean(part)) for part in np.array_split(np.asarray(losses), min(points, len(losses)))]


def rows_trained(n: int, batch: int, steps: int) -> int:
    """Rows the fit's steps went through: whole epochs of n rows, then the batches of the last one."""
    per_epoch = math.ceil(n / batch)
    epochs, rest = divmod(steps, per_epoch)
    return epochs * n + min(n, rest * batch)


def predicted(preds: np.ndarray, labels: np.ndarray, regression: bool) -> dict:
    """What the predictions look like: a classifier's share of its most frequent class (1.0: one class for every
    row) beside the labels' majority share; a regressor's spread."""
    if regression:
        return {"std": float(np.std(preds)), "label_std": float(np.std(labels))}
    _, counts = np.unique(preds, return_counts=True)
    _, label_counts = np.unique(labels, return_counts=True)
    return {
        "majority_share": float(counts.max() / len(preds)),
        "label_majority_share": float(label_counts.max() / len(labels)),
    }


def host() -> dict:
    import platform

    import torch

    return {
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


class GlueWorker:
    """Fits runs one after another on one loaded backbone (every fit gets its own copy, see `fit_task`)."""

    def __init__(self, cfg: HarnessConfig, overrides: dict):
        import torch

        from xpeft.core.encoder import load_encoder, load_tokenizer

        torch.set_num_threads(cfg.threads)
        self.cfg, self.overrides = cfg, overrides
        self.encoder, self.tokenizer = load_encoder(cfg.backbone), load_tokenizer(cfg.backbone)
        self.cache: dict = {}

    def rows(self, run: Run, max_length: int) -> tuple[list[dict], list[dict]]:
        from xpeft.fit.task import tokenize

        key = (run.task, run.train_rows, run.val_rows, max_length)
        if key not in self.cache:
            train, scored = task_rows(run, self.cfg)
            self.cache[key] = (
                tokenize(train, self.tokenizer, max_length),
                tokenize(scored, self.tokenizer, max_length),
            )
        return self.cache[key]

    def fit(self, item: tuple[str, Run]) -> list[dict]:
        key, run = item
        line = {"key": key, "stage": run.stage, "run": dataclasses.asdict(run)}
        try:
            return [{**line, **self._fit(run)}]
        except Exception as e:  # noqa: BLE001 - one run's crash is that run's result, not the stage's end
            log.exception("run failed: %s", run)
            return [{**line, "failed": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}]

    def _fit(self, run: Run) -> dict:
        import torch

        from xpeft.fit.loop import Session, predict
        from xpeft.fit.task import FitConfig, TaskData, fit_task, metric_fn, score_of

        xcfg, tcfg = resolve(run, self.cfg, self.overrides)
        train, scored = self.rows(run, tcfg.max_length)
        pad = self.tokenizer.pad_token_id or 0
        fcfg = FitConfig(xpeft=xcfg, train=tcfg, task=run.task, backbone=self.cfg.backbone, bank_seed=run.seed)
        session = Session(device=torch.device(self.cfg.device))
        model, result = fit_task(fcfg, TaskData(train, [], pad), session, encoder=self.encoder)
        start = time.perf_counter()
        logits = predict(model, scored, 2 * tcfg.batch_size, pad)
        regression = xcfg.problem_type == "regression"
        preds = logits.squeeze(-1) if regression else logits.argmax(-1)
        labels = np.array([r["labels"] for r in scored])
        metrics = metric_fn(run.task)(preds, labels)
        trivial = (
            np.full_like(labels, labels.mean()) if regression else np.full_like(labels, np.bincount(labels).argmax())
        )
        n_rows = rows_trained(len(train), tcfg.batch_size, result.steps)
        out = {
            "score": score_of(run.task, metrics),
            "metrics": metrics,
            "trivial_score": _trivial_score(run.task, trivial, labels),
            "rows_per_s": n_rows / result.seconds if result.seconds else None,
            "seconds": result.seconds,
            "eval_seconds": time.perf_counter() - start,
            "rows_trained": n_rows,
            "steps": result.steps,
            "n_train": len(train),
            "n_scored": len(scored),
            "final_loss": float(np.mean(result.losses[-50:])),
            "curve": curve(result.losses),
            "predicted": predicted(preds, labels, regression),
            "xpeft": xcfg.to_dict(),
            "recipe": tcfg.to_dict(),
            "host": host(),
            "device": self.cfg.device,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        if xcfg.mode == "x_peft":
            out["masks"] = self._masks(model, xcfg)
        return out

    @staticmethod
    def died(item: tuple[str, Run], reason: str) -> list[dict]:
        """The lines of an item whose worker died under it."""
        key, run = item
        return [{"key": key, "stage": run.stage, "run": dataclasses.asdict(run), "failed": reason}]

    @staticmethod
    def _masks(model, xcfg: XPeftConfig) -> dict:
        """The eval masks' fingerprint, and whether they are still those of all-zero logits (never moved)."""
        import torch

        from xpeft.core.masks import khot, soft_mask

        model.eval()
        with torch.no_grad():
            weights = [w.detach().cpu().numpy() for w in model.mask_weights()]
            zeros = torch.zeros_like(model.mask_logits_B).cpu()
            tie = soft_mask(zeros) if xcfg.mask_type == "soft" else khot(zeros, xcfg.top_k)
        return {
            "fingerprint": fingerprint(weights),
            "at_zero_init": fingerprint([tie.numpy()] * 2) == fingerprint(weights),
        }


def _trivial_score(task: str, preds: np.ndarray, labels: np.ndarray) -> float:
    """The task's score for predicting the majority class (the mean, for a regression: correlation 0)."""
    from xpeft.fit.task import metric_fn, score_of

    if preds.dtype.kind == "f":
        return 0.0
    return score_of(task, metric_fn(task)(preds, labels))


# --- a stage --------------------------------------------------------------------------------------------------


def run_stage(stage: str, cfg: HarnessConfig, overrides: dict, runs: list[Run] | None = None) -> str:
    """Fit every run of the stage's plan not finished in <out>/<stage>.jsonl yet, appending each as it ends."""
    path = os.path.join(cfg.out, f"{stage}.jsonl")
    runs = PLANS[stage](cfg) if runs is None else runs
    done = finished(path)
    items = [(k, r) for r in runs if (k := run_key(r, cfg, overrides)) not in done]
    log.info("%s: %d runs, %d finished, %d to go -> %s", stage, len(runs), len(runs) - len(items), len(items), path)
    count = iter(range(1, len(items) + 1))

    def on_line(line: dict) -> None:
        append_line(path, line)
        run = Run.from_dict(line["run"])
        what = f"{run.task} {run.name or run.row}" + (f" seed {run.seed}" if run.seed else "")
        if "failed" in line:
            log.warning("[%d/%d] %s FAILED: %s", next(count), len(items), what, line["failed"])
        else:
            log.info(
                "[%d/%d] %s: %.4f, %.0f rows/s, %.0f s",
                next(count),
                len(items),
                what,
                line["score"],
                line["rows_per_s"] or 0,
                line["seconds"],
            )

    if items:
        run_pool(cfg, GlueWorker, (cfg, overrides), items, on_line)
    return path
