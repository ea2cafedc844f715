"""Where Transformer models keep their parts: the one place that knows the names.

Pruning, distillation, quantization and the runners all need to find the same pieces of a
Hugging Face model: the stack of layers, the output head, the attention projections, the
feed-forward width, and which batch keys the model's forward takes. They ask here, so a
new architecture is taught to compress in one module.
"""

from __future__ import annotations

import contextlib
import functools
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
        # `h` is GPT-2's name for its stack (transformer.h).
        if isinstance(module, nn.ModuleList) and len(module) == n and re.search(r"(^|\.)(layer|layers|h)$", name):
            return name, module
    raise UserError(
        f"Cannot find the Transformer layers of this {type(model).__name__}: compress finds the layer stack of "
        "BERT-like encoders (BERT, RoBERTa, MiniLM, DistilBERT, ...) and of GPT-2 and Llama-like decoders "
        "(Llama, Qwen2, Mistral). Use a size spec or a model directory as the student instead."
    )


# --------------------------------------------------------------------------- decoders (causal LMs)

# Inside one decoder layer. GPT-2 keeps q, k and v fused in one Conv1D (`attn.c_attn`, weight
# [in, out]) and its MLP in Conv1Ds too; Llama-like decoders (Llama, Qwen2, Mistral) have one
# nn.Linear (weight [out, in]) per projection, grouped-query attention (`num_key_value_heads`)
# and a gated MLP (act(gate(x)) * up(x) -> down).
DECODER_LAYOUTS = {
    "gpt2": {"attention": "attn", "query": "attn.c_attn", "output": "attn.c_proj",
             "mlp_in": ("mlp.c_fc",), "mlp_out": "mlp.c_proj", "width_key": "n_inner", "conv1d": True},
    "llama": {"attention": "self_attn", "query": "self_attn.q_proj", "key": "self_attn.k_proj",
              "value": "self_attn.v_proj", "output": "self_attn.o_proj",
              "mlp_in": ("mlp.gate_proj", "mlp.up_proj"), "mlp_out": "mlp.down_proj",
              "width_key": "intermediate_size", "conv1d": False},
}
# Config entries with one value per layer (Qwen2's `layer_types`): a student keeps its layers' ones.
PER_LAYER_CONFIG_KEYS = ("layer_types",)


def decoder_layout(model) -> tuple[str, dict]:
    """(name, parts) of the decoder layout of `model`'s layers: 'gpt2' or 'llama' (DECODER_LAYOUTS).

    Raises:
        UserError: the layers are neither (then decoder pruning does not apply).
    """
    _, layers = layer_list(model)
    first = layers[0]
    for name, parts in DECODER_LAYOUTS.items():
        try:
            first.get_submodule(parts["output"])
            first.get_submodule(parts["mlp_out"])
        except AttributeError:
            continue
        return name, parts
    raise UserError(f"The layers of this {type(model).__name__} are neither GPT-2-like (attn.c_attn, mlp.c_fc) nor "
                    "Llama-like (self_attn.q_proj, mlp.gate_proj): compress cannot find their attention heads and "
                    "MLP units. Drop --prune-heads/--prune-ffn for this model.")


def head_dim(config) -> int:
    """Width of one attention head (an explicit `head_dim`, else hidden / heads)."""
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def mlp_width(model) -> int:
    """Units of each decoder layer's MLP (GPT-2's n_inner may be None: 4 x hidden)."""
    _, parts = decoder_layout(model)
    value = getattr(model.config, parts["width_key"], None)
    return int(value) if value else 4 * model.config.hidden_size


def embeddings_tied(model) -> bool:
    """True when the LM head shares its weight tensor with the input embedding."""
    out = model.get_output_embeddings()
    return out is not None and out.weight is model.get_input_embeddings().weight


# Activation modules written as several elementwise kernels, each with a one-kernel equal in
# torch: GPT-2's gelu_new and gelu_fast are the tanh GELU (to 2e-7 in float32).
_TANH_GELU_CLASSES = ("NewGELUActivation", "FastGELUActivation")


