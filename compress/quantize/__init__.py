"""`compress quantize`: int8 / 4-bit / bf16 versions of a classifier or a causal LM, optionally
accuracy-aware (accuracy for a classifier, perplexity for a causal LM: the task's primary metric).

Each method is a small class with its own typed settings, in its own module, registered
under its CLI name (`compress.quantize.registry`); adding a method means adding that
module and importing it once below. A method writes its weights into a directory and says
which layers it could leave in full precision; everything else (calibration data,
evaluation before/after, the accuracy-aware fallback search, `--method auto`, the
manifest) lives here and in `tune.py` and is shared by all methods.

The methods' settings are also flat flags (`--calib-method`, `--per-channel`, ...), generated
from the settings classes: a flag the chosen method does not take is an error that names
the method and the settings it takes.
"""

from __future__ import annotations

import shutil
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from pydantic import Field, ValidationInfo, create_model, field_validator

from compress.artifacts import atomic_output, check_output, fingerprint, make_dir, read_manifest, weights_size, write_manifest
from compress.config import RuntimeConfig
from compress.data import DataConfig
from compress.errors import GateFailed, UserError
from compress.lineage import inherits_data
# The methods: importing a module registers its methods (one line per module).
from compress.quantize import bnb, cast, onnx_int8, onnx_nbits, torch_int8  # noqa: F401
from compress.quantize.onnx_int8 import MIN_CALIBRATION
from compress.quantize.registry import (METHODS, Job, Method, MethodSettings, auto_candidates, get_method,
                                        settings_for)


class _QuantizeStage(RuntimeConfig, DataConfig):
    """Quantize a classifier or causal-LM artifact."""

    renamed = {"batch_size": "eval_batch_size"}
    model: str = Field(..., description="artifact to quantize: a PyTorch classifier or causal-LM directory, or an ONNX artifact for the ort-* methods")
    out: str = Field(..., description="output artifact directory")
    method: str = Field(..., description=f"{', '.join(METHODS)}, or auto (the fastest that meets --max-drop)")
    max_drop: str | None = Field(None, description="quality tolerance on the validation split: for a classifier absolute accuracy points (1.0 = one point) or relative ('2%' of the fp32 accuracy); for a causal LM the relative perplexity increase ('5%'); layers fall back to full precision until it is met (auto: default 1.0)")
    max_fallback: int | None = Field(None, ge=0, description="at most this many layers fall back to full precision in accuracy-aware mode (default: no limit)")
    sensitivity_samples: int = Field(256, ge=8, description="validation examples used to rank layer sensitivity in accuracy-aware mode (a causal LM uses at most 32 windows)")

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        if v != "auto" and v not in METHODS:
            raise ValueError(f"unknown method (known methods: {', '.join(sorted(METHODS))}, auto)")
        return v

    @field_validator("max_drop", mode="before")
    @classmethod
    def _drop_number_as_text(cls, v):
        # YAML and --set give 0.5 as a float; the field keeps the user's text ("0.5" or "2%").
        return str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v

    @field_validator("max_drop")
    @classmethod
    def _drop_format(cls, v: str | None) -> str | None:
        if v is not None:
            parse_drop(v)
        return v


def _takes(method: type[Method]) -> str:
    fields = method.Settings.model_fields
    return ", ".join(fields) if fields else "no settings"


def _setting_taken(cls, value, info: ValidationInfo):
    """A method setting given for a method that does not take it is an error."""
    method = info.data.get("method")
    if value is None or method is None:  # unset, or the method itself is invalid (its own error says so)
        return value
    name = info.field_name
    if method == "auto":
        if not any(name in m.Settings.model_fields for m in auto_candidates()):
            raise ValueError(f"--method auto tries {', '.join(m.name for m in auto_candidates())}, and none of them "
                             f"takes {name}")
    elif name not in METHODS[method].Settings.model_fields:
        raise ValueError(f"--method {method} does not take {name}; it takes {_takes(METHODS[method])}")
    return value


