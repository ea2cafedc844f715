"""`torch-dynamic-int8`: PyTorch dynamic int8 (torch.ao `quantize_dynamic`), stored small.

Linear layers get int8 weights and quantize their activations on the fly; the word
embedding table is stored as uint8 rows with a float scale and offset per row (PyTorch's
weight-only quantized Embedding). The classifier head stays fp32.

On disk (`format: torch-int8`), one `model.safetensors`:
  - `<module>.weight.int8` (int8, [out, in]), `<module>.weight.scale` (float32, [out] per
    channel or [1] per tensor), `<module>.weight.zero_point` (int32, same shape) and
    `<module>.bias` (float32) for each quantized Linear;
  - `<module>.weight.uint8` (uint8, [rows, dim]), `<module>.weight.scale` and
    `<module>.weight.zero_point` (float32, [rows]) for a quantized Embedding;
  - every other tensor under its usual state_dict name, in fp32;
  - metadata `{"format": "torch-int8", "version": "1", "modules": JSON {name: kind}}`.
The runner rebuilds the architecture from config.json, swaps in quantized modules and
loads those tensors, so nothing is pickled and nothing runs code from the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from compress.artifacts import copy_support_files
from compress.errors import UserError
from compress.quantize import Job, Method, register_method
from compress.runners import register

WEIGHTS = "model.safetensors"
HEAD_NAMES = ("classifier", "score", "qa_outputs")


def _quiet():
    import warnings

    # quantize_dynamic works in torch 2.13 but warns on every call that it moves to torchao.
    warnings.filterwarnings("ignore", message=".*torch.ao.quantization.*")
    warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module="torch.ao")


def _is_head(name: str) -> bool:
    return name.split(".")[0] in HEAD_NAMES


def quantizable(model) -> dict[str, str]:
    """{module name: 'linear' | 'embedding'} for every module this method quantizes."""
    import torch

    found = {n: "linear" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not _is_head(n)}
    emb = model.get_input_embeddings()
    for n, m in model.named_modules():
        if m is emb:
            found[n] = "embedding"
    return found


def quantize_model(model, exclude: list[str], per_channel: bool):
    """Quantize `model` in place (eval mode) and return {module name: kind} of what was quantized."""
    import torch
    from torch.ao.quantization import (default_dynamic_qconfig, float_qparams_weight_only_qconfig,
                                       per_channel_dynamic_qconfig, quantize_dynamic)

    _quiet()
    modules = {n: k for n, k in quantizable(model).items() if n not in exclude}
    linear_q = per_channel_dynamic_qconfig if per_channel else default_dynamic_qconfig
    # Only the named modules: the qconfig dict keyed by name quantizes exactly these.
    spec = {n: (linear_q if k == "linear" else float_qparams_weight_only_qconfig) for n, k in modules.items()}
    quantize_dynamic(model.eval(), spec, dtype=torch.qint8, inplace=True)
    return modules


def save_quantized(model, modules: dict[str, str], path: Path) -> None:
    """Write the quantized model in the torch-int8 safetensors layout described above."""
    import torch
    from safetensors.torch import save_file

    tensors: dict[str, Any] = {}
    quantized_prefixes = tuple(n + "." for n in modules)
    for name, kind in modules.items():
        mod = model.get_submodule(name)
        w = mod.weight()
        if w.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
            scale = torch.tensor([w.q_scale()], dtype=torch.float32)
            zp = torch.tensor([w.q_zero_point()], dtype=torch.int32)
        else:
            scale = w.q_per_channel_scales().to(torch.float32)
            zp = w.q_per_channel_zero_points()
            zp = zp.to(torch.float32 if kind == "embedding" else torch.int32)
        tensors[f"{name}.weight.{'int8' if kind == 'linear' else 'uint8'}"] = w.int_repr().contiguous()
        tensors[f"{name}.weight.scale"] = scale.contiguous()
        tensors[f"{name}.weight.zero_point"] = zp.contiguous()
        if kind == "linear" and mod.bias() is not None:
            tensors[f"{name}.bias"] = mod.bias().detach().float().contiguous()
    for key, value in model.state_dict().items():
        if key.startswith(quantized_prefixes) or not isinstance(value, torch.Tensor) or value.is_quantized:
            continue
        tensors[key] = value.detach().contiguous()
    # Tied weights share storage; safetensors refuses shared tensors, so store copies.
    tensors = {k: v.clone() for k, v in tensors.items()}
    save_file(tensors, str(path), metadata={"format": "torch-int8", "version": "1", "modules": json.dumps(modules)})


def load_quantized(directory: Path):
    """Rebuild a model saved by `save_quantized` (quantized modules included), in eval mode."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file
    from torch.ao.nn.quantized import Embedding as QEmbedding
    from torch.ao.nn.quantized.dynamic import Linear as QLinear
    from transformers import AutoConfig, AutoModelForSequenceClassification

    path = directory / WEIGHTS
    if not path.is_file():
        raise UserError(f"'{directory}' is a torch-int8 artifact without its {WEIGHTS}. Re-run compress quantize.")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != "torch-int8":
        raise UserError(f"'{path}' is not in the torch-int8 layout (metadata format={meta.get('format')!r}).")
    modules: dict[str, str] = json.loads(meta["modules"])
    _quiet()
    tensors = load_file(str(path))
    config = AutoConfig.from_pretrained(str(directory))
    model = AutoModelForSequenceClassification.from_config(config).eval()
    floats = {k: v for k, v in tensors.items() if not k.startswith(tuple(n + "." for n in modules))}
    # The float tensors go in before the swap: quantized modules load only their packed form.
    _, unexpected = model.load_state_dict(floats, strict=False)
    if unexpected:
        raise UserError(f"'{path}' holds tensors this architecture does not have: {', '.join(unexpected[:5])}.")
    for name, kind in modules.items():
        old = model.get_submodule(name)
        scale, zp = tensors.pop(f"{name}.weight.scale"), tensors.pop(f"{name}.weight.zero_point")
        if kind == "linear":
            raw = tensors.pop(f"{name}.weight.int8")
            if scale.numel() == 1 and raw.shape[0] != 1:
                qw = torch._make_per_tensor_quantized_tensor(raw, float(scale), int(zp))
            else:
                qw = torch._make_per_channel_quantized_tensor(raw, scale.double(), zp.long(), 0)
            new = QLinear(old.in_features, old.out_features, dtype=torch.qint8)
            new.set_weight_bias(qw, tensors.pop(f"{name}.bias", None))
        else:
            raw = tensors.pop(f"{name}.weight.uint8")
            qw = torch._make_per_channel_quantized_tensor(raw.view(torch.quint8), scale.double(), zp.double(), 0)
            new = QEmbedding(old.num_embeddings, old.embedding_dim, dtype=torch.quint8)
            new.set_weight(qw)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    return model


