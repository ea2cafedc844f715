"""`ort-dynamic-int8` and `ort-static-int8`: ONNX Runtime's quantizer on an exported graph.

Dynamic: weights int8 ahead of time, activations uint8 per batch at run time. A PyTorch
input is exported fused (measured faster here, see `export_optimize`): attention becomes
QAttention and the embeddings one QEmbedLayerNormalization with int8 tables; on an unfused
graph (`--optimize none`, or a plain ONNX input) the embedding Gathers are quantized.
Either way the embedding table (a third to a half of a small BERT) shrinks, not only the
MatMuls.

Static: QDQ format (QOperator produced invalid graphs on these exports), activation
ranges calibrated on real training examples with minmax, entropy or percentile. Only
MatMul, Gemm and Gather are quantized: the attention-mask Add holds -3.4e38, which makes
entropy and percentile histograms useless, and leaving Add out keeps it uncalibrated.

The output head stays fp32 in both (the MatMul/Gemm that produces the logits: a classifier's
head, a causal LM's LM head), unless `ort-dynamic-int8 --quantize-embeddings` puts it and the
embedding tables in `--embedding-bits` blocks (MatMulNBits, GatherBlockQuantized). Dynamic int8 also takes a causal LM's decoder graph (with past
key values); static int8 is for classifiers.
"""

from __future__ import annotations

import logging
import shutil
from collections import Counter
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from compress.artifacts import copy_support_files, read_manifest
from compress.errors import UserError
from compress.quantize.registry import Int8Settings, Job, Method, TableSettings, register_method
from compress.onnx_graph import fold_constant_transposes
from compress.runners.ort import find_onnx_file

OUTPUT_FILE = "model_int8.onnx"
# What the quantized graph's operators were before quantization (dynamic IntegerOps).
INTEGER_OPS = {"MatMulInteger": "MatMul", "DynamicQuantizeMatMul": "MatMul", "MatMulIntegerToFloat": "MatMul",
               "QAttention": "Attention", "QEmbedLayerNormalization": "EmbedLayerNormalization", "QGemm": "Gemm",
               # the head and tables under --quantize-embeddings
               "MatMulNBits": "MatMul", "GatherBlockQuantized": "Gather"}
DYNAMIC_OPS = ("MatMul", "Gemm", "Attention", "Gather", "EmbedLayerNormalization")
GEMM_SUFFIX = "_MatMul"
STATIC_OPS = ("MatMul", "Gemm", "Gather")
CALIBRATION = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}
ENTROPY_BINS, ENTROPY_QUANTIZED_BINS = 2048, 256
# Fewer examples than this give calibration ranges that depend on which sentences were picked.
MIN_CALIBRATION = 8


class OrtSettings(Int8Settings):
    """Settings of both ONNX Runtime methods."""

    weight_type: Literal["auto", "int8", "uint8"] = Field("auto", description="ONNX Runtime weight type; auto = int8 on CPUs with VNNI/AMX (u8 x s8 is their fast instruction), uint8 elsewhere (u8 x s8 can saturate without VNNI)")
    optimize: Literal["auto", "none", "basic", "extended", "transformer"] = Field("auto", description="graph optimisation when a PyTorch model is exported first; auto = transformer for ort-dynamic-int8 (QAttention; none where ORT has no fusions for the architecture), none for ort-static-int8 (QDQ needs the plain graph)")


class OrtDynamicSettings(OrtSettings, TableSettings):
    """ort-dynamic-int8: the weight scheme, and blockwise tables and head under --quantize-embeddings."""


class OrtStaticSettings(OrtSettings):
    """ort-static-int8: the weight scheme plus the calibration set."""

    calib_samples: int = Field(128, ge=1, description="training examples used to calibrate activation ranges")
    calib_method: Literal["minmax", "entropy", "percentile"] = Field("minmax", description="how activation ranges are chosen from the calibration set")


def onnx_path(directory: Path) -> Path:
    name = read_manifest(directory).get("onnx_file") or find_onnx_file(directory)
    return directory / name


def load_graph(directory: Path):
    """The ONNX model of an artifact, with stale value_info dropped.

    A dynamo export records intermediate shapes that conflict with ONNX Runtime's shape
    inference during quantization; the quantizer re-infers what it needs.
    """
    import onnx

    model = onnx.load(str(onnx_path(directory)))
    del model.graph.value_info[:]
    return model


