"""`torch-dynamic-int8`: PyTorch dynamic int8 (torch.ao `quantize_dynamic`), stored small.

Linear layers get int8 weights and quantize their activations on the fly; the word
embedding table is stored as uint8 rows with a float scale and offset per row (PyTorch's
weight-only quantized Embedding). The output head (a classifier's head, a causal LM's LM head)
stays fp32. GPT-2's Conv1D projections are turned into the nn.Linear layers they are
equivalent to first: quantize_dynamic takes nn.Linear only.

The on-disk layout (`format: torch-int8`) is described, and read back, in
`compress.runners.torch_int8`; `save_quantized` here writes it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from compress.anatomy import is_head
from compress.artifacts import copy_support_files
from compress.errors import UserError
from compress.quantize.registry import Int8Settings, Job, Method, register_method
from compress.runners.torch_int8 import WEIGHTS, quiet_torch_ao


def head_names(model) -> set[str]:
    """Modules of the output head: a classifier's head, or a causal LM's output embedding (LM head)."""
    heads = {n for n, _ in model.named_modules() if n and is_head(n)}
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    heads.update(n for n, m in model.named_modules() if out is not None and m is out)
    return heads


def load_source(job: Job):
    """The fp32 model of the job's source, of its task, with GPT-2's Conv1D projections as nn.Linear.

    Returns:
        (model, names of the Conv1D modules that became Linear).
    """
    from compress.runners.torch_int8 import conv1d_to_linear
    from compress.tasks.registry import task_for_artifact

    model, _ = task_for_artifact(job.source).load_model(job.source, job.cfg.trust_remote_code)
    return model, conv1d_to_linear(model)


def quantizable(model) -> dict[str, str]:
    """{module name: 'linear' | 'embedding'} for every module this method quantizes."""
    import torch

    heads = head_names(model)
    found = {n: "linear" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in heads}
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

    quiet_torch_ao()
    modules = {n: k for n, k in quantizable(model).items() if n not in exclude}
    linear_q = per_channel_dynamic_qconfig if per_channel else default_dynamic_qconfig
    # Only the named modules: the qconfig dict keyed by name quantizes exactly these.
    spec = {n: (linear_q if k == "linear" else float_qparams_weight_only_qconfig) for n, k in modules.items()}
    quantize_dynamic(model.eval(), spec, dtype=torch.qint8, inplace=True)
    return modules


def save_quantized(model, modules: dict[str, str], path: Path, conv1d_as_linear: bool = False) -> None:
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
    meta = {"format": "torch-int8", "version": "1", "modules": json.dumps(modules)}
    if conv1d_as_linear:
        meta["conv1d_as_linear"] = "1"
    save_file(tensors, str(path), metadata=meta)


@register_method("torch-dynamic-int8")
class TorchDynamicInt8(Method):
    Settings = Int8Settings
    input = "pytorch"
    auto_order = 2

    def check(self, settings: Int8Settings, device: str) -> None:
        import torch

        if "x86" not in torch.backends.quantized.supported_engines and "qnnpack" not in torch.backends.quantized.supported_engines:
            raise UserError("This PyTorch build has no quantized CPU engine (x86/fbgemm or qnnpack), so "
                            "torch-dynamic-int8 cannot run here. Use ort-dynamic-int8.")

    def layers(self, job: Job) -> list[str]:
        model, _ = load_source(job)
        return list(quantizable(model))

    def build(self, job: Job, out: Path, exclude: list[str]) -> dict[str, Any]:
        model, converted = load_source(job)
        heads = sorted(n for n in head_names(model) if n.count(".") <= 1 and hasattr(model.get_submodule(n), "weight"))
        modules = quantize_model(model, exclude, job.settings.per_channel)
        save_quantized(model, modules, out / WEIGHTS, conv1d_as_linear=bool(converted))
        copy_support_files(job.source, out)
        kinds = [k for k in modules.values()]
        return {"format": "torch-int8", "run_device": "cpu",
                "scheme": {"weights": "int8 symmetric " + ("per-channel" if job.settings.per_channel else "per-tensor"),
                           "activations": "uint8, dynamic per batch", "embedding": "uint8 per row (weight-only)"},
                "quantized": {"Linear": kinds.count("linear"), "Embedding": kinds.count("embedding")},
                "quantized_modules": sorted(modules),
                "skipped": [{"module": n, "reason": "output head kept fp32"} for n in heads]
                + [{"module": n, "reason": "accuracy-aware fallback"} for n in exclude]}
