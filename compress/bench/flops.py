"""Model arithmetic: parameter counts, FLOPs per call, and the bytes a decode step reads.

The FLOP formulas are written out in docs/results-schema.md. They count the matmuls of a
BERT-style encoder at the padded sequence length (eager backends compute on padding too),
or of a decoder's prefill and cached decode steps, and ignore embedding lookups, softmax,
LayerNorm, activations and biases, which are O(s*h) against the O(s*h^2 + s^2*h) of the
matmuls.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

# transformers configs name the same sizes differently per architecture.
_ARCH_KEYS = {
    "layers": ("num_hidden_layers", "n_layers", "num_layers", "n_layer"),
    "hidden": ("hidden_size", "dim", "d_model", "n_embd"),
    "ff": ("intermediate_size", "hidden_dim", "ffn_dim", "n_inner"),
    "heads": ("num_attention_heads", "n_heads", "num_heads", "n_head"),
}


# Decoders whose feed-forward block is gated (SwiGLU): three h x ff matrices instead of two.
GATED_FF = ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "olmo", "smollm3")


def architecture(config) -> dict | None:
    """{layers, hidden, ff, heads, num_labels, vocab} from a transformers config, or None; plus
    `kv` (the K/V width under grouped-query attention) and `ff_matrices` (3 when gated)."""
    out: dict[str, int] = {}
    for name, keys in _ARCH_KEYS.items():
        for key in keys:
            value = getattr(config, key, None)
            if isinstance(value, int) and value > 0:
                out[name] = value
                break
    if "layers" not in out or "hidden" not in out:
        return None
    out.setdefault("ff", 4 * out["hidden"])  # the usual ratio when a config leaves it implicit
    pruned = getattr(config, "pruned_heads", None) or {}
    if pruned and out.get("heads"):
        # Pruned heads narrow Q, K, V, O and the attention itself: the mean width over layers.
        removed = sum(len(v) for v in pruned.values()) / out["layers"]
        out["attention"] = round(out["hidden"] * (1 - removed / out["heads"]))
    out["num_labels"] = int(getattr(config, "num_labels", 2) or 2)
    out["vocab"] = int(getattr(config, "vocab_size", 0) or 0)
    kv_heads = getattr(config, "num_key_value_heads", None)
    if isinstance(kv_heads, int) and out.get("heads") and kv_heads != out["heads"]:
        out["kv"] = out["hidden"] // out["heads"] * kv_heads  # grouped-query attention: K and V are narrower
    if getattr(config, "model_type", None) in GATED_FF:
        out["ff_matrices"] = 3  # gate, up and down projections
    return out


def flops_per_inference(arch: dict | None, batch_size: int, seq_len: int) -> float | None:
    """Floating-point operations (2 per multiply-add) of one forward pass on a padded batch.

    Per layer and sequence: projections Q, K, V, O: 4 * 2*s*h*a; feed-forward: 2 * 2*s*h*ff;
    attention scores QK^T and the weighted sum AV: 2 * 2*s^2*a, where a is the attention width
    (h, or less after head pruning). Then the pooler 2*h^2 and the classifier 2*h*labels once
    per sequence.
    """
    if not arch:
        return None
    s, h, ff, layers = seq_len, arch["hidden"], arch["ff"], arch["layers"]
    a = arch.get("attention", h)
    per_layer = 8 * s * h * a + 4 * s * h * ff + 4 * s * s * a
    head = 2 * h * h + 2 * h * arch.get("num_labels", 2)
    return float(batch_size * (layers * per_layer + head))


def _decoder_token_flops(arch: dict, context: float, head: bool = True) -> float:
    """FLOPs of one token through a decoder that attends to `context` positions, LM head included
    unless `head` is False.

    Per layer: Q and O 2 * 2*h*a, K and V 2 * 2*h*kv, feed-forward 2*h*ff per matrix,
    attention 2 * 2*context*a; then the LM head 2*h*vocab.
    """
    h, ff, layers = arch["hidden"], arch["ff"], arch["layers"]
    a = arch.get("attention", h)
    kv = arch.get("kv", a)
    per_layer = 4 * h * a + 4 * h * kv + 2 * h * ff * arch.get("ff_matrices", 2) + 4 * context * a
    return float(layers * per_layer + (2 * h * arch.get("vocab", 0) if head else 0))


def lm_flops(arch: dict | None, point: dict) -> float | None:
    """FLOPs of one timed call of an LM point: a prefill (every prompt position through the
    layers, with full s x s attention scores, and the LM head at the last position only, as
    transformers' generate and compress's exported graphs compute it), a prefill plus one
    decode step (ttft), or one decode step per sequence (decode, at the mean context of the run)."""
    if not arch:
        return None
    b, s = point["batch_size"], point["seq_len"]
    kind = point.get("kind")
    prefill = s * _decoder_token_flops(arch, s, head=False) + 2 * arch["hidden"] * arch.get("vocab", 0)
    if kind == "prefill":
        return float(b * prefill)
    if kind == "ttft":
        return float(b * (prefill + _decoder_token_flops(arch, s + 1)))
    if kind == "decode":
        return float(b * _decoder_token_flops(arch, s + (point.get("new_tokens", 1) + 1) / 2))
    return None


def kv_cache_bytes(arch: dict | None, point: dict, element_bytes: int) -> float | None:
    """Bytes of K and V a decode step reads: every layer's cache of every sequence, at the run's mean context."""
    if not arch or point.get("kind") != "decode":
        return None
    kv = arch.get("kv", arch.get("attention", arch["hidden"]))
    context = point["seq_len"] + (point.get("new_tokens", 1) + 1) / 2
    return float(point["batch_size"] * 2 * arch["layers"] * context * kv * element_bytes)


def point_flops(arch: dict | None, point: dict) -> float | None:
    """FLOPs of one timed call of any point: forward (encoder classifier) or an LM workload."""
    if point.get("kind", "forward") == "forward":
        return flops_per_inference(arch, point["batch_size"], point["seq_len"])
    return lm_flops(arch, point)


# --------------------------------------------------------------------------- bytes a decode step reads

def _module_weight_bytes(model) -> int | None:
    """Bytes of a torch model's weights that one decode step reads.

    Every parameter once (tied weights once), the packed int8 weights of dynamically
    quantized Linear layers included, but not the tables of embeddings that only look up
    rows (position embeddings, an untied input embedding): a step reads one row of those.
    """
    import torch

    if not isinstance(model, torch.nn.Module):
        return None
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    out_weight = getattr(out_emb, "weight", None)
    lookup_only = {id(m.weight) for m in model.modules()
                   if isinstance(m, torch.nn.Embedding) and m.weight is not out_weight}
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) in seen or id(p) in lookup_only:
            continue
        seen.add(id(p))
        total += p.numel() * p.element_size()
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if callable(weight) and not isinstance(weight, torch.nn.Parameter):
            try:
                total += int(weight().numel())  # int8: one byte each
            except (RuntimeError, TypeError):
                pass
    return total


LOOKUP_OPS = ("Gather", "GatherBlockQuantized", "GatherElements", "GatherND")


def onnx_weight_bytes(path: Path) -> int:
    """Bytes of an ONNX graph's initializers that one decode step reads: all but the tables
    only Gather-like nodes consume (embedding lookups read one row)."""
    import onnx
    from onnx import helper

    model = onnx.load(str(path), load_external_data=False)
    consumers: dict[str, set[str]] = {}

    def walk(graph):
        for node in graph.node:
            for name in node.input:
                consumers.setdefault(name, set()).add(node.op_type)
            for attr in node.attribute:
                if attr.g is not None and attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g)

    walk(model.graph)
    total = 0
    for init in model.graph.initializer:
        ops = consumers.get(init.name, set())
        if ops and ops <= set(LOOKUP_OPS):
            continue
        n = 1
        for d in init.dims:
            n *= d
        if init.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
            total += (n + 1) // 2
        else:
            total += n * helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
    return total


def decode_weight_bytes(runner, directory: str | Path) -> tuple[int | None, str]:
    """(bytes of weights one decode step reads, how they were counted) for a loaded runner.

    Counted on the in-memory torch module when the runner holds one, else on the runner's
    ONNX graph (or the directory's first .onnx file); None when neither can be read.
    """
    n = _module_weight_bytes(getattr(runner, "model", None))
    if n:
        return n, "module"
    path = getattr(runner, "path", None)
    if not (path and str(path).endswith(".onnx")):
        found = sorted(Path(directory).glob("*.onnx"))
        path = found[0] if found else None
    if path is not None and Path(path).is_file():
        return onnx_weight_bytes(Path(path)), "onnx-graph"
    return None, "unknown"


# --------------------------------------------------------------------------- parameter counts

def _module_parameters(model) -> int | None:
    """Parameters of a torch module, counting weights that quantization hid from .parameters()."""
    import torch

    if not isinstance(model, torch.nn.Module):
        return None
    if hasattr(model, "num_parameters"):
        # transformers' count undoes the 2-per-byte packing of bitsandbytes 4-bit weights.
        total = int(model.num_parameters())
    else:
        total = sum(p.numel() for p in model.parameters())
    for module in model.modules():
        # Dynamically quantized Linear layers keep their int8 weight in a packed
        # structure exposed through a method, not as a Parameter.
        weight = getattr(module, "weight", None)
        if callable(weight) and not isinstance(weight, torch.nn.Parameter):
            try:
                total += int(weight().numel())
            except (RuntimeError, TypeError):
                pass
    return total


def _safetensors_elements(path: Path) -> int:
    # The header is JSON after an 8-byte length: counting needs no tensor data.
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    total = 0
    for name, meta in header.items():
        if name != "__metadata__":
            n = 1
            for d in meta["shape"]:
                n *= d
            total += n
    return total


def _onnx_elements(path: Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    total = 0
    for init in model.graph.initializer:
        n = 1
        for d in init.dims:
            n *= d
        total += n
    return total


def file_parameters(directory: str | Path) -> int | None:
    """Elements of the weight tensors stored in an artifact's files (ONNX initializers or safetensors)."""
    directory = Path(directory)
    onnx_files = sorted(directory.glob("*.onnx"))
    if onnx_files:
        # Several .onnx files are alternatives (e.g. model.onnx and model_quantized.onnx): count the first.
        return _onnx_elements(onnx_files[0])
    st = sorted(directory.glob("*.safetensors"))
    if st:
        return sum(_safetensors_elements(p) for p in st)
    return None


def count_parameters(runner, directory: str | Path) -> tuple[int | None, str]:
    """(parameter count, how it was counted) for a loaded runner and its artifact directory.

    Prefers the in-memory torch module when the runner holds one (cheap and exact,
    quantized or not), else counts weight-tensor elements in the files.
    """
    n = _module_parameters(getattr(runner, "model", None))
    if n:  # 0 means a wrapper module that holds no torch weights (e.g. a session)
        return n, "module"
    n = file_parameters(directory)
    return n, "files" if n is not None else "unknown"