def _setting_fields() -> dict[str, Any]:
    """One optional flat field per method setting (the union over the registered methods).

    Unset (None) means the method's own default. A setting shared by several methods is
    declared once, in a settings class they share, so its type is the same for all.
    """
    users: dict[str, list[str]] = {}
    infos: dict[str, Any] = {}
    for method in METHODS.values():
        for name, info in method.Settings.model_fields.items():
            users.setdefault(name, []).append(method.name)
            infos.setdefault(name, info)
    fields = {}
    for name, info in infos.items():
        annotation = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
        defaults = {m: METHODS[m].Settings.model_fields[name].default for m in users[name]}
        shown = next(iter(defaults.values())) if len(set(map(repr, defaults.values()))) == 1 else \
            ", ".join(f"{v} for {m}" for m, v in defaults.items())
        fields[name] = (typing.Optional[annotation],
                        Field(None, description=f"{info.description} ({', '.join(users[name])})",
                              json_schema_extra={"default_text": shown}))
    return fields


SETTING_NAMES = tuple(_setting_fields())
QuantizeConfig = create_model(
    "QuantizeConfig", __base__=_QuantizeStage, __module__=__name__, __doc__=_QuantizeStage.__doc__,
    __validators__={"_setting_taken": field_validator(*SETTING_NAMES)(_setting_taken)}, **_setting_fields())


def given_settings(cfg) -> dict[str, Any]:
    """The method settings the user set (flat flags or recipe keys), by name."""
    return {k: getattr(cfg, k) for k in SETTING_NAMES if getattr(cfg, k) is not None}


def method_settings(cfg, method: type[Method] | Method) -> MethodSettings:
    """`method`'s typed settings: what the user set that it takes, its own defaults for the rest.

    Under `--method auto` a setting applies to the candidates that take it.
    """
    given = given_settings(cfg)
    if cfg.method == "auto":
        given = {k: v for k, v in given.items() if k in method.Settings.model_fields}
    return settings_for(method, given)


@dataclass(frozen=True)
class Tolerance:
    """An allowed accuracy drop: absolute points, or a percentage of the fp32 accuracy."""

    value: float
    relative: bool

    def allowed(self, baseline_accuracy: float) -> float:
        """The allowed drop as a fraction of accuracy (0.01 = one point)."""
        return baseline_accuracy * self.value / 100 if self.relative else self.value / 100

    def __str__(self) -> str:
        return f"{self.value:g}%" if self.relative else f"{self.value:g} points"


def parse_drop(text: str | float) -> Tolerance:
    s = str(text).strip()
    relative = s.endswith("%")
    try:
        value = float(s.rstrip("%"))
    except ValueError:
        raise ValueError("must be a number of accuracy points like 1.0, or a relative drop like '2%'") from None
    if not (value >= 0):
        raise ValueError("must be zero or positive")
    return Tolerance(value, relative)


# --------------------------------------------------------------------------- the stage

