"""Accuracy-aware quantization and `--method auto`.

Accuracy-aware mode quantizes everything, scores the validation split and, when the drop
is larger than allowed, ranks the quantized layers by sensitivity and returns the most
sensitive ones to full precision, one at a time, until the drop is within tolerance.

Sensitivity of layer L = the logit error (mean squared difference to the fp32 logits,
on a validation subset) of the model in which only L is quantized. One layer at a time
measures each layer's own damage, so one broken layer does not drown the ranking of the
rest; and the logit error is a far less noisy signal than accuracy on a few hundred
examples.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from compress.artifacts import MANIFEST
from compress.data import EncodedSplit, check_labels, tokenize
from compress.metrics import classification_metrics

# What a method's info holds that runners read from the manifest's top level (how to load and
# run the artifact): written for each candidate here, and for the chosen one by the stage.
RUNNER_KEYS = ("format", "onnx_file", "dtype", "ort_session_config")
from compress.runners import load_runner, score


class Evaluator:
    """The validation split, encoded once, and the fp32 model's logits on it."""

    def __init__(self, data, reference: Path, cfg, device: str):
        self.cfg, self.device, self.reference = cfg, device, Path(reference)
        self.data_fingerprint = data.fingerprint
        runner = load_runner(reference, device=device, threads=cfg.threads, trust_remote_code=cfg.trust_remote_code)
        self.tokenizer = runner.tokenizer
        mapping = check_labels(data, getattr(runner.config, "label2id", None), runner.config.num_labels)
        ds = data["validation"]
        self.split = EncodedSplit(tokenize(ds, self.tokenizer, cfg.max_length, data.has_pair, mapping))
        small = ds.select(range(min(len(ds), cfg.sensitivity_samples)))
        self.subset = EncodedSplit(tokenize(small, self.tokenizer, cfg.max_length, data.has_pair, mapping))
        self.num_labels = runner.config.num_labels
        self.reference_logits = score(runner, self.split, cfg.eval_batch_size)
        self.reference_subset = score(runner, self.subset, cfg.eval_batch_size)
        self.baseline = self._metrics(self.reference_logits)

    def _metrics(self, logits: np.ndarray) -> dict[str, float]:
        m = classification_metrics(logits, self.split.labels, self.num_labels)
        m["agreement"] = round(float((logits.argmax(-1) == self.reference_logits.argmax(-1)).mean())
                               if hasattr(self, "reference_logits") else 1.0, 6)
        return m

    def runner(self, directory: Path, device: str | None = None):
        return load_runner(directory, device=device or self.device, threads=self.cfg.threads,
                           trust_remote_code=self.cfg.trust_remote_code)

    def validation(self, directory: Path, device: str | None = None) -> dict[str, float]:
        """accuracy, macro_f1, n and agreement with the fp32 predictions on the validation split."""
        return self._metrics(score(self.runner(directory, device), self.split, self.cfg.eval_batch_size))

    def logit_error(self, directory: Path, device: str | None = None) -> float:
        """Mean squared logit difference to fp32 on the sensitivity subset."""
        logits = score(self.runner(directory, device), self.subset, self.cfg.eval_batch_size)
        return float(np.mean((logits.astype(np.float64) - self.reference_subset) ** 2))


@dataclass
class Candidate:
    """One quantized model written to `directory`, with what it measured."""

    directory: Path
    exclude: list[str]
    info: dict[str, Any]
    metrics: dict[str, float]
    latency: dict[str, Any] | None = None


def drop_of(evaluator: Evaluator, metrics: dict[str, float]) -> float:
    return evaluator.baseline["accuracy"] - metrics["accuracy"]


def build(method, job, directory: Path, exclude: list[str]) -> dict[str, Any]:
    """Run `method` into a fresh `directory`, with a provisional manifest so that load_runner
    picks the right runner (the stage writes the full manifest at the end)."""
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    info = method.build(job, directory, exclude)
    keys = {k: info[k] for k in RUNNER_KEYS if k in info}
    (directory / MANIFEST).write_text(json.dumps({"stage": "quantize", **keys}) + "\n")
    return info


def plain(method, job, work: Path, evaluator: Evaluator, name: str = "plain") -> Candidate:
    """Quantize every layer the method can, and score the result."""
    d = work / name
    info = build(method, job, d, [])
    return Candidate(d, [], info, evaluator.validation(d, info.get("run_device")))


