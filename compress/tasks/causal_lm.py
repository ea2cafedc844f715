"""Causal language modelling: plain text packed into blocks, next-token loss, perplexity.

Quality is measured by sliding-window scoring of a whole split (`compress.lm_data`):
perplexity (the primary metric, lower is better), the mean negative log-likelihood per
token in nats, and bits per character, which compares models with different tokenizers.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable

import numpy as np

from compress import distributed as dist
from compress.errors import UserError
from compress.hardware import autocast
from compress.lm_data import TokenStream, encode_text, load_text
from compress.tasks.base import Task
from compress.tasks.lm_kd import LM_LOSSES, LMDistillLoss, TopKTargets



class _PackedBlocksNeedNoMask(logging.Filter):
    """Packed blocks hold EOS (= the padding id) as a real token and have no padding, so
    transformers' advice to pass an attention mask does not apply to them."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "strongly recommend passing in an `attention_mask`" not in record.getMessage()


logging.getLogger("transformers.modeling_utils").addFilter(_PackedBlocksNeedNoMask())

NllFn = Callable[[np.ndarray], np.ndarray]  # ids [b, t] -> NLL of ids[:, 1:] given the prefix, [b, t-1]


def score_stream(nll_fn: NllFn, stream: TokenStream, batch_size: int, shard: bool = False) -> dict[str, float]:
    """Perplexity, NLL per token and bits per character of `stream`, by sliding windows.

    Windows of equal length are batched; under DDP with `shard` each rank scores a slice of
    the batches and the sums are gathered, so every rank returns the same figures.
    """
    windows = stream.windows()
    full = [w for w in windows if w[1] - w[0] == stream.block]
    rest = [w for w in windows if w[1] - w[0] != stream.block]
    batches = [full[i:i + batch_size] for i in range(0, len(full), batch_size)] + [[w] for w in rest]
    if shard and dist.world_size() > 1:
        batches = batches[dist.rank()::dist.world_size()]
    total, count = 0.0, 0
    for batch in batches:
        ids = np.stack([stream.tokens[b:e] for b, e, _ in batch])
        nll = nll_fn(ids)
        for row, (b, _, first) in enumerate(batch):
            # nll[:, j] scores token b + j + 1: keep the targets from `first` on.
            part = nll[row, first - b - 1:]
            total += float(part.sum(dtype=np.float64))
            count += part.size
    if shard and dist.world_size() > 1:
        sums = dist.all_gather_objects((total, count))
        total, count = sum(t for t, _ in sums), sum(c for _, c in sums)
    nll = total / max(count, 1)
    return {"perplexity": round(math.exp(nll), 4), "nll": round(nll, 6),
            "bits_per_char": round(total / math.log(2) / max(stream.chars, 1), 6),
            "tokens": int(count), "chars": int(stream.chars)}


def torch_nll_fn(model, device: str = "cpu", precision: str = "fp32") -> NllFn:
    """Per-token NLL from a PyTorch causal LM (logits in fp32 for the softmax)."""
    import torch
    import torch.nn.functional as F

    def fn(ids: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(ids).to(device)
        with torch.inference_mode(), autocast(device.split(":")[0], precision):
            logits = model(input_ids=x).logits
        logits = logits[:, :-1].float()
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="none")
        return nll.view(ids.shape[0], -1).cpu().numpy()

    return fn


def logits_nll_fn(logits_fn: Callable[[dict[str, np.ndarray]], np.ndarray]) -> NllFn:
    """Per-token NLL from a runner's `logits(batch) -> [b, t, vocab]`.

    The log-sum-exp runs in torch, in fp32, on torch's threads: in float64 numpy it took longer
    than the Austen teacher's forward pass (24 s of a 40 s test-split score). Per-token NLLs
    are within ~1e-6 of the float64 ones, and their sum is taken in float64 (score_stream).
    """
    import torch

    def fn(ids: np.ndarray) -> np.ndarray:
        logits = torch.from_numpy(np.asarray(logits_fn({"input_ids": ids, "attention_mask": np.ones_like(ids)})))
        logits = logits[:, :-1].float()
        logz = torch.logsumexp(logits, dim=-1)
        target = logits.gather(-1, torch.from_numpy(np.ascontiguousarray(ids[:, 1:, None], dtype=np.int64)))[..., 0]
        return (logz - target).double().numpy()

    return fn


def position_limit(config) -> int | None:
    """The longest sequence the model's position embeddings allow (None when unbounded)."""
    for key in ("n_positions", "max_position_embeddings"):
        value = getattr(config, key, None)
        if value:
            return int(value)
    return None


