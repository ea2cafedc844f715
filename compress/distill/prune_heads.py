"""Attention-head pruning: keep the `keep` most important heads of every layer.

A head is a slice of the query, key and value projections and the matching columns of the
attention output projection; transformers' own `prune_heads` removes all four exactly and
records the removed heads in `config.pruned_heads`, so `from_pretrained` rebuilds the same
narrower layers and every exporter traces them as plain dense layers.

Heads are ranked by what they add to the layer's output: the mean norm, over the real
(unpadded) tokens of sample batches, of the head's context vectors sent through its columns
of the output projection, ||c_h W_O[:, h]||, or, without batches, ||W_V[h]|| * ||W_O[:, h]||.
Distillation then trains the narrower student.

Halving the heads of a 3-layer MiniLM student (12 -> 6) made its int8 ONNX model faster at
batch 1 than the 2-layer student with every head (docs/distill.md).
"""

from __future__ import annotations

from typing import Any

from compress.anatomy import ATTENTION_OUTPUT_NAMES, ATTENTION_VALUE_NAMES, layer_list
from compress.errors import UserError


def _find(layer, names):
    for name in names:
        try:
            return layer.get_submodule(name)
        except AttributeError:
            continue
    return None


def head_projections(model) -> list[tuple[Any, Any]]:
    """[(value projection, output projection)] of every layer."""
    found = [(_find(layer, ATTENTION_VALUE_NAMES), _find(layer, ATTENTION_OUTPUT_NAMES))
             for layer in layer_list(model)[1]]
    if not hasattr(model, "prune_heads") or any(v is None or o is None for v, o in found):
        raise UserError(f"--prune-heads supports BERT-like encoders (BERT, RoBERTa, MiniLM, DistilBERT); cannot find "
                        f"the attention projections of this {type(model).__name__}. Drop --prune-heads.")
    return found


def head_output_norms(model, outputs, n_heads: int, batches) -> list:
    """Mean ||c_h W_O[:, h]|| of each head h of each layer over the real tokens of `batches`."""
    import torch

    from compress.distill.prune_ffn import token_means

    def per_head(i, ctx):
        b, s, width = ctx.shape
        d = width // n_heads
        weight = outputs[i].weight.detach()
        w = weight.view(weight.shape[0], n_heads, d)  # [out, head, d]
        return torch.einsum("bshd,ohd->bsho", ctx.view(b, s, n_heads, d), w).norm(dim=-1)

    return token_means(model, outputs, per_head, batches)


def prune_heads(model, keep: int, batches=None) -> dict[str, Any]:
    """Keep `keep` attention heads in every layer of `model` (in place).

    With `batches` (dicts of input_ids, attention_mask, ...), heads are ranked by the mean norm
    of their output; without, by weight norms alone. Returns the manifest's record.
    """
    import torch

    config = model.config
    n_heads = config.num_attention_heads
    if getattr(config, "pruned_heads", None):
        raise UserError("--prune-heads needs a student whose heads were never pruned, but this one's config has "
                        f"pruned_heads={config.pruned_heads}. Start from the teacher's layers or a size spec.")
    if not 1 <= keep < n_heads:
        raise UserError(f"--prune-heads {keep} must be between 1 and the number of heads minus one ({n_heads - 1}); "
                        f"the student's layers have {n_heads} heads.")
    params_before = sum(p.numel() for p in model.parameters())
    projections = head_projections(model)
    d = config.hidden_size // n_heads
    norms = head_output_norms(model, [o for _, o in projections], n_heads, batches) if batches else None
    drop, kept_share = {}, []
    for i, (value, out) in enumerate(projections):
        with torch.no_grad():
            if norms is not None:
                score = norms[i].to(torch.float32)
            else:
                score = (value.weight.view(n_heads, d, -1).norm(dim=(1, 2))
                         * out.weight.view(out.weight.shape[0], n_heads, d).norm(dim=(0, 2)))
        ranked = score.argsort(descending=True)
        drop[i] = sorted(ranked[keep:].tolist())
        kept_share.append(float(score[ranked[:keep]].sum() / score.sum()) if score.sum() > 0 else 1.0)
    model.prune_heads(drop)
    return {"heads_before": n_heads, "heads_after": keep, "pruned": drop, "params_before": params_before,
            "params_after": sum(p.numel() for p in model.parameters()),
            "ranking": "mean ||c_h W_O[:, h]||" if norms is not None else "||W_V[h]|| x ||W_O[:, h]||",
            "kept_score_share": [round(s, 4) for s in kept_share]}
