"""`compress quantize`: int8 / 4-bit / bf16 versions of a classifier, optionally accuracy-aware.

Each method is a small class registered under its CLI name (`@register_method`); adding a
method means adding a module that registers one and importing it at the bottom of this
file. A method writes its weights into a directory and says which layers it could leave
in full precision; everything else (calibration data, evaluation before/after, the
accuracy-aware fallback search, `--method auto`, the manifest) lives here and in
`tune.py` and is shared by all methods.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field, field_validator

from compress.artifacts import atomic_output, check_output, fingerprint, make_dir, read_manifest, weights_size, write_manifest
from compress.data import DataConfig
from compress.errors import GateFailed, UserError

# Fewer examples than this give calibration ranges that depend on which sentences were picked.
MIN_CALIBRATION = 8


class QuantizeConfig(DataConfig):
    """Quantize a classifier artifact."""

    model: str = Field(..., description="artifact to quantize: a PyTorch classifier directory, or an ONNX artifact for the ort-* methods")
    out: str = Field(..., description="output artifact directory")
    method: str = Field(..., description="torch-dynamic-int8, ort-dynamic-int8, ort-static-int8, bnb-int8, bnb-nf4, bnb-fp4, bf16, fp16, or auto (the fastest that meets --max-drop)")
    calib_samples: int = Field(128, ge=1, description="training examples used to calibrate activation ranges (ort-static-int8)")
    calib_method: Literal["minmax", "entropy", "percentile"] = Field("minmax", description="how activation ranges are chosen from the calibration set (ort-static-int8)")
    per_channel: bool = Field(True, description="one scale per output channel instead of one per weight tensor (int8 methods); on the MiniLM teacher ort-dynamic-int8 lost 0.16 validation points per-channel against 1.22 per-tensor, at the same size")
    weight_type: Literal["auto", "int8", "uint8"] = Field("auto", description="ONNX Runtime weight type; auto = int8 on CPUs with VNNI/AMX (u8 x s8 is their fast instruction), uint8 elsewhere (u8 x s8 can saturate without VNNI)")
    optimize: Literal["auto", "none", "basic", "extended", "transformer"] = Field("auto", description="graph optimisation when a PyTorch model is exported first (ort-* methods); auto = transformer for ort-dynamic-int8 (QAttention; none where ORT has no fusions for the architecture), none for ort-static-int8 (QDQ needs the plain graph)")
    max_drop: str | None = Field(None, description="accuracy tolerance on the validation split: absolute points (1.0 = one accuracy point) or relative ('2%' of the fp32 accuracy); layers fall back to full precision until it is met (auto: default 1.0)")
    max_fallback: int | None = Field(None, ge=0, description="at most this many layers fall back to full precision in accuracy-aware mode (default: no limit)")
    sensitivity_samples: int = Field(256, ge=8, description="validation examples used to rank layer sensitivity in accuracy-aware mode")
    batch_size: int = Field(64, ge=1, description="examples per batch when evaluating")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="where the quantized model will run (bnb and fp16 need a matching backend)")
    threads: int | None = Field(None, ge=1, description="CPU threads for evaluation and timing (default: all cores)")
    force: bool = Field(False, description="replace an existing output directory")

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


# --------------------------------------------------------------------------- the method registry

@dataclass
class Job:
    """What a method gets: the config, the input it consumes and, if it calibrates, the batches."""

    cfg: QuantizeConfig
    source: Path  # an fp32 PyTorch directory, or an ONNX artifact for methods with input == "onnx"
    device: str
    calibration: list[dict[str, np.ndarray]] = field(default_factory=list)


class Method:
    """One quantization method. Subclasses set `name`, `input` and implement `build`."""

    name: ClassVar[str]
    input: ClassVar[Literal["pytorch", "onnx"]] = "pytorch"
    calibrated: ClassVar[bool] = False  # needs calibration batches from the training split
    can_fall_back: ClassVar[bool] = True  # accuracy-aware mode may keep layers in full precision
    export_optimize: ClassVar[str] = "auto"  # graph optimisation when an ONNX input must be exported first

    def check(self, cfg: QuantizeConfig, device: str) -> None:
        """Raise UserError when this method cannot run here (missing backend, wrong device)."""

    def check_source(self, src: Path) -> None:
        """Raise UserError when the given artifact (already in this method's input format) cannot be used."""

    def layers(self, job: Job) -> list[str]:
        """Names of the layers that are quantized and could fall back to full precision."""
        return []

    def build(self, job: Job, out: Path, exclude: list[str]) -> dict[str, Any]:
        """Write the quantized artifact's weights and support files into `out`, leaving
        `exclude` in full precision. Returns manifest fields (format, counts, ...)."""
        raise NotImplementedError


METHODS: dict[str, type[Method]] = {}


def register_method(name: str):
    """Class decorator: make a Method available as `--method NAME`."""

    def wrap(cls: type[Method]) -> type[Method]:
        cls.name = name
        METHODS[name] = cls
        return cls

    return wrap


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise UserError(f"Unknown quantization method '{name}'. Known methods: {', '.join(sorted(METHODS))}, auto.")
    return METHODS[name]()


# --------------------------------------------------------------------------- the stage

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

    from compress.data import load_data
    from compress.hardware import resolve_device
    from compress.models import check_model_dir
    from compress.quantize import tune

    out, src = check_output(cfg.out, cfg.force), Path(cfg.model)
    if not src.is_dir():
        raise UserError(f"The model directory '{src}' does not exist. Pass an artifact written by train, distill or export.")
    check_model_dir(src)
    device = resolve_device(cfg.device)
    fmt = source_format(src)
    if cfg.method == "auto":
        methods = auto_methods(cfg, device, fmt, src)
    else:
        methods = [get_method(cfg.method)]
        methods[0].check(cfg, device)
        check_input(methods[0], fmt, src)
    tolerance = parse_drop(cfg.max_drop or DEFAULT_AUTO_DROP) if (cfg.max_drop or cfg.method == "auto") else None

    data = load_data(cfg)
    eval_device = "cuda" if device == "cuda" and fmt == "pytorch" else "cpu"
    evaluator = tune.Evaluator(data, src, cfg, eval_device)
    calibration, calib_info = [], None
    if any(m.calibrated for m in methods):
        calibration, calib_info = calibration_batches(cfg, data, evaluator.tokenizer)

    make_dir(out.parent)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.work-", dir=out.parent) as tmpdir:
        work = Path(tmpdir)
        exports: dict[str, Path] = {}

        def make_job(method: Method) -> Job:
            source = src if method.input == fmt else export_onnx(cfg, method, work, exports, device)
            return Job(cfg, source, device, calibration if method.calibrated else [])

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
            manifest = _write(tmp, cfg, src, evaluator, chosen, calib_info, tolerance, search, auto_rows, met)
            if tolerance is not None:
                (tmp / "tuning.md").write_text(tune.tuning_markdown(evaluator.baseline, tolerance, search, auto_rows, chosen))
    _summary(out, manifest)
    if not met:
        if tolerance is not None:
            print((out / "tuning.md").read_text())
        raise GateFailed(
            f"Quantization with {chosen.info['method']} could not keep the validation accuracy within {tolerance} of fp32 "
            f"({evaluator.baseline['accuracy']:.4f} -> {chosen.metrics['accuracy']:.4f} with "
            f"{len(chosen.exclude)} layer(s) in full precision). The most accurate candidate was written to '{out}' "
            "(see its tuning.md). Allow a larger --max-drop, raise --max-fallback, or try another method.")
    return out


DEFAULT_AUTO_DROP = "1.0"
# --method auto tries these, in this order. bitsandbytes is left out: it saves memory, but
# its layers are slower than fp32 on the CPU and than fp16 on most GPUs.
AUTO_ORDER = ("ort-dynamic-int8", "ort-static-int8", "torch-dynamic-int8", "bf16", "fp16")


def auto_methods(cfg: QuantizeConfig, device: str, fmt: str, src: Path) -> list[Method]:
    from compress.hardware import has_fast_bf16_cpu

    methods = []
    for name in AUTO_ORDER:
        m = get_method(name)
        if fmt == "onnx" and m.input != "onnx":
            continue
        if fmt == m.input:
            try:
                m.check_source(src)
            except UserError:
                continue
        if name == "bf16" and device == "cpu" and not has_fast_bf16_cpu():
            continue
        try:
            m.check(cfg, device)
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


def export_onnx(cfg: QuantizeConfig, method: Method, work: Path, exports: dict[str, Path], device: str) -> Path:
    """Export the PyTorch input to ONNX (with export's parity gate), once per optimisation level."""
    from compress.export import ExportConfig, export

    level = method.export_optimize if cfg.optimize == "auto" else cfg.optimize
    if level == "transformer" and cfg.optimize == "auto":
        from transformers import AutoConfig

        from compress.export import fusion_model_type

        if not fusion_model_type(AutoConfig.from_pretrained(cfg.model).model_type):
            level = "none"  # no transformer fusions for this architecture: the plain graph
    if level not in exports:
        data_fields = {k: getattr(cfg, k) for k in DataConfig.model_fields}
        exports[level] = export(ExportConfig(model=cfg.model, out=str(work / f"export-{level}"), optimize=level,
                                             device="cpu", **data_fields))
    return exports[level]


def calibration_batches(cfg: QuantizeConfig, data, tokenizer) -> tuple[list[dict[str, np.ndarray]], dict[str, Any]]:
    """`cfg.calib_samples` training examples (a seeded random sample), one per batch, all
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
    if cfg.calib_samples < MIN_CALIBRATION:
        raise UserError(f"--calib-samples {cfg.calib_samples} is too small: calibrate on at least {MIN_CALIBRATION} "
                        "examples (128 or more gives stable activation ranges).")
    if len(train) < cfg.calib_samples:
        raise UserError(f"--calib-samples {cfg.calib_samples} asks for more examples than the training split of "
                        f"'{cfg.dataset}' has ({len(train)}). Lower --calib-samples or use a larger dataset.")
    idx = np.sort(np.random.default_rng(0).choice(len(train), cfg.calib_samples, replace=False))
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
    info = {"dataset": data.source, "split": "train", "n": cfg.calib_samples, "seed": 0, "padded_to": width,
            "fingerprint": fingerprint(data.fingerprint, idx.tolist()), "method": cfg.calib_method}
    return batches, info


def _write(tmp: Path, cfg: QuantizeConfig, src: Path, evaluator, chosen, calib_info, tolerance, search, auto_rows,
           met: bool) -> dict[str, Any]:
    from compress.quantize import tune

    info = dict(chosen.info)
    top = {k: info.pop(k) for k in tune.RUNNER_KEYS if k in info}
    method = info.pop("method")
    info.pop("run_device", None)
    size, parent_size = weights_size(tmp), weights_size(src)
    before, after = evaluator.baseline, chosen.metrics
    sens = {s["layer"]: s for s in (search.sensitivity if search else [])}
    steps = {s["fallback_layer"]: s for s in (search.steps if search else []) if s["fallback_layer"]}
    fallback = [{"layer": name, "sensitivity_logit_mse": sens.get(name, {}).get("logit_mse"),
                 "accuracy_after_fallback": steps.get(name, {}).get("accuracy")} for name in chosen.exclude]
    metrics = {"validation": {"before": before, "after": after,
                              "drop_points": round(100 * (before["accuracy"] - after["accuracy"]), 4)},
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
                          method=method, quantization=info, calibration=calib_info if METHODS[method].calibrated else None,
                          fallback_layers=fallback, tuning=tuning,
                          data={"source": cfg.dataset, "split": "validation",
                                "fingerprint": evaluator.data_fingerprint}, **top)


def _summary(out: Path, manifest: dict[str, Any]) -> None:
    v = manifest["metrics"]["validation"]
    q = manifest["quantization"]
    counts = ", ".join(f"{k} {n}" for k, n in (q.get("quantized") or {}).items())
    print(f"quantized with {manifest['method']} ({counts}); validation accuracy {v['before']['accuracy']:.4f} -> "
          f"{v['after']['accuracy']:.4f}; size {manifest['metrics']['parent_size_bytes'] / 1e6:.2f} MB -> "
          f"{manifest['metrics']['size_bytes'] / 1e6:.2f} MB; fallback layers: {len(manifest['fallback_layers'])} -> {out}")


from compress.quantize import bnb, cast, onnx_int8, torch_int8  # noqa: E402,F401  (register the methods)