@dataclass
class Search:
    """What accuracy-aware mode did: sensitivities, the fallback steps, and whether it met the goal."""

    allowed: float
    met: bool = False
    sensitivity: list[dict[str, Any]] = field(default_factory=list)
    steps: list[dict[str, Any]] = field(default_factory=list)


def accuracy_aware(method, job, work: Path, evaluator: Evaluator, tolerance) -> tuple[Candidate, Search]:
    """Quantize, then fall back the most sensitive layers until the drop is within `tolerance`.

    Returns the chosen candidate (the first that meets the goal, else the most accurate
    one seen) and the search record. Candidates that lose are deleted as it goes.
    """
    cfg = job.cfg
    search = Search(allowed=tolerance.allowed(evaluator.baseline["accuracy"]))
    best = plain(method, job, work, evaluator, "step-0")
    run_device = best.info.get("run_device")
    search.steps.append(_step(0, None, best, evaluator))
    if drop_of(evaluator, best.metrics) <= search.allowed + 1e-12:
        search.met = True
        return best, search
    layers = method.layers(job) if method.can_fall_back else []
    limit = len(layers) if cfg.max_fallback is None else min(cfg.max_fallback, len(layers))
    if limit == 0:
        return best, search

    probe = work / "probe"
    for i, layer in enumerate(layers):
        # Only this layer quantized: its own damage, not its share of everyone else's.
        build(method, job, probe, [other for other in layers if other != layer])
        err = evaluator.logit_error(probe, run_device)
        search.sensitivity.append({"layer": layer, "logit_mse": err})
        print(f"  sensitivity {i + 1}/{len(layers)}: {layer}: logit MSE {err:.3g} when only it is quantized", flush=True)
    shutil.rmtree(probe, ignore_errors=True)
    ranked = sorted(search.sensitivity, key=lambda s: -s["logit_mse"])

    exclude: list[str] = []
    for n, s in enumerate(ranked[:limit], start=1):
        exclude = exclude + [s["layer"]]
        d = work / f"step-{n}"
        info = build(method, job, d, exclude)
        cand = Candidate(d, list(exclude), info, evaluator.validation(d, run_device))
        search.steps.append(_step(n, s, cand, evaluator))
        met = drop_of(evaluator, cand.metrics) <= search.allowed + 1e-12
        # Keep the most accurate model seen; on a tie the one with fewer fallbacks (found first).
        if met or cand.metrics["accuracy"] > best.metrics["accuracy"]:
            shutil.rmtree(best.directory, ignore_errors=True)
            best = cand
        else:
            shutil.rmtree(d, ignore_errors=True)
        if met:
            search.met = True
            break
    return best, search


def _step(n: int, sens: dict | None, cand: Candidate, evaluator: Evaluator) -> dict[str, Any]:
    return {"step": n, "fallback_layer": sens["layer"] if sens else None,
            "sensitivity": sens["logit_mse"] if sens else None, "fallback_count": len(cand.exclude),
            "accuracy": cand.metrics["accuracy"], "drop_points": round(100 * drop_of(evaluator, cand.metrics), 4),
            "agreement": cand.metrics["agreement"]}


# --------------------------------------------------------------------------- --method auto

def measure_latency(runner, tokenizer, texts: list[str], max_length: int) -> dict[str, Any]:
    """p50 latency at batch 1 and sequence length min(128, max_length), with the shared timer."""
    from compress.bench.measure import latency, make_batch, timer_for

    batch = make_batch(tokenizer, texts[:1], 1, min(128, max_length))
    result = latency(lambda: runner.logits(batch), warmup=3, budget_s=2.0, min_iters=10,
                     timer=timer_for(runner.device))
    return {"batch_size": 1, "seq_len": min(128, max_length), **result}