def _constants(graph) -> set[str]:
    names = {t.name for t in graph.initializer}
    names.update(o for n in graph.node if n.op_type == "Constant" for o in n.output)
    return names


def head_nodes(graph) -> set[str]:
    """Nodes that compute the logits: the last MatMul/Gemm on the way to each graph output."""
    producer = {o: n for n in graph.node for o in n.output}
    heads: set[str] = set()
    for out in graph.output:
        frontier = [out.name]
        while frontier:
            node = producer.get(frontier.pop())
            if node is None:
                continue
            if node.op_type in ("MatMul", "Gemm"):
                heads.add(node.name)
            elif node.op_type in ("Add", "Identity", "Cast", "Reshape", "Squeeze"):
                frontier.extend(node.input)
    return heads


def candidate_nodes(model, ops: tuple[str, ...], weights_only: bool) -> list[str]:
    """Names of the nodes of `ops` the quantizer will touch (the head excluded), in graph order."""
    graph = model.graph
    consts, heads = _constants(graph), head_nodes(graph)
    found = []
    for node in graph.node:
        if node.op_type not in ops or node.name in heads:
            continue
        if node.op_type == "Gather" and node.input[0] not in consts:
            continue  # a shape or index Gather, not an embedding table
        if node.op_type in ("MatMul", "Gemm") and weights_only and node.input[1] not in consts:
            continue  # dynamic mode quantizes MatMuls with a constant weight only
        found.append(node.name + GEMM_SUFFIX if weights_only and node.op_type == "Gemm" else node.name)
    return found


def excluded_heads(graph) -> list[str]:
    # Dynamic quantization first rewrites each Gemm as MatMul + Add, naming the MatMul
    # "<gemm>_MatMul"; exclude both names so the head stays fp32 either way.
    return sorted(h for name in head_nodes(graph) for h in (name, name + GEMM_SUFFIX))


def quantized_counts(model) -> dict[str, int]:
    """How many nodes of each original operator type run quantized in `model`."""
    import onnx

    graph = model.graph
    producer = {o: n.op_type for n in graph.node for o in n.output}
    int8 = {t.name for t in graph.initializer if t.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)}
    counts: Counter = Counter()
    for node in graph.node:
        if node.op_type in INTEGER_OPS:
            counts[INTEGER_OPS[node.op_type]] += 1
        elif node.op_type in STATIC_OPS + ("Attention", "EmbedLayerNormalization"):
            if any(producer.get(i) == "DequantizeLinear" or i in int8 for i in node.input):
                counts[node.op_type] += 1
    return dict(sorted(counts.items()))


def _weight_type(settings: OrtSettings):
    from onnxruntime.quantization import QuantType

    from compress.hardware import has_vnni

    if settings.weight_type == "auto":
        # VNNI multiplies u8 activations by s8 weights natively; without it the u8 x s8
        # instruction (vpmaddubsw) can saturate, and u8 x u8 is the safe choice.
        return QuantType.QInt8 if has_vnni() else QuantType.QUInt8
    return QuantType.QInt8 if settings.weight_type == "int8" else QuantType.QUInt8


class _NoPreprocessHint(logging.Filter):
    # quantize_dynamic logs "Please consider to run pre-processing" on every call; for
    # dynamic quantization of these graphs it changes nothing, so it is only noise.
    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()


logging.getLogger().addFilter(_NoPreprocessHint())


def _extra_options() -> dict[str, Any]:
    import onnx

    # Fused graphs hold contrib ops whose output types ORT's shape inference cannot see.
    return {"DefaultTensorType": onnx.TensorProto.FLOAT}


def _entropy_ranges(model_path: Path, reader, augmented: Path, cache: Path) -> None:
    """Entropy (KL) activation ranges with a fine histogram, written as an ORT calibration cache.

    `quantize_static` builds its entropy calibrator with 128 histogram bins and 128 quantized
    bins and offers no option to change them. The KL search then has a single candidate, the
    whole range, so "entropy" returns exactly minmax's ranges (we found byte-identical models).
    With 2048 bins, the search tries every symmetric window of 256 bins (u8 levels) or more.
    """
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

    calibrator = create_calibrator(model_path, list(STATIC_OPS), augmented_model_path=str(augmented),
                                   calibrate_method=CalibrationMethod.Entropy, providers=["CPUExecutionProvider"],
                                   extra_options={"symmetric": False, "num_bins": ENTROPY_BINS,
                                                  "num_quantized_bins": ENTROPY_QUANTIZED_BINS})
    calibrator.collect_data(reader)
    save_tensors_data(calibrator.compute_data(), cache)


