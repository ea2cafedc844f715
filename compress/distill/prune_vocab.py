"""Vocabulary pruning: keep the tokens the training data uses, shrink the embedding matrix,
and rewrite the fast tokenizer to match.

A 30k-token vocabulary is most of a small student's weights (30522 x 384 floats = 47 MB for
MiniLM, against 7 MB for two Transformer layers). A classifier fine-tuned on one dataset only
ever learned from the tokens that occur in it.

How a pruned WordPiece tokenizer treats text (tested in tests/test_prune_vocab.py):
- Text whose pieces were all kept is tokenised exactly as before (ids remapped), because
  greedy longest-match-first over a subset of the vocabulary finds the same pieces.
- A word whose whole-word token was dropped is re-segmented greedily into the pieces that
  remain (e.g. "playing" -> "play", "##ing" when "playing" itself was dropped).
- A word that cannot be fully covered by the remaining pieces (some position of the word has
  no matching piece, e.g. a missing "##x" continuation) becomes one [UNK] token for the whole
  word: the WordPiece model of `tokenizers` gives up on the word, it does not keep the prefix.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from compress.errors import UserError


@dataclass
class PrunedVocab:
    kept: np.ndarray  # old token id of each new id, increasing
    old_size: int

    @property
    def new_size(self) -> int:
        return len(self.kept)

    def old_to_new(self, unk_new: int) -> np.ndarray:
        table = np.full(self.old_size, unk_new, dtype=np.int64)
        table[self.kept] = np.arange(len(self.kept))
        return table


def count_tokens(id_lists: Iterable[list[int]], vocab_size: int) -> np.ndarray:
    """How often each token id occurs in `id_lists`."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for ids in id_lists:
        np.add.at(counts, np.asarray(ids, dtype=np.int64), 1)
    return counts


def choose_tokens(counts: np.ndarray, special_ids: list[int], min_count: int = 1) -> PrunedVocab:
    """Keep the special tokens and every token seen at least `min_count` times, in id order."""
    keep = counts >= max(1, min_count)
    keep[np.asarray(special_ids, dtype=np.int64)] = True
    return PrunedVocab(kept=np.flatnonzero(keep), old_size=len(counts))


def _remap_ids(node: Any, table: dict[int, int]) -> Any:
    """Rewrite the `ids` lists of a TemplateProcessing / BertProcessing post-processor."""
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if k == "ids" and isinstance(v, list):
                out[k] = [table[i] for i in v]
            elif k in ("cls", "sep") and isinstance(v, list) and len(v) == 2 and isinstance(v[1], int):
                out[k] = [v[0], table[v[1]]]  # BertProcessing/RobertaProcessing: ["[CLS]", 101]
            else:
                out[k] = _remap_ids(v, table)
        return out
    if isinstance(node, list):
        return [_remap_ids(v, table) for v in node]
    return node


def prune_tokenizer(tokenizer, vocab: PrunedVocab, directory: Path):
    """Write a pruned copy of a fast WordPiece tokenizer into `directory` and load it."""
    from transformers import AutoTokenizer

    if not getattr(tokenizer, "is_fast", False):
        raise UserError("--prune-vocab needs a fast tokenizer (tokenizer.json); this model only has a slow one.")
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(directory)
    spec = json.loads((directory / "tokenizer.json").read_text())
    if spec["model"].get("type") != "WordPiece":
        raise UserError(f"--prune-vocab supports WordPiece tokenizers (BERT family); this one is "
                        f"{spec['model'].get('type')}. Run without --prune-vocab.")
    table = {int(old): new for new, old in enumerate(vocab.kept)}
    old_vocab = spec["model"]["vocab"]
    spec["model"]["vocab"] = {tok: table[i] for tok, i in sorted(old_vocab.items(), key=lambda kv: kv[1]) if i in table}
    for added in spec.get("added_tokens", []):
        if added["id"] not in table:
            raise UserError(f"The added token {added['content']!r} was not kept by vocabulary pruning.")
        added["id"] = table[added["id"]]
    spec["post_processor"] = _remap_ids(spec.get("post_processor"), table)
    if spec.get("padding"):
        spec["padding"]["pad_id"] = table[spec["padding"]["pad_id"]]
    (directory / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
    # tokenizer_config.json keys its added tokens by id; vocab.txt is one token per line in id order.
    cfg_path = directory / "tokenizer_config.json"
    if cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text())
        if "added_tokens_decoder" in cfg:
            cfg["added_tokens_decoder"] = {str(table[int(k)]): v for k, v in cfg["added_tokens_decoder"].items()}
        cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False))
    vocab_txt = directory / "vocab.txt"
    if vocab_txt.is_file():
        by_id = sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])
        vocab_txt.write_text("".join(tok + "\n" for tok, _ in by_id))
    return AutoTokenizer.from_pretrained(str(directory))


def prune_embeddings(model, vocab: PrunedVocab, pad_new: int | None) -> None:
    """Keep only the rows of the input embedding matrix named by `vocab.kept` (in place)."""
    import torch
    import torch.nn as nn

    old = model.get_input_embeddings()
    if old.num_embeddings != vocab.old_size:
        raise UserError(f"The model's embedding matrix has {old.num_embeddings} rows but the tokenizer has "
                        f"{vocab.old_size} tokens; cannot prune a mismatched pair.")
    new = nn.Embedding(vocab.new_size, old.embedding_dim, padding_idx=pad_new,
                       device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(old.weight[torch.from_numpy(vocab.kept).to(old.weight.device)])
    model.set_input_embeddings(new)
    model.config.vocab_size = vocab.new_size
    if pad_new is not None:
        model.config.pad_token_id = pad_new


def prune_vocab(model, tokenizer, train_ids: Iterable[list[int]], *, min_count: int = 1,
                directory: str | Path | None = None) -> tuple[Any, PrunedVocab]:
    """Shrink `model`'s vocabulary (in place) to the tokens of the training data.

    Args:
        model: a model whose input embeddings match `tokenizer`.
        train_ids: token id lists of the training split, encoded with `tokenizer`.
        min_count: keep tokens seen at least this many times (special tokens always stay).
        directory: where the pruned tokenizer files are written (a temporary one if None).
    Returns:
        (pruned tokenizer, PrunedVocab: the old id of every kept token).
    """
    counts = count_tokens(train_ids, len(tokenizer))
    vocab = choose_tokens(counts, tokenizer.all_special_ids, min_count)
    directory = Path(directory) if directory is not None else Path(tempfile.mkdtemp(prefix="pruned-tokenizer-"))
    new_tokenizer = prune_tokenizer(tokenizer, vocab, directory)
    prune_embeddings(model, vocab, new_tokenizer.pad_token_id)
    return new_tokenizer, vocab


def unk_share(id_lists: Iterable[list[int]], unk_id: int) -> float:
    """Share of tokens that are [UNK]."""
    total = unk = 0
    for ids in id_lists:
        total += len(ids)
        unk += sum(1 for i in ids if i == unk_id)
    return unk / max(total, 1)
