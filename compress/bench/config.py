"""The `compress bench` config (its own module so that the worker process can validate it
without importing the stage)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from compress.config import RuntimeConfig
from compress.data import DataConfig


class BenchConfig(RuntimeConfig, DataConfig):
    """Benchmark artifacts on one dataset split: a grid of (batch size, sequence length) for
    classifiers; prefill, time to first token and cached decode for causal LMs."""

    positional = ("artifacts",)

    artifacts: list[str] = Field(..., min_length=1, description="artifact directories to measure; name=path sets the display name")
    out: str = Field(..., description="output directory for results.json, report.md and report.html")
    baseline: str | None = Field(None, description="artifact (name or path) every figure is compared with; added to the list if absent")
    batch_sizes: list[int] = Field([1, 32], description="classifiers: batch sizes to time, comma-separated")
    seq_lens: list[int] = Field([32, 128], description="classifiers: sequence lengths to time (real texts padded/truncated to exactly this)")
    prompt_lens: list[int] = Field([128, 512], description="causal LMs: prompt lengths (real test text) of the prefill and time-to-first-token points, capped at the model's positions; decode starts from a prompt of the first")
    decode_batch_sizes: list[int] = Field([1, 8], description="causal LMs: batch sizes of the cached decode points")
    new_tokens: int = Field(32, ge=1, description="causal LMs: decode steps per timed run (each step is one sample)")
    split: Literal["test", "validation"] = Field("test", description="split that accuracy is measured on and texts are taken from")
    warmup: int = Field(3, ge=0, description="untimed calls before each latency point")
    budget_s: float = Field(3.0, gt=0, description="seconds of timed calls per latency point at most")
    min_iters: int = Field(10, ge=3, description="fewest timed calls per point before it may stop early")
    target_ci: float = Field(0.02, gt=0, lt=1, description="stop a point once the 95 percent interval of its median is within +/- this fraction")
    interleave: bool = Field(True, description="time all artifacts together, one call of each per round, so a machine whose load drifts slows them all alike and their ratios hold")
    isolate: bool = Field(True, description="measure each artifact in a fresh process (honest per-artifact peak memory; ~5 s start-up each)")
    peak_probe: bool = Field(True, description="measure fp32/bf16/int8 matmul peaks first (~1-2 s) for the roofline ratios")
    progress: bool = Field(True, description="print one line per artifact to stderr")

    @field_validator("batch_sizes", "seq_lens", "prompt_lens", "decode_batch_sizes")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if not v or any(x < 1 for x in v):
            raise ValueError("needs one or more positive integers, e.g. 1,32")
        return list(dict.fromkeys(v))  # keep order, drop repeats
