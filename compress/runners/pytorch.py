"""The eager PyTorch runner (`format: pytorch`): fp32, and the bf16/fp16 casts, of any task."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from compress.anatomy import model_inputs
from compress.artifacts import read_manifest
from compress.runners.torch_lm import TorchDecoder


class TorchRunner(TorchDecoder):
    """Eager PyTorch: fp32, bf16/fp16 casts, and anything `from_pretrained` loads.

    For a causal LM, `logits` gives [b, t, vocab] and `start`/`step`/`generate` decode with
    transformers' DynamicCache (`compress.runners.torch_lm`).
    """

    format = "pytorch"

    def __init__(self, directory: Path, device: str = "cpu", threads: int | None = None,
                 trust_remote_code: bool = False):
        import torch
        from transformers import AutoConfig

        from compress.tasks.registry import task_for_artifact

        if threads:
            torch.set_num_threads(threads)
        self.task = task_for_artifact(directory)
        self.model, self.tokenizer = self.task.load_model(directory, trust_remote_code)
        manifest = read_manifest(directory)
        dtype = manifest.get("dtype")
        if dtype in ("bf16", "fp16"):
            self.model.to(torch.bfloat16 if dtype == "bf16" else torch.float16)
            self.format = f"pytorch-{dtype}"
        self.device = device
        self.model.to(device).eval()
        self.config = AutoConfig.from_pretrained(str(directory), trust_remote_code=trust_remote_code)

    def logits(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        import torch

        inputs = {k: torch.from_numpy(np.ascontiguousarray(v)).to(self.device) for k, v in model_inputs(batch).items()}
        with torch.inference_mode():
            return self.model(**inputs).logits.float().cpu().numpy()
