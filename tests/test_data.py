"""Data: the built-in set, user files in every format, label mapping, bucketing, and
the bad-input messages."""

import json

import numpy as np
import pandas as pd
import pytest

from compress.cli import main
from compress.data import DataConfig, bucketed_batches, check_labels, load_data
from compress.errors import UserError


def test_rt_snippets_split_by_movie_is_deterministic():
    from compress.data import load_rt_snippets

    a, b = load_rt_snippets(), load_rt_snippets()
    counts = {s: len(a[s]) for s in ("train", "validation", "test")}
    assert counts == {"train": 10203, "validation": 1312, "test": 1182}  # documented in the README
    assert a.label_names == ["negative", "positive"]
    movies = {s: set(a[s]["movie_name"]) for s in counts}
    assert not (movies["train"] & movies["validation"]) and not (movies["train"] & movies["test"])
    assert not (movies["validation"] & movies["test"])
    assert list(a["test"]["text"]) == list(b["test"]["text"])
    texts = [t for s in counts for t in a[s]["text"]]
    assert len(texts) == len(set(texts))  # duplicates dropped


def test_csv_dir_with_string_labels(tiny_csv_dir):
    data = load_data(DataConfig(dataset=str(tiny_csv_dir), text_column="review", label_column="sentiment"))
    assert data.label_names == ["neg", "pos"]
    assert set(data["train"]["label"]) <= {0, 1} and len(data["test"]) == 120


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "csv", "disk"])
def test_single_file_formats_are_split_80_10_10(tmp_path, fmt):
    df = pd.DataFrame({"sentence": [f"text number {i}" for i in range(50)], "y": [i % 3 for i in range(50)]})
    if fmt == "jsonl":
        path = tmp_path / "d.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in df.to_dict("records")))
    elif fmt == "parquet":
        path = tmp_path / "d.parquet"
        df.to_parquet(path)
    elif fmt == "csv":
        path = tmp_path / "d.csv"
        df.to_csv(path, index=False)
    else:
        import datasets

        path = tmp_path / "disk"
        datasets.Dataset.from_pandas(df).save_to_disk(str(path))
    data = load_data(DataConfig(dataset=str(path), text_column="sentence", label_column="y"))
    assert data.counts == {"train": 40, "validation": 5, "test": 5}
    assert data.label_names == ["0", "1", "2"]


def test_sentence_pairs(tmp_path):
    pd.DataFrame({"a": ["x y"] * 20, "b": ["z"] * 20, "label": [0, 1] * 10}).to_csv(tmp_path / "p.csv", index=False)
    data = load_data(DataConfig(dataset=str(tmp_path / "p.csv"), text_column="a", text_pair_column="b"))
    assert data.has_pair and data["train"][0]["text_pair"] == "z"


def test_missing_column_lists_existing(tiny_csv_dir):
    with pytest.raises(UserError, match="no column 'text'.*Its columns are: review, sentiment"):
        load_data(DataConfig(dataset=str(tiny_csv_dir), label_column="sentiment"))


def test_nan_labels_non_utf8_empty_split_negative_labels(tmp_path):
    pd.DataFrame({"text": ["a", "b", "c"] * 5, "label": [0, None, 1] * 5}).to_csv(tmp_path / "nan.csv", index=False)
    with pytest.raises(UserError, match="NaN"):
        load_data(DataConfig(dataset=str(tmp_path / "nan.csv")))
    (tmp_path / "latin.csv").write_bytes("text,label\ncaf\xe9,1\n".encode("latin-1"))
    with pytest.raises(UserError, match="not UTF-8"):
        load_data(DataConfig(dataset=str(tmp_path / "latin.csv")))
    d = tmp_path / "splits"
    d.mkdir()
    pd.DataFrame({"text": ["a"], "label": [0]}).to_csv(d / "train.csv", index=False)
    pd.DataFrame({"text": [], "label": []}).to_csv(d / "validation.csv", index=False)
    with pytest.raises(UserError, match="validation.csv' has no rows"):
        load_data(DataConfig(dataset=str(d)))
    pd.DataFrame({"text": ["a", "b"] * 5, "label": [-1, 0] * 5}).to_csv(tmp_path / "neg.csv", index=False)
    with pytest.raises(UserError, match="negative"):
        load_data(DataConfig(dataset=str(tmp_path / "neg.csv")))


def test_unknown_dataset_offline_fails_fast(monkeypatch):
    import time

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = time.perf_counter()
    with pytest.raises(UserError, match="offline"):
        load_data(DataConfig(dataset="someone/some-dataset"))
    assert time.perf_counter() - t < 5


def test_label_sets_must_match_the_model():
    data = load_data(DataConfig(max_examples=10))
    assert check_labels(data, {"negative": 0, "positive": 1}, 2) is None
    assert check_labels(data, {"positive": 0, "negative": 1}, 2) == [1, 0]
    with pytest.raises(UserError, match="do not match"):
        check_labels(data, {"spam": 0, "ham": 1}, 2)
    with pytest.raises(UserError, match="out of range"):
        check_labels(data, None, 1)


def test_bucketing_cuts_padding_and_covers_every_example():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 120, size=2000)
    batches = bucketed_batches(lengths, 32, shuffle=True, seed=0, epoch=0)
    assert sorted(np.concatenate(batches).tolist()) == list(range(2000))
    padded = sum(len(b) * lengths[b].max() for b in batches)
    random_batches = [np.arange(i, min(i + 32, 2000)) for i in range(0, 2000, 32)]
    padded_random = sum(len(b) * lengths[b].max() for b in random_batches)
    assert padded < 0.7 * padded_random  # bucketing removes most of the padding
    again = bucketed_batches(lengths, 32, shuffle=True, seed=0, epoch=0)
    assert all((x == y).all() for x, y in zip(batches, again))
    other_epoch = bucketed_batches(lengths, 32, shuffle=True, seed=0, epoch=1)
    assert any(not np.array_equal(x, y) for x, y in zip(batches, other_epoch))


def test_cli_bad_dataset_exit_2_without_traceback(capsys, tmp_path):
    code = main(["eval", "--model", str(tmp_path), "--dataset", "rt-snippets"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "not an artifact" in err
