"""`compress generate`: continue a prompt with a causal-LM artifact, streaming the text.

It goes through the runners, so every LM artifact compress makes generates the same way;
the runner keeps the KV cache. Sampling: temperature (0 = greedy), top-k, top-p, seeded.
"""

from __future__ import annotations

import sys
from pydantic import Field

from compress.config import RuntimeConfig
from compress.errors import UserError


class GenerateConfig(RuntimeConfig):
    """Generate text from a prompt (device, threads and trust_remote_code from the runtime group)."""

    model: str = Field(..., description="causal-LM artifact directory")
    prompt: str = Field(..., description="text to continue")
    max_new_tokens: int = Field(64, ge=1, description="tokens to generate")
    temperature: float = Field(0.8, ge=0, description="sampling temperature; 0 = greedy (always the likeliest token)")
    top_k: int = Field(50, ge=0, description="sample among the k likeliest tokens (0 = all)")
    top_p: float = Field(0.95, gt=0, le=1, description="sample among the likeliest tokens whose probabilities add up to p")
    seed: int = Field(0, description="seed of the sampling")
    stream: bool = Field(True, description="print tokens as they are generated")


def generate(cfg: GenerateConfig) -> str:
    """Continue `cfg.prompt`; return the generated text (without the prompt)."""
    import numpy as np
    import torch

    from compress.hardware import resolve_device
    from compress.runners import load_runner
    from compress.tasks.causal_lm import position_limit
    from compress.tasks.registry import task_for_artifact

    task = task_for_artifact(cfg.model)
    if task.name != "causal-lm":
        raise UserError(f"'{cfg.model}' is a {task.name} artifact; `compress generate` needs a causal language "
                        "model (one trained with --task causal-lm, or a causal-LM checkpoint).")
    if not cfg.prompt:
        raise UserError("The prompt is empty. Give the text to continue with --prompt.")
    runner = load_runner(cfg.model, device=resolve_device(cfg.device), threads=cfg.threads,
                         trust_remote_code=cfg.trust_remote_code)
    if not hasattr(runner, "generate"):
        raise UserError(f"Artifacts of format '{runner.format}' cannot generate yet ('{cfg.model}').")
    tok = runner.tokenizer
    ids = np.asarray([tok(cfg.prompt, add_special_tokens=False)["input_ids"]], dtype=np.int64)
    limit = position_limit(runner.config)
    if limit is not None and ids.shape[1] + cfg.max_new_tokens > limit:
        raise UserError(f"The prompt ({ids.shape[1]} tokens) and --max-new-tokens {cfg.max_new_tokens} exceed the "
                        f"model's {limit} positions. Shorten the prompt or ask for fewer tokens.")
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    new: list[int] = []
    shown = [""]

    def on_token(tokens: list[int]) -> None:
        # Decode everything so far and print what is new: a byte-level token can end inside a
        # multi-byte character, which only decodes once the next token arrives.
        new.extend(tokens)
        text = tok.decode(new, skip_special_tokens=True)
        if cfg.stream and not text.endswith("\ufffd"):
            sys.stdout.write(text[len(shown[0]):])
            sys.stdout.flush()
            shown[0] = text

    if cfg.stream:
        sys.stdout.write(cfg.prompt)
        sys.stdout.flush()
    out = runner.generate(ids, max_new_tokens=cfg.max_new_tokens, on_token=on_token,
                          sampling={"temperature": cfg.temperature, "top_k": cfg.top_k, "top_p": cfg.top_p})
    text = tok.decode(list(out), skip_special_tokens=True)
    if cfg.stream:
        sys.stdout.write(text[len(shown[0]):] + "\n")
        sys.stdout.flush()
    return text
