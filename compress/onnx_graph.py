"""ONNX graph tools shared by export and quantize: ONNX Runtime's optimizer, operator counts,
and the Gemm -> MatMul rewrite that weight-only quantization needs.

`MatMulNBitsQuantizer` quantizes `MatMul` (and `Gather`) only. GPT-2's Conv1D projections
export as `Gemm` (`torch.addmm`), so on a GPT-2 graph it quantizes nothing and says nothing
(docs/quantize.md#gpt-2-and-the-gemm-trap); `gemm_to_matmul` rewrites each Gemm with a constant
weight as MatMul + Add first, which computes the same thing.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from compress.ort_settings import SKIP_LAYER_NORM_FUSION

# Operators that graph fusion creates (com.microsoft contrib ops) or folds into; counted
# before and after optimisation to show what fusion did.
FUSED_OPS = ("Attention", "MultiHeadAttention", "GroupQueryAttention", "EmbedLayerNormalization",
             "SkipLayerNormalization", "SkipSimplifiedLayerNormalization", "LayerNormalization",
             "SimplifiedLayerNormalization", "Gelu", "FastGelu", "BiasGelu", "GemmFastGelu", "FusedMatMul",
             "RotaryEmbedding")
# ONNX Runtime's graph optimisation level behind --optimize basic / extended.
ORT_LEVELS = {"basic": 1, "extended": 2}


def fusion_model_type(model_type: str) -> str | None:
    """ONNX Runtime's optimizer family (bert, gpt2, ...) for a transformers model type, or None."""
    from optimum.onnxruntime.utils import ORTConfigManager

    try:
        return ORTConfigManager.get_model_ort_type(model_type)
    except KeyError:
        return None


def optimize_graph(path: Path, level: str, config, use_gpu: bool, fuse_skip_layer_norm: bool = True):
    """ONNX Runtime's optimizer on `path`; returns an onnxruntime.transformers OnnxModel."""
    import onnx
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.onnx_model import OnnxModel
    from onnxruntime.transformers.optimizer import optimize_by_onnxruntime, optimize_model

    if level == "transformer":
        # opt_level 1 (portable basic passes) then the Python fusions for this model family.
        family = fusion_model_type(config.model_type)
        options = FusionOptions(family)
        options.enable_skip_layer_norm = fuse_skip_layer_norm
        # With pruned heads the config's head count and width are not the attention's: 0 lets the
        # fusion read them off each layer's graph.
        pruned = bool(getattr(config, "pruned_heads", None))
        heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", 0) or 0
        hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", 0) or 0
        return optimize_model(str(path), model_type=family, num_heads=0 if pruned else heads,
                              hidden_size=0 if pruned else hidden, optimization_options=options, opt_level=1,
                              use_gpu=use_gpu)
    disabled = [] if fuse_skip_layer_norm else [SKIP_LAYER_NORM_FUSION]
    optimized = optimize_by_onnxruntime(str(path), use_gpu=use_gpu, optimized_model_path=str(path.with_suffix(".opt.onnx")),
                                        opt_level=ORT_LEVELS[level], disabled_optimizers=disabled)
    model = OnnxModel(onnx.load(optimized))
    Path(optimized).unlink()
    return model


def convert_to_fp16(model_proto):
    """fp16 weights and activations, fp32 inputs and logits (callers and runners stay unchanged)."""
    from onnxruntime.transformers.onnx_model import OnnxModel

    half = OnnxModel(model_proto)
    half.convert_float_to_float16(keep_io_types=True)
    return half


def operator_counts(model_proto, ops: tuple[str, ...] = FUSED_OPS) -> dict[str, int]:
    """{operator: count} of the operators in `ops` that `model_proto` holds."""
    counts = Counter(node.op_type for node in model_proto.graph.node)
    return {op: counts[op] for op in ops if counts[op]}


def save(onnx_model, path: Path) -> None:
    """Save an onnxruntime.transformers OnnxModel in one file (these models are far below 2 GB)."""
    onnx_model.save_model_to_file(str(path), use_external_data_format=False)


