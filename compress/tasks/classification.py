"""Sequence classification: labelled examples, a classifier head, cross-entropy, accuracy."""

from __future__ import annotations

from typing import Any

import numpy as np

from compress import distributed as dist
from compress.anatomy import MODEL_INPUTS
from compress.data import EncodedSplit, bucketed_batches, check_labels, collate, encode, load_data
from compress.hardware import autocast
from compress.metrics import classification_metrics
from compress.tasks.base import Task


def predict_logits(model, split: EncodedSplit, pad_id: int, *, batch_size: int = 128, device: str = "cpu",
                   precision: str = "fp32", shard: bool = False) -> np.ndarray:
    """Logits for every example of `split`, in the split's order.

    With `shard` under DDP each rank scores a slice and the slices are gathered.
    """
    import torch

    batches = bucketed_batches(split.lengths, batch_size, shuffle=False)
    if shard and dist.world_size() > 1:
        batches = batches[dist.rank()::dist.world_size()]
    raw = model.module if hasattr(model, "module") else model
    was_training = raw.training
    raw.eval()
    parts: list[tuple[np.ndarray, np.ndarray]] = []
    with torch.inference_mode(), autocast(device.split(":")[0], precision):
        for idx in batches:
            b = collate(split, idx, pad_id)
            inputs = {k: v.to(device) for k, v in b.items() if k in MODEL_INPUTS}
            parts.append((idx, raw(**inputs).logits.float().cpu().numpy()))
    raw.train(was_training)
    if shard and dist.world_size() > 1:
        parts = [p for chunk in dist.all_gather_objects(parts) for p in chunk]
    num = parts[0][1].shape[-1]
    out = np.zeros((len(split), num), dtype=np.float32)
    for idx, logits in parts:
        out[idx] = logits
    return out


def numpy_batch(split: EncodedSplit, idx: np.ndarray, pad_id: int) -> dict[str, np.ndarray]:
    """A right-padded batch as int64 numpy arrays, without the labels (what a runner takes)."""
    b = collate(split, idx, pad_id)
    return {k: v.numpy() for k, v in b.items() if k != "labels"}


def score(runner, split: EncodedSplit, batch_size: int = 64) -> np.ndarray:
    """Logits for every example of `split`, in order, through a runner's `logits(batch)`."""
    pad_id = runner.tokenizer.pad_token_id or 0
    out = None
    for idx in bucketed_batches(split.lengths, batch_size, shuffle=False):
        logits = runner.logits(numpy_batch(split, idx, pad_id))
        if out is None:
            out = np.zeros((len(split), logits.shape[-1]), dtype=np.float32)
        out[idx] = logits
    return out


def label_loss(model, batch: dict) -> tuple[Any, dict[str, float]]:
    """Cross-entropy against the hard labels (the model computes it)."""
    inputs = {k: v for k, v in batch.items() if k in MODEL_INPUTS + ("labels",)}
    return model(**inputs).loss, {}


class ClassificationTask(Task):
    name = "classification"
    export_task = "text-classification"
    primary_metric = "accuracy"
    higher_is_better = True
    default_dataset = "rt-snippets"
    # Distillation of classifiers keeps its own flow (compress/distill/__init__.py).
    distill_losses = ("logits", "hidden", "attention")
    default_distill_losses = ("logits", "hidden")
    default_temperature = 2.0

    def load_data(self, cfg):
        return load_data(cfg)

    def build_model(self, source, data, cfg):
        from compress.models import build_classifier

        return build_classifier(source, label_names=data.label_names,
                                train_texts=list(data["train"]["text"]) if source.kind == "spec" else None,
                                trust_remote_code=cfg.trust_remote_code)

    def load_model(self, directory, trust_remote_code=False):
        from compress.models import load_classifier

        return load_classifier(directory, trust_remote_code)

    def encode(self, data, tokenizer, cfg, *, model_config=None, splits=("train", "validation", "test")):
        mapping = None
        if model_config is not None:
            mapping = check_labels(data, getattr(model_config, "label2id", None), model_config.num_labels)
        return encode(data, tokenizer, cfg.max_length, mapping, splits=splits)

    def loss(self, model, batch):
        return label_loss(model, batch)

    def evaluate(self, model, split, *, batch_size, device="cpu", precision="fp32", shard=False):
        raw = model.module if hasattr(model, "module") else model
        logits = predict_logits(model, split, split.pad_id, batch_size=batch_size, device=device,
                                precision=precision, shard=shard)
        return classification_metrics(logits, split.labels, raw.config.num_labels)

    def evaluate_runner(self, runner, split, batch_size):
        return classification_metrics(score(runner, split, batch_size), split.labels, runner.config.num_labels)

    def bench_plan(self, cfg, model_config, name):
        from compress.errors import UserError

        max_pos = getattr(model_config, "max_position_embeddings", None)
        if max_pos and max(cfg.seq_lens) > max_pos:
            raise UserError(
                f"--seq-lens asks for {max(cfg.seq_lens)} tokens but '{name}' accepts at most "
                f"{max_pos} (max_position_embeddings). Use sequence lengths up to {max_pos}."
            )
        return [{"kind": "forward", "batch_size": b, "seq_len": s} for b in cfg.batch_sizes for s in cfg.seq_lens]

    def preload(self):
        from compress.metrics import load_metric

        load_metric("accuracy")
        load_metric("f1")

    def summary(self, metrics):
        return f"accuracy {metrics['accuracy']:.4f}  macro-F1 {metrics['macro_f1']:.4f}"
