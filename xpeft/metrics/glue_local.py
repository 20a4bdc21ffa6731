"""Offline `evaluate` metric for GLUE, SuperGLUE (cb, boolq, axb, axg) and profile classification.

    import evaluate
    from xpeft.metrics import GLUE_LOCAL_PATH
    metric = evaluate.load(GLUE_LOCAL_PATH, config_name="mrpc")
    metric.compute(predictions=[1, 0, 1], references=[1, 1, 1])  # accuracy, f1, comb

`evaluate.load("glue")` fetches its script from the hub; this file is the local stand-in. Config names
are the task names of `xpeft.metrics.official.TASK_METRICS` plus "mnli_matched"/"mnli_mismatched"
(accuracy of one MNLI dev set each). The math lives in `xpeft.metrics.official`, so the `evaluate`
route and `xpeft.metrics.compute_metrics` give the same numbers. axg takes an optional `pair_ids`.
"""

import datasets
import evaluate

from xpeft.metrics.official import TASK_METRICS, compute_metrics

_DESCRIPTION = "Official GLUE/SuperGLUE metrics (X-PEFT Tables 2 and 3) and accuracy + macro-F1 for profiles."
_CITATION = """\
@inproceedings{wang2019glue, title={GLUE: A Multi-Task Benchmark and Analysis Platform for Natural
  Language Understanding}, author={Wang, Alex and others}, booktitle={ICLR}, year={2019}}
@inproceedings{wang2019superglue, title={SuperGLUE: A Stickier Benchmark for General-Purpose Language
  Understanding Systems}, author={Wang, Alex and others}, booktitle={NeurIPS}, year={2019}}
"""
_KWARGS_DESCRIPTION = """
Args:
    predictions: predicted class ids (float scores for stsb).
    references: gold class ids (float scores for stsb).
    pair_ids: (axg only, optional) pair id per row; default: rows 2i and 2i+1 form a pair.
Returns:
    a dict of the task's official metrics; see xpeft.metrics.official.
"""

CONFIGS = (*TASK_METRICS, "mnli_matched", "mnli_mismatched")


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class GlueLocal(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        if self.config_name not in CONFIGS:
            raise KeyError(f"unknown config {self.config_name!r}; pass config_name= one of {', '.join(CONFIGS)}")
        dtype = "float64" if self.config_name == "stsb" else "int64"
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value(dtype), "references": datasets.Value(dtype)}),
        )

    def _compute(self, predictions, references, pair_ids=None):
        if self.config_name in ("mnli_matched", "mnli_mismatched"):
            return {"accuracy": compute_metrics("mnli", predictions, references)["accuracy_matched"]}
        return compute_metrics(self.config_name, predictions, references, pair_ids=pair_ids)
