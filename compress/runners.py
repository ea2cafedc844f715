"""Load any artifact compress makes and score it, through one narrow interface.

A runner knows three things: its tokenizer, how to turn a padded batch into logits, and
what it is (format, device). Evaluation, the export parity gate, accuracy-aware
quantization and the benchmark all go through `load_runner`, so a new backend is one
class and one line in `RUNNERS`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from compress.artifacts import read_manifest
from compress.data import EncodedSplit, bucketed_batches, collate
from compress.errors import UserError


class Runner(Protocol):
    format: str
    device: str
    tokenizer: object
    config: object  # the transformers config (labels, sizes)

    def logits(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        """Logits for a right-padded batch of int64 arrays (input_ids, attention_mask[, token_type_ids])."""


class TorchRunner:
    """Eager PyTorch: fp32, bf16/fp16 casts, and anything `from_pretrained` loads."""

    format = "pytorch"

    def __init__(self, directory: Path, device: str = "cpu", threads: int | None = None):
        import torch
        from transformers import AutoConfig

        from compress.models import load_classifier

        if threads:
            torch.set_num_threads(threads)
        self.model, self.tokenizer = load_classifier(directory)
        manifest = read_manifest(directory)
        dtype = manifest.get("dtype")
        if dtype in ("bf16", "fp16"):
            self.model.to(torch.bfloat16 if dtype == "bf16" else torch.float16)
            self.format = f"pytorch-{dtype}"
        self.device = device
        self.model.to(device).eval()
        self.config = AutoConfig.from_pretrained(str(directory))

    def logits(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        import torch

        inputs = {k: torch.from_numpy(np.ascontiguousarray(v)).to(self.device) for k, v in batch.items()
                  if k in ("input_ids", "attention_mask", "token_type_ids")}
        with torch.inference_mode():
            return self.model(**inputs).logits.float().cpu().numpy()


RUNNERS: dict[str, Callable[..., Runner]] = {"pytorch": TorchRunner}


def register(fmt: str):
    """Decorator: make a runner class loadable for artifacts whose format is `fmt`."""

    def wrap(cls):
        RUNNERS[fmt] = cls
        return cls

    return wrap


def detect_format(directory: str | Path) -> str:
    """The artifact's format: from its manifest, else from the files it holds."""
    path = Path(directory)
    if not path.is_dir():
        raise UserError(f"'{path}' is not a directory. Pass an artifact directory written by a compress stage or save_pretrained.")
    fmt = read_manifest(path).get("format")
    if fmt:
        return fmt
    if any(path.glob("*.onnx")):
        return "onnx"
    cfg = path / "config.json"
    if cfg.is_file():
        qc = json.loads(cfg.read_text()).get("quantization_config") or {}
        return "bnb" if qc.get("quant_method") == "bitsandbytes" else "pytorch"
    raise UserError(
        f"'{path}' is not an artifact compress recognises: no manifest.json, no *.onnx file and no "
        "config.json. Pass a directory written by a compress stage or by save_pretrained."
    )


def _load_plugins() -> None:
    # Backends with heavy imports register themselves when their module is imported.
    import importlib

    for mod in ("compress.export", "compress.quantize"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as err:
            if err.name != mod:
                raise


def load_runner(directory: str | Path, device: str = "cpu", threads: int | None = None) -> Runner:
    fmt = detect_format(directory)
    if fmt not in RUNNERS:
        _load_plugins()
    if fmt not in RUNNERS:
        raise UserError(f"No runner for artifacts of format '{fmt}' ('{directory}'). Known formats: {', '.join(sorted(RUNNERS))}.")
    return RUNNERS[fmt](Path(directory), device=device, threads=threads)


def numpy_batch(split: EncodedSplit, idx: np.ndarray, pad_id: int) -> dict[str, np.ndarray]:
    b = collate(split, idx, pad_id)
    return {k: v.numpy() for k, v in b.items() if k != "labels"}


def score(runner: Runner, split: EncodedSplit, batch_size: int = 64) -> np.ndarray:
    """Logits for every example of `split`, in order, through `runner`."""
    pad_id = runner.tokenizer.pad_token_id or 0
    out = None
    for idx in bucketed_batches(split.lengths, batch_size, shuffle=False):
        logits = runner.logits(numpy_batch(split, idx, pad_id))
        if out is None:
            out = np.zeros((len(split), logits.shape[-1]), dtype=np.float32)
        out[idx] = logits
    return out
