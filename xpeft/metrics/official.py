"""Official GLUE/SuperGLUE metrics and the profile-farm metric, as plain functions.

| task                         | metrics (keys)                          | Table 2/3 column (`main_score`) |
|------------------------------|-----------------------------------------|---------------------------------|
| cola, axb                    | matthews_correlation                    | MCC                             |
| sst2, qnli, rte, wnli, boolq | accuracy                                | Acc                             |
| cb                           | accuracy, f1 (macro over 3 classes)     | Acc                             |
| mrpc, qqp                    | accuracy, f1 (positive class), comb     | Comb                            |
| stsb                         | pearson, spearmanr, comb                | Comb                            |
| mnli                         | accuracy_matched, accuracy_mismatched   | Comb                            |
| axg                          | accuracy, gender_parity_score (0..100)  | Acc (GPS in its own column)     |
| profile                      | accuracy, f1 (macro)                    | Acc                             |
| profile_regression           | mse, pearson, spearmanr                 | Pearson                         |

'Comb' is the mean of a task's official metrics, as in Table 2 of the paper.

The Gender Parity Score (AX-g) is the percentage of Winogender pairs on which the predictions agree; a
predictor that ignores gender scores 100. In the AX-g file the two sentences of a pair are consecutive
rows (idx 2i and 2i+1, the same premise with he/his/him vs she/her, the same hypothesis and label), so
pairs default to consecutive rows in idx order; pass `pair_ids` to group otherwise.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

log = logging.getLogger(__name__)

# task → (metric keys, the key Table 2/3 reports). "comb" is the mean of the others.
TASK_METRICS: dict[str, tuple[tuple[str, ...], str]] = {
    "cola": (("matthews_correlation",), "matthews_correlation"),
    "sst2": (("accuracy",), "accuracy"),
    "mrpc": (("accuracy", "f1", "comb"), "comb"),
    "qqp": (("accuracy", "f1", "comb"), "comb"),
    "stsb": (("pearson", "spearmanr", "comb"), "comb"),
    "mnli": (("accuracy_matched", "accuracy_mismatched", "comb"), "comb"),
    "qnli": (("accuracy",), "accuracy"),
    "rte": (("accuracy",), "accuracy"),
    "wnli": (("accuracy",), "accuracy"),
    "cb": (("accuracy", "f1"), "accuracy"),
    "boolq": (("accuracy",), "accuracy"),
    "axb": (("matthews_correlation",), "matthews_correlation"),
    "axg": (("accuracy", "gender_parity_score"), "accuracy"),
    "profile": (("accuracy", "f1"), "accuracy"),
    "profile_regression": (("mse", "pearson", "spearmanr"), "pearson"),
}


def gender_parity_score(predictions: Sequence, pair_ids: Sequence | None = None) -> float:
    """Percentage (0..100) of Winogender pairs whose two predictions agree."""
    preds = np.asarray(predictions)
    if pair_ids is None:
        if len(preds) % 2:
            raise ValueError(
                f"AX-g predictions come in pairs (rows 2i, 2i+1) but got {len(preds)} rows; "
                "pass all rows in idx order, or pass pair_ids"
            )
        pair_ids = np.arange(len(preds)) // 2
    pair_ids = np.asarray(pair_ids)
    if len(pair_ids) != len(preds):
        raise ValueError(f"pair_ids has {len(pair_ids)} entries but there are {len(preds)} predictions")
    groups: dict = {}
    for pid, p in zip(pair_ids.tolist(), preds.tolist(), strict=True):
        groups.setdefault(pid, []).append(p)
    if not groups:
        return float("nan")
    agree = sum(len(set(ps)) == 1 for ps in groups.values())
    return 100.0 * agree / len(groups)


def _classes(predictions, references) -> tuple[np.ndarray, np.ndarray]:
    p, r = np.asarray(predictions), np.asarray(references)
    if p.shape != r.shape:
        raise ValueError(f"{len(p)} predictions but {len(r)} references; pass one prediction per example")
    if (r < 0).any():
        raise ValueError("references contain -1 (an unlabelled test row); score a labelled split instead")
    return p, r


def _comb(out: dict[str, float]) -> dict[str, float]:
    out["comb"] = float(np.mean([v for v in out.values()]))
    return out


def compute_metrics(
    task: str,
    predictions: Sequence,
    references: Sequence,
    *,
    mismatched: tuple[Sequence, Sequence] | None = None,
    pair_ids: Sequence | None = None,
) -> dict[str, float]:
    """The official metrics of `task` (see the table above) for class ids (scores for stsb).

    mnli: `predictions`/`references` are the matched dev set; pass `mismatched=(preds, refs)` for the
    mismatched one. Without it, 'comb' is the matched accuracy alone (logged), since our copy lacks it.
    """
    task = task.lower()
    if task not in TASK_METRICS:
        raise ValueError(f"no metrics for task {task!r}; choose one of {', '.join(TASK_METRICS)}")
    if task == "stsb":
        p, r = np.asarray(predictions, dtype=float), np.asarray(references, dtype=float)
        if p.shape != r.shape:
            raise ValueError(f"{len(p)} predictions but {len(r)} references")
        return _comb({"pearson": float(pearsonr(p, r)[0]), "spearmanr": float(spearmanr(p, r)[0])})
    if task == "profile_regression":  # a profile's float target: few rows, maybe constant, so NaN-safe
        p, r = np.asarray(predictions, dtype=float), np.asarray(references, dtype=float)
        flat = len(r) < 2 or np.ptp(r) == 0 or np.ptp(p) == 0
        return {
            "mse": float(np.mean((p - r) ** 2)) if len(r) else float("nan"),
            "pearson": float("nan") if flat else float(pearsonr(p, r)[0]),
            "spearmanr": float("nan") if flat else float(spearmanr(p, r)[0]),
        }
    p, r = _classes(predictions, references)
    if task == "profile" and not len(r):
        return {"accuracy": float("nan"), "f1": float("nan")}
    if task in ("cola", "axb"):
        return {"matthews_correlation": float(matthews_corrcoef(r, p))}
    if task == "mnli":
        out = {"accuracy_matched": float(accuracy_score(r, p))}
        if mismatched is not None:
            mp, mr = _classes(*mismatched)
            out["accuracy_mismatched"] = float(accuracy_score(mr, mp))
        else:
            log.info("mnli: no mismatched predictions given; comb is the matched accuracy alone")
        return _comb(out)
    out = {"accuracy": float(accuracy_score(r, p))}
    if task in ("mrpc", "qqp"):
        return _comb({**out, "f1": float(f1_score(r, p, zero_division=0))})
    if task in ("cb", "profile"):
        out["f1"] = float(f1_score(r, p, average="macro", zero_division=0))
    if task == "axg":
        out["gender_parity_score"] = gender_parity_score(p, pair_ids)
    return out


def main_score(task: str, metrics: dict[str, float]) -> float:
    """The number Table 2/3 reports for `task`: MCC, Acc or Comb."""
    task = task.lower()
    if task not in TASK_METRICS:
        raise ValueError(f"no metrics for task {task!r}; choose one of {', '.join(TASK_METRICS)}")
    key = TASK_METRICS[task][1]
    if key not in metrics:
        raise KeyError(
            f"{task}'s main score is {key!r} but the metrics have only {sorted(metrics)}; "
            "pass the dict compute_metrics returned"
        )
    return float(metrics[key])