def window_batch(batch_size: int, block: int, vocab: int) -> int:
    """At most `batch_size` windows, and no more than ~256 MB of fp32 logits at once."""
    return max(1, min(batch_size, (1 << 26) // max(1, block * vocab)))


def next_token_loss(model, batch: dict) -> tuple[Any, dict[str, float]]:
    """Mean cross-entropy of each next token (the model shifts the labels)."""
    return model(input_ids=batch["input_ids"], labels=batch["labels"]).loss, {}


def _capped(point: dict, asked: list[int], room: int | None) -> dict:
    """`point`, with `capped_from` when the length asked for did not fit the model's positions."""
    over = [s for s in asked if room is not None and s > room and min(s, room) == point["seq_len"]]
    if over:
        point["capped_from"] = max(over)
    return point


class CausalLMTask(Task):
    name = "causal-lm"
    export_task = "text-generation-with-past"
    primary_metric = "perplexity"
    higher_is_better = False
    default_dataset = "austen"
    distill_losses = LM_LOSSES
    default_distill_losses = ("forward_kl",)
    default_temperature = 1.0

    def load_data(self, cfg):
        return load_text(cfg)

    def build_model(self, source, data, cfg):
        from compress.models import build_causal_lm

        model, tokenizer = build_causal_lm(source, train_texts=list(data["train"]["text"]) if source.kind == "spec"
                                           else None, trust_remote_code=cfg.trust_remote_code)
        self.check_fits(model.config, tokenizer, cfg)
        return model, tokenizer

    def check_fits(self, config, tokenizer, cfg) -> None:
        """Fail before any work when the block is longer than the model's positions or EOS is missing."""
        limit = position_limit(config)
        if limit is not None and cfg.max_length > limit:
            raise UserError(f"--max-length {cfg.max_length} is longer than the model's {limit} positions "
                            f"({config.model_type}). Use --max-length {limit} or less.")
        if tokenizer.eos_token_id is None:
            from compress.lm_data import token_stream

            token_stream([], tokenizer)  # raises the message about the missing EOS

    def load_model(self, directory, trust_remote_code=False):
        from compress.models import load_causal_lm

        return load_causal_lm(directory, trust_remote_code)

    def encode(self, data, tokenizer, cfg, *, model_config=None, splits=("train", "validation", "test")):
        if model_config is not None:
            self.check_fits(model_config, tokenizer, cfg)
        return encode_text(data, tokenizer, cfg.max_length, cfg.stride, splits=splits)

    def loss(self, model, batch):
        return next_token_loss(model, batch)

    def evaluate(self, model, split, *, batch_size, device="cpu", precision="fp32", shard=False):
        raw = model.module if hasattr(model, "module") else model
        was_training = raw.training
        raw.eval()
        try:
            return score_stream(torch_nll_fn(raw, device, precision), split,
                                window_batch(batch_size, split.block, raw.config.vocab_size), shard=shard)
        finally:
            raw.train(was_training)

    def evaluate_runner(self, runner, split, batch_size):
        return score_stream(logits_nll_fn(runner.logits), split,
                            window_batch(batch_size, split.block, runner.config.vocab_size))

    def bench_plan(self, cfg, model_config, name):
        """Prefill and time to first token at each prompt length, and cached decode at each decode
        batch size from a prompt of the first length; lengths capped at the model's positions."""
        limit = position_limit(model_config)
        if limit is not None and cfg.new_tokens >= limit:
            raise UserError(f"--new-tokens {cfg.new_tokens} leaves no room for a prompt in '{name}', which has "
                            f"{limit} positions. Use --new-tokens {max(1, limit // 4)} or fewer.")
        points = []
        for kind in ("prefill", "ttft"):
            # TTFT feeds one more token (the first decode step) after the prompt.
            room = None if limit is None else limit - (1 if kind == "ttft" else 0)
            for s in dict.fromkeys(cfg.prompt_lens if room is None else [min(s, room) for s in cfg.prompt_lens]):
                points.append(_capped({"kind": kind, "batch_size": 1, "seq_len": s}, cfg.prompt_lens, room))
        context = cfg.prompt_lens[0] if limit is None else min(cfg.prompt_lens[0], limit - cfg.new_tokens)
        for b in cfg.decode_batch_sizes:
            points.append(_capped({"kind": "decode", "batch_size": b, "seq_len": context,
                                   "new_tokens": cfg.new_tokens}, cfg.prompt_lens[:1], context))
        return points

    def summary(self, metrics):
        return (f"perplexity {metrics['perplexity']:.2f}  NLL {metrics['nll']:.4f} nats/token  "
                f"{metrics['bits_per_char']:.4f} bits/char")

    def teacher_targets(self, teacher, split, *, top_k, temperature, batch_size, device, precision, directory,
                        key=None, progress=True, tail_samples=0, seed=0):
        """The teacher's top-k log-probabilities per training token plus the leftover mass, and
        `tail_samples` draws from outside the top k (lm_kd.TopKTargets)."""
        return TopKTargets.build(teacher, split.blocks, k=top_k, temperature=temperature, batch_size=batch_size,
                                 device=device, precision=precision, directory=directory, key=key, progress=progress,
                                 tail_samples=tail_samples, seed=seed)

    def distill_loss(self, teacher, targets, settings, projections=None):
        return LMDistillLoss(teacher, targets, settings, projections)
