"""Are profiles as good as adapters? The one quality harness (issues 24 and 25): X-PEFT's masks against
single_adapter and head_only, every choice made on validation data, the dev sets and holdouts scored once.

    python benchmarks/fidelity.py parity   # the new fit loop against the old: SST-2 16k, 3 seeds, validation
    python benchmarks/fidelity.py study    # closing the hard-mask gap: variants on SST-2, validation
    python benchmarks/fidelity.py grid     # Table 2 at full size: full training sets, whole dev sets
    python benchmarks/fidelity.py news     # Figure 4 on the news profiles, with one global model beside them
    python benchmarks/fidelity.py report   # <out>/fidelity.md (and figure5.png, figure7.png) from what finished
    python benchmarks/fidelity.py grid --plan              # the runs and their estimated CPU time; fits nothing
    python benchmarks/fidelity.py study --smoke --out /tmp/f   # seconds: tiny backbone, synthetic rows
    python benchmarks/fidelity.py --smoke  # every stage so, into a fresh temporary folder (never the results)
    benchmarks/run_quality.sh              # every stage in order, committing results/fidelity/*.jsonl after each

Every stage is resumable: each finished run appends one JSON line to <out>/<stage>.jsonl (`run`: task, mode,
mask_type, N, seed and the rest of its settings; `score`: the task's official metric; rows/s, seconds, the
resolved recipe), and a rerun skips the runs already there (kill it any time). A run that crashes is recorded
as failed with its error, the stage goes on, and the next run of the stage tries it again. A run's identity
includes its resolved recipe, so a changed TASK_TRAIN makes the grid's runs new runs (the report shows the
latest of each).

- parity: SST-2, --val-rows carved from a seeded shuffle of the training set, --train-rows of the rest; 2
  epochs, batch 32; single_adapter, x_peft soft and hard (k = 50) at N = 100; the old loop (padded random
  batches, fp32: `packing=False, bf16="off"`) and the new (the TrainConfig defaults); seeds 0, 1, 2.
- study: the same data; the variants of STUDY in harness/fidelity_runs.py (epochs, mask lr and warm-up, tau /
  nu annealing, N = 400, k, mask init, LN), hard masks first, beside soft and single_adapter at the same settings.
- grid: SST-2 (67,349 rows), CoLA, MRPC, STS-B, RTE, full training sets, --grid-epochs; head_only,
  single_adapter, soft and hard (k = 50) at N = 100, soft and hard at N = 400 on SST-2; seed 0, and seeds 0,
  1, 2 on RTE and MRPC. Recipe: xpeft.fit.recipes.TASK_TRAIN (write the study's winner there first).
- news: see harness/fidelity_news.py (validation phase, then the holdouts with each row's chosen recipe).

Runs go one at a time in this process (--workers 1, --threads torch threads: best for long fits on a small
machine) or --workers at a time on Ray actors of one CPU each. TrainConfig flags (--max-steps, --max-length,
...) override every run's recipe: quick checks on real data with --limit and --max-steps, into a scratch --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the companions below, however this is started

from harness.fidelity_news import NEWS, ROWS, news_data, run_news  # noqa: E402
from harness.fidelity_report import report  # noqa: E402
from harness.fidelity_runs import GLUE5, PLANS, SMOKE_TRAIN, HarnessConfig, Run, run_stage  # noqa: E402

from xpeft.config import TrainConfig  # noqa: E402
from xpeft.fit.recipes import FARM_TRAIN, TASK_TRAIN  # noqa: E402
from xpeft.flags import add_flags, from_flags  # noqa: E402

log = logging.getLogger("fidelity")
STAGES = ("parity", "study", "grid", "news", "report")
DEFAULT_OUT = "results/fidelity"
SMOKE = ("backbone", "threads", "out", "max_steps", "max_length")  # what --smoke replaces (tests/test_benchmarks.py)
# TrainConfig fields a command line may override in every run (packing and bf16 once the fit loop has them).
OVERRIDABLE = ("max_steps", "max_length", "log_every", "gradient_checkpointing", "packing", "bf16")

# --- --plan: sizes and estimated CPU time ---------------------------------------------------------------------

SIZES = {"sst2": (67349, 872), "cola": (8551, 1043), "mrpc": (3668, 408), "stsb": (5749, 1500), "rte": (2490, 277)}
# Mean tokens a row (bundled MiniLM tokenizer, 3,000 training rows of each; news: a profile's text): a run's
# rows/s is taken as SST-2's scaled by SST-2's tokens over the task's (the step's cost follows the tokens).
TOKENS = {"sst2": 13.3, "cola": 11.4, "mrpc": 53.3, "stsb": 27.7, "rte": 66.6, "news": 35.6}
NEW_RATES, OLD_RATE = (250.0, 150.0), 68.0  # rows/s on SST-2 rows: the new loop (a range), the old


def seconds(rows: float, scored: float, tokens: float, rate: float) -> float:
    """Fitting `rows` and scoring `scored` (a forward is about a third of a training step) at `rate` SST-2 rows/s."""
    per_row = tokens / TOKENS["sst2"] / rate
    return (rows + scored / 3) * per_row


def estimate_glue(runs: list[Run], cfg: HarnessConfig) -> list[tuple[float, float, float, float]]:
    """(rows trained, rows scored, hours at the fast and at the slow rate) of each run."""
    out = []
    for run in runs:
        train = dict(run.train)
        n = run.train_rows or SIZES[run.task][0]
        epochs = train.get("epochs", TASK_TRAIN.epochs)
        scored = run.val_rows or SIZES[run.task][1]
        rates = (OLD_RATE, OLD_RATE) if train.get("packing") is False else NEW_RATES
        hours = [seconds(n * epochs, scored, TOKENS[run.task], r) / 3600 for r in rates]
        out.append((n * epochs, scored, *hours))
    return out


def estimate_news(cfg: HarnessConfig) -> tuple[list[tuple[float, float, float, float]], int]:
    """The news stage's parts (the sa and mtl warm starts, then each variant on validation, each row on the
    holdouts) as (rows trained, rows scored, hours fast, hours slow), and its number of fits (~1 s each besides
    its rows: building and scoring a small model)."""
    warm, rest, _, _ = news_data(cfg)
    rows = {"warm": sum(len(d.train) for d in warm), "rest": sum(len(d.train) for d in rest)}
    rows["global"] = rows["warm"] + rows["rest"]
    parts, fits = [], 0
    for share, scored, todo in (
        (0.75, 0.25 * rows["rest"], [(row, t) for row, _, _, t in NEWS]),  # validation: carved parts
        (1.0, sum(len(d.test) for d in rest), [(row, {}) for row in ROWS]),  # holdouts, the chosen recipes
    ):
        parts.append((2 * rows["warm"] * share * FARM_TRAIN.epochs, 0))  # the sa and mtl warm starts
        fits += len(warm) + 1
        for row, t in todo:
            parts.append(
                (rows["global" if row == "global" else "rest"] * share * t.get("epochs", FARM_TRAIN.epochs), scored)
            )
            fits += 1 if row == "global" else len(rest)
    hours = [[(seconds(n, s, TOKENS["news"], r) + fits / len(parts)) / 3600 for r in NEW_RATES] for n, s in parts]
    return [(n, s, *h) for (n, s), h in zip(parts, hours, strict=True)], fits


def print_plan(stage: str, cfg: HarnessConfig) -> None:
    try:
        parts, fits = estimate_news(cfg) if stage == "news" else (estimate_glue(PLANS[stage](cfg), cfg), 0)
    except FileNotFoundError as e:
        print(f"{stage:7s} cannot be sized: {e}")
        return
    rows, scored = sum(p[0] for p in parts), sum(p[1] for p in parts)
    fast, slow = sum(p[2] for p in parts), sum(p[3] for p in parts)
    what = f"{fits} fits" if stage == "news" else f"{len(parts)} runs"
    print(
        f"{stage:7s} {what:>9s}  {rows / 1e6:6.2f} M rows trained  {scored / 1e3:7.1f} k rows scored  "
        f"~{fast:.1f}-{slow:.1f} h (one run at a time, 2 torch threads: the new loop at {NEW_RATES[0]:.0f}-"
        f"{NEW_RATES[1]:.0f}, the old at {OLD_RATE:.0f} SST-2 rows/s, scaled by tokens a row)"
    )
    if stage != "news":
        for run in PLANS[stage](cfg):
            data = f"{run.train_rows or 'all'} rows, scored on " + (
                f"{run.val_rows} validation" if run.val_rows else "dev"
            )
            print(f"    {run.task} {run.name or run.row} seed {run.seed} {dict(run.xpeft)} {dict(run.train)} ({data})")


# --- the command ---------------------------------------------------------------------------------------------


def arguments() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", nargs="?", choices=STAGES, help="the stage to run (with --smoke alone: every stage)")
    add_flags(ap, HarnessConfig)
    group = ap.add_argument_group("every run's recipe (over TASK_TRAIN / FARM_TRAIN)")
    add_flags(group, TrainConfig, only=OVERRIDABLE, unset=True)
    return ap


def parse(argv: list[str] | None) -> tuple[list[str], HarnessConfig, dict]:
    """(the stages to run, the harness's settings, the TrainConfig overrides of every run)."""
    ap = arguments()
    args = ap.parse_args(argv)
    cfg = from_flags(args, HarnessConfig)
    if args.stage is None and not cfg.smoke:
        ap.error(f"name a stage ({', '.join(STAGES)}); only --smoke runs them all")
    if set(cfg.tasks or ()) - set(GLUE5):
        ap.error(f"--tasks: the grid's tasks are {', '.join(GLUE5)}; got {', '.join(cfg.tasks)}")
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    if cfg.smoke:  # never into the results: a fresh folder unless --out says where
        out = cfg.out or tempfile.mkdtemp(prefix="fidelity-smoke-")
        cfg = dataclasses.replace(cfg, backbone="tiny", threads=1, out=out)
        overrides = {**SMOKE_TRAIN, **overrides}
    stages = [args.stage] if args.stage else list(STAGES)
    return stages, dataclasses.replace(cfg, out=cfg.out or DEFAULT_OUT), overrides


def main(argv: list[str] | None = None) -> None:
    stages, cfg, overrides = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if cfg.plan:
        for s in STAGES[:-1] if stages[-1] == "report" else stages:
            print_plan(s, cfg)
        return
    os.makedirs(cfg.out, exist_ok=True)
    for stage in stages:
        if stage == "news":
            run_news(cfg, overrides)
        elif stage != "report":
            run_stage(stage, cfg, overrides)
    path = report(cfg.out)
    print(open(path).read())
    log.info("report: %s", path)


if __name__ == "__main__":
    main()
