"""`ort-int4` and `ort-int8-weight-only`: ONNX Runtime's blockwise weight-only MatMulNBits.

Each MatMul with a constant weight becomes a `MatMulNBits` (com.microsoft) holding 4- or
8-bit blocks of `--block-size` weights along the input dimension, each block with its own
scale (and zero point unless `--symmetric`). Activations stay float, unless
`accuracy_level` 4 lets the kernel quantize them to int8 per block (the VNNI path).

- `--algorithm rtn` (default): round to nearest per block, onnxruntime's
  `DefaultWeightOnlyQuantConfig` (4 and 8 bits).
- `--algorithm hqq`: half-quadratic quantization (`HQQWeightOnlyQuantConfig`): better
  scales and zero points, no data needed (4 bits).
- `--algorithm gptq`: GPTQ with onnxruntime's bundled implementation (`gptq_quantize`, what
  `MatMulNBitsQuantizer` runs for a `GPTQWeightOnlyQuantConfig`), calibrated on
  `--calib-samples` training windows (4 bits).
- `--quantize-embeddings`: also the token embedding (`Gather` -> `GatherBlockQuantized`, round
  to nearest) and the output head (the LM head, tied to the embedding in GPT-2 and Llama
  specs). In a small LM these two are most of the file. `--embedding-bits 8` gives them 8-bit
  blocks under a 4-bit body (onnxruntime's quantizer makes 4-bit tables only;
  `compress.quantize.embeddings` makes the 8-bit ones).
- `--accuracy-level auto` (default): the graph is built once, then timed with the MatMulNBits
  nodes at level 0 (fp32 compute) and at level 4 (int8 compute), interleaved on this
  machine; the faster is kept, and the manifest records both timings.

Before quantizing, every Gemm with a constant weight is rewritten as the MatMul + Add it
computes (`compress.onnx_graph.gemm_to_matmul`): GPT-2's Conv1D projections export as Gemm,
which MatMulNBitsQuantizer skips without a word. After quantizing, the MatMulNBits nodes are
counted, and a graph in which none was made is an error.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from compress.artifacts import copy_support_files, read_manifest
from compress.errors import UserError
from compress.onnx_graph import fold_constant_transposes, gemm_to_matmul
from compress.quantize.embeddings import quantize_head_and_tables, set_accuracy_level
from compress.quantize.onnx_int8 import head_nodes, load_graph
from compress.quantize.registry import Job, Method, TableSettings, register_method

OUTPUT_FILE = "model_nbits.onnx"
NBITS_OPS = ("MatMulNBits", "GatherBlockQuantized")
# What the accuracy-level choice times: a prefill of this many tokens and a decode step after it.
TIMED_PROMPT = 128
# Level 4 must be this much faster to be kept: timing noise should not flip the choice.
LEVEL4_MARGIN = 0.97


class NBitsSettings(TableSettings):
    """Settings of the MatMulNBits methods."""

    algorithm: Literal["rtn", "hqq", "gptq"] = Field("rtn", description="how blocks are rounded: rtn (round to nearest), hqq (half-quadratic scales, no data), gptq (calibrated on training text; 4 bits)")
    symmetric: bool = Field(False, description="symmetric blocks without a zero point (rtn, gptq); asymmetric keeps one offset per block")
    accuracy_level: Literal["auto", "0", "1", "2", "3", "4"] = Field("auto", description="MatMulNBits compute: 0 = fp32 (unset), 4 = int8 activations per block (VNNI); auto = time 0 and 4 on this machine and keep the faster")
    calib_samples: int = Field(32, ge=1, description="training examples (windows of --max-length tokens for a causal LM) used to calibrate")


def prepare(job: Job):
    """The source graph with constant Transposes folded and every constant Gemm rewritten as
    MatMul + Add; (model, Gemms rewritten)."""
    model = load_graph(job.source)
    fold_constant_transposes(model)
    return model, gemm_to_matmul(model)


def _constant_2d(graph) -> dict[str, tuple[int, ...]]:
    return {t.name: tuple(t.dims) for t in graph.initializer if len(t.dims) == 2}


def targets(model, quantize_embeddings: bool) -> dict[str, str]:
    """{node name: 'matmul' | 'embedding'} of what the method quantizes in `model`, in graph order.

    MatMuls with a constant 2-D weight, without the output head unless `quantize_embeddings`;
    with it, also the Gathers that read a constant 2-D table (the token embedding, and the
    position table of GPT-2).
    """
    graph = model.graph
    consts, heads = _constant_2d(graph), head_nodes(graph)
    found = {}
    for node in graph.node:
        if node.op_type == "MatMul" and node.input[1] in consts and (quantize_embeddings or node.name not in heads):
            found[node.name] = "matmul"
        elif node.op_type == "Gather" and quantize_embeddings and node.input[0] in consts:
            found[node.name] = "embedding"
    return found


def nbits_counts(model) -> dict[str, int]:
    counts = Counter(n.op_type for n in model.graph.node)
    return {op: counts[op] for op in NBITS_OPS if counts[op]}


def _quiet():
    """onnxruntime's GPTQ prints a progress bar and its quantizer logs every node at INFO."""
    return contextlib.redirect_stdout(io.StringIO())


