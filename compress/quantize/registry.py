"""The quantization method registry: what a method is, its typed settings, and the table.

A method is a `Method` subclass with its own `Settings` (a pydantic model, like torchao's
per-method configs): calibration settings belong to static int8, the weight scheme to the
int8 methods, and so on. It lives in one module of this package and registers itself with
`@register_method(NAME)`; `compress/quantize/__init__.py` imports that module once. The
stage (`compress.quantize.quantize`) never asks for a method by name beyond the registry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from compress.errors import UserError


class MethodSettings(BaseModel):
    """Settings of one method. Subclasses add fields; a method without settings uses this."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Int8Settings(MethodSettings):
    """The weight scheme every int8 method takes (torch-dynamic-int8 and the ONNX Runtime methods)."""

    per_channel: bool = Field(True, description="one scale per output channel instead of one per weight tensor; on the MiniLM teacher ort-dynamic-int8 lost 0.16 validation points per-channel against 1.22 per-tensor, at the same size")


class TableSettings(MethodSettings):
    """Blockwise weights and the embedding tables: the MatMulNBits methods and ort-dynamic-int8."""

    block_size: int = Field(32, ge=16, le=256, description="weights per quantization block along the input dimension (a power of two, 16..256): smaller is more accurate and a little larger")
    quantize_embeddings: bool = Field(False, description="also quantize the token embedding (Gather) and the output head (the LM head tied to it) as blocks of --embedding-bits (GatherBlockQuantized, MatMulNBits): most of a small LM's size")
    embedding_bits: int | None = Field(None, description="4 or 8: bits of the embedding tables and the output head under --quantize-embeddings (default: 4 for ort-int4, 8 for the 8-bit methods)")

    @field_validator("embedding_bits")
    @classmethod
    def _four_or_eight(cls, v: int | None) -> int | None:
        if v not in (None, 4, 8):
            raise ValueError(f"must be 4 or 8 (the bits GatherBlockQuantized and MatMulNBits take), got {v}")
        return v

    @field_validator("block_size")
    @classmethod
    def _power_of_two(cls, v: int) -> int:
        if v & (v - 1):
            raise ValueError(f"must be a power of two (16, 32, 64, 128 or 256), got {v}")
        return v


@dataclass
class Job:
    """What a method gets: the stage config, its own settings, the input it consumes and,
    if it calibrates, the batches."""

    cfg: Any  # the QuantizeConfig (data, threads, trust_remote_code, ...)
    settings: MethodSettings
    source: Path  # an fp32 PyTorch directory, or an ONNX artifact for methods with input == "onnx"
    device: str
    calibration: list[dict[str, np.ndarray]] = field(default_factory=list)
    # What a method measured once for this job and reuses in every candidate it builds
    # (accuracy-aware mode builds many), e.g. a timing-based choice.
    memo: dict[str, Any] = field(default_factory=dict)


class Method:
    """One quantization method. Subclasses set `name`, `input`, `Settings` and implement `build`."""

    name: ClassVar[str]
    Settings: ClassVar[type[MethodSettings]] = MethodSettings
    input: ClassVar[Literal["pytorch", "onnx"]] = "pytorch"
    calibrated: ClassVar[bool] = False  # needs calibration batches from the training split
    # The tasks (Task.name) whose artifacts the method quantizes.
    tasks: ClassVar[tuple[str, ...]] = ("classification", "causal-lm")
    can_fall_back: ClassVar[bool] = True  # accuracy-aware mode may keep layers in full precision
    export_optimize: ClassVar[str] = "auto"  # graph optimisation when an ONNX input must be exported first
    # Position in `--method auto`'s search (lower first); None: auto never tries this method.
    auto_order: ClassVar[int | None] = None

    def check(self, settings: MethodSettings, device: str) -> None:
        """Raise UserError when this method cannot run here (missing backend, wrong device)."""

    def needs_calibration(self, settings: MethodSettings) -> bool:
        """Whether these settings need calibration batches from the training split."""
        return self.calibrated

    def export_level(self, task) -> str:
        """The graph optimisation to export a PyTorch input with, for a model of `task` (a Task)."""
        return self.export_optimize

    def worth_trying(self, device: str) -> bool:
        """Whether `--method auto` should try this method on `device` (it may run but not pay off)."""
        return True

    def check_source(self, src: Path) -> None:
        """Raise UserError when the given artifact (already in this method's input format) cannot be used."""

    def layers(self, job: Job) -> list[str]:
        """Names of the layers that are quantized and could fall back to full precision."""
        return []

    def build(self, job: Job, out: Path, exclude: list[str]) -> dict[str, Any]:
        """Write the quantized artifact's weights and support files into `out`, leaving
        `exclude` in full precision. Returns manifest fields (format, counts, ...)."""
        raise NotImplementedError


METHODS: dict[str, type[Method]] = {}


def register_method(name: str):
    """Class decorator: make a Method available as `--method NAME`."""

    def wrap(cls: type[Method]) -> type[Method]:
        cls.name = name
        METHODS[name] = cls
        return cls

    return wrap


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise UserError(f"Unknown quantization method '{name}'. Known methods: {', '.join(sorted(METHODS))}, auto.")
    return METHODS[name]()


def auto_candidates() -> list[type[Method]]:
    """The methods `--method auto` tries, in order."""
    return sorted((m for m in METHODS.values() if m.auto_order is not None), key=lambda m: m.auto_order)


def settings_for(method: type[Method] | Method, given: dict[str, Any]) -> MethodSettings:
    """`method`'s settings from the `given` values (the flat flags the user set).

    Raises:
        UserError: a given setting is not one the method takes, or its value is invalid;
            the message names the method and the settings it takes.
    """
    from pydantic import ValidationError

    cls = method.Settings
    unknown = sorted(k for k in given if k not in cls.model_fields)
    takes = ", ".join(f"{k} (default {f.default!r})" for k, f in cls.model_fields.items()) or "no settings"
    if unknown:
        raise UserError(f"--method {method.name} does not take {', '.join(unknown)}; it takes {takes}. "
                        "Remove the setting or choose a method that uses it.")
    try:
        return cls(**given)
    except ValidationError as err:
        details = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        raise UserError(f"Bad settings for --method {method.name}: {details}. It takes {takes}.") from None
