"""`compress eval`: the task's metrics of any artifact on a dataset split: accuracy and
macro-F1 for a classifier; perplexity, NLL per token and bits per character for a causal LM."""

from __future__ import annotations

import json
from typing import Literal

from pydantic import Field

from compress.artifacts import atomic_write, check_output
from compress.config import RuntimeConfig
from compress.data import DataConfig
from compress.lineage import inherits_data
from compress.runners import load_runner
from compress.tasks.registry import task_for_artifact


class EvalConfig(RuntimeConfig, DataConfig):
    """Evaluate an artifact on one split."""

    renamed = {"batch_size": "eval_batch_size"}
    model: str = Field(..., description="artifact directory (PyTorch, ONNX, int8, ...)")
    split: Literal["train", "validation", "test"] = Field("test", description="which split to score")
    out: str | None = Field(None, description="write the metrics as JSON to this file")


@inherits_data("model")
def evaluate(cfg: EvalConfig) -> dict:
    """Score `cfg.model` on `cfg.split`; return {model, format, task, dataset, split, **metrics}."""
    from compress.hardware import resolve_device

    if cfg.out:
        check_output(cfg.out, force=True, directory=False)  # a metrics file is replaced, but its place must be writable
    task = task_for_artifact(cfg.model, cfg.task)
    runner = load_runner(cfg.model, device=resolve_device(cfg.device), threads=cfg.threads,
                         trust_remote_code=cfg.trust_remote_code)
    data = task.load_data(cfg)
    split = task.encode(data, runner.tokenizer, cfg, model_config=runner.config, splits=(cfg.split,))[cfg.split]
    metrics = task.evaluate_runner(runner, split, cfg.eval_batch_size)
    result = {"model": str(cfg.model), "format": runner.format, "task": task.name, "dataset": data.source,
              "split": cfg.split, **metrics}
    if cfg.out:
        atomic_write(cfg.out, json.dumps(result, indent=2) + "\n")
    return result
