"""Structured pruning of decoder layers (GPT-2, Llama, Qwen2, Mistral): attention heads and MLP units.

Both remove whole slices of dense matrices, so the pruned layers stay plain dense layers.

Heads. A head is a slice of the query, key and value projections and the matching inputs of
the attention's output projection. Under grouped-query attention one key/value head serves
`heads / kv_heads` query heads; removing a key/value head removes its whole group, so with
GQA heads are kept in whole groups. GPT-2 (no GQA) uses transformers' own `prune_heads`, which
records the removed heads in `config.pruned_heads` so `from_pretrained` rebuilds the layers;
Llama-like layers are sliced here and the config gets the new `num_attention_heads`,
`num_key_value_heads` and an explicit `head_dim` (every layer keeps the same count).

MLP units. Unit i is row i of each input projection (GPT-2's c_fc; Llama's gate and up) and
input i of the output projection (c_proj / down); the config's width becomes the new one.

Ranking, as for classifiers (prune_heads.py, prune_ffn.py), on the training text: a head
(group) by the mean norm of its context vectors sent through its slice of the output
projection, ||c_h W_O[h]||; a unit by its mean |activation| times the norm of its output
weights. Means are over every token of the sample blocks.
"""

from __future__ import annotations

from typing import Any

from compress.anatomy import decoder_layout, head_dim, layer_list, mlp_width
from compress.errors import UserError


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _out_weight(module, conv1d: bool):
    """The output projection's weight as [out, in] (GPT-2's Conv1D stores [in, out])."""
    w = module.weight.detach()
    return w.t() if conv1d else w


def _with_mask(batches):
    """The sample batches with an all-ones attention mask (packed blocks have no padding)."""
    import torch

    for b in batches:
        yield {"input_ids": b["input_ids"], "attention_mask": torch.ones_like(b["input_ids"])}


def head_scores(model, batches) -> list:
    """Mean ||c_h W_O[h]|| of each query head of each layer over the tokens of `batches`."""
    import torch

    from compress.distill.prune_ffn import token_means

    _, parts = decoder_layout(model)
    n_heads, d = model.config.num_attention_heads, head_dim(model.config)
    outputs = [layer.get_submodule(parts["output"]) for layer in layer_list(model)[1]]

    def per_head(i, ctx):
        b, s, _ = ctx.shape
        w = _out_weight(outputs[i], parts["conv1d"])  # [hidden, heads * d]
        w = w.reshape(w.shape[0], n_heads, d)
        return torch.einsum("bshd,ohd->bsho", ctx.reshape(b, s, n_heads, d), w).norm(dim=-1)

    return token_means(model, outputs, per_head, _with_mask(batches))


