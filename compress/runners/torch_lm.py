"""Prefill and cached decode for every PyTorch-backed runner (fp32, bf16/fp16, torch-int8, bnb).

`TorchDecoder` gives a runner that holds a transformers causal LM in `self.model` (on
`self.device`) the LM interface: `start` runs the prompt into a transformers `DynamicCache`,
`step` runs one token against it, and `generate` is the shared loop of
`compress.runners.decode`. Prompts of a batch have equal lengths (no padding), so positions
follow from the cache length, as in transformers' own generation.
"""

from __future__ import annotations

import numpy as np

from compress.runners import decode


class TorchDecoder:
    """Mixin: start/step/generate over `self.model` (a transformers causal LM) on `self.device`."""

    def _forward(self, ids: np.ndarray, cache):
        import torch

        x = torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64)).to(self.device)
        # Only the last position's logits, as transformers' generate asks for them: a prompt
        # then costs one row of the vocabulary projection, not one per token.
        keep = {"logits_to_keep": 1} if getattr(self.model, "_supports_logits_to_keep", lambda: False)() else {}
        with torch.inference_mode():
            out = self.model(input_ids=x, past_key_values=cache, use_cache=True, **keep)
        return out.logits[:, -1].float().cpu().numpy(), out.past_key_values

    def start(self, input_ids: np.ndarray):
        """Run the prompts [b, t]: (logits of the last position [b, vocab], state).

        The state holds transformers' DynamicCache, which `step` extends in place: always
        pass the state the previous call returned.
        """
        from transformers import DynamicCache

        ids = np.asarray(input_ids)
        logits, cache = self._forward(ids, DynamicCache())
        return logits, {"cache": cache, "length": int(ids.shape[1])}

    def step(self, token_ids: np.ndarray, state):
        """One cached decode step for tokens [b]: (logits [b, vocab], state)."""
        ids = np.asarray(token_ids).reshape(-1, 1)
        logits, cache = self._forward(ids, state["cache"])
        return logits, {"cache": cache, "length": state["length"] + 1}

    def generate(self, input_ids: np.ndarray, *, max_new_tokens: int, sampling: dict, on_token=None) -> np.ndarray:
        """Continue `input_ids` [b, t] with the KV cache (`compress.runners.decode.generate`)."""
        return decode.generate(self, input_ids, max_new_tokens=max_new_tokens, sampling=sampling, on_token=on_token,
                               eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.tokenizer.pad_token_id)
