"""Official metrics: plain functions (`compute_metrics`, `main_score`) and an offline `evaluate` module.

`evaluate.load(GLUE_LOCAL_PATH, config_name=task)` works without a network; `evaluate.load("glue")`
does not. Both routes share the math in `xpeft.metrics.official`.
"""

from __future__ import annotations

from pathlib import Path

from xpeft.metrics.official import TASK_METRICS, compute_metrics, gender_parity_score, main_score

GLUE_LOCAL_PATH = str(Path(__file__).resolve().parent / "glue_local.py")


def load_metric(task: str, **kwargs):
    """The `evaluate` metric for `task` (a TASK_METRICS name, or mnli_matched / mnli_mismatched)."""
    import evaluate

    return evaluate.load(GLUE_LOCAL_PATH, config_name=task.lower(), **kwargs)


__all__ = [
    "GLUE_LOCAL_PATH",
    "TASK_METRICS",
    "compute_metrics",
    "gender_parity_score",
    "load_metric",
    "main_score",
]