def prune_decoder_heads(model, keep: int, batches) -> dict[str, Any]:
    """Keep `keep` query heads in every layer of the decoder `model` (in place); with GQA, whole groups.

    Returns the manifest's record: heads (and key/value heads) before and after, the groups
    removed per layer, parameter counts and the share of the ranking score kept.
    """
    import torch

    layout, parts = decoder_layout(model)
    config = model.config
    n_heads = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    group = n_heads // n_kv
    if getattr(config, "pruned_heads", None):
        raise UserError("--prune-heads needs a student whose heads were never pruned, but this one's config has "
                        f"pruned_heads={config.pruned_heads}. Start from the teacher's layers or a size spec.")
    if not 1 <= keep < n_heads or keep % group:
        gqa = (f" With grouped-query attention ({n_heads} query heads share {n_kv} key/value heads) whole groups "
               f"of {group} are kept, so use a multiple of {group}." if group > 1 else "")
        raise UserError(f"--prune-heads {keep} must be between 1 and {n_heads - 1} (the student's layers have "
                        f"{n_heads} heads).{gqa}")
    before = _params(model)
    scores = head_scores(model, batches)
    d = head_dim(config)
    dropped, kept_share = {}, []
    keep_groups = keep // group
    for i, score in enumerate(scores):
        g = score.to(torch.float32).reshape(n_kv, group).sum(-1)  # query heads j*group..(j+1)*group-1 share kv j
        ranked = g.argsort(descending=True)
        dropped[i] = sorted(ranked[keep_groups:].tolist())
        kept_share.append(float(g[ranked[:keep_groups]].sum() / g.sum()) if g.sum() > 0 else 1.0)
    if layout == "gpt2":
        model.prune_heads(dropped)
    else:
        from transformers.pytorch_utils import prune_linear_layer

        for i, layer in enumerate(layer_list(model)[1]):
            kept_kv = [j for j in range(n_kv) if j not in dropped[i]]
            q_rows = torch.tensor([(j * group + r) * d + c for j in kept_kv for r in range(group) for c in range(d)])
            kv_rows = torch.tensor([j * d + c for j in kept_kv for c in range(d)])
            attn = layer.get_submodule(parts["attention"])
            attn.q_proj = prune_linear_layer(attn.q_proj, q_rows, dim=0)
            attn.k_proj = prune_linear_layer(attn.k_proj, kv_rows, dim=0)
            attn.v_proj = prune_linear_layer(attn.v_proj, kv_rows, dim=0)
            attn.o_proj = prune_linear_layer(attn.o_proj, q_rows, dim=1)
            for name in ("num_heads", "num_attention_heads"):
                if hasattr(attn, name):
                    setattr(attn, name, keep)
            for name in ("num_key_value_heads",):
                if hasattr(attn, name):
                    setattr(attn, name, keep_groups)
        config.head_dim = d
        config.num_attention_heads = keep
        config.num_key_value_heads = keep_groups
    return {"heads_before": n_heads, "heads_after": keep, "kv_heads_before": n_kv, "kv_heads_after": keep_groups,
            "pruned": dropped, "params_before": before, "params_after": _params(model),
            "ranking": "mean ||c_h W_O[h]|| over training tokens" + (" summed per key/value group" if group > 1 else ""),
            "kept_score_share": [round(s, 4) for s in kept_share]}


def prune_decoder_mlp(model, width: int, batches) -> dict[str, Any]:
    """Narrow every decoder layer's MLP of `model` (in place) to `width` units, ranked on `batches`."""
    import torch
    from transformers.pytorch_utils import prune_conv1d_layer, prune_linear_layer

    from compress.distill.prune_ffn import mean_activations

    layout, parts = decoder_layout(model)
    inner = mlp_width(model)
    if not 1 <= width < inner:
        raise UserError(f"--prune-ffn {width} must be between 1 and the current MLP width minus one ({inner - 1}); "
                        f"the student's layers have {inner} units.")
    before = _params(model)
    layers = layer_list(model)[1]
    outs = [layer.get_submodule(parts["mlp_out"]) for layer in layers]
    activations = mean_activations(model, outs, _with_mask(batches))
    kept_share = []
    for n, layer in enumerate(layers):
        with torch.no_grad():
            score = activations[n].to(torch.float32) * _out_weight(outs[n], parts["conv1d"]).float().norm(dim=0)
        keep = score.topk(width).indices.sort().values
        kept_share.append(float(score[keep].sum() / score.sum()) if score.sum() > 0 else 1.0)
        for path in parts["mlp_in"] + (parts["mlp_out"],):
            parent_path, _, name = path.rpartition(".")
            parent = layer.get_submodule(parent_path)
            module = getattr(parent, name)
            is_out = path == parts["mlp_out"]
            if parts["conv1d"]:  # Conv1D weight is [in, out]: units are outputs of c_fc, inputs of c_proj
                setattr(parent, name, prune_conv1d_layer(module, keep, dim=0 if is_out else 1))
            else:
                setattr(parent, name, prune_linear_layer(module, keep, dim=1 if is_out else 0))
    for layer in layers:  # Llama's MLP keeps its width as an attribute
        mlp = layer.get_submodule(parts["mlp_out"].rpartition(".")[0])
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = width
    setattr(model.config, parts["width_key"], width)
    return {"width_before": inner, "width_after": width, "params_before": before, "params_after": _params(model),
            "ranking": "mean |activation| x ||W_out|| over training tokens",
            "kept_score_share": [round(s, 4) for s in kept_share]}
