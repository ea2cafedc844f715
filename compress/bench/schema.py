"""The shape of results.json: the quality block, how its metrics read, and reading old files.

Every artifact carries a `quality` block, whatever its task:

    {"task": "causal-lm", "metrics": {"perplexity": 31.2, "nll": 3.44, ...},
     "primary": "perplexity", "higher_is_better": false}

Renderers and `analysis.derive` read only this block. `normalise` turns a results dict
of any schema version this compress reads into the current shape, so it is the one
place that knows about version 1 (top-level `accuracy`, `macro_f1`, `n`, no block).
docs/results-schema.md is the contract.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)


def task_primary(task: str) -> tuple[str | None, bool | None]:
    """(primary metric, higher_is_better) of a task, as its Task object (compress.tasks) says;
    (None, None) for a task this compress does not know."""
    from compress.tasks.registry import TASKS

    cls = TASKS.get(task)
    return (cls.primary_metric, cls.higher_is_better) if cls else (None, None)


# Classification artifacts also keep these metrics as top-level keys, as schema 1 had them,
# so that readers written against version 1 keep working.
LEGACY_TOP_LEVEL = {"classification": ("accuracy", "macro_f1", "n")}


@dataclass(frozen=True)
class Metric:
    """How the reports show one metric.

    Attributes:
        header: column header in the models table.
        label: the metric in running text and plot axes ("perplexity").
        fraction: a value in [0, 1] shown as a percentage; compared with the baseline as a
            difference in percentage points (`<name>_delta_pts`) rather than as a ratio.
        digits: decimals shown when not a fraction.
        count: a number of things scored (examples, tokens); shown in the summary when every
            artifact agrees on it, else as a column. The word is the unit ("examples").
    """

    header: str
    label: str
    fraction: bool = False
    digits: int = 4
    count: str | None = None


METRICS = {
    "accuracy": Metric("Accuracy %", "accuracy", fraction=True),
    "macro_f1": Metric("Macro-F1 %", "macro-F1", fraction=True),
    "n": Metric("Examples", "examples", count="examples"),
    "perplexity": Metric("Perplexity", "perplexity", digits=2),
    "nll": Metric("NLL nats/token", "NLL", digits=4),
    "bits_per_char": Metric("Bits/char", "bits/char", digits=4),
    "tokens": Metric("Tokens", "tokens", count="tokens"),
    "chars": Metric("Characters", "characters", count="characters"),
}


def metric_info(name: str) -> Metric:
    """Display information for a metric; an unknown one shows under its own name."""
    return METRICS.get(name) or Metric(name, name.replace("_", " "))


def quality_block(task: str, metrics: dict, primary: str | None = None,
                  higher_is_better: bool | None = None) -> dict:
    """The `quality` object of one artifact.

    Args:
        task: the task's name (`classification`, `causal-lm`, ...).
        metrics: {metric name: value} as the task's evaluation returned them.
        primary: the metric artifacts are ranked by; default the task's (`task_primary`).
        higher_is_better: its direction; default the task's.

    Returns:
        {task, metrics, primary, higher_is_better}.
    """
    default_primary, default_direction = task_primary(task)
    primary = primary or default_primary
    higher_is_better = default_direction if higher_is_better is None else higher_is_better
    if primary is None or higher_is_better is None:
        raise ValueError(f"task '{task}' has no known primary metric: pass primary and higher_is_better")
    if primary not in metrics:
        raise ValueError(f"primary metric '{primary}' is not among the metrics {sorted(metrics)}")
    return {"task": task, "metrics": dict(metrics), "primary": primary, "higher_is_better": bool(higher_is_better)}


def quality_fields(quality: dict) -> dict:
    """The keys an artifact's result gets from its quality block: `quality` itself, plus
    the schema-1 top-level metrics for tasks that had them (classification)."""
    legacy = LEGACY_TOP_LEVEL.get(quality["task"], ())
    return {**{k: quality["metrics"].get(k) for k in legacy}, "quality": quality}


def primary_comparison(quality: dict | None, base: dict | None) -> dict | None:
    """The artifact's primary metric against the baseline's: delta, ratio, relative change.

    Returns None when either side lacks a value or the two rank by different metrics.
    `delta_pts` (percentage points) is given for fraction metrics such as accuracy, and
    is null otherwise; for those, read `ratio` and `change_pct` (perplexity 1.08 = 8 % worse).
    """
    if not quality or not base or quality["primary"] != base["primary"]:
        return None
    name = quality["primary"]
    a, b = quality["metrics"].get(name), base["metrics"].get(name)
    if a is None or b is None:
        return None
    return {"metric": name, "higher_is_better": quality["higher_is_better"],
            "delta": round(a - b, 6),
            "delta_pts": round((a - b) * 100, 2) if metric_info(name).fraction else None,
            "ratio": round(a / b, 4) if b else None,
            "change_pct": round((a / b - 1) * 100, 2) if b else None}


def normalise_artifact(art: dict) -> dict:
    """Give a schema-1 artifact (top-level accuracy/macro_f1/n) its quality block, in place."""
    if art.get("quality") is None and art.get("accuracy") is not None:
        metrics = {k: art.get(k) for k in LEGACY_TOP_LEVEL["classification"] if art.get(k) is not None}
        art["quality"] = quality_block("classification", metrics)
    return art


def normalise(results: dict) -> dict:
    """A copy of `results` in the current shape, whatever version this compress reads.

    Version 1 artifacts get their quality block (task classification) and their
    `vs_baseline` its `primary` comparison; the file's own version is kept in
    `read_from_schema_version`. Idempotent.
    """
    out = copy.deepcopy(results)
    version = out.get("schema_version")
    out.setdefault("read_from_schema_version", version)
    for art in out.get("artifacts", []):
        normalise_artifact(art)
    by_name = {a["name"]: a for a in out.get("artifacts", [])}
    base = by_name.get(out.get("baseline") or "")
    for art in out.get("artifacts", []):
        vs = art.get("vs_baseline")
        if vs is not None and "primary" not in vs:
            vs["primary"] = primary_comparison(art.get("quality"), (base or {}).get("quality"))
    out["schema_version"] = SCHEMA_VERSION
    return out


def report_primary(results: dict) -> tuple[str, bool] | None:
    """(metric, higher_is_better) the report ranks by: the baseline's primary metric, else
    the first artifact's. None when no artifact has a quality block."""
    by_name = {a["name"]: a for a in results.get("artifacts", [])}
    ordered = [by_name.get(results.get("baseline") or "")] + list(results.get("artifacts", []))
    for art in ordered:
        if art and art.get("quality"):
            return art["quality"]["primary"], art["quality"]["higher_is_better"]
    return None
