"""What the numbers were measured on: CPU, GPU, threads, libraries, commit, machine load.

Latency depends on all of it, so every results.json carries it. The load average is
taken at the start and at the end of a run because a shared machine's other jobs make
timings slower and noisier; a reader can then judge the figures.
"""

from __future__ import annotations

import os
import platform

from compress.artifacts import git_commit, library_versions
from compress.hardware import cpu_info, gpu_info

SHARED_MACHINE_NOTE = (
    "Timings come from one machine that may be shared with other jobs; the load average at "
    "the start and end of the run says how busy it was. A load near or above the number of "
    "logical cores means the benchmark competed for the CPU and latencies are pessimistic."
)


def load_average() -> list[float] | None:
    """1, 5 and 15-minute load averages (None where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def memory_total_gb() -> float | None:
    try:
        import psutil

        return round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        return None


# Environment variables that change how the thread pools wait between operators, and so latency.
THREAD_ENV = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME", "MKL_NUM_THREADS")


def environment(device: str, threads: int | None) -> dict:
    """The environment block of results.json, without the end-of-run load (added later)."""
    import torch

    return {
        "cpu": dict(cpu_info()),
        "gpu": gpu_info() if device.startswith("cuda") or torch.cuda.is_available() else None,
        "device": device,
        "memory_total_gb": memory_total_gb(),
        "threads_requested": threads,
        "thread_env": {k: os.environ[k] for k in THREAD_ENV if k in os.environ},
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": library_versions(),
        "compress_commit": git_commit(),
        "load_average_start": load_average(),
        "load_average_end": None,
        "shared_machine_note": SHARED_MACHINE_NOTE,
    }
