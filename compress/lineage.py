"""Which data an artifact was made from, and the stages that follow it.

Every stage's manifest records its resolved config, DataConfig fields included (dataset,
columns, max length, ...). A stage that reads an artifact and is given no dataset reads the
data recorded there, so a student is distilled, exported, quantized and benchmarked on the
teacher's data without naming it again. A stage given other data than its input artifact
was made from runs on what it was given, and says so.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any, Callable

from compress import distributed as dist
from compress.artifacts import read_manifest
from compress.data import DataConfig

# What makes two data configs the same data (max_length and max_examples only cut it).
IDENTITY = ("dataset", "text_column", "text_pair_column", "label_column", "task")


def recorded_data(artifact: str | Path) -> dict[str, Any] | None:
    """The DataConfig fields in the manifest's config of `artifact`, or None (no manifest, or
    an artifact not made from data compress knows)."""
    path = Path(artifact)
    config = (read_manifest(path).get("config") or {}) if path.is_dir() else {}
    if not isinstance(config, dict) or "dataset" not in config:
        return None
    return {k: config[k] for k in DataConfig.model_fields if k in config}


def describe(values: dict[str, Any]) -> str:
    """'dataset' plus the columns that are not the defaults, for messages and plans."""
    defaults = DataConfig.model_fields
    extra = [f"{k}={values[k]}" for k in IDENTITY[1:] if k in values and values[k] != defaults[k].default]
    return f"'{values.get('dataset')}'" + (f" ({', '.join(extra)})" if extra else "")


def differs(mine: dict[str, Any], theirs: dict[str, Any]) -> bool:
    defaults = {k: DataConfig.model_fields[k].default for k in IDENTITY}
    for k in IDENTITY:
        a, b = mine.get(k, defaults[k]), theirs.get(k, defaults[k])
        # An unset task or dataset means "the model's own" (its task, the task's built-in data):
        # only two named ones can disagree.
        if k in ("task", "dataset") and (a is None or b is None):
            continue
        if a != b:
            return True
    return False


def _say(message: str) -> None:
    if dist.is_main():
        print(message, file=sys.stderr, flush=True)


def resolve(cfg: DataConfig, artifacts: list[str | Path], stage: str) -> DataConfig:
    """`cfg` with the data of its input artifacts applied.

    Given no dataset, the stage takes the DataConfig fields recorded by the first artifact
    that has them (fields it was given stay). Given a dataset, every input artifact whose
    data differs gets a warning that names both.
    """
    recorded = [(a, d) for a in artifacts if (d := recorded_data(a)) is not None]
    if not recorded:
        return cfg
    given = cfg.model_fields_set
    task = DataConfig.model_fields["task"].default
    if "dataset" not in given and "task" in given and recorded[0][1].get("task", task) != cfg.task:
        return cfg  # asked for another task than the input's: its data is not this stage's (the stage says why)
    if "dataset" not in given:
        artifact, data = recorded[0]
        update = {k: v for k, v in data.items() if k not in given and k in type(cfg).model_fields}
        _say(f"compress {stage}: no dataset given: reading {describe(data)}, the data '{artifact}' was made from "
             "(its manifest).")
        cfg = cfg.model_copy(update=update)
    mine = {k: getattr(cfg, k, None) for k in IDENTITY}
    for artifact, data in recorded:
        if differs(mine, data):
            _say(f"compress {stage}: warning: this stage reads {describe(mine)}, but its input '{artifact}' was made "
                 f"from {describe(data)}. Metrics on other data than the model was trained on may mislead; pass the "
                 "same --dataset (and columns), or drop --dataset to use the input's.")
    return cfg


def inherits_data(inputs: str | Callable[[Any], list]):
    """Decorator for a stage function `fn(cfg)`: apply `resolve` with the stage's input
    artifacts before it runs.

    Args:
        inputs: the config field naming the input artifact, or a function cfg -> [artifact paths].
    """

    def wrap(fn):
        stage = fn.__module__.rsplit(".", 1)[-1]

        @functools.wraps(fn)
        def run(cfg, *args, **kwargs):
            return fn(resolve(cfg, input_artifacts(run, cfg), stage), *args, **kwargs)

        run.data_inputs = inputs
        return run

    return wrap


def input_artifacts(stage_fn, cfg) -> list[str]:
    """The input artifacts of a stage function decorated with `inherits_data`, for `cfg`
    (empty for a stage that reads none)."""
    inputs = getattr(stage_fn, "data_inputs", None)
    if inputs is None:
        return []
    paths = inputs(cfg) if callable(inputs) else [getattr(cfg, inputs, None)]
    return [str(p) for p in paths if p]
