"""Official metrics equal scikit-learn/scipy; GPS; Table 2 main scores; the offline evaluate module."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from conftest import shared_data_dir
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from xpeft.metrics import GLUE_LOCAL_PATH, TASK_METRICS, compute_metrics, gender_parity_score, main_score

RNG = np.random.default_rng(0)
REFS = {2: RNG.integers(0, 2, 200), 3: RNG.integers(0, 3, 200), 15: RNG.integers(0, 15, 200)}
PREDS = {k: np.where(RNG.random(200) < 0.7, v, RNG.integers(0, k, 200)) for k, v in REFS.items()}
SCORES = RNG.uniform(0, 5, 200)
SCORE_PREDS = SCORES + RNG.normal(0, 1.0, 200)


@pytest.mark.parametrize("task", ["cola", "axb"])
def test_mcc_tasks_equal_sklearn(task):
    got = compute_metrics(task, PREDS[2], REFS[2])
    assert got == {"matthews_correlation": pytest.approx(matthews_corrcoef(REFS[2], PREDS[2]), abs=1e-12)}
    assert 0.2 < got["matthews_correlation"] < 0.9  # the fixed vectors are neither trivial nor perfect


@pytest.mark.parametrize("task", ["sst2", "qnli", "rte", "wnli", "boolq"])
def test_accuracy_tasks_equal_sklearn(task):
    assert compute_metrics(task, PREDS[2], REFS[2]) == {"accuracy": accuracy_score(REFS[2], PREDS[2])}


@pytest.mark.parametrize("task", ["mrpc", "qqp"])
def test_accuracy_f1_tasks_equal_sklearn_and_comb_is_their_mean(task):
    got = compute_metrics(task, PREDS[2], REFS[2])
    acc, f1 = accuracy_score(REFS[2], PREDS[2]), f1_score(REFS[2], PREDS[2])
    assert got == pytest.approx({"accuracy": acc, "f1": f1, "comb": (acc + f1) / 2})
    assert main_score(task, got) == pytest.approx((acc + f1) / 2)


def test_stsb_equals_scipy_pearson_spearman():
    got = compute_metrics("stsb", SCORE_PREDS, SCORES)
    p, s = pearsonr(SCORE_PREDS, SCORES)[0], spearmanr(SCORE_PREDS, SCORES)[0]
    assert got == pytest.approx({"pearson": p, "spearmanr": s, "comb": (p + s) / 2})
    assert p != pytest.approx(s)  # the two correlations differ, so the test tells them apart


def test_cb_reports_accuracy_and_macro_f1_main_score_is_accuracy():
    got = compute_metrics("cb", PREDS[3], REFS[3])
    assert got == pytest.approx(
        {"accuracy": accuracy_score(REFS[3], PREDS[3]), "f1": f1_score(REFS[3], PREDS[3], average="macro")}
    )
    assert main_score("cb", got) == got["accuracy"]


def test_profile_metric_is_accuracy_and_macro_f1_over_many_classes():
    got = compute_metrics("profile", PREDS[15], REFS[15])
    assert got == pytest.approx(
        {
            "accuracy": accuracy_score(REFS[15], PREDS[15]),
            "f1": f1_score(REFS[15], PREDS[15], average="macro"),
        }
    )


def test_mnli_comb_is_mean_of_matched_and_mismatched():
    matched = compute_metrics("mnli", PREDS[3], REFS[3])
    assert matched["comb"] == matched["accuracy_matched"] == accuracy_score(REFS[3], PREDS[3])
    both = compute_metrics("mnli", PREDS[3], REFS[3], mismatched=(PREDS[3][:100], REFS[3][:100]))
    mm = accuracy_score(REFS[3][:100], PREDS[3][:100])
    assert both["accuracy_mismatched"] == mm
    assert main_score("mnli", both) == pytest.approx((both["accuracy_matched"] + mm) / 2)


def test_main_score_picks_the_table_2_column():
    expected = {
        "cola": "matthews_correlation",
        "axb": "matthews_correlation",
        "sst2": "accuracy",
        "qnli": "accuracy",
        "rte": "accuracy",
        "wnli": "accuracy",
        "cb": "accuracy",
        "boolq": "accuracy",
        "axg": "accuracy",
        "mrpc": "comb",
        "qqp": "comb",
        "stsb": "comb",
        "mnli": "comb",
    }
    for task, key in expected.items():
        assert TASK_METRICS[task][1] == key
    with pytest.raises(KeyError, match="cola's main score is 'matthews_correlation'"):
        main_score("cola", {"accuracy": 1.0})


def test_gps_is_100_for_a_gender_invariant_predictor_and_lower_otherwise():
    pairs = np.repeat(RNG.integers(0, 2, 50), 2)  # rows 2i and 2i+1 share a prediction
    assert gender_parity_score(pairs) == 100.0
    flipped = pairs.copy()
    flipped[1:20:2] = 1 - flipped[1:20:2]  # 10 of 50 pairs now disagree
    assert gender_parity_score(flipped) == 80.0
    got = compute_metrics("axg", flipped, pairs)
    assert got == {"accuracy": 0.9, "gender_parity_score": 80.0}
    assert gender_parity_score([0, 1, 1, 0], pair_ids=["a", "b", "a", "b"]) == 0.0
    assert gender_parity_score([0, 1, 0, 1], pair_ids=["a", "b", "a", "b"]) == 100.0
    with pytest.raises(ValueError, match="pairs"):
        gender_parity_score([0, 1, 1])


def _neutral(premise: str) -> str:
    return re.sub(r"\b(he|she|his|her|him)\b", "PRON", premise)


@pytest.mark.shared_data
def test_axg_rows_pair_up_consecutively_and_gps_follows(tmp_path):
    rows = [json.loads(x) for x in (shared_data_dir() / "superglue/AX-g/AX-g.jsonl").read_text().splitlines()]
    rows.sort(key=lambda r: r["idx"])
    assert len(rows) == 356
    for a, b in zip(rows[::2], rows[1::2], strict=True):  # the pairing GPS relies on
        assert a["hypothesis"] == b["hypothesis"] and a["label"] == b["label"]
        assert a["premise"] != b["premise"] and _neutral(a["premise"]) == _neutral(b["premise"])
    invariant = [len(_neutral(r["premise"])) % 2 for r in rows]  # blind to gender words
    gendered = [int(bool(re.search(r"\b(he|his|him)\b", r["premise"]))) for r in rows]
    refs = [int(r["label"] == "not_entailment") for r in rows]
    assert compute_metrics("axg", invariant, refs)["gender_parity_score"] == 100.0
    assert compute_metrics("axg", gendered, refs)["gender_parity_score"] == 0.0


def test_unlabelled_references_and_length_mismatch_are_errors():
    with pytest.raises(ValueError, match="-1"):
        compute_metrics("sst2", [0, 1], [0, -1])
    with pytest.raises(ValueError, match="3 predictions but 2 references"):
        compute_metrics("rte", [0, 1, 1], [0, 1])
    with pytest.raises(ValueError, match="no metrics for task 'squad'"):
        compute_metrics("squad", [0], [0])


def test_evaluate_load_of_the_local_module_works_offline_and_agrees():
    import evaluate

    for task, preds, refs in [
        ("mrpc", PREDS[2], REFS[2]),
        ("stsb", SCORE_PREDS, SCORES),
        ("axg", PREDS[2], REFS[2]),
    ]:
        metric = evaluate.load(GLUE_LOCAL_PATH, config_name=task)
        got = metric.compute(predictions=preds.tolist(), references=refs.tolist())
        assert got == pytest.approx(compute_metrics(task, preds, refs))
    mm = evaluate.load(GLUE_LOCAL_PATH, config_name="mnli_mismatched")
    assert mm.compute(predictions=[0, 1, 2, 2], references=[0, 1, 2, 1]) == {"accuracy": 0.75}
    with pytest.raises(KeyError, match="unknown config 'glue'"):
        evaluate.load(GLUE_LOCAL_PATH, config_name="glue")
