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
    """A classifier's validation split, encoded once, and the fp32 model's logits on it.

    The tuning code asks an evaluator (this one, or `LMEvaluator` for causal LMs) what the
    primary metric is, how far a candidate fell from fp32 (`drop`), what a tolerance allows,
    which of two candidates is better and how sensitive one layer is; it never reads a
    metric by name itself.
    """

    primary = "accuracy"
    sensitivity_key = "logit_mse"  # the key of each layer's score in tuning records
    sensitivity_label = "logit MSE"

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

    def sensitivity(self, directory: Path, device: str | None = None) -> float:
        """How much the candidate in `directory` (one layer quantized) departs from fp32."""
        return self.logit_error(directory, device)

    def drop(self, metrics: dict[str, float]) -> float:
        """How much worse than fp32 `metrics` are, in the unit the tolerance allows (a fraction of accuracy)."""
        return self.baseline["accuracy"] - metrics["accuracy"]

    def allowed(self, tolerance) -> float:
        return tolerance.allowed(self.baseline["accuracy"])

    def better(self, a: dict[str, float], b: dict[str, float]) -> bool:
        return a["accuracy"] > b["accuracy"]

    def step_record(self, metrics: dict[str, float]) -> dict[str, Any]:
        return {"accuracy": metrics["accuracy"], "drop_points": round(100 * self.drop(metrics), 4),
                "agreement": metrics["agreement"]}

    def validation_summary(self, before: dict, after: dict) -> dict[str, Any]:
        return {"before": before, "after": after, "drop_points": round(100 * (before["accuracy"] - after["accuracy"]), 4)}

    def fallback_keys(self) -> tuple[str, str]:
        """Manifest keys of a fallback layer's sensitivity and of the metric after it fell back."""
        return "sensitivity_logit_mse", "accuracy_after_fallback"

    def describe(self, metrics: dict[str, float]) -> str:
        return f"validation accuracy {metrics['accuracy']:.4f}"

    def headline(self, tolerance, search) -> str:
        base = f"fp32 validation accuracy: {self.baseline['accuracy']:.4f} (n={self.baseline['n']}). Tolerance: {tolerance}"
        return f"{base} (allowed drop {100 * search.allowed:.2f} points)." if search else f"{base}."

    step_headers = ("accuracy", "drop (points)", "agreement with fp32")

    def step_cells(self, step: dict) -> tuple[str, ...]:
        return f"{step['accuracy']:.4f}", f"{step['drop_points']:.2f}", f"{step['agreement']:.4f}"


class LMEvaluator:
    """A causal LM's validation text, encoded once, and the fp32 model's perplexity on it.

    The tolerance is a relative perplexity increase; a layer's sensitivity is the perplexity
    increase on the first `--sensitivity-samples` windows (at most 32) when only that layer
    is quantized: the measured effect itself, and cheap to keep (no logits are stored).
    """

    primary = "perplexity"
    sensitivity_key = "perplexity_increase"
    sensitivity_label = "perplexity increase on the sensitivity windows"
    MAX_SENSITIVITY_WINDOWS = 32

    def __init__(self, task, data, reference: Path, cfg, device: str):
        from compress.lm_data import TokenStream

        self.task, self.cfg, self.device, self.reference = task, cfg, device, Path(reference)
        self.data_fingerprint = data.fingerprint
        runner = self.runner(reference)
        self.tokenizer = runner.tokenizer
        self.split = task.encode(data, runner.tokenizer, cfg, model_config=runner.config, splits=("validation",))["validation"]
        s = self.split
        n = min(cfg.sensitivity_samples, self.MAX_SENSITIVITY_WINDOWS)
        step = max(1, min(s.stride, s.block - 1))
        end = min(len(s.tokens), s.block + (n - 1) * step)
        self.subset = TokenStream(s.tokens[:end], chars=max(1, round(s.chars * end / len(s.tokens))), block=s.block,
                                  stride=s.stride)
        self.baseline = self._score(runner, self.split)
        self.baseline_subset = self._score(runner, self.subset)["perplexity"]

    def _score(self, runner, split) -> dict[str, float]:
        return self.task.evaluate_runner(runner, split, self.cfg.eval_batch_size)

    def runner(self, directory: Path, device: str | None = None):
        return load_runner(directory, device=device or self.device, threads=self.cfg.threads,
                           trust_remote_code=self.cfg.trust_remote_code)

    def validation(self, directory: Path, device: str | None = None) -> dict[str, float]:
        """perplexity, nll, bits_per_char, tokens and chars on the validation split."""
        return self._score(self.runner(directory, device), self.split)

    def sensitivity(self, directory: Path, device: str | None = None) -> float:
        return self._score(self.runner(directory, device), self.subset)["perplexity"] - self.baseline_subset

    def drop(self, metrics: dict[str, float]) -> float:
        """The perplexity increase over fp32 (in perplexity units)."""
        return metrics["perplexity"] - self.baseline["perplexity"]

    def allowed(self, tolerance) -> float:
        return tolerance.allowed(self.baseline["perplexity"])

    def better(self, a: dict[str, float], b: dict[str, float]) -> bool:
        return a["perplexity"] < b["perplexity"]

    def increase_pct(self, metrics: dict[str, float]) -> float:
        return round(100 * (metrics["perplexity"] / self.baseline["perplexity"] - 1), 4)

    def step_record(self, metrics: dict[str, float]) -> dict[str, Any]:
        return {"perplexity": metrics["perplexity"], "increase_pct": self.increase_pct(metrics),
                "bits_per_char": metrics["bits_per_char"]}

    def validation_summary(self, before: dict, after: dict) -> dict[str, Any]:
        return {"before": before, "after": after, "perplexity_increase_pct": self.increase_pct(after)}

    def fallback_keys(self) -> tuple[str, str]:
        return "sensitivity_perplexity_increase", "perplexity_after_fallback"

    def describe(self, metrics: dict[str, float]) -> str:
        return f"validation perplexity {metrics['perplexity']:.4f}"

    def headline(self, tolerance, search) -> str:
        b = self.baseline
        base = (f"fp32 validation perplexity: {b['perplexity']:.4f} ({b['tokens']} tokens, {b['bits_per_char']:.4f} "
                f"bits per character). Tolerance: {tolerance} of it")
        return f"{base} (allowed increase {search.allowed:.4f})." if search else f"{base}."

    step_headers = ("perplexity", "increase (%)", "bits per character")

    def step_cells(self, step: dict) -> tuple[str, ...]:
        return f"{step['perplexity']:.4f}", f"{step['increase_pct']:.2f}", f"{step['bits_per_char']:.4f}"