@contextlib.contextmanager
def fast_kernels(*models):
    """Run `models` with modules swapped for faster ones that compute the same function.

    - GPT-2's gelu_new / gelu_fast -> `F.gelu(approximate="tanh")`: one elementwise pass
      instead of five (a 2.5x slower activation, 0.5 s of a 1.7 s Austen cache pass).
    - `nn.Dropout` -> `FastDropout`, on the CPU: torch's CPU dropout draws one Bernoulli
      variable per element, a quarter of a small classifier student's training step
      (docs/distill.md, Speed); FastDropout draws 16 random bits per element instead.
    - BERT-family SDPA self-attention with attention dropout -> its eager parent class, whose
      dropout is a module (so FastDropout too): with dropout, SDPA on the CPU falls back to
      its unfused math path anyway, the same matmuls and softmax, plus the Bernoulli draws
      (a bf16 step of the quickstart's student 14 % faster). Without dropout, or in eval
      mode, the eager class computes the same attention; the mask BERT prepares for SDPA is
      the additive one eager attention adds.

    The original modules and classes come back on exit, so what is saved or exported is what
    was loaded.
    """
    import torch

    swapped, recast = [], []
    for model in models:
        if model is None:
            continue
        for module in model.modules():
            eager = _eager_self_attention(module)
            if eager is not None:
                recast.append((module, type(module)))
                module.__class__ = eager
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if type(child).__name__ in _TANH_GELU_CLASSES:
                    new = _tanh_gelu()()
                elif type(child) is torch.nn.Dropout and child.p > 0:
                    new = _fast_dropout()(child.p)
                    new.train(child.training)
                else:
                    continue
                setattr(parent, name, new)
                swapped.append((parent, name, child))
    try:
        yield
    finally:
        for parent, name, child in swapped:
            child.train(getattr(parent, name).training)
            setattr(parent, name, child)
        for module, cls in recast:
            module.__class__ = cls


def _eager_self_attention(module):
    """The eager parent of a BERT-family `...SdpaSelfAttention` with attention dropout, else None.

    Only that pattern (transformers' BertSdpaSelfAttention(BertSelfAttention) and its copies in
    RoBERTa, XLM-R, ELECTRA, ...): the subclass adds nothing but its forward, and the parent
    keeps the attention dropout as `self.dropout`.
    """
    import torch

    cls = type(module)
    base = cls.__bases__[0] if cls.__bases__ else None
    if (base is None or not cls.__name__.endswith("SdpaSelfAttention")
            or base.__name__ != cls.__name__.replace("Sdpa", "")
            or not isinstance(getattr(module, "dropout", None), torch.nn.Dropout) or module.dropout.p == 0):
        return None
    return base


@functools.cache
def _tanh_gelu():
    import torch

    class TanhGELU(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.gelu(x, approximate="tanh")

    return TanhGELU


def dropout_keep_mask(shape, p: float, device=None):
    """(mask, scale) for dropout with drop probability `p`, from 16 random bits per element.

    An element is dropped when its 16-bit draw falls below round(p * 65536), so the drop
    probability is that over 65536 (within 8e-6 of p); `scale` = 1 / keep probability, which
    keeps the output's expectation exactly the input. Four elements share one 64-bit draw of
    torch's generator, so `torch.manual_seed` makes the masks repeatable.
    """
    import math

    import torch

    n = math.prod(shape)
    cut = round(p * 65536)
    bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-(1 << 63), None)
    keep = bits.view(torch.int16)[:n].view(shape) >= cut - 32768
    return keep, 65536 / (65536 - cut)


@functools.cache
def _fast_dropout():
    import torch

    class _Drop(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, p):
            keep, scale = dropout_keep_mask(x.shape, p, x.device)
            ctx.save_for_backward(keep)
            ctx.scale = scale
            return torch.where(keep, x, 0).mul_(scale)

        @staticmethod
        def backward(ctx, grad):
            (keep,) = ctx.saved_tensors
            return torch.where(keep, grad, 0).mul_(ctx.scale), None

    class FastDropout(torch.nn.Dropout):
        """nn.Dropout whose CPU mask comes from 16 random bits per element (`dropout_keep_mask`);
        on other devices, torch's own (already fast there)."""

        def forward(self, x):
            if not self.training or self.p == 0:
                return x
            if x.device.type != "cpu" or self.p >= 1:
                return super().forward(x)
            return _Drop.apply(x, self.p)

    return FastDropout