# The quantizer logs a line per node at INFO, and warns that lifting the opset to 21 for 4-bit
# embedding tables "may not be a valid model": every graph it writes is loaded and scored here.
logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.ERROR)


def _gptq_reader(job: Job, model) -> list[dict[str, np.ndarray]]:
    """The calibration windows as full graph feeds (position ids, an empty KV cache)."""
    inputs = {i.name: i for i in model.graph.input}
    feeds = []
    for batch in job.calibration:
        ids = np.asarray(batch["input_ids"], dtype=np.int64)
        feed = {"input_ids": ids}
        if "attention_mask" in inputs:
            feed["attention_mask"] = np.ones_like(ids)
        if "position_ids" in inputs:
            feed["position_ids"] = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int64), ids.shape).copy()
        if "token_type_ids" in inputs:
            feed["token_type_ids"] = np.asarray(batch.get("token_type_ids", np.zeros_like(ids)), dtype=np.int64)
        for name, inp in inputs.items():
            if name.startswith("past_key_values."):
                dims = [d.dim_value for d in inp.type.tensor_type.shape.dim]
                feed[name] = np.zeros((ids.shape[0], dims[1], 0, dims[3]), dtype=np.float32)
        feeds.append(feed)
    return feeds


def quantize_graph(model, bits: int, settings: NBitsSettings, exclude: list[str], job: Job):
    """MatMulNBits (and GatherBlockQuantized) quantization of `model` (already Gemm-free).

    Returns the quantized ModelProto. Accuracy level is left unset here (set afterwards).
    """
    from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig,
                                                                 HQQWeightOnlyQuantConfig, MatMulNBitsQuantizer)

    found = targets(model, settings.quantize_embeddings)
    table_bits = settings.embedding_bits or bits
    heads = head_nodes(model.graph) if table_bits != bits else set()
    matmuls = [n for n, k in found.items() if k == "matmul" and n not in exclude and n not in heads]
    head_matmuls = [n for n, k in found.items() if k == "matmul" and n not in exclude and n in heads]
    embeddings = [n for n, k in found.items() if k == "embedding" and n not in exclude]
    every_matmul = [n.name for n in model.graph.node if n.op_type == "MatMul"]
    skip_matmuls = [n for n in every_matmul if n not in matmuls]
    if settings.algorithm == "gptq":
        from onnxruntime.quantization.neural_compressor import gptq_quantize

        config = {n: "fp32" for n in skip_matmuls}
        with _quiet():
            quantized = gptq_quantize(model, [(feed, None) for feed in _gptq_reader(job, model)], weight_config=config,
                                      num_bits=bits, group_size=settings.block_size,
                                      scheme="sym" if settings.symmetric else "asym", n_samples=-1)
        model = quantized.model
    else:
        if settings.algorithm == "hqq":
            algo = HQQWeightOnlyQuantConfig(block_size=settings.block_size, bits=bits, op_types_to_quantize=("MatMul",))
        else:
            algo = DefaultWeightOnlyQuantConfig(block_size=settings.block_size, is_symmetric=settings.symmetric,
                                                bits=bits, op_types_to_quantize=("MatMul",))
        quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=settings.block_size,
                                         is_symmetric=settings.symmetric, nodes_to_exclude=skip_matmuls,
                                         op_types_to_quantize=("MatMul",), algo_config=algo)
        with warnings.catch_warnings():
            # HQQ wraps read-only weight arrays in torch tensors (it only reads them).
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            quantizer.process()
        model = quantizer.model.model
    # The output head at the tables' bits when they differ from the body's; the tables always here.
    return quantize_head_and_tables(model, table_bits, settings.block_size, settings.symmetric, head_matmuls,
                                    embeddings)


