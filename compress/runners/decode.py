"""The one sampling loop of every causal-LM runner, over its `start` and `step`.

A runner that can run a prompt (`start(input_ids) -> (last logits, state)`) and one cached
decode step (`step(token_ids, state) -> (logits, state)`) generates through `generate`
here, so PyTorch, ONNX Runtime and every quantized artifact pick the next token the same
way: greedy at temperature 0, else temperature, then top-k, then top-p (the order of
transformers' logits warpers), sampled from numpy's global generator (`compress generate
--seed` seeds it). Rows stop at EOS as in transformers' `generate`: the EOS is emitted, the
row is padded afterwards, and the loop ends when every row has stopped.
"""

from __future__ import annotations

from typing import Callable

import numpy as np


def warp(logits: np.ndarray, sampling: dict) -> np.ndarray:
    """Log-probabilities [b, vocab] after temperature, top-k and top-p (-inf outside the kept set).

    Args:
        logits: [b, vocab] next-token logits.
        sampling: temperature (> 0 here), top_k (0 = all), top_p (1 = all).
    """
    x = logits.astype(np.float64) / float(sampling["temperature"])
    vocab = x.shape[-1]
    top_k = int(sampling.get("top_k") or 0)
    if 0 < top_k < vocab:
        kth = np.partition(x, vocab - top_k, axis=-1)[:, vocab - top_k][:, None]
        x = np.where(x < kth, -np.inf, x)
    top_p = float(sampling.get("top_p", 1.0) or 1.0)
    if top_p < 1.0:
        order = np.argsort(-x, axis=-1, kind="stable")
        ranked = np.take_along_axis(x, order, axis=-1)
        probs = np.exp(ranked - ranked[:, :1])
        probs /= probs.sum(-1, keepdims=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop = np.cumsum(probs, axis=-1) - probs >= top_p
        ranked = np.where(drop, -np.inf, ranked)
        x = np.empty_like(x)
        np.put_along_axis(x, order, ranked, axis=-1)
    return x - np.logaddexp.reduce(x, axis=-1, keepdims=True)


def next_tokens(logits: np.ndarray, sampling: dict) -> np.ndarray:
    """The next token of each row [b] (int64): argmax at temperature 0, else a sample."""
    if not sampling.get("temperature"):
        return logits.argmax(-1).astype(np.int64)
    probs = np.exp(warp(logits, sampling))
    cumulative = np.cumsum(probs, axis=-1)
    draws = np.random.random_sample(len(probs)) * cumulative[:, -1]
    picked = (cumulative < draws[:, None]).sum(-1)
    return np.minimum(picked, probs.shape[-1] - 1).astype(np.int64)


def generate(runner, input_ids: np.ndarray, *, max_new_tokens: int, sampling: dict,
             on_token: Callable[[list[int]], None] | None = None, eos_token_id: int | None = None,
             pad_token_id: int | None = None) -> np.ndarray:
    """Continue equal-length prompts `input_ids` [b, t] with `runner.start` / `runner.step`.

    Args:
        max_new_tokens: at most this many new tokens per row.
        sampling: temperature (0 = greedy), top_k, top_p.
        on_token: called with each step's new tokens (one per row) as they arrive.
        eos_token_id: a row stops after emitting it (None: never stop early).
        pad_token_id: what stopped rows get for the remaining steps (default: EOS).

    Returns:
        The new token ids: [n] for one prompt, [b, n] for several (n <= max_new_tokens).
    """
    ids = np.ascontiguousarray(input_ids, dtype=np.int64)
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [batch, tokens] with at least one token, got shape {ids.shape}")
    pad = eos_token_id if pad_token_id is None else pad_token_id
    logits, state = runner.start(ids)
    done = np.zeros(len(ids), dtype=bool)
    out: list[np.ndarray] = []
    for i in range(max_new_tokens):
        token = next_tokens(logits, sampling)
        if eos_token_id is not None:
            token = np.where(done, pad, token)
            done |= token == eos_token_id
        out.append(token)
        if on_token is not None:
            on_token(token.tolist())
        if done.all() or i == max_new_tokens - 1:
            break
        logits, state = runner.step(token, state)
    new = np.stack(out, axis=1) if out else np.zeros((len(ids), 0), dtype=np.int64)
    return new[0] if len(ids) == 1 else new