def make_evaluator(task, data, reference: Path, cfg, device: str):
    """The evaluator for artifacts of `task`: perplexity for a causal LM, accuracy otherwise."""
    if task.higher_is_better:
        return Evaluator(data, reference, cfg, device)
    return LMEvaluator(task, data, reference, cfg, device)


@dataclass
class Candidate:
    """One quantized model written to `directory`, with what it measured."""

    directory: Path
    exclude: list[str]
    info: dict[str, Any]
    metrics: dict[str, float]
    latency: dict[str, Any] | None = None


def drop_of(evaluator, metrics: dict[str, float]) -> float:
    return evaluator.drop(metrics)


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
    search = Search(allowed=evaluator.allowed(tolerance))
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
        err = evaluator.sensitivity(probe, run_device)
        search.sensitivity.append({"layer": layer, evaluator.sensitivity_key: err})
        print(f"  sensitivity {i + 1}/{len(layers)}: {layer}: {evaluator.sensitivity_label} {err:.3g} when only it "
              "is quantized", flush=True)
    shutil.rmtree(probe, ignore_errors=True)
    ranked = sorted(search.sensitivity, key=lambda s: -s[evaluator.sensitivity_key])

    exclude: list[str] = []
    for n, s in enumerate(ranked[:limit], start=1):
        exclude = exclude + [s["layer"]]
        d = work / f"step-{n}"
        info = build(method, job, d, exclude)
        cand = Candidate(d, list(exclude), info, evaluator.validation(d, run_device))
        search.steps.append(_step(n, s, cand, evaluator))
        met = drop_of(evaluator, cand.metrics) <= search.allowed + 1e-12
        # Keep the best model seen; on a tie the one with fewer fallbacks (found first).
        if met or evaluator.better(cand.metrics, best.metrics):
            shutil.rmtree(best.directory, ignore_errors=True)
            best = cand
        else:
            shutil.rmtree(d, ignore_errors=True)
        if met:
            search.met = True
            break
    return best, search


def _step(n: int, sens: dict | None, cand: Candidate, evaluator) -> dict[str, Any]:
    return {"step": n, "fallback_layer": sens["layer"] if sens else None,
            "sensitivity": sens[evaluator.sensitivity_key] if sens else None, "fallback_count": len(cand.exclude),
            **evaluator.step_record(cand.metrics)}


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

def tuning_markdown(evaluator, tolerance, search: Search | None, auto_rows: list[dict] | None,
                    chosen: Candidate) -> str:
    """The human-readable account of accuracy-aware mode / auto, written as tuning.md."""
    lines = ["# Quantization tuning", "", evaluator.headline(tolerance, search), ""]
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
        key, label = evaluator.sensitivity_key, evaluator.sensitivity_label
        lines += ["## Fallback steps", "", f"| step | layer returned to full precision | sensitivity ({label}) "
                  f"| fallback layers | {' | '.join(evaluator.step_headers)} |", "|---|---|---|---|---|---|---|"]
        for s in search.steps:
            sens = "" if s["sensitivity"] is None else f"{s['sensitivity']:.3g}"
            lines.append(f"| {s['step']} | {s['fallback_layer'] or '(all quantized)'} | {sens} | {s['fallback_count']} | "
                         f"{' | '.join(evaluator.step_cells(s))} |")
        lines += ["", "Goal met." if search.met else "Goal NOT met: the most accurate candidate was kept.", ""]
        if search.sensitivity:
            lines += ["## Layer sensitivity", "", f"{label[0].upper() + label[1:]} against fp32 when only "
                      f"this layer is quantized{' (sensitivity subset)' if key == 'logit_mse' else ''}.", "",
                      f"| layer | {label} |", "|---|---|"]
            for s in sorted(search.sensitivity, key=lambda s: -s[key]):
                lines.append(f"| {s['layer']} | {s[key]:.4g} |")
            lines.append("")
    lines.append(f"Kept: {chosen.info.get('method', '')} with {len(chosen.exclude)} fallback layer(s): "
                 f"{', '.join(chosen.exclude) or 'none'}; {evaluator.describe(chosen.metrics)}.")
    return "\n".join(lines) + "\n"
