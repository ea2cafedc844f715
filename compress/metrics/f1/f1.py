"""F1 (macro by default), shipped with compress because `evaluate` cannot fetch metric
scripts offline. Loaded with `evaluate.load(<this directory>)`. One import per line.
Self-contained on purpose: evaluate copies this one file into its module cache, so it
cannot import a helper shared with the other metric module.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "F1: harmonic mean of precision and recall; macro averages the per-class F1."
_KWARGS = "predictions: list of int, references: list of int, average: 'macro' | 'binary', num_labels: int"


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class F1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("int64"),
                                        "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, average="macro", num_labels=None, pos_label=1):
        p = np.asarray(predictions)
        r = np.asarray(references)
        n = num_labels or int(max(p.max(initial=0), r.max(initial=0)) + 1)

        def f1_of(c):
            tp = np.sum((p == c) & (r == c))
            fp = np.sum((p == c) & (r != c))
            fn = np.sum((p != c) & (r == c))
            return 0.0 if tp == 0 else float(2 * tp / (2 * tp + fp + fn))

        if average == "binary":
            return {"f1": f1_of(pos_label)}
        return {"f1": float(np.mean([f1_of(c) for c in range(n)]))}