@register_method("torch-dynamic-int8")
class TorchDynamicInt8(Method):
    input = "pytorch"

    def check(self, cfg, device: str) -> None:
        import torch

        if "x86" not in torch.backends.quantized.supported_engines and "qnnpack" not in torch.backends.quantized.supported_engines:
            raise UserError("This PyTorch build has no quantized CPU engine (x86/fbgemm or qnnpack), so "
                            "torch-dynamic-int8 cannot run here. Use ort-dynamic-int8.")

    def layers(self, job: Job) -> list[str]:
        from compress.models import load_classifier

        model, _ = load_classifier(job.source)
        return list(quantizable(model))

    def build(self, job: Job, out: Path, exclude: list[str]) -> dict[str, Any]:
        from compress.models import load_classifier

        model, _ = load_classifier(job.source)
        modules = quantize_model(model, exclude, job.cfg.per_channel)
        save_quantized(model, modules, out / WEIGHTS)
        copy_support_files(job.source, out)
        kinds = [k for k in modules.values()]
        heads = [n for n, m in model.named_modules() if _is_head(n) and n.count(".") <= 1 and hasattr(m, "weight")]
        return {"format": "torch-int8", "run_device": "cpu",
                "scheme": {"weights": "int8 symmetric " + ("per-channel" if job.cfg.per_channel else "per-tensor"),
                           "activations": "uint8, dynamic per batch", "embedding": "uint8 per row (weight-only)"},
                "quantized": {"Linear": kinds.count("linear"), "Embedding": kinds.count("embedding")},
                "quantized_modules": sorted(modules),
                "skipped": [{"module": n, "reason": "output head kept fp32"} for n in heads]
                + [{"module": n, "reason": "accuracy-aware fallback"} for n in exclude]}


@register("torch-int8")
class TorchInt8Runner:
    """Runs a torch-int8 artifact (PyTorch's quantized kernels are CPU-only)."""

    format = "torch-int8"

    def __init__(self, directory: Path, device: str = "cpu", threads: int | None = None):
        import torch
        from transformers import AutoConfig

        from compress.models import load_tokenizer

        if device != "cpu":
            raise UserError("A torch-int8 artifact runs on the CPU only (PyTorch's dynamic int8 kernels); use --device cpu.")
        if threads:
            torch.set_num_threads(threads)
        self.model = load_quantized(Path(directory))
        self.tokenizer = load_tokenizer(directory)
        self.config = AutoConfig.from_pretrained(str(directory))
        self.device = device

    def logits(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        import torch

        inputs = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()
                  if k in ("input_ids", "attention_mask", "token_type_ids")}
        with torch.inference_mode():
            return self.model(**inputs).logits.float().numpy()