def _timing_runner(directory: Path, name: str, threads: int | None, session_config: dict):
    from compress.runners.ort import OrtRunner

    return OrtRunner(directory, "cpu", threads, name, session_config)


def choose_accuracy_level(directory: Path, model, threads: int | None, session_config: dict) -> dict[str, Any]:
    """Time the quantized graph at accuracy level 0 and 4 (interleaved) and return the choice.

    A causal LM is timed on a 128-token prefill plus one cached decode step per generated
    token (64), a classifier on one [1, 128] batch. Level 4 is kept only when it is at least
    3 % faster.
    """
    import onnx

    from compress.ort_settings import time_interleaved

    files = {}
    for level in (0, 4):
        set_accuracy_level(model, level)
        files[level] = f"timing-level{level}.onnx"
        onnx.save(model, str(directory / files[level]))
    try:
        runners = {level: _timing_runner(directory, f, threads, session_config) for level, f in files.items()}
        vocab = int(getattr(runners[0].config, "vocab_size", 1000) or 1000)
        ids = np.random.default_rng(0).integers(0, vocab, (1, TIMED_PROMPT), dtype=np.int64)
        calls = {}
        for level, runner in runners.items():
            if runner.past_names:
                logits, state = runner.start(ids)
                token = logits.argmax(-1)
                calls[f"level{level}_prefill"] = lambda r=runner: r.start(ids)
                calls[f"level{level}_step"] = lambda r=runner, t=token, s=state: r.step(t, s)
            else:
                batch = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
                calls[f"level{level}_forward"] = lambda r=runner: r.logits(batch)
        ms = time_interleaved(calls, rounds=5, per_round=10)
    except Exception as err:  # a kernel that cannot run at level 4 on this CPU: keep level 0
        return {"choice": 0, "how": f"auto: level 4 could not run here ({type(err).__name__}: {err}); level 0 kept"}
    finally:
        for f in files.values():
            (directory / f).unlink(missing_ok=True)

    def total(level: int) -> float:
        if f"level{level}_step" in ms:
            return ms[f"level{level}_prefill"] + 64 * ms[f"level{level}_step"]
        return ms[f"level{level}_forward"]

    choice = 4 if total(4) < LEVEL4_MARGIN * total(0) else 0
    what = "a 128-token prefill + 64 decode steps" if "level0_step" in ms else "one [1, 128] batch"
    return {"choice": choice, "ms": ms,
            "how": f"auto: {what} at batch 1, timed interleaved on this machine: level 0 {total(0):.2f} ms, "
                   f"level 4 {total(4):.2f} ms (4 kept only when {100 * (1 - LEVEL4_MARGIN):.0f} % faster)"}


