"""Artifact directories: where outputs may go, atomic writes, and the manifest.

An artifact is a directory in the Hugging Face `save_pretrained` layout (or an ONNX
model beside its config and tokenizer) plus `manifest.json`, which records what
produced it, from what, with which config and what it measured. Stages write into a
temporary sibling directory and rename it into place only when everything succeeded,
so an interrupted or failed stage never leaves a directory that looks finished.

Every stage goes through this module for its output: `check_output` before any work
(an existing output without --force, a parent that is a file, no permission),
`atomic_output` for an artifact directory, `atomic_write` for a single file, `check_dir`
and `make_dir` for a directory that collects outputs.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
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


def check_output(out: str | os.PathLike, force: bool = False, *, directory: bool = True) -> Path:
    """Fail now, before any work, when `out` cannot become a stage's output. Creates nothing.

    Args:
        out: the file or directory the stage will write.
        force: allow replacing an existing `out`.
        directory: `out` will be a directory (an artifact); False for a single file.

    Returns:
        `out` as a Path.

    Raises:
        UserError: `out` exists (without `force`), or its location cannot be created or
            written: a parent that is a file, a directory without write permission, a
            read-only file system.
    """
    out = Path(out)
    if (out.exists() or out.is_symlink()) and not force:
        raise UserError(
            f"The output {'directory' if directory else 'file'} '{out}' already exists. Choose "
            "another --out, or pass --force to replace it."
        )
    if not directory and out.is_dir():
        raise UserError(f"The output '{out}' is a directory; --out names a file here (e.g. {out / 'metrics.json'}).")
    ancestor = out.parent
    while not ancestor.exists() and ancestor != ancestor.parent:  # the nearest part that exists
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(
            f"Cannot create the output '{out}': '{ancestor}' is a file, not a directory. Choose "
            "another --out, or move that file away."
        )
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserError(
            f"Cannot create the output '{out}': no permission to write in '{ancestor}'. Choose a "
            "writable location with --out."
        )
    return out


def work_dir(out: str | os.PathLike) -> Path:
    """The run directory of a training stage, `<out>.work`, beside its output."""
    out = Path(out)
    return out.with_name(out.name + ".work")


def check_dir(path: str | os.PathLike) -> Path:
    """Fail now when `path` is neither a writable directory nor a place to create one.

    For a directory that collects outputs (a recipe's output_dir, a report's directory),
    which, unlike an artifact, may already exist. Creates nothing.
    """
    path = Path(path)
    if path.is_dir():
        if not os.access(path, os.W_OK | os.X_OK):
            raise UserError(f"Cannot write in the directory '{path}': no permission. Choose another location.")
        return path
    if path.exists():
        raise UserError(f"'{path}' is a file, not a directory. Choose another location, or move that file away.")
    return check_output(path, force=True)


def make_dir(path: str | os.PathLike) -> Path:
    """Create the directory `path` (and its parents) if needed, or say why it cannot be."""
    path = check_dir(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"Cannot create the directory '{path}': {err.strerror or err}. Choose another "
                        "location.") from None
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_failure(err: BaseException) -> str | None:
    """The reason, when `err` says the disk or file system refused a write (full, read-only)."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS):
        return err.strerror or str(err)
    # safetensors and torch report a full disk as their own error types, with the OS message inside.
    text = str(err)
    for reason in ("No space left on device", "Disk quota exceeded", "Read-only file system", "StorageFull"):
        if reason in text:
            return "No space left on device" if reason == "StorageFull" else reason
    return None


@contextlib.contextmanager
def atomic_output(out: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes `out` when the block succeeds.

    Refuses an existing `out` unless `force` (see `check_output`). On any exception the
    temporary directory is removed and `out` is left as it was; a full disk or a read-only
    file system becomes a UserError that names `out`.
    """
    out = check_output(out, force)
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=parent))
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the artifact is not
    except OSError as err:
        raise UserError(
            f"Cannot write the output directory '{out}': {err.strerror}. Choose a writable "
            "location with --out."
        ) from None
    try:
        yield tmp
        if out.exists() or out.is_symlink():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=parent))
            os.replace(out, trash / "old")
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = _write_failure(err)
        if reason:
            raise UserError(f"Cannot write the output '{out}': {reason}. Nothing was written there; free "
                            "some space or choose another --out.") from None
        raise


def atomic_write(path: str | os.PathLike, text: str) -> Path:
    """Write the text file `path` whole or not at all (a temporary sibling renamed over it).

    Replaces an existing file. Any failure to write becomes a UserError naming `path`.
    """
    path = check_output(path, force=True, directory=False)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    except OSError as err:
        raise UserError(f"Cannot write '{path}': {err.strerror or err}. Nothing was written there; free some "
                        "space or choose another location.") from None
    return path


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