@inherits_data("model")
def quantize(cfg: QuantizeConfig) -> Path:
    """Quantize `cfg.model` with `cfg.method` into `cfg.out`.

    Returns:
        The artifact directory, loadable with `compress.runners.load_runner`. Its manifest
        records the method, calibration set, quantized node/module counts, fallback layers
        and validation accuracy before and after.

    Raises:
        UserError: bad input or a method that cannot run on this device (nothing written).
        GateFailed: `--max-drop` could not be met; the best candidate found is still
            written to `cfg.out` (so it can be inspected or used), then this is raised.
    """
    import tempfile

    from compress.hardware import resolve_device
    from compress.models import check_model_dir
    from compress.quantize import tune
    from compress.tasks.registry import task_for_artifact

    out, src = check_output(cfg.out, cfg.force), Path(cfg.model)
    if not src.is_dir():
        raise UserError(f"The model directory '{src}' does not exist. Pass an artifact written by train, distill or export.")
    check_model_dir(src)
    task = task_for_artifact(src, cfg.task)
    device = resolve_device(cfg.device)
    fmt = source_format(src)
    if cfg.method == "auto":
        if task.name not in AUTO_TASKS:
            raise UserError(f"--method auto times classifier batches and is not available for {task.name} artifacts "
                            f"yet. Name a method: {', '.join(sorted(n for n, m in METHODS.items() if task.name in m.tasks))}.")
        methods = auto_methods(cfg, device, fmt, src)
    else:
        methods = [get_method(cfg.method)]
        check_task(methods[0], task, src)
        methods[0].check(method_settings(cfg, methods[0]), device)
        check_input(methods[0], fmt, src)
    settings = {m.name: method_settings(cfg, m) for m in methods}
    tolerance = parse_drop(cfg.max_drop or DEFAULT_AUTO_DROP) if (cfg.max_drop or cfg.method == "auto") else None
    if tolerance is not None and not task.higher_is_better and not tolerance.relative:
        raise UserError(f"For a {task.name} artifact --max-drop is the allowed relative increase of its "
                        f"{task.primary_metric} on the validation split, written with a percent sign: e.g. "
                        f"--max-drop 5% allows the fp32 {task.primary_metric} times 1.05. '{cfg.max_drop}' has no '%'.")

    data = task.load_data(cfg)
    eval_device = "cuda" if device == "cuda" and fmt == "pytorch" else "cpu"
    evaluator = tune.make_evaluator(task, data, src, cfg, eval_device)
    calibration: dict[str, list] = {}
    calib_info = None
    for m in methods:
        if m.needs_calibration(settings[m.name]):
            calibration[m.name], calib_info = CALIBRATION[task.name](cfg, settings[m.name], data, evaluator.tokenizer,
                                                                     task)

    make_dir(out.parent)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.work-", dir=out.parent) as tmpdir:
        work = Path(tmpdir)
        exports: dict[str, Path] = {}

        def make_job(method: Method) -> Job:
            source = src if method.input == fmt else export_onnx(cfg, method, settings[method.name], work, exports,
                                                                 device, task)
            return Job(cfg, settings[method.name], source, device, calibration.get(method.name, []))

        search, auto_rows = None, None
        if cfg.method == "auto":
            texts = list(data["validation"]["text"][:8])
            chosen, auto_rows, allowed = tune.auto(methods, make_job, work, evaluator, tolerance, texts)
            if chosen is None:
                raise UserError("--method auto found no method that runs here: "
                                + "; ".join(f"{r['method']}: {r['skipped']}" for r in auto_rows if "skipped" in r))
            met = chosen.metrics["accuracy"] >= evaluator.baseline["accuracy"] - allowed - 1e-12
        elif tolerance is not None:
            chosen, search = tune.accuracy_aware(methods[0], make_job(methods[0]), work, evaluator, tolerance)
            met = search.met
        else:
            chosen = tune.plain(methods[0], make_job(methods[0]), work, evaluator)
            met = True
        chosen.info.setdefault("method", methods[0].name)
        with atomic_output(out, force=cfg.force) as tmp:
            for p in chosen.directory.iterdir():
                shutil.move(str(p), tmp / p.name)
            manifest = _write(tmp, cfg, src, evaluator, chosen, calib_info, tolerance, search, auto_rows, met,
                              settings[chosen.info["method"]], task)
            if tolerance is not None:
                (tmp / "tuning.md").write_text(tune.tuning_markdown(evaluator, tolerance, search, auto_rows, chosen))
    _summary(out, manifest)
    if not met:
        if tolerance is not None:
            print((out / "tuning.md").read_text())
        p = evaluator.primary
        raise GateFailed(
            f"Quantization with {chosen.info['method']} could not keep the validation {p} within {tolerance} of fp32 "
            f"({evaluator.baseline[p]:.4f} -> {chosen.metrics[p]:.4f} with "
            f"{len(chosen.exclude)} layer(s) in full precision). The best candidate was written to '{out}' "
            "(see its tuning.md). Allow a larger --max-drop, raise --max-fallback, or try another method.")
    return out


DEFAULT_AUTO_DROP = "1.0"
# The tasks --method auto can time (it measures classifier batches with compress.bench.measure).
AUTO_TASKS = ("classification",)


def check_task(method: Method, task, src: Path) -> None:
    if task.name not in method.tasks:
        others = sorted(n for n, m in METHODS.items() if task.name in m.tasks)
        raise UserError(f"--method {method.name} quantizes {' and '.join(method.tasks)} artifacts, and '{src}' is a "
                        f"{task.name} artifact. Methods for it: {', '.join(others)}.")