def _finish(job: Job, out: Path, exclude: list[str], extra: dict[str, Any]) -> dict[str, Any]:
    import onnx

    copy_support_files(job.source, out)
    model = onnx.load(str(out / OUTPUT_FILE), load_external_data=False)
    src_manifest = read_manifest(job.source)
    heads = sorted(head_nodes(load_graph(job.source).graph))
    quantized_heads = set((extra.get("tables") or {}).get("head") or [])
    return {"format": "onnx", "onnx_file": OUTPUT_FILE, "run_device": "cpu",
            "source_graph": {"optimize": src_manifest.get("optimize"), "fused": src_manifest.get("fused"),
                             "skip_layer_norm": src_manifest.get("skip_layer_norm")},
            # The export stage's session settings were chosen for this graph; they still apply.
            "ort_session_config": src_manifest.get("ort_session_config") or {},
            "quantized": quantized_counts(model),
            "skipped": [{"node": n, "reason": "output head kept fp32"} for n in heads if n not in quantized_heads]
            + [{"node": n, "reason": "accuracy-aware fallback"} for n in exclude], **extra}


@register_method("ort-dynamic-int8")
class OrtDynamicInt8(Method):
    Settings = OrtDynamicSettings
    input = "onnx"
    auto_order = 0
    # Fused (QAttention, QEmbedLayerNormalization), with the export's session settings (split
    # residual LayerNorms, denormals flushed): on this project's 2-core AVX512-VNNI machine
    # (ORT 1.31, b1, one review padded to 128 tokens, 2 threads) the MiniLM-L6 teacher ran in
    # 6.99 ms fused and 10.29 ms plain. Without those settings the fused graph was no faster
    # than the plain one (docs/quantize.md).
    export_optimize = "transformer"

    def export_level(self, task) -> str:
        # The timings above are a classifier's; a causal LM's export times its own fused and plain
        # decoders and keeps the faster (export's auto, compress.export_lm).
        return self.export_optimize if task.export_task == "text-classification" else "auto"

    def layers(self, job: Job) -> list[str]:
        return candidate_nodes(load_graph(job.source), DYNAMIC_OPS, weights_only=True)

    def build(self, job: Job, out: Path, exclude: list[str]) -> dict[str, Any]:
        from onnxruntime.quantization import quantize_dynamic

        settings = job.settings
        model = load_graph(job.source)
        heads = excluded_heads(model.graph)
        weight_type = _weight_type(settings)
        ops = list(DYNAMIC_OPS)
        tables = settings.quantize_embeddings
        if tables:
            # The tables and the head go to blockwise kernels below; fold a tied head's Transpose first.
            fold_constant_transposes(model)
            ops.remove("Gather")
            heads = excluded_heads(model.graph)
        quantize_dynamic(model, out / OUTPUT_FILE, op_types_to_quantize=ops, per_channel=settings.per_channel,
                         weight_type=weight_type, nodes_to_exclude=heads + list(exclude), extra_options=_extra_options())
        scheme = {"weights": f"{weight_type.name} symmetric " + ("per-channel" if settings.per_channel else "per-tensor"),
                  "activations": "QUInt8, dynamic per batch"}
        extra: dict[str, Any] = {}
        if tables:
            extra = self._tables(out / OUTPUT_FILE, settings, exclude)
            scheme["embeddings"] = extra.pop("scheme")
        return _finish(job, out, exclude, {"scheme": scheme, **extra})

    @staticmethod
    def _tables(path: Path, settings, exclude: list[str]) -> dict[str, Any]:
        """The LM head (MatMulNBits) and the embedding tables (GatherBlockQuantized) of the dynamic
        int8 graph at `path` in blocks of --embedding-bits (8 by default), rewritten in place.

        Small decoders need both: dynamic int8 is the fastest prefill on VNNI CPUs (one
        DynamicQuantizeMatMul per projection), and the tied 8,192 x 256 table, as fp32 head and
        int8 Gather, was most of the file (benchmarks/results/lm_quantize_austen.md).
        """
        import onnx

        from compress.hardware import has_vnni
        from compress.quantize.embeddings import embedding_gathers, quantize_head_and_tables, set_accuracy_level

        bits = settings.embedding_bits or 8
        model = onnx.load(str(path))
        heads = sorted(head_nodes(model.graph))
        gathers = [n for n in embedding_gathers(model.graph) if n not in exclude]
        model = quantize_head_and_tables(model, bits, settings.block_size, False, [h for h in heads if h not in exclude],
                                         gathers)
        # int8 activations per block on VNNI CPUs, as the int8 projections around it already do.
        level = 4 if has_vnni() else 0
        set_accuracy_level(model, level)
        onnx.save(model, str(path))
        return {"scheme": f"{bits}-bit blocks of {settings.block_size} (round to nearest) for the embedding tables "
                          f"and the output head (MatMulNBits accuracy_level {level})",
                "tables": {"bits": bits, "block_size": settings.block_size, "head": heads, "gathers": gathers}}


