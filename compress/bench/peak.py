"""A short matmul-peak probe: what fp32, bf16 and int8 GEMMs reach on this machine.

The roofline ratio of an artifact (achieved FLOP/s over the peak of its precision) is
only meaningful against a peak measured here, with the same thread count, so the probe
runs at the start of every benchmark. It takes about a second: one square GEMM size,
a fraction of a second per kernel.
"""

from __future__ import annotations

import time
from typing import Callable

# Square GEMM side. 1024 is large enough to leave the cache-bound regime on the CPUs we
# meet and small enough that one call takes tens of milliseconds at 2 threads.
CPU_N = 1024
GPU_N = 4096


def _rate(fn: Callable[[], object], flops: float, budget_s: float, sync: Callable[[], None]) -> float:
    """Best observed FLOP/s of `fn` over `budget_s` (the best, since a peak is a ceiling)."""
    fn()
    sync()
    best = 0.0
    start = time.perf_counter()
    while time.perf_counter() - start < budget_s:
        t = time.perf_counter()
        fn()
        sync()
        best = max(best, flops / (time.perf_counter() - t))
    return best


def _ort_int8_matmul(n: int, threads: int | None) -> Callable[[], object] | None:
    """An onnxruntime MatMulInteger (u8 x s8 -> s32) call, the kernel ORT int8 models use."""
    try:
        import numpy as np
        import onnxruntime as ort
        from onnx import TensorProto, helper
    except ImportError:
        return None
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["A", "B"], ["Y"])], "peak",
        [helper.make_tensor_value_info("A", TensorProto.UINT8, [n, n]),
         helper.make_tensor_value_info("B", TensorProto.INT8, [n, n])],
        [helper.make_tensor_value_info("Y", TensorProto.INT32, [n, n])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # newer onnx writes an IR version older runtimes refuse
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {"A": rng.integers(0, 255, (n, n), dtype=np.uint8), "B": rng.integers(-128, 127, (n, n), dtype=np.int8)}
    return lambda: sess.run(None, feeds)


def matmul_peak(device: str = "cpu", threads: int | None = None, budget_s: float = 0.3) -> dict:
    """GEMM throughput per precision, in GFLOP/s (GOP/s for int8).

    int8 is the best of torch._int_mm and onnxruntime's MatMulInteger (on the CPU), since
    int8 artifacts run through either; each kernel's figure is kept under `kernels`.

    Returns:
        {device, n, threads, fp32_gflops, bf16_gflops, int8_gops, kernels: {name: GFLOP/s},
         seconds}; a precision whose kernel fails here is None.
    """
    import torch

    start = time.perf_counter()
    if threads and device == "cpu":
        torch.set_num_threads(threads)
    n = GPU_N if device.startswith("cuda") else CPU_N
    flops = 2.0 * n**3
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device)
    b = torch.randn(n, n, generator=gen).to(device)
    kernels: dict[str, float | None] = {}

    def probe(name: str, make: Callable[[], Callable[[], object] | None]) -> None:
        try:
            fn = make()
            kernels[name] = round(_rate(fn, flops, budget_s, sync) / 1e9, 1) if fn else None
        except (RuntimeError, NotImplementedError, TypeError):
            kernels[name] = None  # the kernel does not exist for this device/build

    probe("torch.matmul fp32", lambda: (lambda: a @ b))
    a16, b16 = a.bfloat16(), b.bfloat16()
    probe("torch.matmul bf16", lambda: (lambda: a16 @ b16))
    ai = torch.randint(-128, 127, (n, n), dtype=torch.int8, generator=gen).to(device)
    bi = torch.randint(-128, 127, (n, n), dtype=torch.int8, generator=gen).to(device)
    if hasattr(torch, "_int_mm"):
        probe("torch._int_mm int8", lambda: (lambda: torch._int_mm(ai, bi)))
    if device == "cpu":
        probe("onnxruntime MatMulInteger int8", lambda: _ort_int8_matmul(n, threads))
    int8 = [v for k, v in kernels.items() if "int8" in k and v]
    return {
        "device": device, "n": n, "threads": torch.get_num_threads() if device == "cpu" else None,
        "fp32_gflops": kernels.get("torch.matmul fp32"), "bf16_gflops": kernels.get("torch.matmul bf16"),
        "int8_gops": max(int8) if int8 else None, "kernels": kernels,
        "seconds": round(time.perf_counter() - start, 2),
    }


# Bytes of the bandwidth probe's buffer: far beyond any CPU's last-level cache (tens of MiB on
# the CPUs we meet), so the rate is that of main memory; on a GPU, of its HBM.
BANDWIDTH_BYTES = 256 * 2**20


def memory_bandwidth(device: str = "cpu", threads: int | None = None, budget_s: float = 0.3,
                     n_bytes: int = BANDWIDTH_BYTES) -> dict:
    """Main-memory bandwidth as a cached decode step meets it: a large buffer read once.

    `read_gbs` times a sum over an fp32 buffer (reads only; the arithmetic is trivial, so it
    is bound by memory), which is what reading a model's weights for one decode step is.
    `copy_gbs` times a copy into a second buffer and counts the bytes read plus written.
    Both use torch with the benchmark's thread count, best rate over `budget_s` each.

    Returns:
        {device, bytes, threads, read_gbs, copy_gbs, seconds}: GB/s (1e9 bytes per second).
    """
    import torch

    start = time.perf_counter()
    if threads and device == "cpu":
        torch.set_num_threads(threads)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    n = n_bytes // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    read = _rate(lambda: src.sum(), float(n_bytes), budget_s, sync)
    copy = _rate(lambda: dst.copy_(src), 2.0 * n_bytes, budget_s, sync)
    return {"device": device, "bytes": n_bytes, "threads": torch.get_num_threads() if device == "cpu" else None,
            "read_gbs": round(read / 1e9, 2), "copy_gbs": round(copy / 1e9, 2),
            "seconds": round(time.perf_counter() - start, 2)}
