"""The quality harness (benchmarks/fidelity.py): every stage runs end to end on smoke data and resumes where it
stopped, a crashed run is recorded and retried without stopping its stage, and the report checks the issue's
goals, says by how much a goal is missed, and warns about vacuous results."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import fidelity  # noqa: E402
from harness import fidelity_news, fidelity_pool, fidelity_report, fidelity_runs  # noqa: E402
from harness.fidelity_runs import HarnessConfig, Run  # noqa: E402
from test_benchmarks import assert_ran, run_smoke, smoke_folder  # noqa: E402

from xpeft.config import TrainConfig  # noqa: E402

SMOKE = {"backbone": "tiny", "threads": 1, "smoke": True}
# Parity's old loop sets TrainConfig.packing and .bf16, which the fast fit loop adds (another branch): until it
# has landed these tests must fail (strict), and after they must pass.
FAST_LOOP = {"packing", "bf16"} <= {f.name for f in dataclasses.fields(TrainConfig)}
needs_fast_loop = pytest.mark.xfail(not FAST_LOOP, reason="TrainConfig has no packing / bf16 yet", strict=True)


def lines_of(path) -> list[dict]:
    return [json.loads(line) for line in open(path)]


@pytest.fixture(scope="module")
def smoke_out():
    """Every stage once with --smoke into one folder, then the report: the suite's smoke run of the script
    (tests/test_benchmarks.py runs it once for both)."""
    assert_ran(run_smoke("fidelity.py"))
    return smoke_folder("fidelity.py")


@pytest.mark.parametrize("stage", [pytest.param("parity", marks=needs_fast_loop), "study", "grid"])
def test_each_glue_stage_finishes_one_line_per_planned_run_with_its_score_speed_and_settings(smoke_out, stage):
    cfg = HarnessConfig(out=str(smoke_out), **SMOKE)
    lines = lines_of(smoke_out / f"{stage}.jsonl")
    assert [r.get("failed") for r in lines if "failed" in r] == []
    assert len(lines) == len(fidelity_runs.PLANS[stage](cfg)) == len({r["key"] for r in lines})
    for r in lines:
        assert {"task", "mode", "mask_type", "N", "seed"} <= r["run"].keys()
        assert isinstance(r["score"], float) and r["rows_per_s"] > 0 and r["seconds"] > 0
        assert r["recipe"]["seed"] == r["run"]["seed"] and r["n_scored"] == fidelity_runs.SMOKE_ROWS["scored"]
        assert ("masks" in r) == (r["run"]["mode"] == "x_peft")


@needs_fast_loop
def test_parity_runs_each_mode_and_seed_in_the_old_and_the_new_loop(smoke_out):
    lines = lines_of(smoke_out / "parity.jsonl")
    got = {(r["run"]["mode"], r["run"]["mask_type"], r["run"]["seed"], r["run"]["name"]) for r in lines}
    assert len(got) == 3 * 3 * 2
    old = [r["recipe"] for r in lines if r["run"]["name"] == "old loop"]
    assert old and all(r["packing"] is False and r["bf16"] == "off" for r in old)
    new = [r["recipe"] for r in lines if r["run"]["name"] == "new loop"]
    assert all(r["packing"] is True and r["bf16"] == "auto" for r in new)  # the TrainConfig defaults


def test_news_scores_every_variant_on_validation_then_each_rows_choice_and_the_global_model_on_holdouts(smoke_out):
    lines = lines_of(smoke_out / "news.jsonl")
    _, rest, _, _ = fidelity_news.news_data(HarnessConfig(**SMOKE))
    validation = [r for r in lines if r["phase"] == "validation"]
    assert {(r["row"], r["variant"]) for r in validation} == set(fidelity_news.VARIANTS)
    holdout = [r for r in lines if r["phase"] == "holdout"]
    assert {r["row"] for r in holdout} == set(fidelity_news.ROWS)
    picks = fidelity_news.chosen(lines)
    assert all(r["variant"] == picks[r["row"]][0] for r in holdout)
    assert {r["profile_id"] for r in holdout if r["row"] == "global"} == {d.profile_id for d in rest}
    assert not [r for r in lines if "failed" in r]


def test_the_report_shows_every_stage_the_goals_and_the_figures(smoke_out):
    text = (smoke_out / "fidelity.md").read_text()
    for title in ("## Parity", "## Full training sets", "### The goals", "## Closing the gap", "### Figure 4"):
        assert title in text
    assert all(f"| {name} |" in text for name, *_ in fidelity_runs.STUDY)  # every variant, the losers too
    assert "x_peft's best within 2 points of single_adapter on" in text and "news: hard mtl" in text
    assert "the global model" in text and "| global |" in text
    assert (smoke_out / "figure5.png").stat().st_size > 0 and (smoke_out / "figure7.png").stat().st_size > 0


def test_a_rerun_fits_nothing_and_a_lost_line_is_fitted_again(smoke_out, tmp_path):
    lines = (smoke_out / "study.jsonl").read_text().splitlines()
    (tmp_path / "study.jsonl").write_text("\n".join(lines[:3] + lines[4:]) + "\n" + lines[3][:40])  # cut short
    fidelity.main(["study", "--smoke", "--out", str(tmp_path)])
    again = lines_of_tolerant(tmp_path / "study.jsonl")
    assert len(again) == len(lines) and again[-1]["key"] == json.loads(lines[3])["key"]
    fidelity.main(["study", "--smoke", "--out", str(tmp_path)])
    assert len(lines_of_tolerant(tmp_path / "study.jsonl")) == len(lines)


def lines_of_tolerant(path) -> list[dict]:
    return fidelity_pool.load_lines(str(path))


def test_a_run_that_crashes_is_recorded_with_its_error_and_the_stage_goes_on(tmp_path):
    cfg = HarnessConfig(out=str(tmp_path), **SMOKE)
    good = Run("grid", "rte", "head_only")
    bad = Run("grid", "rte", "x_peft", "hard", 100, xpeft=(("k", 100),))  # k = N: refused
    fidelity_runs.run_stage("grid", cfg, fidelity_runs.SMOKE_TRAIN, [bad, good])
    lines = lines_of(tmp_path / "grid.jsonl")
    assert "proper subset" in lines[0]["failed"] and "score" in lines[1]
    fidelity_runs.run_stage("grid", cfg, fidelity_runs.SMOKE_TRAIN, [bad, good])  # the failed run is tried again
    assert [("failed" in r) for r in lines_of(tmp_path / "grid.jsonl")] == [True, False, True]
    assert "## Failed runs" in (Path(fidelity_report.report(str(tmp_path)))).read_text()


@pytest.mark.parametrize("stage", [pytest.param("parity", marks=needs_fast_loop), "study", "grid"])
def test_every_planned_run_resolves_to_configs_that_can_be_built(stage):
    cfg = HarnessConfig()
    for run in fidelity_runs.PLANS[stage](cfg):
        xcfg, tcfg = fidelity_runs.resolve(run, cfg, {})
        assert tcfg.seed == run.seed and (xcfg.N == run.N or run.mode != "x_peft"), run


def test_the_grid_and_news_plans_are_the_issues():
    cfg = HarnessConfig()
    grid = fidelity_runs.plan_grid(cfg)
    assert len(grid) == 4 * 5 + 2 + 2 * 2 * 4  # 3 seeds on rte and mrpc, N = 400 on sst2
    assert all(dict(r.xpeft)["k"] == 50 for r in grid if r.mask_type == "hard")
    assert {(r.task, r.seed) for r in grid if r.mode == "head_only"} >= {("rte", 2), ("mrpc", 2), ("sst2", 0)}
    for row, variant in fidelity_news.VARIANTS:
        fidelity_news.recipe(row, variant, {})
    assert set(fidelity_news.ROWS) == {row for row, _ in fidelity_news.VARIANTS}


def test_a_stage_stopped_early_has_every_task_and_mode_at_the_first_seed_before_any_second():
    cfg = HarnessConfig()
    for plan in (fidelity_runs.plan_parity(cfg), fidelity_runs.plan_grid(cfg)):
        seeds = [r.seed for r in plan]
        assert seeds == sorted(seeds) and {r.seed for r in plan} == {0, 1, 2}
        first = {(r.task, r.mode, r.mask_type, r.N) for r in plan if r.seed == 0}
        assert first == {(r.task, r.mode, r.mask_type, r.N) for r in plan}
    only = fidelity_runs.plan_parity(dataclasses.replace(cfg, seeds=[0]))
    assert {r.seed for r in only} == {0} and len(only) == 6  # three modes, old loop and new
    with pytest.raises(ValueError, match="--seeds"):
        fidelity_runs.plan_grid(dataclasses.replace(cfg, seeds=[7]))


def test_smoke_runs_never_write_into_the_results_and_a_stage_is_required_without_it(capsys):
    stages, cfg, overrides = fidelity.parse(["grid", "--smoke"])
    assert (
        stages == ["grid"]
        and cfg.backbone == "tiny"
        and overrides["max_steps"] == fidelity_runs.SMOKE_TRAIN["max_steps"]
    )
    assert Path(cfg.out).resolve() != (REPO / "results" / "fidelity").resolve() and Path(cfg.out).is_dir()
    shutil.rmtree(cfg.out)
    assert fidelity.parse(["--smoke"])[0] == list(fidelity.STAGES)
    assert fidelity.parse(["grid"])[1].out == "results/fidelity"
    with pytest.raises(SystemExit):
        fidelity.parse([])
    assert "name a stage" in capsys.readouterr().err


def test_plan_prints_each_stages_size_and_time(capsys):
    fidelity.main(["report", "--plan", "--smoke"])
    out = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("    ")]
    assert [line.split()[0] for line in out] == ["parity", "study", "grid", "news"]
    assert all("M rows trained" in line and " h " in line for line in out)


# --- the report on made-up results ---------------------------------------------------------------------------


def glue_line(stage="grid", task="sst2", mode="x_peft", mask_type="hard", N=100, seed=0, name="", score=0.8, **kw):
    run = Run(stage, task, mode, mask_type, N, seed, name)
    line = {
        "key": json.dumps([stage, task, mode, mask_type, N, seed, name]),
        "stage": stage,
        "run": dataclasses.asdict(run),
    }
    line |= {"score": score, "rows_per_s": 100.0, "seconds": 1.0, "final_loss": 0.3, "steps": 10, "trivial_score": 0.5}
    line |= {
        "xpeft": {"mode": mode, "N": N},
        "recipe": {"seed": seed},
        "host": {"cpu_capability": "AVX2", "torch_threads": 2},
    }
    return line | kw


def test_the_report_warns_when_a_model_predicts_one_class_or_runs_of_different_settings_share_masks():
    one_class = glue_line(predicted={"majority_share": 1.0, "label_majority_share": 0.51})
    a = glue_line(seed=0, masks={"fingerprint": "f00", "at_zero_init": False})
    b = glue_line(seed=1, masks={"fingerprint": "f00", "at_zero_init": False})
    b["recipe"] = {"seed": 1}
    same_run_elsewhere = glue_line(stage="study", name="recipe", masks={"fingerprint": "f11", "at_zero_init": False})
    same = glue_line(stage="parity", name="new loop", masks={"fingerprint": "f11", "at_zero_init": False})
    still = glue_line(masks={"fingerprint": "f22", "at_zero_init": True})
    text = "\n".join(
        fidelity_report.warnings(
            {"grid": [one_class, a, b, still], "study": [same_run_elsewhere], "parity": [same]}, []
        )
    )
    assert "predicts one class for 100.0%" in text
    assert "identical masks (f00) across 2 runs" in text and "f11" not in text  # the same settings may agree
    assert "never left their all-zero init" in text


def test_a_missed_goal_is_reported_with_by_how_much():
    means = {
        ("head_only", "rte"): 0.60,
        ("single_adapter", "rte"): 0.62,
        ("x_peft 100 (soft)", "rte"): 0.57,
        ("head_only", "sst2"): 0.85,
        ("single_adapter", "sst2"): 0.90,
        ("x_peft 100 (soft)", "sst2"): 0.89,
        ("x_peft 100 (hard)", "sst2"): 0.865,
    }
    text = "\n".join(fidelity_report.grid_goals(means, {"rte": 0.52, "sst2": 0.51}, ["sst2", "rte"]))
    assert "rte: x_peft best 0.570" in text and "**MISSED** by 3.0 points" in text  # below head_only
    assert "on 1 of 2 tasks" in text and "rte by 3.0 points" in text  # 0.62 - 0.02 - 0.57
    assert "hard -2.5 points vs soft" in text and "**MISSED** by 1.5 points" in text


def test_a_task_nobody_learns_is_not_counted_against_x_peft():
    means = {("head_only", "cola"): 0.0, ("single_adapter", "cola"): 0.0, ("x_peft 100 (soft)", "cola"): -0.01}
    text = "\n".join(fidelity_report.grid_goals(means, {"cola": 0.0}, ["cola"]))
    assert "does not learn" in text and "MISSED by" not in text.split("\n")[0]


def test_parity_pairs_seeds_and_flags_a_difference_over_half_a_point():
    lines = [
        glue_line("parity", mode="single_adapter", mask_type=None, N=None, seed=s, name=loop, score=score, recipe={})
        for s, (old, new) in enumerate([(0.85, 0.84), (0.86, 0.85), (0.84, 0.83)])
        for loop, score in (("old loop", old), ("new loop", new))
    ]
    table = "\n".join(fidelity_report.parity_section(lines))
    assert "| single_adapter | 0, 1, 2 | 0.8500 | 0.8400 | -1.0 ± 0.0 | **NO**, off by 0.5 points |" in table


def test_news_says_plainly_where_personalisation_does_not_beat_the_global_model():
    def rows(row, accs):
        return [{"row": row, "profile_id": f"p{i}", "accuracy": a, "f1": a / 2} for i, a in enumerate(accs)]

    hold = {
        "global": rows("global", [0.8, 0.8]),
        "mtl-hard": rows("mtl-hard", [0.7, 0.85]),
        "single_adapter": rows("single_adapter", [0.9, 0.9]),
    }
    text = "\n".join(fidelity_report.against_global(hold))
    assert "mtl-hard does **NOT** beat the global model" in text and "better on 1, worse on 1 of 2" in text
    assert "single_adapter beats the global model" in text
    assert "**Personalisation does not beat one global model for: mtl-hard.**" in text


# --- runs on Ray actors --------------------------------------------------------------------------------------


class Dying:
    """A worker whose process ends on the item "die"."""

    def fit(self, item):
        if item == "die":
            os._exit(1)
        return [{"item": item}]

    @staticmethod
    def died(item, reason):
        return [{"item": item, "failed": reason}]


@pytest.mark.ray
def test_on_ray_a_worker_that_dies_fails_its_run_alone_and_is_replaced(local_ray, tmp_path):
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    got = []
    fidelity_pool.on_ray(HarnessConfig(workers=2), Dying, (), ["a", "die", "b", "c"], got.append)
    assert sorted(r["item"] for r in got if "failed" not in r) == ["a", "b", "c"]
    assert [r["item"] for r in got if "the worker died" in r.get("failed", "")] == ["die"]
    cfg = HarnessConfig(out=str(tmp_path), workers=2, **SMOKE)
    path = fidelity_runs.run_stage(
        "grid", cfg, fidelity_runs.SMOKE_TRAIN, fidelity_runs.plan_grid(dataclasses.replace(cfg, tasks=["cola"]))[:2]
    )
    assert len([r for r in lines_of(path) if "score" in r]) == 2
