"""Model arithmetic: parameter counts and FLOPs per inference of an encoder classifier.

The FLOP formula is written out in docs/results-schema.md. It counts the matmuls of a
BERT-style encoder at the padded sequence length (eager backends compute on padding
too) and ignores embeddings lookups, softmax, LayerNorm, GELU and biases, which are
O(s*h) against the O(s*h^2 + s^2*h) of the matmuls.
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


def architecture(config) -> dict | None:
    """{layers, hidden, ff, heads, num_labels, vocab} from a transformers config, or None."""
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
