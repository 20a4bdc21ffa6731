"""Fidelity at full size (issue 16): hard masks against soft ones and the baselines, every choice made on
validation data carved from the training set, the dev sets scored once.

    python benchmarks/fidelity.py study --out results/fidelity    # why hard trails soft, on SST-2 (validation)
    python benchmarks/fidelity.py grid --out results/fidelity     # full training sets, whole dev sets
    python benchmarks/fidelity.py news --out results/fidelity     # news Figure 4, recipe chosen on validation
    python benchmarks/fidelity.py report --out results/fidelity   # fidelity.md from what has finished

Every stage is resumable: each finished run appends one JSON line to <out>/<stage>.jsonl, and a rerun skips
the runs already there (kill it any time; it picks up where it was). Runs go two at a time on Ray actors with
one torch thread each (`--workers`); on a shared machine nothing else should be timed meanwhile.

- study: SST-2, a validation split of --val rows carved from train (seed 0), fits on --train rows of the rest;
  variants of the hard-mask recipe (temperature and noise annealing, k, logit init, mask learning rate,
  epochs) beside soft masks and single_adapter, all scored on the validation split only.
- grid: SST-2 (67K), CoLA, MRPC, STS-B, RTE, CB on their full training sets, --epochs (3) epochs, whole dev
  sets; head_only, single_adapter, soft and hard (k = 50) at N = 100, and N = 400 on SST-2; 3 seeds on the
  small tasks. The recipe is xpeft.fit.recipes.TASK_TRAIN (the study's choice), fixed before the grid runs.
- news: the news profiles' Figure 4: the farm's mask learning rate and k (soft and hard) are chosen on a
  validation split carved from each profile's training part (the mtl warm start fitted on the warm profiles'
  carved parts too), with the farm's own fit (ProfileFitter, fit_mtl). The holdouts are then scored once, by
  the main job with the chosen flags (BENCHMARKS.md gives the commands).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass, field

import numpy as np

from xpeft.config import XPeftConfig
from xpeft.fit.recipes import TASK_TRAIN

log = logging.getLogger("fidelity")

# Table 2 / 3 of the paper (bert-base-uncased): the modes the grid runs.
PAPER = {
    "x_peft 100 (soft)": {"cola": 0.40, "sst2": 0.90, "mrpc": 0.78, "stsb": 0.79, "rte": 0.58, "cb": 0.64},
    "x_peft 100 (hard)": {"cola": 0.39, "sst2": 0.87, "mrpc": 0.76, "stsb": 0.76, "rte": 0.61, "cb": 0.68},
    "x_peft 400 (soft)": {"sst2": 0.90},
    "x_peft 400 (hard)": {"sst2": 0.89},
    "head_only": {"cola": 0.31, "sst2": 0.85, "mrpc": 0.76, "stsb": 0.72, "rte": 0.59, "cb": 0.71},
    "single_adapter": {"cola": 0.43, "sst2": 0.91, "mrpc": 0.76, "stsb": 0.85, "rte": 0.60, "cb": 0.68},
}
SMALL_TASKS = ("cola", "mrpc", "stsb", "rte", "cb")


@dataclass(frozen=True)
class Run:
    """One fit: a task, a mode, the config and recipe overrides, the seed, and what it is scored on."""

    stage: str
    task: str
    mode: str
    mask_type: str | None = None
    N: int | None = None
    seed: int = 42
    xpeft: tuple = ()  # (key, value) overrides of XPeftConfig
    train: tuple = ()  # (key, value) overrides of the recipe
    name: str = ""  # the study's variant name

    @property
    def key(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @property
    def row(self) -> str:
        return f"x_peft {self.N} ({self.mask_type})" if self.mode == "x_peft" else self.mode


# --- the stages' plans --------------------------------------------------------------------------------------

STUDY = [  # (variant, mode, mask type, XPeftConfig overrides, TrainConfig overrides)
    ("soft", "x_peft", "soft", {}, {}),
    ("single_adapter", "single_adapter", None, {}, {}),
    ("hard", "x_peft", "hard", {}, {}),
    ("hard, tau 1 -> 0.1", "x_peft", "hard", {}, {"tau_final": 0.1}),
    ("hard, nu 1 -> 0", "x_peft", "hard", {}, {"nu_final": 0.0}),
    ("hard, tau 1 -> 0.1, nu 1 -> 0", "x_peft", "hard", {}, {"tau_final": 0.1, "nu_final": 0.0}),
    ("hard, tau 2", "x_peft", "hard", {"tau": 2.0}, {}),
    ("hard, k 25", "x_peft", "hard", {"k": 25}, {}),
    ("hard, k 75", "x_peft", "hard", {"k": 75}, {}),
    ("hard, logits init N(0, 0.1)", "x_peft", "hard", {"mask_init": 0.1}, {}),
    ("hard, mask lr 1", "x_peft", "hard", {}, {"mask_lr": 1.0}),
    ("hard, mask lr 0.1", "x_peft", "hard", {}, {"mask_lr": 0.1}),
    ("hard, LN lr 0.1", "x_peft", "hard", {}, {"ln_lr": 0.1}),
    ("hard, 4 epochs", "x_peft", "hard", {}, {"epochs": 4}),
    ("soft, 4 epochs", "x_peft", "soft", {}, {"epochs": 4}),
]


def plan_study(args) -> list[Run]:
    return [
        Run("study", "sst2", mode, mt, 100 if mode == "x_peft" else None, 42, tuple(x.items()), tuple(t.items()), name)
        for name, mode, mt, x, t in STUDY
    ]


def plan_grid(args) -> list[Run]:
    modes = [
        ("head_only", None, None),
        ("single_adapter", None, None),
        ("x_peft", "soft", 100),
        ("x_peft", "hard", 100),
    ]
    runs = [Run("grid", "sst2", m, mt, n) for m, mt, n in modes]
    runs += [Run("grid", "sst2", "x_peft", mt, 400) for mt in ("soft", "hard")]
    runs += [Run("grid", t, m, mt, n, seed) for t in SMALL_TASKS for seed in (42, 1, 2) for m, mt, n in modes]
    return [r for r in runs if not args.tasks or r.task in args.tasks]


# --- one run ------------------------------------------------------------------------------------------------


class Runner:
    """Fits runs one by one on one loaded encoder (copied per run: x_peft wraps its linears in place)."""

    def __init__(self, args_dict: dict):
        import torch

        from xpeft.core.encoder import load_encoder, load_tokenizer

        torch.set_num_threads(args_dict["threads"])
        self.args = argparse.Namespace(**args_dict)
        self.tokenizer, self.encoder = load_tokenizer("minilm"), load_encoder("minilm")
        self.cache: dict = {}

    def data(self, run: Run):
        """(train rows, rows it is scored on): a validation split carved from train (study), or the dev set."""
        from xpeft.data.tasks import get_task, load_task
        from xpeft.fit.loop import tokenize

        key = (run.stage, run.task)
        if key not in self.cache:
            a, spec = self.args, get_task(run.task)
            train = load_task(run.task, "train", a.data_dir).shuffle(seed=0)
            if run.stage == "study":
                scored = train.select(range(a.val))
                train = train.select(range(a.val, min(len(train), a.val + a.train)))
            else:
                scored = load_task(run.task, spec.eval_split, a.data_dir)
            self.cache[key] = (tokenize(train, self.tokenizer, 128), tokenize(scored, self.tokenizer, 128))
        return self.cache[key]

    def fit(self, run: Run) -> dict:
        import copy

        from xpeft.core.bank import random_bank_for
        from xpeft.core.model import XPeftModel
        from xpeft.fit.loop import fit
        from xpeft.fit.task import for_task, metric_fn, score_of

        train_rows, scored_rows = self.data(run)
        xcfg = XPeftConfig(mode=run.mode, mask_type=run.mask_type or "hard", N=run.N or 100, b=48, **dict(run.xpeft))
        xcfg = for_task(xcfg, run.task)
        tcfg = dataclasses.replace(TASK_TRAIN, **{"epochs": self.args.epochs, "seed": run.seed, **dict(run.train)})
        encoder = copy.deepcopy(self.encoder)
        bank = random_bank_for(encoder, xcfg, seed=run.seed) if run.mode == "x_peft" else None
        model = XPeftModel(encoder, xcfg, bank, seed=run.seed)
        start = time.perf_counter()
        result = fit(model, train_rows, tcfg, eval_rows=scored_rows, metric_fn=metric_fn(run.task))
        return {
            "key": run.key,
            "run": dataclasses.asdict(run),
            "score": score_of(run.task, result.metrics),
            "metrics": result.metrics,
            "final_loss": float(np.mean(result.losses[-50:])),
            "steps": result.steps,
            "n_train": len(train_rows),
            "n_scored": len(scored_rows),
            "seconds": time.perf_counter() - start,
            "recipe": tcfg.to_dict(),
        }


def run_all(args, runs: list[Run], path: str) -> None:
    """Fit every run not in `path` yet (two at a time on Ray actors), appending each result as it finishes."""
    done = {json.loads(line)["key"] for line in open(path)} if os.path.exists(path) else set()
    todo = [r for r in runs if r.key not in done]
    log.info("%d runs, %d done, %d to go", len(runs), len(done), len(todo))
    if not todo:
        return
    import ray
    from ray.util import ActorPool

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
    opts = {k: getattr(args, k) for k in ("threads", "data_dir", "epochs", "train", "val")}
    actors = [ray.remote(num_cpus=1)(Runner).remote(opts) for _ in range(args.workers)]
    for i, r in enumerate(ActorPool(actors).map_unordered(lambda a, run: a.fit.remote(run), todo), 1):
        with open(path, "a") as f:
            f.write(json.dumps(r) + "\n")
        log.info(
            "[%d/%d] %s %s: %.4f in %.0f s",
            i,
            len(todo),
            r["run"]["task"],
            r["run"]["name"] or Run(**r["run"]).row,
            r["score"],
            r["seconds"],
        )
    ray.shutdown()


# --- news: Figure 4 with the farm's recipe chosen on validation data ----------------------------------------

NEWS_VARIANTS = [  # (variant, mask type, k as a fraction of N, TrainConfig overrides) over FARM_TRAIN
    ("hard, mask lr 0.1", "hard", 0.5, {"mask_lr": 0.1}),
    ("hard, mask lr 0.3", "hard", 0.5, {"mask_lr": 0.3}),
    ("hard, mask lr 1", "hard", 0.5, {"mask_lr": 1.0}),
    ("hard, k N/4", "hard", 0.25, {}),
    ("hard, k 3N/4", "hard", 0.75, {}),
    ("soft, mask lr 0.1", "soft", None, {"mask_lr": 0.1}),
    ("soft, mask lr 0.3", "soft", None, {"mask_lr": 0.3}),
    ("soft, mask lr 1", "soft", None, {"mask_lr": 1.0}),
]


def carve(d, fraction: float = 0.25, seed: int = 0):
    """A profile's training part split again: a validation part of `fraction` (at least 1 row) and the rest
    to fit on; the holdout (d.test) is never looked at."""
    from xpeft.data.dataset import ProfileData

    rows = list(d.train)
    order = np.random.default_rng([seed, len(rows), sum(map(ord, d.profile_id))]).permutation(len(rows))
    n_val = max(1, round(fraction * len(rows))) if len(rows) >= 3 else 0
    val = [rows[i] for i in order[:n_val]]
    return ProfileData(d.profile_id, [rows[i] for i in order[n_val:]], val)


class NewsRunner:
    """Fits mask profiles of the news data on one learned bank and shared head (what a farm actor does)."""

    def __init__(self, threads: int, bank_obj: dict, head: dict, labels: int):
        import torch

        from xpeft.core.bank import bank_from_object
        from xpeft.core.encoder import load_encoder, load_tokenizer

        torch.set_num_threads(threads)
        self.encoder, self.tokenizer = load_encoder("minilm"), load_tokenizer("minilm")
        self.bank, self.head, self.labels = bank_from_object(bank_obj), head, labels

    def fit(self, variant: tuple, data) -> dict:
        from xpeft.fit.profile import BadProfileData, ProfileFitter
        from xpeft.fit.recipes import FARM_TRAIN

        name, mask_type, k_frac, train = variant
        k = max(1, int(k_frac * self.bank.N)) if k_frac else None
        xcfg = XPeftConfig(head="linear", mask_type=mask_type, N=self.bank.N, k=k, num_labels=self.labels)
        fitter = ProfileFitter(
            self.encoder, self.tokenizer, self.bank, xcfg, dataclasses.replace(FARM_TRAIN, **train), self.head, "shared"
        )
        try:
            m = fitter.fit(data).profile.metrics
        except BadProfileData as e:
            return {"variant": name, "profile_id": data.profile_id, "skipped": str(e)}
        return {"variant": name, "profile_id": data.profile_id, "accuracy": m["accuracy"], "f1": m["f1"]}


def news_validation(args) -> None:
    """The mtl warm start on the warm profiles' carved training parts, then every variant on the other
    profiles' carved training parts, scored on their validation parts; one JSON line per (variant, profile)."""
    import ray
    from ray.util import ActorPool

    from xpeft.core.bank import bank_to_object, load_bank, save_bank
    from xpeft.core.encoder import load_encoder, load_tokenizer
    from xpeft.data.dataset import profile_datas
    from xpeft.data.profiles import load_news_profiles
    from xpeft.fit.profile import ProfileFitter
    from xpeft.fit.recipes import FARM_TRAIN
    from xpeft.fit.warm_start import fit_mtl
    from xpeft.ray.farm import FarmConfig, split_warm

    path = os.path.join(args.out, "news_validation.jsonl")
    done = {(r["variant"], r["profile_id"]) for r in load(path)}
    dataset = profile_datas(load_news_profiles(args.data_dir))
    warm, rest = split_warm(FarmConfig(store="-", setting="mtl", train=FARM_TRAIN), dataset.profiles)
    todo = [(v, carve(d)) for v in NEWS_VARIANTS for d in rest if (v[0], d.profile_id) not in done]
    log.info(
        "news validation: %d warm-start profiles, %d mask profiles, %d fits to go", len(warm), len(rest), len(todo)
    )
    if not todo:
        return
    bank_path, head_path = (os.path.join(args.out, f"news_validation_{n}.safetensors") for n in ("bank", "head"))
    if not os.path.exists(head_path):
        import torch
        from safetensors.torch import save_file

        torch.set_num_threads(args.workers)
        xcfg = XPeftConfig(mode="single_adapter", head="linear", num_labels=dataset.labels.num_labels)
        fitter = ProfileFitter(load_encoder("minilm"), load_tokenizer("minilm"), None, xcfg, FARM_TRAIN)
        bank, head, _ = fit_mtl(fitter, [carve(d) for d in warm])
        save_bank(bank, bank_path)
        save_file(head, head_path)
    from safetensors.torch import load_file

    saved = {"bank": bank_to_object(load_bank(bank_path)), "head": load_file(head_path)}
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
    Actor = ray.remote(num_cpus=1)(NewsRunner)
    actors = [
        Actor.remote(args.threads, saved["bank"], saved["head"], dataset.labels.num_labels) for _ in range(args.workers)
    ]
    for i, r in enumerate(ActorPool(actors).map_unordered(lambda a, item: a.fit.remote(*item), todo), 1):
        with open(path, "a") as f:
            f.write(json.dumps(r) + "\n")
        if i % 20 == 0:
            log.info("[%d/%d] news validation fits", i, len(todo))
    ray.shutdown()