def auto(methods, make_job, work: Path, evaluator: Evaluator, tolerance, texts: list[str]
         ) -> tuple[Candidate | None, list[dict[str, Any]], float]:
    """Try each method, keep the fastest whose drop is within `tolerance`.

    Returns (chosen candidate or None, one row per method tried, allowed drop). When no
    method meets the goal the most accurate candidate is returned with met=False rows.
    """
    from compress.errors import UserError

    allowed = tolerance.allowed(evaluator.baseline["accuracy"])
    rows: list[dict[str, Any]] = []
    reference = evaluator.runner(evaluator.reference)
    base_lat = measure_latency(reference, evaluator.tokenizer, texts, evaluator.cfg.max_length)
    rows.append({"method": "fp32", "accuracy": evaluator.baseline["accuracy"], "drop_points": 0.0,
                 "p50_ms": base_lat["p50_ms"], "met": True, "note": "the input model"})
    kept: list[Candidate] = []
    for method in methods:
        try:
            job = make_job(method)
            cand = plain(method, job, work, evaluator, method.name)
        except UserError as err:
            rows.append({"method": method.name, "skipped": str(err)})
            continue
        cand.info["method"] = method.name
        runner = evaluator.runner(cand.directory, cand.info.get("run_device"))
        cand.latency = measure_latency(runner, evaluator.tokenizer, texts, evaluator.cfg.max_length)
        drop = drop_of(evaluator, cand.metrics)
        rows.append({"method": method.name, "accuracy": cand.metrics["accuracy"], "drop_points": round(100 * drop, 4),
                     "p50_ms": cand.latency["p50_ms"], "met": drop <= allowed + 1e-12})
        print(f"  auto: {method.name}: accuracy {cand.metrics['accuracy']:.4f} (drop {100 * drop:.2f} points), "
              f"p50 {cand.latency['p50_ms']:.2f} ms", flush=True)
        kept.append(cand)
    meeting = [c for c in kept if drop_of(evaluator, c.metrics) <= allowed + 1e-12]
    if meeting:
        chosen = min(meeting, key=lambda c: c.latency["p50_ms"])
    elif kept:
        chosen = max(kept, key=lambda c: c.metrics["accuracy"])
    else:
        chosen = None
    for c in kept:
        if c is not chosen:
            shutil.rmtree(c.directory, ignore_errors=True)
    return chosen, rows, allowed


# --------------------------------------------------------------------------- explanation

def tuning_markdown(baseline: dict, tolerance, search: Search | None, auto_rows: list[dict] | None,
                    chosen: Candidate) -> str:
    """The human-readable account of accuracy-aware mode / auto, written as tuning.md."""
    lines = ["# Quantization tuning", "",
             f"fp32 validation accuracy: {baseline['accuracy']:.4f} (n={baseline['n']}). "
             f"Tolerance: {tolerance} (allowed drop {100 * (search.allowed if search else 0):.2f} points)."
             if search else f"fp32 validation accuracy: {baseline['accuracy']:.4f} (n={baseline['n']}). Tolerance: {tolerance}.",
             ""]
    if auto_rows is not None:
        lines += ["## Methods tried (--method auto)", "", "| method | accuracy | drop (points) | p50 ms (b1) | meets goal |",
                  "|---|---|---|---|---|"]
        for r in auto_rows:
            if "skipped" in r:
                lines.append(f"| {r['method']} | - | - | - | skipped: {r['skipped'][:120]} |")
            else:
                lines.append(f"| {r['method']} | {r['accuracy']:.4f} | {r['drop_points']:.2f} | {r['p50_ms']:.2f} | "
                             f"{'yes' if r['met'] else 'no'} |")
        lines.append("")
    if search is not None:
        lines += ["## Fallback steps", "", "| step | layer returned to full precision | sensitivity (logit MSE) "
                  "| fallback layers | accuracy | drop (points) | agreement with fp32 |", "|---|---|---|---|---|---|---|"]
        for s in search.steps:
            sens = "" if s["sensitivity"] is None else f"{s['sensitivity']:.3g}"
            lines.append(f"| {s['step']} | {s['fallback_layer'] or '(all quantized)'} | {sens} | {s['fallback_count']} | "
                         f"{s['accuracy']:.4f} | {s['drop_points']:.2f} | {s['agreement']:.4f} |")
        lines += ["", "Goal met." if search.met else "Goal NOT met: the most accurate candidate was kept.", ""]
        if search.sensitivity:
            lines += ["## Layer sensitivity", "", "Logit MSE against fp32 on the sensitivity subset when only "
                      "this layer is quantized.", "", "| layer | logit MSE |", "|---|---|"]
            for s in sorted(search.sensitivity, key=lambda s: -s["logit_mse"]):
                lines.append(f"| {s['layer']} | {s['logit_mse']:.4g} |")
            lines.append("")
    lines.append(f"Kept: {chosen.info.get('method', '')} with {len(chosen.exclude)} fallback layer(s): "
                 f"{', '.join(chosen.exclude) or 'none'}; validation accuracy {chosen.metrics['accuracy']:.4f}.")
    return "\n".join(lines) + "\n"
