"""The torch-int8 runner (`format: torch-int8`): PyTorch dynamic int8, rebuilt from safetensors.

On disk (`format: torch-int8`), one `model.safetensors`:
  - `<module>.weight.int8` (int8, [out, in]), `<module>.weight.scale` (float32, [out] per
    channel or [1] per tensor), `<module>.weight.zero_point` (int32, same shape) and
    `<module>.bias` (float32) for each quantized Linear;
  - `<module>.weight.uint8` (uint8, [rows, dim]), `<module>.weight.scale` and
    `<module>.weight.zero_point` (float32, [rows]) for a quantized Embedding;
  - every other tensor under its usual state_dict name, in fp32;
  - metadata `{"format": "torch-int8", "version": "1", "modules": JSON {name: kind}}`, and
    `"conv1d_as_linear": "1"` when GPT-2's Conv1D projections were quantized as Linear layers.
The runner rebuilds the architecture from config.json, swaps in quantized modules and
loads those tensors, so nothing is pickled and nothing runs code from the file.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from compress.anatomy import model_inputs
from compress.errors import UserError
from compress.runners.torch_lm import TorchDecoder

WEIGHTS = "model.safetensors"


def quiet_torch_ao():
    """Silence torch.ao's deprecation warnings (quantize_dynamic still works in torch 2.13)."""
    import warnings

    # quantize_dynamic works in torch 2.13 but warns on every call that it moves to torchao.
    warnings.filterwarnings("ignore", message=".*torch.ao.quantization.*")
    warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module="torch.ao")


def model_class(config):
    """The transformers class that config.json's `architectures` names (e.g. GPT2LMHeadModel,
    BertForSequenceClassification); AutoModelForSequenceClassification when it names none."""
    import transformers

    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    return transformers.AutoModelForSequenceClassification


def conv1d_to_linear(model) -> list[str]:
    """Replace GPT-2's Conv1D projections (weight [in, out]) by equivalent nn.Linear modules
    (weight [out, in]) in place, so that torch.ao's quantize_dynamic, which takes nn.Linear
    only, quantizes them. Returns the names of the replaced modules."""
    import torch
    from transformers.pytorch_utils import Conv1D

    replaced = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, Conv1D):
            continue
        n_in, n_out = module.weight.shape
        linear = torch.nn.Linear(n_in, n_out, bias=module.bias is not None)
        with torch.no_grad():
            linear.weight.copy_(module.weight.t())
            if module.bias is not None:
                linear.bias.copy_(module.bias)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, linear)
        replaced.append(name)
    return replaced


def load_quantized(directory: Path, trust_remote_code: bool = False):
    """Rebuild a model saved by `save_quantized` (quantized modules included), in eval mode."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file
    from torch.ao.nn.quantized import Embedding as QEmbedding
    from torch.ao.nn.quantized.dynamic import Linear as QLinear
    from transformers import AutoConfig

    path = directory / WEIGHTS
    if not path.is_file():
        raise UserError(f"'{directory}' is a torch-int8 artifact without its {WEIGHTS}. Re-run compress quantize.")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != "torch-int8":
        raise UserError(f"'{path}' is not in the torch-int8 layout (metadata format={meta.get('format')!r}).")
    modules: dict[str, str] = json.loads(meta["modules"])
    quiet_torch_ao()
    tensors = load_file(str(path))
    config = AutoConfig.from_pretrained(str(directory), trust_remote_code=trust_remote_code)
    cls = model_class(config)
    model = (cls.from_config(config, trust_remote_code=trust_remote_code) if hasattr(cls, "from_config")
             else cls(config)).eval()
    if meta.get("conv1d_as_linear") == "1":
        conv1d_to_linear(model)  # the quantized GPT-2 projections were stored as Linear layers
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


class TorchInt8Runner(TorchDecoder):
    """Runs a torch-int8 artifact (PyTorch's quantized kernels are CPU-only); a causal LM
    decodes with the KV cache (`compress.runners.torch_lm`)."""

    format = "torch-int8"

    def __init__(self, directory: Path, device: str = "cpu", threads: int | None = None,
                 trust_remote_code: bool = False):
        import torch
        from transformers import AutoConfig

        from compress.models import load_tokenizer
        from compress.tasks.registry import task_for_artifact

        if device != "cpu":
            raise UserError("A torch-int8 artifact runs on the CPU only (PyTorch's dynamic int8 kernels); use --device cpu.")
        if threads:
            torch.set_num_threads(threads)
        self.model = load_quantized(Path(directory), trust_remote_code)
        self.tokenizer = load_tokenizer(directory, trust_remote_code)
        if self.tokenizer.pad_token_id is None and self.tokenizer.eos_token is not None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.config = AutoConfig.from_pretrained(str(directory), trust_remote_code=trust_remote_code)
        self.task = task_for_artifact(directory)
        self.device = device

    def logits(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        import torch

        inputs = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in model_inputs(batch).items()}
        with torch.inference_mode():
            return self.model(**inputs).logits.float().numpy()
