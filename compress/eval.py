"""`compress eval`: accuracy and macro-F1 of any artifact on a dataset split."""

from __future__ import annotations

import json
from typing import Literal

from pydantic import Field

from compress.artifacts import atomic_write, check_output
from compress.data import DataConfig, check_labels, encode, load_data
from compress.metrics import classification_metrics
from compress.runners import load_runner, score


class EvalConfig(DataConfig):
    """Evaluate an artifact on one split."""

    model: str = Field(..., description="artifact directory (PyTorch, ONNX, int8, ...)")
    split: Literal["train", "validation", "test"] = Field("test", description="which split to score")
    batch_size: int = Field(64, ge=1, description="examples per batch")
    device: Literal["cpu", "cuda"] = Field("cpu", description="where to run")
    out: str | None = Field(None, description="write the metrics as JSON to this file")


def evaluate(cfg: EvalConfig) -> dict:
    """Score `cfg.model` on `cfg.split`; return {accuracy, macro_f1, n, ...}."""
    from compress.hardware import resolve_device

    if cfg.out:
        check_output(cfg.out, force=True, directory=False)  # a metrics file is replaced, but its place must be writable
    runner = load_runner(cfg.model, device=resolve_device(cfg.device))
    data = load_data(cfg)
    label2id = getattr(runner.config, "label2id", None)
    mapping = check_labels(data, label2id, runner.config.num_labels)
    split = encode(data, runner.tokenizer, cfg.max_length, mapping, splits=(cfg.split,))[cfg.split]
    metrics = classification_metrics(score(runner, split, cfg.batch_size), split.labels, runner.config.num_labels)
    result = {"model": str(cfg.model), "format": runner.format, "dataset": data.source, "split": cfg.split, **metrics}
    if cfg.out:
        atomic_write(cfg.out, json.dumps(result, indent=2) + "\n")
    return result