class NBits(Method):
    Settings = NBitsSettings
    input = "onnx"
    tasks = ("classification", "causal-lm")
    bits: int

    def needs_calibration(self, settings: NBitsSettings) -> bool:
        return settings.algorithm == "gptq"

    def check(self, settings: NBitsSettings, device: str) -> None:
        if settings.algorithm in ("gptq", "hqq") and self.bits != 4:
            raise UserError(f"--algorithm {settings.algorithm} makes 4-bit blocks only in onnxruntime; use --method "
                            f"ort-int4, or --algorithm rtn for {self.bits}-bit weights.")
        if settings.embedding_bits and not settings.quantize_embeddings:
            raise UserError(f"--embedding-bits {settings.embedding_bits} sets the bits of the embedding tables and the "
                            "output head, which stay in full precision without --quantize-embeddings. Add "
                            "--quantize-embeddings, or drop --embedding-bits.")
        if settings.algorithm == "hqq" and settings.symmetric:
            raise UserError("--algorithm hqq keeps a zero point per block; it has no symmetric form. Drop --symmetric.")

    def check_source(self, src: Path) -> None:
        import onnx

        from compress.quantize.onnx_int8 import onnx_path

        model = onnx.load(str(onnx_path(src)), load_external_data=False)
        ops = Counter(n.op_type for n in model.graph.node)
        if ops["MatMulNBits"]:
            raise UserError(f"'{src}' is already quantized with MatMulNBits. Quantize the fp32 ONNX graph it came from.")
        consts = _constant_2d(model.graph)
        if not any(n.op_type in ("MatMul", "Gemm") and len(n.input) > 1 and n.input[1] in consts for n in model.graph.node):
            common = ", ".join(f"{op} {k}" for op, k in ops.most_common(6)) or "no operators"
            raise UserError(
                f"The graph of '{src}' has no MatMul or Gemm with a constant weight, so MatMulNBits has nothing to "
                f"quantize (its operators: {common}). Pass an fp32 graph exported by compress export, or the PyTorch "
                "model (exported for you).")

    def layers(self, job: Job) -> list[str]:
        model, _ = prepare(job)
        return list(targets(model, job.settings.quantize_embeddings))

    def build(self, job: Job, out: Path, exclude: list[str]) -> dict[str, Any]:
        import onnx

        settings = job.settings
        model, rewritten = prepare(job)
        found = targets(model, settings.quantize_embeddings)
        heads = sorted(head_nodes(model.graph))
        wanted = [n for n, kind in found.items() if kind == "matmul" and n not in exclude]
        if not any(kind == "matmul" for kind in found.values()):
            raise UserError(f"The graph of '{job.source}' has no MatMul with a constant weight outside the output head "
                            f"({rewritten} Gemm rewritten to MatMul), so MatMulNBits has nothing to quantize. Pass "
                            "--quantize-embeddings to quantize the head, or use ort-dynamic-int8.")
        model = quantize_graph(model, self.bits, settings, exclude, job)
        counts = nbits_counts(model)
        # Count what was made: onnxruntime's quantizer skips what it cannot take without an error.
        if wanted and counts.get("MatMulNBits", 0) < len(wanted):
            raise UserError(
                f"MatMulNBits quantization of '{job.source}' made {counts.get('MatMulNBits', 0)} MatMulNBits nodes for "
                f"{len(wanted)} MatMuls ({rewritten} Gemm rewritten to MatMul): onnxruntime skipped some without a "
                "word. Check that their weights are 2-D float32 constants, or use ort-dynamic-int8.")
        copy_support_files(job.source, out)
        session_config = read_manifest(job.source).get("ort_session_config") or {}
        if settings.accuracy_level == "auto":
            if "accuracy_level" not in job.memo:
                job.memo["accuracy_level"] = choose_accuracy_level(out, model, job.cfg.threads, session_config)
            level_info = job.memo["accuracy_level"]
        else:
            level_info = {"choice": int(settings.accuracy_level), "how": "--accuracy-level"}
        set_accuracy_level(model, level_info["choice"])
        onnx.save(model, str(out / OUTPUT_FILE))
        skipped = [{"node": n, "reason": "output head kept in full precision"} for n in heads
                   if not settings.quantize_embeddings]
        skipped += [{"node": n, "reason": "accuracy-aware fallback"} for n in exclude]
        src_manifest = read_manifest(job.source)
        return {"format": "onnx", "onnx_file": OUTPUT_FILE, "run_device": "cpu",
                "source_graph": {"optimize": src_manifest.get("optimize"), "fused": src_manifest.get("fused")},
                "ort_session_config": session_config,
                "scheme": {"weights": f"{self.bits}-bit blocks of {settings.block_size}, "
                                      f"{'symmetric' if settings.symmetric else 'asymmetric'} ({settings.algorithm})",
                           "embeddings": (f"{settings.embedding_bits or self.bits}-bit blocks of {settings.block_size} "
                                          "(round to nearest), the output head too" if settings.quantize_embeddings
                                          else "fp32"),
                           "activations": "int8 per block (accuracy_level 4)" if level_info["choice"] == 4 else
                           f"float (accuracy_level {level_info['choice']})"},
                "quantized": {"MatMul": counts.get("MatMulNBits", 0), "Gather": counts.get("GatherBlockQuantized", 0)},
                "operators": counts, "gemm_rewritten_as_matmul": rewritten, "accuracy_level": level_info,
                "skipped": skipped}


@register_method("ort-int4")
class OrtInt4(NBits):
    bits = 4


@register_method("ort-int8-weight-only")
class OrtInt8WeightOnly(NBits):
    bits = 8
