"""Plain text for causal language models: loading, packing into blocks, sliding windows.

Sources: the built-in `austen` corpus, a `.txt` file or a directory of them, and every
tabular source classification reads (CSV/JSONL/Parquet with a text column, `save_to_disk`
directories, hub names when online). Each row or file is a *document*.

Training packs the token stream into fixed-length blocks: every document's tokens followed
by EOS, concatenated, cut into `block` tokens (the remainder is dropped). A block may span
two documents; EOS marks the boundary, as in GPT-2's own training.

Evaluation scores every token of a split with context, by a sliding window (Hugging Face's
perplexity guide, lm-evaluation-harness's rolling log-likelihood): windows of `block` tokens
end every `stride` tokens, and each window scores only the tokens no earlier window
scored, so each token but the first is predicted exactly once, from at least
`block - stride` tokens of context (fewer only in the first window). Unlike the guide's
loop, a stride equal to the block still scores the first token of each window, from the
token before it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from compress.errors import UserError

SPLITS = ("train", "validation", "test")
TEXT_SUFFIXES = (".txt", ".text", ".md")


# --------------------------------------------------------------------------- loading


def _read_text(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"The file '{path}' is not UTF-8 text ({err.reason} at byte {err.start}). Re-save it as "
                        "UTF-8, e.g. `iconv -f latin1 -t utf-8 in.txt > out.txt`.") from None
    if not text.strip():
        raise UserError(f"The text file '{path}' is empty. Give a file with text in it.")
    return text


def _cut(text: str, at: float) -> int:
    """The index of the first line break at or after fraction `at` of `text` (its end if none)."""
    i = text.find("\n", int(len(text) * at))
    return len(text) if i < 0 else i + 1


def split_one_text(text: str) -> dict[str, list[str]]:
    """One document split 90/5/5 by position, at line breaks: the model never sees test text."""
    a, b = _cut(text, 0.9), _cut(text, 0.95)
    parts = {"train": text[:a], "validation": text[a:b], "test": text[b:]}
    return {s: [t] if t.strip() else [] for s, t in parts.items()}


def split_documents(docs: list[tuple[str, str]]) -> dict[str, list[str]]:
    """(name, text) documents split 90/5/5 by a hash order of their names (no RNG involved)."""
    order = sorted(docs, key=lambda d: hashlib.sha256(d[0].encode()).hexdigest())
    n = len(order)
    n_val = max(1, round(0.05 * n))
    n_test = max(1, round(0.05 * n))
    n_train = n - n_val - n_test
    return {"train": [t for _, t in order[:n_train]], "validation": [t for _, t in order[n_train:n_train + n_val]],
            "test": [t for _, t in order[n_train + n_val:]]}


def _text_dir(path: Path) -> dict[str, list[str]] | None:
    """A directory of .txt files: train/validation/test files, else every file a document."""
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
    if not files:
        return None
    named = {p.stem: p for p in files if p.stem in SPLITS}
    if "train" in named:
        splits = {s: [_read_text(named[s])] for s in named}
        if "validation" not in splits or "test" not in splits:
            parts = split_one_text(splits["train"][0])
            splits["train"] = parts["train"]
            splits.setdefault("validation", parts["validation"])
            splits.setdefault("test", parts["test"])
        return splits
    docs = [(p.name, _read_text(p)) for p in files]
    if len(docs) < 3:  # too few files to give each split one: split the text itself
        return split_one_text("\n".join(t for _, t in docs))
    return split_documents(docs)


def load_text(cfg) -> Any:
    """Load the documents that `cfg.dataset` names as a `Data` with a `text` column per split."""
    import datasets

    from compress.data import Data, _load_raw, _quiet_datasets

    _quiet_datasets()
    source = cfg.dataset or "austen"
    path = Path(source)
    if source == "austen":
        from compress.austen import austen_splits

        splits = austen_splits()
    elif path.is_file() and path.suffix.lower() in TEXT_SUFFIXES:
        splits = split_one_text(_read_text(path))
    elif path.is_dir() and (found := _text_dir(path)) is not None:
        splits = found
    else:
        raw = _load_raw(source)
        splits = {}
        for name, ds in raw.items():
            name = "validation" if name in ("valid", "dev") else name
            if cfg.text_column not in ds.column_names:
                raise UserError(
                    f"The {name} split of '{source}' has no column '{cfg.text_column}'. Its columns are: "
                    f"{', '.join(ds.column_names)}. Pass --text-column to name the one that holds the text.")
            splits[name] = [str(t) for t in ds[cfg.text_column] if t is not None and str(t).strip()]
        if "validation" not in splits or "test" not in splits:
            whole = splits.get("train") or next(iter(splits.values()))
            parts = split_documents([(str(i), t) for i, t in enumerate(whole)]) if len(whole) >= 3 else \
                split_one_text("\n".join(whole))
            splits = {s: splits.get(s) or parts[s] for s in SPLITS}
    for s in SPLITS:
        if not splits.get(s) or not any(t.strip() for t in splits[s]):
            raise UserError(f"The {s} split of '{source}' has no text. Give more text (a causal LM needs text in "
                            "train, validation and test), or files named train.txt / validation.txt / test.txt.")
    if cfg.max_examples:
        splits = {s: docs[:cfg.max_examples] for s, docs in splits.items()}
    result = {s: datasets.Dataset.from_dict({"text": splits[s]}) for s in SPLITS}
    return Data(splits=result, label_names=[], source=source)


# --------------------------------------------------------------------------- tokens


def token_stream(docs: list[str], tokenizer) -> np.ndarray:
    """Every document's tokens followed by EOS, concatenated (int64)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise UserError(
            f"The tokenizer ({type(tokenizer).__name__}, '{getattr(tokenizer, 'name_or_path', '')}') has no EOS "
            "token, so documents cannot be separated when text is packed into blocks. Use a causal-LM "
            "tokenizer that defines eos_token, or set one (tokenizer.eos_token = ...) and save it.")
    # verbose=False: documents are longer than the model's window on purpose; they are cut below.
    ids = tokenizer(docs, add_special_tokens=False, verbose=False)["input_ids"]
    parts = []
    for seq in ids:
        parts.append(np.asarray(seq, dtype=np.int64))
        parts.append(np.asarray([eos], dtype=np.int64))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


