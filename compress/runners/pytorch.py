"""The eager PyTorch runner (`format: pytorch`): fp32, and the bf16/fp16 casts."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from compress.anatomy import model_inputs
from compress.artifacts import read_manifest


class TorchRunner:
    """Eager PyTorch: fp32, bf16/fp16 casts, and anything `from_pretrained` loads."""

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

    def generate(self, input_ids: np.ndarray, *, max_new_tokens: int, sampling: dict, on_token=None) -> np.ndarray:
        """Continue `input_ids` ([1, t]) with the KV cache; `on_token(ids)` is called as tokens arrive.

        `sampling`: temperature (0 = greedy), top_k, top_p. Returns the new token ids.
        """
        import torch
        from transformers.generation.streamers import BaseStreamer

        class Streamer(BaseStreamer):
            first = True

            def put(self, value):
                if self.first:  # generate() first hands over the prompt itself
                    self.first = False
                    return
                if on_token is not None:
                    on_token(value.reshape(-1).tolist())

            def end(self):
                pass

        temperature = sampling.get("temperature", 0.0)
        kwargs = dict(do_sample=temperature > 0, max_new_tokens=max_new_tokens, use_cache=True,
                      pad_token_id=self.tokenizer.pad_token_id, streamer=Streamer())
        if temperature > 0:
            kwargs.update(temperature=temperature, top_k=sampling.get("top_k") or 0, top_p=sampling.get("top_p", 1.0))
        x = torch.from_numpy(np.ascontiguousarray(input_ids, dtype=np.int64)).to(self.device)
        with torch.inference_mode():
            out = self.model.generate(input_ids=x, attention_mask=torch.ones_like(x), **kwargs)
        return out[0, x.shape[1]:].cpu().numpy()
