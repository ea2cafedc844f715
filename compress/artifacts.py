"""Artifact directories: atomic writes and the manifest.

An artifact is a directory in the Hugging Face `save_pretrained` layout (or an ONNX
model beside its config and tokenizer) plus `manifest.json`, which records what
produced it, from what, with which config and what it measured. Stages write into a
temporary sibling directory and rename it into place only when everything succeeded,
so an interrupted or failed stage never leaves a directory that looks finished.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

from compress.errors import UserError

MANIFEST = "manifest.json"
# Files whose bytes are the model; the size on disk of an artifact is their sum.
WEIGHT_SUFFIXES = (".safetensors", ".onnx", ".onnx_data", ".bin", ".pt", ".data")


@contextlib.contextmanager
def atomic_output(out: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes `out` when the block succeeds.

    Refuses an existing `out` unless `force`. On any exception the temporary
    directory is removed and `out` is left as it was.
    """
    out = Path(out)
    if out.exists() and not force:
        raise UserError(
            f"The output directory '{out}' already exists. Choose another --out, or pass "
            "--force to replace it."
        )
    parent = out.parent if str(out.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=parent))
    except OSError as err:
        raise UserError(
            f"Cannot write the output directory '{out}': {err.strerror}. Choose a writable "
            "location with --out."
        ) from None
    try:
        yield tmp
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=parent))
            os.replace(out, trash / "old")
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def library_versions() -> dict[str, str]:
    from importlib import metadata

    names = ["compress", "torch", "transformers", "tokenizers", "optimum", "optimum-onnx", "onnx",
             "onnxruntime", "bitsandbytes", "evaluate", "datasets", "accelerate", "numpy"]
    # onnxruntime ships as several distributions (onnxruntime, onnxruntime-gpu, ...), and two can
    # be installed at once: the imported module's own version is the one that ran.
    alternatives = {"onnxruntime": ["onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino", "onnxruntime-directml"]}
    out = {}
    for n in names:
        module = sys.modules.get(n.replace("-", "_"))
        if getattr(module, "__version__", None) and n in alternatives:
            out[n] = module.__version__
            continue
        for dist in alternatives.get(n, [n]):
            try:
                out[n] = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                pass
    return out


def git_commit() -> str | None:
    """The commit of the compress checkout, if it is one (None for an installed wheel)."""
    here = Path(__file__).resolve().parent
    try:
        r = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True,
                           text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if r.returncode != 0:
        return None
    dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--", "."],
                           capture_output=True, text=True, timeout=5).stdout.strip()
    return r.stdout.strip() + ("-dirty" if dirty else "")


def write_manifest(directory: str | os.PathLike, *, stage: str, config: dict[str, Any],
                   parent: str | None = None, metrics: dict[str, Any] | None = None,
                   **extra: Any) -> dict[str, Any]:
    """Write `manifest.json` into `directory` and return it."""
    manifest = {
        "stage": stage,
        "format": extra.pop("format", "pytorch"),
        "parent": str(parent) if parent else None,
        "config": config,
        "metrics": metrics or {},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": library_versions(),
        "compress_commit": git_commit(),
        **extra,
    }
    Path(directory, MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    return manifest


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """The manifest of an artifact, or {} for a plain Hugging Face directory."""
    p = Path(directory, MANIFEST)
    if not p.is_file():
        return {}
    return json.loads(p.read_text())


def weights_size(directory: str | os.PathLike) -> int:
    """Bytes of the weight files of an artifact (what you ship)."""
    return sum(p.stat().st_size for p in Path(directory).rglob("*")
               if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-able parts (configs, data fingerprints)."""
    h = hashlib.sha256()
    for part in parts:
        h.update(json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def copy_support_files(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy config and tokenizer files (not weights, not the manifest) from src to dst."""
    for p in Path(src).iterdir():
        if p.is_file() and not p.name.endswith(WEIGHT_SUFFIXES) and p.name != MANIFEST:
            shutil.copy2(p, Path(dst, p.name))
