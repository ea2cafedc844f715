"""`compress export`: a PyTorch model to a self-contained ONNX directory, gated on parity.

The artifact's task picks the exporter (`EXPORTERS`, keyed by the task's `export_task`):
classifiers here, causal LMs with past key values in `compress.export_lm`. For a classifier,
the graph comes from optimum-onnx's exporter (so the directory loads in
`optimum.onnxruntime.ORTModelForSequenceClassification`), falling back to
`torch.onnx.export` only for architectures optimum has no ONNX config for. ONNX Runtime's
transformer optimizer then fuses attention, layer norms and GELU. After every step the
graph must reproduce the PyTorch logits on real validation batches within `atol` and
predict the same labels, or the stage raises `GateFailed` and writes nothing. The graphs
run through the ONNX Runtime runner (`compress.runners.ort`), as eval, bench and quantize do.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from compress.artifacts import atomic_output, write_manifest
from compress.config import RuntimeConfig
from compress.data import DataConfig, encode, load_data
from compress.errors import GateFailed, UserError
from compress.export_lm import LM_TASK, export_lm, start_export
from compress.lineage import inherits_data
# FUSED_OPS, convert_to_fp16 and fusion_model_type are also this module's API (tests, quantize).
from compress.onnx_graph import FUSED_OPS, convert_to_fp16, fusion_model_type, operator_counts, optimize_graph  # noqa: F401
from compress.onnx_graph import save as _save
from compress.ort_settings import DENORMAL_AS_ZERO, DISABLE_OPTIMIZERS, SKIP_LAYER_NORM_FUSION, choose_skip_layer_norm
from compress.runners import detect_format, numpy_batch
from compress.runners.ort import ONNX_FILE, OrtRunner
from compress.runners.pytorch import TorchRunner

TASK = "text-classification"
# The TorchScript exporter that optimum drives stops at opset 20; below 14 BERT's
# attention (scaled_dot_product_attention, Trilu) has no ONNX translation.
MIN_OPSET, MAX_OPSET, FALLBACK_OPSET = 14, 20, 18
PARITY_BATCH_SIZES = (32, 8, 1)  # the first batch also serves as the tracing example


class ExportConfig(RuntimeConfig, DataConfig):
    """Export a PyTorch classifier or causal-LM artifact to ONNX, with parity gates (which run
    on --device, and the graph is optimised for it)."""

    model: str = Field(..., description="PyTorch artifact directory (from train, distill or save_pretrained): a classifier, or a causal LM (exported with past key values)")
    out: str = Field(..., description="output directory: model.onnx, config.json, tokenizer files, manifest.json")
    opset: int | None = Field(None, ge=MIN_OPSET, le=MAX_OPSET, description=f"ONNX opset ({MIN_OPSET}..{MAX_OPSET}); default: optimum's choice for the architecture (18 for BERT)")
    optimize: Literal["auto", "none", "basic", "extended", "transformer"] = Field(
        "auto", description="graph optimisation: none; basic (ORT constant folding, portable ops); extended (ORT fusions, "
                            "tied to the device); transformer (ORT transformer fusions: Attention, SkipLayerNorm, ...); "
                            "auto = transformer where ORT has fusions for the architecture, else extended; for a causal "
                            "LM, auto keeps the transformer fusions only where the fused graph decodes faster here (timed)")
    flush_denormals: bool = Field(True, description="record the session setting that flushes denormal floats to zero on the CPU (softmax over padding makes them, and they are slow); the parity gates run with it")
    skip_layer_norm: Literal["auto", "fuse", "split"] = Field(
        "auto", description="residual Add + LayerNorm: fuse (ORT's SkipLayerNormalization kernel) or split (two operators, "
                            "and the manifest's session config stops ORT from fusing them at load); auto: time both on "
                            "this CPU at the model's width and keep the faster (fuse on CUDA)")
    dtype: Literal["fp32", "fp16"] = Field("fp32", description="weights of the graph; fp16 needs --device cuda and onnxruntime-gpu (inputs and logits stay fp32)")
    atol: float = Field(1e-4, gt=0, description="largest |logit difference| allowed between PyTorch and an fp32 ONNX graph")
    fp16_atol: float = Field(1e-2, gt=0, description="largest |logit difference| allowed for the fp16 graph (fp16 keeps ~3 significant digits)")
    parity_examples: int = Field(64, ge=1, le=4096, description="validation examples fed to each parity gate, at batch sizes 1, 8 and 32")
    parity_prompts: int = Field(8, ge=1, le=64, description="causal LM: validation prompts (and windows) the gates feed; each prompt's greedy continuation must match PyTorch's")
    parity_steps: int = Field(32, ge=16, le=512, description="causal LM: cached decode steps checked against PyTorch's uncached logits (fed the real next tokens)")
    greedy_tokens: int = Field(32, ge=1, le=512, description="causal LM: tokens of each greedy continuation that must be identical to PyTorch's")


# --------------------------------------------------------------------------- parity gate

@dataclass
class ParityCase:
    """One batch fed to both runtimes, with the PyTorch logits it must reproduce."""

    name: str
    batch: dict[str, np.ndarray]
    reference: np.ndarray | None = None


def parity_cases(split, tokenizer, n_examples: int, max_length: int) -> list[ParityCase]:
    """Right-padded batches of real validation examples that cover the shapes a deployment meets.

    Every example at batch sizes 1, 8 and 32 (padding differs per size); a batch cut to
    one token (only [CLS] survives); and a batch padded to `max_length` whose first row is
    real text filling all `max_length` positions.
    """
    pad = tokenizer.pad_token_id or 0
    idx = np.random.default_rng(0).permutation(len(split))[:n_examples]
    cases = []
    for size in PARITY_BATCH_SIZES:
        for start in range(0, len(idx), size):
            cases.append(ParityCase(f"batch{size}[{start // size}]", numpy_batch(split, idx[start:start + size], pad)))
    first = numpy_batch(split, idx[:8], pad)
    cases.append(ParityCase("length1", {k: v[:, :1] for k, v in first.items()}))
    # Joined snippets make a real text long enough to fill every position up to max_length.
    long_text = " ".join(tokenizer.decode(split.input_ids[i], skip_special_tokens=True) for i in idx[:200])
    long = tokenizer(long_text, truncation=True, max_length=max_length)
    rows = [(long["input_ids"], long.get("token_type_ids"))]
    rows += [(split.input_ids[i], split.token_type_ids[i] if split.token_type_ids else None) for i in idx[:7]]
    types = split.token_type_ids is not None
    cases.append(ParityCase(f"max_length{max_length}", _pad_rows(rows, max_length, pad, types)))
    return cases


def _pad_rows(rows: list[tuple[list[int], list[int] | None]], width: int, pad: int,
              types: bool) -> dict[str, np.ndarray]:
    batch = {"input_ids": np.full((len(rows), width), pad, dtype=np.int64),
             "attention_mask": np.zeros((len(rows), width), dtype=np.int64)}
    if types:
        batch["token_type_ids"] = np.zeros((len(rows), width), dtype=np.int64)
    for r, (ids, type_ids) in enumerate(rows):
        batch["input_ids"][r, :len(ids)] = ids
        batch["attention_mask"][r, :len(ids)] = 1
        if types and type_ids:
            batch["token_type_ids"][r, :len(type_ids)] = type_ids
    return batch


def check_parity(runner, cases: list[ParityCase], atol: float, graph: str) -> dict:
    """Compare `runner`'s logits with each case's reference; raise GateFailed with the numbers.

    A predicted label may differ only where PyTorch's top two logits are within 2*atol
    (a tie that the tolerance allows either way); any other disagreement fails the gate.
    """
    worst, where, flips, per_case, n = 0.0, None, [], {}, 0
    for case in cases:
        got = runner.logits(case.batch)
        # NaN compares false with everything: count it as an infinite difference.
        diff = np.nan_to_num(np.abs(got.astype(np.float64) - case.reference), nan=np.inf)
        per_case[case.name] = float(diff.max())
        if diff.max() > worst or where is None:
            row, col = np.unravel_index(int(diff.argmax()), diff.shape)
            worst, where = float(diff.max()), {"case": case.name, "row": int(row), "logit": int(col)}
        top2 = np.sort(case.reference, axis=-1)[:, -2:] if case.reference.shape[-1] > 1 else None
        margin = (top2[:, 1] - top2[:, 0]) if top2 is not None else np.full(len(got), np.inf)
        disagree = (got.argmax(-1) != case.reference.argmax(-1)) & (margin > 2 * atol)
        flips += [f"{case.name} row {r}" for r in np.flatnonzero(disagree)]
        n += len(got)
    result = {"graph": graph, "atol": atol, "max_abs_diff": worst, "where": where,
              "label_disagreements": len(flips), "rows": n, "batches": len(cases),
              "worst_by_batch_size": _worst_by_size(per_case)}
    if worst > atol or flips:
        shown = "; ".join(flips[:5]) + (" ..." if len(flips) > 5 else "")
        raise GateFailed(
            f"Parity gate failed for the {graph} ONNX graph: the largest |logit difference| from PyTorch is "
            f"{worst:.3g} (atol {atol:g}) at batch '{where['case']}' row {where['row']} logit {where['logit']}; "
            f"{len(flips)} of {n} predicted labels differ{': ' + shown if flips else ''}. Nothing was written. "
            "If fusion caused it, try --optimize none or basic; if the difference is acceptable, raise --atol."
        )
    return result


def _worst_by_size(per_case: dict[str, float]) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, value in per_case.items():
        key = name.split("[")[0]
        out[key] = max(out.get(key, 0.0), value)
    return out


# --------------------------------------------------------------------------- export and optimisation

def supported_model_types() -> list[str]:
    """Model types optimum-onnx exports for text classification."""
    import optimum.exporters.onnx.model_configs  # noqa: F401  (registers the ONNX configs)
    from optimum.exporters.tasks import TasksManager

    return sorted(TasksManager.get_supported_model_type_for_task(TASK, exporter="onnx"))


def check_architecture(model) -> None:
    """Refuse classifiers that cannot take a padded batch (input_ids plus attention_mask)."""
    import inspect

    accepted = inspect.signature(model.forward).parameters
    if "attention_mask" not in accepted:
        raise UserError(
            f"The '{model.config.model_type}' architecture takes no attention_mask, so padded batches cannot be "
            f"exported or checked. compress export supports the architectures optimum-onnx exports for {TASK}: "
            f"{', '.join(supported_model_types())} (others are tried with torch.onnx.export)."
        )


def export_graph(model, example: dict[str, np.ndarray], out: Path, opset: int | None, device: str) -> str:
    """Write out/model.onnx with dynamic batch and sequence axes; return which exporter ran."""
    if model.config.model_type in supported_model_types():
        from optimum.exporters.onnx import onnx_export_from_model

        with warnings.catch_warnings():
            # Tracer warnings about mask arithmetic; the parity gate checks the graph on real batches.
            warnings.simplefilter("ignore")
            # Our gate validates on real data below; optimum's own check uses random dummies.
            onnx_export_from_model(model, out, opset=opset, task=TASK, do_validation=False, device=device)
        return "optimum"
    return _torch_export(model, example, out / ONNX_FILE, opset or FALLBACK_OPSET, device)


def _torch_export(model, example: dict[str, np.ndarray], path: Path, opset: int, device: str) -> str:
    import torch

    model.config.save_pretrained(path.parent)
    names = list(example)
    axes = {k: {0: "batch_size", 1: "sequence_length"} for k in names} | {"logits": {0: "batch_size"}}
    inputs = {k: torch.from_numpy(v).to(device) for k, v in example.items()}
    try:
        # The TorchScript exporter, as optimum uses it (dynamo=False).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (inputs,), str(path), input_names=names, output_names=["logits"],
                              dynamic_axes=axes, opset_version=opset, dynamo=False)
    except Exception as err:  # the exporter raises many types for unsupported operators
        raise UserError(
            f"optimum-onnx does not support the '{model.config.model_type}' architecture for {TASK} and "
            f"torch.onnx.export failed on it too ({type(err).__name__}: {str(err).splitlines()[0][:200]}). "
            f"Supported architectures: {', '.join(supported_model_types())}."
        ) from None
    return "torch.onnx"


def resolve_optimize(level: str, model_type: str) -> str:
    if level == "auto":
        return "transformer" if fusion_model_type(model_type) else "extended"
    if level == "transformer" and not fusion_model_type(model_type):
        raise UserError(f"ONNX Runtime has no transformer fusions for '{model_type}' models (optimum maps BERT-, "
                        "GPT-2-, BART- and ViT-like types to them). Use --optimize extended, basic or none.")
    return level


@inherits_data("model")
def export(cfg: ExportConfig) -> Path:
    """Export `cfg.model` to ONNX at `cfg.out`, optimise the graph, and gate every step on parity.

    The artifact's task says what is exported (its `export_task`): a classifier's logits
    graph here, a causal LM's decoder with past key values in `compress.export_lm`.

    Returns:
        The artifact directory: model.onnx, config.json, tokenizer files and manifest.json
        (format "onnx", onnx_file, opset, optimize level, fused-operator counts, parity figures).
    """
    from compress.tasks.registry import task_for_artifact

    detect_format(cfg.model)  # a missing or unrecognised directory is one message
    task = task_for_artifact(cfg.model, cfg.task)
    if task.export_task not in EXPORTERS:
        raise UserError(f"compress export has no exporter for the {task.name} task ({task.export_task}). "
                        f"It exports: {', '.join(EXPORTERS)}.")
    return EXPORTERS[task.export_task](cfg, task)


def export_classifier(cfg: ExportConfig, task=None) -> Path:
    """The classifier export (`text-classification`): see `export`."""
    import onnx

    out, device, manifest = start_export(cfg, "classifier")
    torch_runner = TorchRunner(Path(cfg.model), device=device, threads=cfg.threads,
                               trust_remote_code=cfg.trust_remote_code)
    model, tokenizer, config = torch_runner.model, torch_runner.tokenizer, torch_runner.config
    check_architecture(model)
    level = resolve_optimize(cfg.optimize, config.model_type)

    data = load_data(cfg)
    split = encode(data, tokenizer, cfg.max_length, splits=("validation",))["validation"]
    cases = parity_cases(split, tokenizer, cfg.parity_examples, cfg.max_length)
    for case in cases:
        try:
            case.reference = torch_runner.logits(case.batch).astype(np.float64)
        except Exception as err:  # the user's model, not compress, fails on a legal batch
            shape = "x".join(map(str, case.batch["input_ids"].shape))
            raise UserError(f"The PyTorch model in '{cfg.model}' ({config.model_type}) fails on the parity batch "
                            f"'{case.name}' ({shape} tokens): {type(err).__name__}: {err}. Export needs a classifier "
                            "that accepts any batch size and length from 1 to --max-length.") from None

    with atomic_output(out, force=cfg.force) as tmp:
        exporter = export_graph(model, cases[0].batch, tmp, cfg.opset, device)
        # The tokenizer as loaded (a pruned vocabulary included) is the one the graph was made for.
        tokenizer.save_pretrained(tmp)
        path = tmp / ONNX_FILE
        hidden = getattr(config, "hidden_size", None) or 768
        fuse_skip, skip_info = choose_skip_layer_norm(cfg.skip_layer_norm, hidden, device, cfg.threads)
        session_config = {} if fuse_skip else {DISABLE_OPTIMIZERS: SKIP_LAYER_NORM_FUSION}
        if cfg.flush_denormals and device == "cpu":
            session_config[DENORMAL_AS_ZERO] = "1"

        def graph_runner():  # a fresh session on the graph as it is on disk now
            return OrtRunner(tmp, device, cfg.threads, ONNX_FILE, session_config, trust_remote_code=cfg.trust_remote_code)

        parity = {"exported": check_parity(graph_runner(), cases, cfg.atol, "exported")}
        exported = onnx.load(str(path))
        opset = next(o.version for o in exported.opset_import if o.domain in ("", "ai.onnx"))
        counts = {"before": operator_counts(exported)}
        if level != "none":
            _save(optimize_graph(path, level, config, use_gpu=device == "cuda", fuse_skip_layer_norm=fuse_skip), path)
            parity["optimized"] = check_parity(graph_runner(), cases, cfg.atol, f"{level}-optimized")
        final = onnx.load(str(path))
        counts["after"] = operator_counts(final)
        if cfg.dtype == "fp16":
            _save(convert_to_fp16(final), path)
            parity["fp16"] = check_parity(graph_runner(), cases, cfg.fp16_atol, "fp16")
        # Contrib operators (com.microsoft) mark a fused graph; ORT quantization then needs
        # extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT}.
        fused = any(n.domain == "com.microsoft" for n in final.graph.node)
        shipped = list(parity.values())[-1]  # the gate of the graph that is written
        metrics = {"parity_max_abs_diff": shipped["max_abs_diff"],
                   "parity_label_disagreements": shipped["label_disagreements"]}
        write_manifest(tmp, stage="export", config=cfg.model_dump(), parent=str(cfg.model), metrics=metrics,
                       format="onnx", onnx_file=ONNX_FILE, opset=opset, exporter=exporter, optimize=level,
                       fused=fused, dtype=cfg.dtype, device=device, fused_operators=counts, parity=parity,
                       skip_layer_norm=skip_info, ort_session_config=session_config,
                       data={"source": data.source, "fingerprint": data.fingerprint})
    print(f"exported {config.model_type} ({exporter}, opset {opset}, optimize {level}, {cfg.dtype}) -> {out}; "
          f"parity max |diff| {metrics['parity_max_abs_diff']:.2g}, fused {counts['after']}, "
          f"SkipLayerNorm {skip_info['choice']}")
    return out


# The task's export_task -> the function that exports it.
EXPORTERS = {TASK: export_classifier, LM_TASK: export_lm}