@register_method("ort-static-int8")
class OrtStaticInt8(Method):
    Settings = OrtStaticSettings
    input = "onnx"
    calibrated = True
    # Its calibration batches are padded classifier examples; a decoder's KV-cache inputs are not fed.
    tasks = ("classification",)
    auto_order = 1
    # QDQ on the plain graph: ORT fuses DequantizeLinear/MatMul/QuantizeLinear into integer
    # kernels when the session starts; the transformer fusions would hide MatMuls in Attention.
    export_optimize = "none"

    def check(self, settings: OrtStaticSettings, device: str) -> None:
        if settings.calib_samples < MIN_CALIBRATION:
            raise UserError(f"--calib-samples {settings.calib_samples} is too small: ort-static-int8 needs at least "
                            f"{MIN_CALIBRATION} examples to calibrate (128 or more gives stable ranges).")

    def check_source(self, src: Path) -> None:
        import onnx

        model = onnx.load(str(onnx_path(src)), load_external_data=False)
        if any(n.domain == "com.microsoft" for n in model.graph.node):
            raise UserError(f"'{src}' is a fused ONNX graph (ONNX Runtime contrib operators such as Attention), and "
                            "static QDQ calibration cannot infer the types inside it. Pass the PyTorch model (it is "
                            "exported without fusion for you) or an export made with --optimize none or basic.")

    def layers(self, job: Job) -> list[str]:
        return candidate_nodes(load_graph(job.source), STATIC_OPS, weights_only=False)

    def build(self, job: Job, out: Path, exclude: list[str]) -> dict[str, Any]:
        import tempfile

        import onnx
        from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                              quantize_static)
        from onnxruntime.quantization.shape_inference import quant_pre_process

        settings = job.settings
        with tempfile.TemporaryDirectory(dir=out) as tmp:
            pre = Path(tmp) / "pre.onnx"
            # Symbolic shape inference fails on these graphs; ONNX shape inference is enough.
            quant_pre_process(load_graph(job.source), str(pre), skip_symbolic_shape=True)
            model = onnx.load(str(pre))
            inputs = {i.name for i in model.graph.input}
            batches = [{k: v for k, v in b.items() if k in inputs} for b in job.calibration]

            class Reader(CalibrationDataReader):
                def __init__(self):
                    self._it = iter(batches)

                def get_next(self):
                    return next(self._it, None)

            heads = excluded_heads(model.graph)
            weight_type = _weight_type(settings)
            method = getattr(CalibrationMethod, CALIBRATION[settings.calib_method])
            cache = None
            if settings.calib_method == "entropy":
                cache = Path(tmp) / "ranges.json"
                _entropy_ranges(pre, Reader(), Path(tmp) / "augmented.onnx", cache)
            quantize_static(str(pre), str(out / OUTPUT_FILE), Reader(), quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=list(STATIC_OPS), per_channel=settings.per_channel,
                            activation_type=QuantType.QUInt8, weight_type=weight_type,
                            nodes_to_exclude=heads + list(exclude),
                            calibrate_method=method,
                            extra_options={**_extra_options(), "CalibTensorRangeSymmetric": False},
                            calibration_providers=["CPUExecutionProvider"], calibration_cache_path=cache)
        shutil.rmtree(out / "augmented_model.onnx", ignore_errors=True)
        return _finish(job, out, exclude, {"scheme": {
            "weights": f"{weight_type.name} symmetric " + ("per-channel" if settings.per_channel else "per-tensor"),
            "activations": f"QUInt8, static ({settings.calib_method} on {settings.calib_samples} examples)",
            "format": "QDQ", "operators": list(STATIC_OPS)}})
