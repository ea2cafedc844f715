"""What this machine can do: CPU instruction sets, GPU, threads; the precision to use.

Precision is chosen from what the hardware supports, never assumed: bf16 autocast on a CPU
only where it has AMX or a matmul probe measures bf16 faster, and fp16 only exists on CUDA.
"""

from __future__ import annotations

import functools
import os
import platform

from compress.errors import UserError

ISA_FLAGS = {  # /proc/cpuinfo flag -> the name people know
    "avx2": "AVX2",
    "avx512f": "AVX512F",
    "avx512_vnni": "AVX512-VNNI",
    "avx_vnni": "AVX-VNNI",
    "avx512_bf16": "AVX512-BF16",
    "amx_bf16": "AMX-BF16",
    "amx_int8": "AMX-INT8",
    "asimd": "NEON",
    "sve": "SVE",
}


@functools.lru_cache(maxsize=1)
def cpu_info() -> dict:
    """CPU model name, logical cores and the instruction-set flags that matter for ML."""
    flags: set[str] = set()
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model in ("", platform.machine(), platform.processor()):
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    isa = [name for flag, name in ISA_FLAGS.items() if flag in flags]
    return {"model": model, "arch": platform.machine(), "logical_cores": os.cpu_count(), "isa": isa}


# Without AMX, bf16 autocast is kept only when a bf16 matmul measures this much faster than fp32.
BF16_MARGIN = 1.5


@functools.cache
def has_fast_bf16_cpu() -> bool:
    """Whether bf16 autocast beats fp32 on this CPU: with AMX tiles, yes; with AVX512-BF16
    alone it depends on the CPU, so a matmul probe decides (`bf16_speedup`). On an Intel Xeon
    with AVX512-BF16 and no AMX we measured bf16 slower (the casts cost more than the narrower
    multiply saves); on an AMD EPYC (Zen 4) a bf16 matmul ran 2.2x and a causal-LM distillation
    step 1.6x faster (docs/decisions.md)."""
    isa = cpu_info()["isa"]
    if "AMX-BF16" in isa:
        return True
    return "AVX512-BF16" in isa and bf16_speedup() >= BF16_MARGIN


def bf16_speedup(n: int = 512, repeats: int = 8) -> float:
    """fp32 / bf16 time of an [n, n] x [n, n] matmul on this CPU (best of `repeats`, after a warm-up)."""
    import time

    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    best = {}
    for dtype in (torch.float32, torch.bfloat16):
        x, y = a.to(dtype), b.to(dtype)
        torch.mm(x, y)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.mm(x, y)
            times.append(time.perf_counter() - t0)
        best[dtype] = min(times)
    return best[torch.float32] / max(best[torch.bfloat16], 1e-9)


def has_vnni() -> bool:
    return bool(set(cpu_info()["isa"]) & {"AVX512-VNNI", "AVX-VNNI", "AMX-INT8"})


def resolve_device(device: str) -> str:
    """'auto' -> cuda when available else cpu; 'cuda' without a GPU is an error."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but PyTorch sees no CUDA GPU here. Use --device cpu or auto.")
    return device


def resolve_precision(precision: str, device: str, flag: str = "--precision") -> str:
    """'auto' -> bf16 where the hardware runs it fast, else fp32; fp16 only on CUDA (`flag` names
    the option in the message)."""
    import torch

    if precision == "auto":
        if device == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if has_fast_bf16_cpu() else "fp32"
    if precision == "fp16" and device != "cuda":
        raise UserError(f"{flag} fp16 needs a CUDA GPU; on the CPU use fp32, or bf16 ({flag} auto picks bf16 where "
                        "this CPU runs it faster).")
    return precision


def autocast(device: str, precision: str):
    """The autocast context for a resolved precision (a no-op for fp32)."""
    import contextlib

    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device, dtype=dtype)


def gpu_info() -> dict | None:
    import torch

    if not torch.cuda.is_available():
        return None
    p = torch.cuda.get_device_properties(0)
    return {"name": p.name, "memory_gb": round(p.total_memory / 2**30, 1),
            "capability": f"{p.major}.{p.minor}", "cuda": torch.version.cuda}