@dataclass
class TokenBlocks:
    """Training text packed into `[n, block]` token blocks; no padding anywhere."""

    blocks: np.ndarray

    def __post_init__(self):
        # Read on every training step (tokens counted per batch): built once.
        self.lengths = np.full(len(self.blocks), self.blocks.shape[1], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.blocks)

    def collate(self, idx: np.ndarray, pad_id: int | None = None) -> dict[str, Any]:
        import torch

        ids = torch.from_numpy(self.blocks[idx])
        # No attention mask: every position is a real token, and without one the attention
        # takes its causal fast path. labels = inputs; the model shifts them.
        return {"input_ids": ids, "labels": ids}


@dataclass
class TokenStream:
    """An evaluation split: its token stream and the characters it came from."""

    tokens: np.ndarray
    chars: int
    block: int
    stride: int

    def __len__(self) -> int:
        return len(self.tokens)

    def windows(self) -> list[tuple[int, int, int]]:
        """(begin, end, first) per window: tokens[begin:end] is fed, targets from `first` on are scored.

        The first window scores tokens 1..block-1 (token 0 has no context and is never scored);
        each later one ends `stride` tokens further (at most block - 1, so the token before its
        first target is inside it) and scores only its new tokens.
        """
        n = len(self.tokens)
        end = min(self.block, n)
        out = [(0, end, 1)] if n > 1 else []
        step = max(1, min(self.stride, self.block - 1))
        while end < n:
            first, end = end, min(end + step, n)
            out.append((max(0, end - self.block), end, first))
        return out


def pack_blocks(stream: np.ndarray, block: int, source: str) -> TokenBlocks:
    n = len(stream) // block
    if n == 0:
        raise UserError(
            f"The training text of '{source}' is {len(stream)} tokens long, too short for one block of "
            f"{block} tokens (--max-length). Give more text, or a smaller --max-length.")
    return TokenBlocks(stream[:n * block].reshape(n, block))


def encode_text(data, tokenizer, block: int, stride: int | None = None,
                splits: tuple[str, ...] = SPLITS) -> dict[str, Any]:
    """Train -> TokenBlocks; validation and test -> TokenStream for sliding-window scoring."""
    stride = stride or max(1, block // 2)
    if stride > block:
        raise UserError(f"--stride {stride} is longer than the window (--max-length {block}): tokens between "
                        "windows would never be scored. Use a stride of at most the window length.")
    out: dict[str, Any] = {}
    for s in splits:
        docs = list(data[s]["text"])
        stream = token_stream(docs, tokenizer)
        if s == "train":
            out[s] = pack_blocks(stream, block, data.source)
        else:
            if len(stream) < 2:
                raise UserError(f"The {s} split of '{data.source}' has fewer than 2 tokens: nothing to score.")
            # Each document boundary (the EOS) counts as one character, the line break it stands for.
            out[s] = TokenStream(stream, chars=sum(len(d) for d in docs) + len(docs), block=block, stride=stride)
    return out
