"""Accuracy, shipped with compress because `evaluate` cannot fetch metric scripts offline.

Loaded with `evaluate.load(<this directory>)`. Keep one import per line: evaluate's
import scanner misreads `import a, b`.
Self-contained on purpose: evaluate copies this one file into its module cache, so it
cannot import a helper shared with the other metric module.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Accuracy: the fraction of predictions equal to the references."
_KWARGS = "predictions: list of int, references: list of int"


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("int64"),
                                        "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references):
        p = np.asarray(predictions)
        r = np.asarray(references)
        return {"accuracy": float((p == r).mean()) if len(r) else 0.0}
