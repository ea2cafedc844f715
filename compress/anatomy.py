"""Where Transformer models keep their parts: the one place that knows the names.

Pruning, distillation, quantization and the runners all need to find the same pieces of a
Hugging Face model: the stack of layers, the output head, the attention projections, the
feed-forward width, and which batch keys the model's forward takes. They ask here, so a
new architecture is taught to compress in one module.
"""

from __future__ import annotations

import re

from compress.errors import UserError

# The batch keys an encoder's forward takes; collated batches also carry `labels`.
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
# Top-level module names of the output head (sequence classification, token scoring, QA).
HEAD_NAMES = ("classifier", "score", "qa_outputs")
# Inside one layer: the attention output projection and the value projection (BERT-like,
# DistilBERT-like).
ATTENTION_OUTPUT_NAMES = ("attention.output.dense", "attention.out_lin")
ATTENTION_VALUE_NAMES = ("attention.self.value", "attention.v_lin")
# Config keys of the feed-forward width: BERT/RoBERTa/MiniLM, DistilBERT, BART-like.
FFN_WIDTH_KEYS = ("intermediate_size", "hidden_dim", "ffn_dim")


def model_inputs(batch: dict) -> dict:
    """The entries of `batch` the model's forward takes (drops labels, lengths, indices)."""
    return {k: v for k, v in batch.items() if k in MODEL_INPUTS}


def is_head(module_name: str) -> bool:
    """True for the output head and the modules inside it (e.g. `classifier.dense`)."""
    return module_name.split(".")[0] in HEAD_NAMES


def layer_list(model):
    """(dotted name, nn.ModuleList) of the model's stack of Transformer layers.

    Raises:
        UserError: the model has no ModuleList named `layer`/`layers` with one entry per
            `config.num_hidden_layers`.
    """
    import torch.nn as nn

    n = model.config.num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n and re.search(r"(^|\.)(layer|layers)$", name):
            return name, module
    raise UserError(
        f"Cannot find the Transformer layers of this {type(model).__name__}: compress finds the layer stack of "
        "BERT-like encoders (BERT, RoBERTa, MiniLM, DistilBERT, ...). Use a size spec or a model directory "
        "as the student instead."
    )
