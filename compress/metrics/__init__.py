"""Task metrics through `evaluate`, from the metric modules shipped in this folder."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


@functools.lru_cache(maxsize=None)
def load_metric(name: str):
    import evaluate

    return evaluate.load(str(HERE / name))


def classification_metrics(logits: np.ndarray, labels: np.ndarray, num_labels: int | None = None) -> dict[str, float]:
    """accuracy and macro-F1 of argmax(logits) against labels."""
    preds = np.asarray(logits).argmax(-1)
    labels = np.asarray(labels)
    acc = load_metric("accuracy").compute(predictions=preds, references=labels)["accuracy"]
    f1 = load_metric("f1").compute(predictions=preds, references=labels, average="macro",
                                   num_labels=num_labels or int(np.asarray(logits).shape[-1]))["f1"]
    return {"accuracy": round(float(acc), 6), "macro_f1": round(float(f1), 6), "n": int(len(labels))}
