"""The bitsandbytes runner (`format: bnb`): a transformers model whose config.json carries
its BitsAndBytesConfig, loaded with `from_pretrained`."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from compress.anatomy import model_inputs
from compress.errors import UserError
from compress.runners.torch_lm import TorchDecoder


class BnbRunner(TorchDecoder):
    """A bitsandbytes-quantized transformers model, loaded with from_pretrained; a causal LM
    decodes with the KV cache (`compress.runners.torch_lm`)."""

    format = "bnb"

    def __init__(self, directory: Path, device: str = "cpu", threads: int | None = None,
                 trust_remote_code: bool = False):
        import torch
        from transformers import AutoConfig

        from compress.models import load_tokenizer
        from compress.runners.torch_int8 import model_class
        from compress.tasks.registry import task_for_artifact

        if threads:
            torch.set_num_threads(threads)
        try:
            import bitsandbytes  # noqa: F401
        except Exception as err:
            raise UserError(f"'{directory}' is a bitsandbytes model and bitsandbytes cannot be imported ({err}).") from None
        dtype = torch.float16 if device == "cuda" else torch.float32
        self.config = AutoConfig.from_pretrained(str(directory), trust_remote_code=trust_remote_code)
        self.model = model_class(self.config).from_pretrained(
            str(directory), dtype=dtype, device_map=device, trust_remote_code=trust_remote_code).eval()
        self.tokenizer = load_tokenizer(directory, trust_remote_code)
        if self.tokenizer.pad_token_id is None and self.tokenizer.eos_token is not None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.task = task_for_artifact(directory)
        self.device = device

    def logits(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        import torch

        inputs = {k: torch.from_numpy(np.ascontiguousarray(v)).to(self.device) for k, v in model_inputs(batch).items()}
        with torch.inference_mode():
            return self.model(**inputs).logits.float().cpu().numpy()
