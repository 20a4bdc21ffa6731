"""Ray Tune search (xpeft.ray.tune): Appendix C's space, ASHA on the task's score, impossible trials refused."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import tiny_rows

from xpeft.config import TrainConfig, XPeftConfig
from xpeft.fit.task import FitConfig, TaskData
from xpeft.profiles.store import ProfileStore
from xpeft.ray.tune import BEST_FILE, SEARCH_SPACE, SearchConfig, _trial, restore_search, search, validate_space

DATA = TaskData(train=tiny_rows(32), eval=tiny_rows(16, seed=1))
EPOCHS = 4


def tiny_search(storage, space: dict, mask_type: str = "hard", **kw) -> SearchConfig:
    fit = FitConfig(
        xpeft=XPeftConfig(mask_type=mask_type, N=8, k=2, b=4, dropout=0.0),
        train=TrainConfig(lr=1e-2, mask_lr=5e-2, ln_lr=5e-2, epochs=EPOCHS, batch_size=8),
        backbone="tiny",
    )
    return SearchConfig(fit=fit, space=space, storage_path=str(storage), name="tiny", **kw)


def test_search_space_is_appendix_c():
    assert SEARCH_SPACE == {
        "N": (100, 200, 400, 800),
        "k": (1, 10, 20, 30, 40, 50, 60, 70, 80, 100),
        "b": (12, 24, 48, 96),
        "batch_size": (8, 16, 32, 64, 128),
    }
    # A hard mask selects a proper subset (k < N): the paper's space has one pair that cannot, k = N = 100.
    assert validate_space(SearchConfig()) == [(100, 100)]


@pytest.mark.ray
def test_four_trial_search_over_N_and_k_completes_with_asha_and_reports_the_best(local_ray, tmp_path):
    scfg = tiny_search(tmp_path / "tune", {"N": (8, 16), "k": (2, 4)}, grid=True)
    store = str(tmp_path / "store")
    result = search(scfg, DATA, store=store)

    assert len(result.trials) == 4 and not [t for t in result.trials if t["error"]]
    assert sorted((t["config"]["N"], t["config"]["k"]) for t in result.trials) == [(8, 2), (8, 4), (16, 2), (16, 4)]
    assert all(1 <= t["epochs"] <= EPOCHS for t in result.trials)  # ASHA may stop any after its grace period
    assert result.best_score == max(t["score"] for t in result.trials)
    assert result.best_config in [t["config"] for t in result.trials if t["score"] == result.best_score]

    with open(os.path.join(result.experiment_path, BEST_FILE)) as f:
        assert json.load(f)["best_config"] == result.best_config
    profile = ProfileStore(store).get(result.profile_id)
    assert (profile.config.N, profile.config.k) == (result.best_config["N"], result.best_config["k"])
    assert profile.metrics["score"] == pytest.approx(result.best_score)

    # Restoring the finished search runs nothing again (no trial reports another result) and finds the same best.
    reported = {str(p): p.read_text() for p in Path(result.experiment_path).rglob("result.json")}
    again = restore_search(scfg, DATA)
    assert len(reported) == 4
    assert {str(p): p.read_text() for p in Path(result.experiment_path).rglob("result.json")} == reported
    assert len(again.trials) == 4 and again.best_score == result.best_score


def test_pairs_with_k_at_least_N_are_never_drawn_and_a_space_of_only_those_is_refused(tmp_path):
    from xpeft.ray.tune import tune_space

    scfg = tiny_search(tmp_path, {"N": (8, 16), "k": (2, 8, 10)}, grid=True)
    assert validate_space(scfg) == [(8, 8), (8, 10)]
    assert sorted(map(tuple, tune_space(scfg)["N_k"]["grid_search"])) == [(8, 2), (16, 2), (16, 8), (16, 10)]
    with pytest.raises(ValueError, match=r"proper subset of the bank \(k < N\): dropped \[\(8, 8\), \(8, 10\)\]"):
        search(tiny_search(tmp_path, {"N": (8,), "k": (8, 10)}), DATA)
    assert validate_space(tiny_search(tmp_path, {"N": (8,), "k": (2, 10)}, mask_type="soft")) == []  # soft: no k


def test_a_zero_bottleneck_is_refused_before_any_trial_starts(tmp_path):
    with pytest.raises(ValueError, match=r"b must be a positive integer, but the grid has \[0\]"):
        search(tiny_search(tmp_path, {"b": (0, 4)}), DATA)


@pytest.mark.parametrize(
    "params, message",
    [({"N": 4, "k": 8}, "1 <= k < N; got k=8, N=4"), ({"b": 0}, "bottleneck b must be >= 1")],
)
def test_an_impossible_trial_fails_fast_inside_the_trainable(tmp_path, params, message, monkeypatch):
    """Refused before a model or a bank is built: the fits it would start are not reached."""
    import xpeft.ray.tune as tune_module

    def reached(*args, **kwargs):
        raise AssertionError("an impossible trial started a fit")

    for name in ("fit_task", "fit_distributed", "from_checkpoint"):
        monkeypatch.setattr(tune_module, name, reached)
    scfg = tiny_search(tmp_path, {"N": (8,)})
    with pytest.raises(ValueError, match=f"trial .* is impossible: .*{message}"):
        _trial(params, scfg, DATA)
