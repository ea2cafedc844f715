"""Embedding tables and the output head as blocks: `Gather` -> `GatherBlockQuantized` (4 or 8
bits) and the head `MatMul` -> `MatMulNBits`, shared by ort-int4/ort-int8-weight-only and
ort-dynamic-int8 --quantize-embeddings.

onnxruntime's MatMulNBitsQuantizer quantizes a Gather to 4 bits only ("Gather only supports 4
bits quantization"), though the GatherBlockQuantized kernel also reads 8-bit tables (uint8
data, one float scale per block along the hidden dimension, and a uint8 zero point per block,
128 when there is none). In a small LM the token embedding, tied to the output head, is most
of the file, and 4 bits there cost more perplexity than 4 bits everywhere else
(benchmarks/results/lm_quantize_austen.md); `--embedding-bits 8` quantizes it here instead.
"""

from __future__ import annotations

import numpy as np

from compress.onnx_graph import drop_unused_initializers

DEFAULT_ZERO_POINT = 128  # what GatherBlockQuantized assumes for 8-bit data without zero points


def quantize_rows(table: np.ndarray, block_size: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Round-to-nearest 8-bit blocks of `block_size` values along each row of `table` [rows, width].

    Returns:
        (uint8 data [rows, width], float32 scales [rows, width / block], uint8 zero points of
        the same shape, or None when symmetric: then the zero point is 128).
    """
    rows, width = table.shape
    if width % block_size:
        raise ValueError(f"the table's width {width} is not a multiple of the block size {block_size}")
    blocks = table.astype(np.float32).reshape(rows, width // block_size, block_size)
    if symmetric:
        scale = np.abs(blocks).max(-1) / 127.0
        scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
        q = np.clip(np.rint(blocks / scale[..., None]) + DEFAULT_ZERO_POINT, 0, 255)
        return q.astype(np.uint8).reshape(rows, width), scale, None
    lo, hi = np.minimum(blocks.min(-1), 0.0), np.maximum(blocks.max(-1), 0.0)
    scale = (hi - lo) / 255.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    zero = np.clip(np.rint(-lo / scale), 0, 255)
    q = np.clip(np.rint(blocks / scale[..., None]) + zero[..., None], 0, 255)
    return q.astype(np.uint8).reshape(rows, width), scale, zero.astype(np.uint8)


def quantize_gathers_8bit(model, names: list[str], block_size: int, symmetric: bool) -> int:
    """Replace, in place, each named Gather of a constant 2-D table by an 8-bit GatherBlockQuantized.

    Returns:
        How many Gathers were replaced.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    done = 0
    for i, node in enumerate(list(graph.node)):
        if node.op_type != "Gather" or node.name not in names or node.input[0] not in inits:
            continue
        table = numpy_helper.to_array(inits[node.input[0]])
        if table.ndim != 2 or table.shape[1] % block_size:
            continue
        axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 0)
        data, scale, zero = quantize_rows(table, block_size, symmetric)
        base = node.input[0]
        graph.initializer.extend([numpy_helper.from_array(data, f"{base}_Q8"),
                                  numpy_helper.from_array(scale, f"{base}_Q8_scales")])
        inputs = [f"{base}_Q8", node.input[1], f"{base}_Q8_scales"]
        if zero is not None:
            graph.initializer.append(numpy_helper.from_array(zero, f"{base}_Q8_zero_points"))
            inputs.append(f"{base}_Q8_zero_points")
        new = helper.make_node("GatherBlockQuantized", inputs, list(node.output), name=f"{node.name}_Q8",
                               domain="com.microsoft", gather_axis=axis, quantize_axis=1, block_size=block_size, bits=8)
        graph.node.remove(node)
        graph.node.insert(i, new)
        done += 1
    drop_unused_initializers(graph)
    if done and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return done


def embedding_gathers(graph) -> list[str]:
    """Names of the Gathers that look up a constant 2-D table (token and position embeddings)."""
    tables = {t.name for t in graph.initializer if len(t.dims) == 2}
    return [n.name for n in graph.node if n.op_type == "Gather" and n.input[0] in tables]


def set_accuracy_level(model, level: int) -> int:
    """Set (level > 0) or remove (0) the accuracy_level attribute of every MatMulNBits node."""
    from onnx import helper

    n = 0
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        keep = [a for a in node.attribute if a.name != "accuracy_level"]
        del node.attribute[:]
        node.attribute.extend(keep)
        if level:
            node.attribute.append(helper.make_attribute("accuracy_level", level))
        n += 1
    return n


def quantize_head_and_tables(model, bits: int, block_size: int, symmetric: bool, heads: list[str],
                             gathers: list[str]):
    """Round-to-nearest `bits` blocks for the named head MatMuls (MatMulNBits) and embedding
    Gathers (GatherBlockQuantized; 4 bits by onnxruntime's quantizer, 8 by
    `compress.quantize.embeddings`). Returns the model (a new ModelProto when onnxruntime ran)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    if heads:
        others = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name not in heads]
        algo = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=symmetric, bits=bits,
                                            op_types_to_quantize=("MatMul",))
        quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=symmetric,
                                         nodes_to_exclude=others, op_types_to_quantize=("MatMul",), algo_config=algo)
        quantizer.process()
        model = quantizer.model.model
    if gathers and bits == 8:
        quantize_gathers_8bit(model, gathers, block_size, symmetric)
    elif gathers:
        others = [n.name for n in model.graph.node if n.op_type == "Gather" and n.name not in gathers]
        algo = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=symmetric, bits=4,
                                            op_types_to_quantize=("Gather",), quant_axes=(("Gather", 1),))
        quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=block_size, is_symmetric=symmetric,
                                         nodes_to_exclude=others, op_types_to_quantize=("Gather",),
                                         quant_axes=(("Gather", 1),), algo_config=algo)
        quantizer.process()
        model = quantizer.model.model
    return model