def news_table(rows: list[dict]) -> list[str]:
    by: dict[str, list[dict]] = {}
    for r in rows:
        if "accuracy" in r:
            by.setdefault(r["variant"], []).append(r)
    out = ["| variant | mean validation accuracy | mean validation macro-F1 | profiles |", "|---|---|---|---|"]
    for name, rs in sorted(by.items(), key=lambda kv: -np.mean([r["accuracy"] for r in kv[1]])):
        acc, f1 = np.mean([r["accuracy"] for r in rs]), np.mean([r["f1"] for r in rs])
        out.append(f"| {name} | {acc:.4f} | {f1:.4f} | {len(rs)} |")
    return out


# --- the report ---------------------------------------------------------------------------------------------


def load(path: str) -> list[dict]:
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


def study_table(rows: list[dict]) -> list[str]:
    out = ["| variant | validation accuracy | final train loss | steps | seconds |", "|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: -r["score"]):
        out.append(
            f"| {r['run']['name']} | {r['score']:.4f} | {r['final_loss']:.4f} | {r['steps']} | {r['seconds']:.0f} |"
        )
    return out


@dataclass
class Cell:
    scores: list[float] = field(default_factory=list)

    def text(self) -> str:
        if not self.scores:
            return "–"
        m = float(np.mean(self.scores))
        return f"{m:.3f} ± {np.std(self.scores):.3f} ({len(self.scores)})" if len(self.scores) > 1 else f"{m:.3f}"


def grid_table(rows: list[dict]) -> tuple[list[str], dict]:
    tasks = [t for t in ("sst2", *SMALL_TASKS) if any(r["run"]["task"] == t for r in rows)]
    cells: dict[tuple[str, str], Cell] = {}
    for r in rows:
        run = Run(
            **{**r["run"], "xpeft": tuple(map(tuple, r["run"]["xpeft"])), "train": tuple(map(tuple, r["run"]["train"]))}
        )
        cells.setdefault((run.row, run.task), Cell()).scores.append(r["score"])
    out = ["| mode | " + " | ".join(f"{t} (ours / paper)" for t in tasks) + " |", "|---|" + "---|" * len(tasks)]
    for row in PAPER:
        cs = [f"{cells.get((row, t), Cell()).text()} / {PAPER[row].get(t, float('nan')):.2f}" for t in tasks]
        out.append(f"| {row} | " + " | ".join(cs) + " |")
    means = {k: float(np.mean(c.scores)) for k, c in cells.items() if c.scores}
    return out, means


def grid_goals(means: dict) -> list[str]:
    """The issue's goals, checked: x_peft's best >= head_only where the task learns, within 2 points of
    single_adapter on >= 4 of the 5 full-size GLUE tasks, hard within 1 point of soft on full SST-2."""
    lines = []
    glue = [t for t in ("sst2", "cola", "mrpc", "stsb", "rte") if ("single_adapter", t) in means]
    near = 0
    for t in glue:
        best = max(v for (row, task), v in means.items() if task == t and row.startswith("x_peft"))
        ho, sa = means.get(("head_only", t)), means[("single_adapter", t)]
        near += best >= sa - 0.02
        lines.append(f"- {t}: x_peft best {best:.3f}, head_only {ho:.3f}, single_adapter {sa:.3f}")
    lines.append(
        f"- x_peft's best within 2 points of single_adapter on {near} of {len(glue)} GLUE tasks (goal: >= 4 of 5)"
    )
    if ("x_peft 100 (hard)", "sst2") in means and ("x_peft 100 (soft)", "sst2") in means:
        gap = means[("x_peft 100 (soft)", "sst2")] - means[("x_peft 100 (hard)", "sst2")]
        lines.append(f"- SST-2 full: hard {gap * 100:+.1f} points below soft (goal: within 1)")
    return lines


def report(args) -> str:
    lines = ["# Fidelity at full size (benchmarks/fidelity.py)", ""]
    study = load(os.path.join(args.out, "study.jsonl"))
    if study:
        lines += ["## Hard vs soft on SST-2 (validation split carved from train)", "", *study_table(study), ""]
    news = load(os.path.join(args.out, "news_validation.jsonl"))
    if news:
        lines += [
            "## News profiles: the farm's recipe on validation splits of the training parts",
            "",
            *news_table(news),
            "",
        ]
    grid = load(os.path.join(args.out, "grid.jsonl"))
    if grid:
        table, means = grid_table(grid)
        lines += ["## Full training sets, dev sets (mean ± std over seeds (n))", "", *table, "", *grid_goals(means), ""]
    path = os.path.join(args.out, "fidelity.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=["study", "grid", "news", "report"])
    ap.add_argument("--out", default="results/fidelity", help="where the .jsonl results and fidelity.md go")
    ap.add_argument("--data-dir", default=None, help="GLUE/SuperGLUE files (default ../shared/data)")
    ap.add_argument("--tasks", nargs="*", default=None, help="grid: only these tasks")
    ap.add_argument("--epochs", type=int, default=3, help="epochs per fit (the study's variants may override)")
    ap.add_argument("--train", type=int, default=20000, help="study: training rows (after the validation split)")
    ap.add_argument("--val", type=int, default=2000, help="study: validation rows carved from SST-2's train")
    ap.add_argument("--workers", type=int, default=2, help="runs at a time (Ray actors, one CPU each)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.makedirs(args.out, exist_ok=True)
    if args.stage == "news":
        news_validation(args)
    elif args.stage != "report":
        runs = plan_study(args) if args.stage == "study" else plan_grid(args)
        run_all(args, runs, os.path.join(args.out, f"{args.stage}.jsonl"))
    print(open(report(args)).read())


if __name__ == "__main__":
    main()