def auto_methods(cfg, device: str, fmt: str, src: Path) -> list[Method]:
    """The candidates of `--method auto` (each method's `auto_order`) that can run here on this input."""
    methods = []
    for cls in auto_candidates():
        m = cls()
        if fmt == "onnx" and m.input != "onnx":
            continue
        if fmt == m.input:
            try:
                m.check_source(src)
            except UserError:
                continue
        if not m.worth_trying(device):
            continue
        try:
            m.check(method_settings(cfg, m), device)
        except UserError:
            continue
        methods.append(m)
    return methods


def source_format(src: Path) -> str:
    """'pytorch' (fp32) or 'onnx'; anything already quantized or cast is refused."""
    from compress.runners import detect_format

    fmt = detect_format(src)
    dtype = read_manifest(src).get("dtype")
    if fmt not in ("pytorch", "onnx") or dtype in ("bf16", "fp16"):
        raise UserError(f"'{src}' is already a {dtype or fmt} artifact. Quantize the fp32 model it was made from "
                        "(the output of train, distill or export).")
    return fmt


def check_input(method: Method, fmt: str, src: Path) -> None:
    if method.input == "pytorch" and fmt == "onnx":
        raise UserError(f"--method {method.name} quantizes a PyTorch model, but '{src}' is an ONNX artifact. Pass the "
                        "PyTorch directory it was exported from, or use ort-dynamic-int8 / ort-static-int8.")
    if method.input == fmt:
        method.check_source(src)


def export_onnx(cfg, method: Method, settings: MethodSettings, work: Path, exports: dict[str, Path],
                device: str, task) -> Path:
    """Export the PyTorch input to ONNX (with export's parity gate), once per optimisation level."""
    from compress.export import ExportConfig, export

    optimize = getattr(settings, "optimize", "auto")
    level = method.export_level(task) if optimize == "auto" else optimize
    if level == "transformer" and optimize == "auto":
        from transformers import AutoConfig

        from compress.export import fusion_model_type

        if not fusion_model_type(AutoConfig.from_pretrained(cfg.model, trust_remote_code=cfg.trust_remote_code).model_type):
            level = "none"  # no transformer fusions for this architecture: the plain graph
    if level not in exports:
        data_fields = {k: getattr(cfg, k) for k in DataConfig.model_fields}
        exports[level] = export(ExportConfig(model=cfg.model, out=str(work / f"export-{level}"), optimize=level,
                                             device="cpu", trust_remote_code=cfg.trust_remote_code, **data_fields))
    return exports[level]


def calibration_batches(cfg, settings, data, tokenizer, task=None) -> tuple[list[dict[str, np.ndarray]], dict[str, Any]]:
    """`settings.calib_samples` training examples (a seeded random sample), one per batch, all
    padded to the same width.

    ONNX Runtime's entropy and percentile calibrators stack every batch's activations into
    one array, so every batch must have the same shape; one example per batch at a common
    width gives that without dropping examples.
    """
    from compress.data import EncodedSplit, tokenize
    from compress.runners import numpy_batch

    train = data["train"]
    if len(train) == 0:
        raise UserError(f"The training split of '{cfg.dataset}' is empty: there is nothing to calibrate on.")
    n = settings.calib_samples
    if n < MIN_CALIBRATION:
        raise UserError(f"--calib-samples {n} is too small: calibrate on at least {MIN_CALIBRATION} "
                        "examples (128 or more gives stable activation ranges).")
    if len(train) < n:
        raise UserError(f"--calib-samples {n} asks for more examples than the training split of "
                        f"'{cfg.dataset}' has ({len(train)}). Lower --calib-samples or use a larger dataset.")
    idx = np.sort(np.random.default_rng(0).choice(len(train), n, replace=False))
    split = EncodedSplit(tokenize(train.select(idx.tolist()), tokenizer, cfg.max_length, data.has_pair))
    pad = tokenizer.pad_token_id or 0
    width = int(split.lengths.max())
    batches = []
    for i in range(len(split)):
        b = numpy_batch(split, np.array([i]), pad)
        extra = width - b["input_ids"].shape[1]
        if extra > 0:
            b = {k: np.pad(v, ((0, 0), (0, extra)), constant_values=pad if k == "input_ids" else 0) for k, v in b.items()}
        batches.append({k: v[:, :width] for k, v in b.items()})
    info = {"dataset": data.source, "split": "train", "n": n, "seed": 0, "padded_to": width,
            "fingerprint": fingerprint(data.fingerprint, idx.tolist()), "method": settings.calib_method}
    return batches, info


