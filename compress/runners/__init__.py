"""Load any artifact compress makes and score it, through one narrow interface.

A runner knows three things: its tokenizer, how to turn a padded batch into logits, and
what it is (format, device). Evaluation, the export parity gate, accuracy-aware
quantization and the benchmark all go through `load_runner`, so a new backend is one
module in this package (`pytorch`, `ort`, `torch_int8`, `bnb`) and one line in `RUNNERS`.

A causal-LM runner also decodes with its KV cache (`LMRunner`): `start` runs a prompt,
`step` runs one token against the cache, and `generate` is the one sampling loop every
runner shares (`compress.runners.decode`). The PyTorch-backed runners get these from
`compress.runners.torch_lm` (transformers' DynamicCache); the ONNX Runtime runner runs the
graph's past key values itself (`compress.runners.ort`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from compress.artifacts import read_manifest
from compress.errors import UserError
from compress.runners.bnb import BnbRunner
from compress.runners.ort import OrtRunner
from compress.runners.pytorch import TorchRunner
from compress.runners.torch_int8 import TorchInt8Runner
# The scoring helpers every runner is driven by live with the classification task; re-exported
# here because eval, quantize and bench score through the runners.
from compress.tasks.classification import numpy_batch, score  # noqa: F401


class Runner(Protocol):
    format: str
    device: str
    tokenizer: object
    config: object  # the transformers config (labels, sizes)
    task: object  # the artifact's Task (compress.tasks)

    def logits(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        """Logits for a right-padded batch of int64 arrays (input_ids, attention_mask[, token_type_ids]):
        [b, classes] for a classifier, [b, t, vocab] for a causal LM (no cache)."""


class LMRunner(Runner, Protocol):
    """What every runner of a causal-LM artifact adds (bench, eval and `compress generate` use it)."""

    def start(self, input_ids: np.ndarray) -> tuple[np.ndarray, object]:
        """Run equal-length prompts [b, t] (prefill): (logits of the last position [b, vocab], KV-cache state)."""

    def step(self, token_ids: np.ndarray, state: object) -> tuple[np.ndarray, object]:
        """One cached decode step for tokens [b]: (logits [b, vocab], the next state). Always pass the state
        the previous call returned (PyTorch's DynamicCache grows in place; ONNX Runtime's state is new each step)."""

    def generate(self, input_ids: np.ndarray, *, max_new_tokens: int, sampling: dict,
                 on_token: Callable[[list[int]], None] | None = None) -> np.ndarray:
        """New token ids ([n] for one prompt, [b, n] for several) from the shared sampling loop
        (`compress.runners.decode`): temperature (0 = greedy), top_k, top_p; stops at EOS."""


# format (the manifest's `format`) -> runner class. A new backend is one module in this
# package and one line here; backends import their heavy libraries when they are built.
RUNNERS: dict[str, Callable[..., Runner]] = {
    "pytorch": TorchRunner,
    "onnx": OrtRunner,
    "torch-int8": TorchInt8Runner,
    "bnb": BnbRunner,
}


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


def load_runner(directory: str | Path, device: str = "cpu", threads: int | None = None,
                trust_remote_code: bool = False) -> Runner:
    """The runner for the artifact in `directory`, chosen by its format (`detect_format`).

    Args:
        device: "cpu" or "cuda" (already resolved).
        threads: intra-op threads of the backend; None leaves the library's choice.
        trust_remote_code: allow model code shipped with the checkpoint (only for sources you trust).
    """
    fmt = detect_format(directory)
    if fmt not in RUNNERS:
        raise UserError(f"No runner for artifacts of format '{fmt}' ('{directory}'). Known formats: {', '.join(sorted(RUNNERS))}.")
    return RUNNERS[fmt](Path(directory), device=device, threads=threads, trust_remote_code=trust_remote_code)