def gemm_to_matmul(model) -> int:
    """Rewrite, in place, every Gemm whose weight (B) is a constant as MatMul (+ Add of the bias).

    Gemm computes alpha * A' @ B' + beta * C; the weight is transposed into the MatMul's
    initializer when transB is set and alpha and beta are folded into the constants, so the
    result is the same to rounding. Gemms with transA or a non-constant B are left alone.

    Returns:
        How many Gemms were rewritten.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    nodes, converted = [], 0
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type != "Gemm" or attrs.get("transA", 0) or node.input[1] not in inits:
            nodes.append(node)
            continue
        weight = numpy_helper.to_array(inits[node.input[1]])
        if attrs.get("transB", 0):
            weight = weight.T
        alpha, beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
        if alpha != 1.0:
            weight = weight * np.asarray(alpha, dtype=weight.dtype)
        name = node.name or f"gemm_{converted}"
        weight_name = node.input[1]  # [K, N] already when transB = 0 and alpha = 1: used as it is
        if attrs.get("transB", 0) or alpha != 1.0:
            weight_name = f"{name}.weight_matmul"
            graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(weight), weight_name))
        has_bias = len(node.input) > 2 and node.input[2]
        matmul_out = f"{name}.matmul_out" if has_bias else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], weight_name], [matmul_out], name=f"{name}_MatMul"))
        if has_bias:
            bias = node.input[2]
            if beta != 1.0:
                if bias not in inits:
                    raise ValueError(f"Gemm '{name}' scales a non-constant bias (beta={beta}); it cannot be rewritten.")
                bias = f"{name}.bias_scaled"
                scaled = numpy_helper.to_array(inits[node.input[2]]) * np.float32(beta)
                graph.initializer.append(numpy_helper.from_array(scaled.astype(np.float32), bias))
            nodes.append(helper.make_node("Add", [matmul_out, bias], [node.output[0]], name=f"{name}_Add"))
        converted += 1
    del graph.node[:]
    graph.node.extend(nodes)
    drop_unused_initializers(graph)
    return converted


def fold_constant_transposes(model) -> int:
    """Replace, in place, every Transpose of an initializer by the transposed initializer.

    A tied LM head can export as MatMul(x, Transpose(embedding)); the quantizers only take a
    MatMul whose weight is itself an initializer. Returns how many Transposes were folded.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    nodes, folded = [], 0
    for node in graph.node:
        if node.op_type != "Transpose" or node.input[0] not in inits:
            nodes.append(node)
            continue
        perm = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "perm"), None)
        value = numpy_helper.to_array(inits[node.input[0]])
        value = np.transpose(value, perm) if perm is not None else value.T
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(value), node.output[0]))
        folded += 1
    del graph.node[:]
    graph.node.extend(nodes)
    drop_unused_initializers(graph)
    return folded


def drop_unused_initializers(graph) -> None:
    """Remove, in place, the initializers no node reads. One that is also a graph input stays:
    without it the input (an optional one, like `logits_to_keep`) would become required."""
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output} | {i.name for i in graph.input}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


# The optional input of an LM graph that says how many last positions get logits (0 = all),
# as transformers' `logits_to_keep`. It is an initializer that is also a graph input, so ONNX
# Runtime lets a caller override it and everyone else (optimum's ORTModelForCausalLM, which
# feeds only the inputs `session.get_inputs()` lists) gets the default, every position.
KEEP_INPUT = "logits_to_keep"
# Operators whose first input is the hidden state the output head projects.
HEAD_OPS = ("MatMul", "Gemm", "MatMulNBits")


def add_logits_to_keep(model, output: str = "logits") -> bool:
    """Give a causal-LM graph the optional input `logits_to_keep`, in place.

    The output head then projects only the last `logits_to_keep` positions of the final
    hidden state (a Slice in front of the head; 0, the default, keeps all), so a generation
    prefill computes one row of the vocabulary projection instead of one per prompt token,
    as transformers' `generate` does. Perplexity, which needs every position, feeds nothing.

    Returns:
        True when the input was added; False when the graph has it already or has no
        recognisable head (a MatMul-like node, perhaps behind a bias Add or a Cast, that
        makes `output`).
    """
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    if any(i.name == KEEP_INPUT for i in graph.input):
        return False
    producers = {o: n for n in graph.node for o in n.output}
    consts = {t.name for t in graph.initializer}
    node = producers.get(output)
    while node is not None and node.op_type in ("Add", "Cast", "Mul"):
        data = [i for i in node.input if i not in consts]
        if len(data) != 1:
            return False
        node = producers.get(data[0])
    if node is None or node.op_type not in HEAD_OPS:
        return False
    hidden = node.input[0]
    starts, sliced = f"{KEEP_INPUT}/starts", f"{KEEP_INPUT}/hidden"
    graph.initializer.extend([numpy_helper.from_array(np.zeros(1, np.int64), KEEP_INPUT),
                              numpy_helper.from_array(np.array([np.iinfo(np.int64).max], np.int64), f"{KEEP_INPUT}/ends"),
                              numpy_helper.from_array(np.ones(1, np.int64), f"{KEEP_INPUT}/axes")])
    graph.input.append(helper.make_tensor_value_info(KEEP_INPUT, TensorProto.INT64, [1]))
    # Slice(h, starts=-k, ends=max, axes=1): k = 0 gives start 0, every position.
    new = [helper.make_node("Neg", [KEEP_INPUT], [starts], name=f"{KEEP_INPUT}/Neg"),
           helper.make_node("Slice", [hidden, starts, f"{KEEP_INPUT}/ends", f"{KEEP_INPUT}/axes"], [sliced],
                            name=f"{KEEP_INPUT}/Slice")]
    node.input[0] = sliced
    at = list(graph.node).index(node)
    for i, n in enumerate(new):
        graph.node.insert(at + i, n)
    return True