def lm_calibration_batches(cfg, settings, data, tokenizer, task) -> tuple[list[dict[str, np.ndarray]], dict[str, Any]]:
    """`settings.calib_samples` training blocks of `--max-length` tokens (a seeded random sample),
    one per batch: real text, every position a real token."""
    blocks = task.encode(data, tokenizer, cfg, splits=("train",))["train"].blocks
    n = settings.calib_samples
    if len(blocks) < n:
        raise UserError(f"--calib-samples {n} asks for more training windows of {blocks.shape[1]} tokens than "
                        f"'{data.source}' has ({len(blocks)}). Lower --calib-samples or --max-length.")
    idx = np.sort(np.random.default_rng(0).choice(len(blocks), n, replace=False))
    batches = [{"input_ids": blocks[i:i + 1]} for i in idx]
    info = {"dataset": data.source, "split": "train", "n": n, "seed": 0, "tokens_per_window": int(blocks.shape[1]),
            "fingerprint": fingerprint(data.fingerprint, idx.tolist()), "method": getattr(settings, "algorithm", None)}
    return batches, info


# Task name -> how its calibration batches are drawn from the training split.
CALIBRATION = {"classification": calibration_batches, "causal-lm": lm_calibration_batches}


def _write(tmp: Path, cfg, src: Path, evaluator, chosen, calib_info, tolerance, search, auto_rows,
           met: bool, settings: MethodSettings, task) -> dict[str, Any]:
    from compress.quantize import tune

    info = dict(chosen.info)
    top = {k: info.pop(k) for k in tune.RUNNER_KEYS if k in info}
    method = info.pop("method")
    info.pop("run_device", None)
    size, parent_size = weights_size(tmp), weights_size(src)
    before, after = evaluator.baseline, chosen.metrics
    sens = {s["layer"]: s for s in (search.sensitivity if search else [])}
    steps = {s["fallback_layer"]: s for s in (search.steps if search else []) if s["fallback_layer"]}
    sens_key, after_key = evaluator.fallback_keys()
    fallback = [{"layer": name, sens_key: sens.get(name, {}).get(evaluator.sensitivity_key),
                 after_key: steps.get(name, {}).get(evaluator.primary)} for name in chosen.exclude]
    metrics = {"validation": {"primary": evaluator.primary, **evaluator.validation_summary(before, after)},
               "size_bytes": size, "parent_size_bytes": parent_size,
               "compression": round(parent_size / size, 3) if size else None}
    if chosen.latency:
        metrics["latency"] = chosen.latency
    tuning = None
    if tolerance is not None:
        tuning = {"tolerance": str(tolerance), "goal_met": met, "fallback_layers": fallback,
                  "steps": search.steps if search else None, "sensitivity": search.sensitivity if search else None,
                  "auto": auto_rows}
    return write_manifest(tmp, stage="quantize", config=cfg.model_dump(), parent=str(src), metrics=metrics,
                          task=task.name, method=method, settings=settings.model_dump(), quantization=info,
                          calibration=calib_info if METHODS[method]().needs_calibration(settings) else None,
                          fallback_layers=fallback, tuning=tuning,
                          data={"source": cfg.dataset, "split": "validation",
                                "fingerprint": evaluator.data_fingerprint}, **top)


def _summary(out: Path, manifest: dict[str, Any]) -> None:
    v = manifest["metrics"]["validation"]
    q = manifest["quantization"]
    p = v["primary"]
    counts = ", ".join(f"{k} {n}" for k, n in (q.get("quantized") or {}).items())
    print(f"quantized with {manifest['method']} ({counts}); validation {p} {v['before'][p]:.4f} -> "
          f"{v['after'][p]:.4f}; size {manifest['metrics']['parent_size_bytes'] / 1e6:.2f} MB -> "
          f"{manifest['metrics']['size_bytes'] / 1e6:.2f} MB; fallback layers: {len(manifest['fallback_layers'])} -> {out}")


