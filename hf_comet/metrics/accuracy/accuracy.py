"""Accuracy as an `evaluate` metric module shipped inside hf_comet: ``evaluate.load(<this folder>)`` works offline
(the Hub's ``evaluate-metric/accuracy`` needs the network)."""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "The share of predictions equal to their references: (TP + TN) / N, optionally weighted per sample."

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[int]`): predicted labels.
    references (`list[int]`): ground-truth labels.
    normalize (`bool`): the share of correct predictions (default) or their count.
    sample_weight (`list[float]`, optional): a weight per sample.
Returns:
    accuracy (`float`): in [0, 1] when ``normalize`` (NaN for no predictions, like numpy's mean of nothing), else the
        (weighted) count of correct predictions.
Examples:
    >>> metric = evaluate.load("hf_comet/metrics/accuracy")
    >>> metric.compute(predictions=[0, 1, 1], references=[0, 1, 0])
    {'accuracy': 0.6666666666666666}
"""

_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, normalize: bool = True, sample_weight=None) -> dict[str, float]:
        correct = np.asarray(predictions) == np.asarray(references)
        weights = np.ones(len(correct)) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        total = float((correct * weights).sum())
        if not normalize:
            return {"accuracy": total}
        return {"accuracy": total / float(weights.sum()) if weights.sum() > 0 else float("nan")}  # NaN: nothing scored
