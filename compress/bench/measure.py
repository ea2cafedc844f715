"""Measurement primitives: latency of a callable, a benchmark batch, memory high-water.

These are reused outside the benchmark (the quantize stage's `--method auto` times
candidates with `latency`), so they know nothing about artifacts or reports.
"""

from __future__ import annotations

import math
import os
import time
from typing import Callable, Sequence

import numpy as np

from compress.anatomy import MODEL_INPUTS

Timer = Callable[[Callable[[], object]], float]
# Below 6 samples even the min-max range covers the median with less than 95% probability
# (1 - 2 * 0.5**n), so no interval from fewer calls can claim 95%.
MIN_CI_SAMPLES = 6


def wall_timer(fn: Callable[[], object]) -> float:
    """Seconds one call of `fn` takes by the monotonic wall clock (CPU work is synchronous)."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def cuda_timer(fn: Callable[[], object]) -> float:
    """Seconds one call of `fn` takes on the GPU, by CUDA events.

    The device is synchronised first so that queued work from earlier calls is not
    billed to this one, and the end event is waited on so that asynchronous kernels
    launched by `fn` are.
    """
    import torch

    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def timer_for(device: str) -> Timer:
    """The timer that measures honestly on `device` ("cpu" or "cuda")."""
    return cuda_timer if device.startswith("cuda") else wall_timer


def median_ci_rel(times: Sequence[float]) -> float:
    """Half-width of the distribution-free 95% confidence interval of the median, relative to it.

    The interval runs between the order statistics n/2 -/+ 1.96*sqrt(n)/2 (the normal
    approximation to the binomial), so it needs no assumption about the shape of the
    latency distribution, which is skewed. Returns inf for fewer than 3 samples.
    """
    n = len(times)
    if n < 3:
        return math.inf
    x = np.sort(np.asarray(times, dtype=np.float64))
    half = 1.96 * math.sqrt(n) / 2
    lo = max(0, int(math.floor(n / 2 - half)) - 1)  # ranks are 1-based in the formula
    hi = min(n - 1, int(math.ceil(n / 2 + half)) - 1)
    median = float(np.median(x))
    if median <= 0:
        return math.inf
    return float((x[hi] - x[lo]) / (2 * median))


def latency(fn: Callable[[], object], *, warmup: int = 3, budget_s: float = 3.0, min_iters: int = 10,
            max_iters: int = 10_000, target_rel: float = 0.02, timer: Timer = wall_timer) -> dict:
    """Time `fn` until the median is known to `target_rel` or the time budget is spent.

    Args:
        fn: the call to time, with no arguments (e.g. `lambda: runner.logits(batch)`).
        warmup: untimed calls first (lazy initialisation, caches, allocator warm-up).
        budget_s: stop once this many seconds of timed calls have run, even if the
            interval is still wide (but never before 3 calls).
        min_iters: the fewest timed calls before the interval may stop the loop.
        max_iters: the most timed calls.
        target_rel: stop when the 95% CI of the median is within +/- this fraction of it.
        timer: `wall_timer` on the CPU, `cuda_timer` on a GPU (see `timer_for`).

    Returns:
        {p50_ms, p90_ms, p99_ms, mean_ms, min_ms, iters, ci95_rel, converged, total_s}:
        milliseconds; ci95_rel is the relative half-width of the 95% CI of the median
        (None below 3 calls; below 6 calls it is the half-range and covers less than 95%);
        converged says whether it reached `target_rel` with at least 6 calls.
    """
    for _ in range(warmup):
        fn()
    times: list[float] = []
    spent = 0.0
    next_check = max(MIN_CI_SAMPLES, min_iters)
    while len(times) < max_iters:
        t = timer(fn)
        times.append(t)
        spent += t
        n = len(times)
        if n >= next_check:
            # Sorting every call would cost O(n^2 log n) over a long run; checking at
            # ~10% growth steps keeps the overhead negligible.
            if median_ci_rel(times) <= target_rel:
                break
            next_check = n + max(1, n // 10)
        if spent >= budget_s and n >= 3:
            break
    return summarize(times, target_rel)


def summarize(times: Sequence[float], target_rel: float = 0.02) -> dict:
    """Percentiles (ms), the median's 95% CI and whether it reached `target_rel`."""
    ms = np.asarray(times) * 1e3
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    ci = median_ci_rel(times)
    return {"p50_ms": round(float(p50), 4), "p90_ms": round(float(p90), 4), "p99_ms": round(float(p99), 4),
            "mean_ms": round(float(ms.mean()), 4), "min_ms": round(float(ms.min()), 4), "iters": len(times),
            "ci95_rel": round(ci, 5) if math.isfinite(ci) else None,
            "converged": bool(ci <= target_rel and len(times) >= MIN_CI_SAMPLES),
            "total_s": round(float(np.sum(times)), 3)}


def interleaved_latency(fns: dict[str, Callable[[], object]], *, warmup: int = 3, budget_s: float = 3.0,
                        min_iters: int = 10, max_iters: int = 10_000, target_rel: float = 0.02,
                        timer: Timer = wall_timer, settle: int = 1, settle_s: float = 0.05,
                        block: int = 4) -> dict[str, dict]:
    """Time several callables in rounds, a block of calls of each per round, in rotating order.

    On a machine whose load drifts (other jobs start and stop), timing artifacts one after
    another compares them under different conditions; interleaving makes every artifact see
    the same conditions, so their ratios hold. Stops when every median is known to
    `target_rel`, or when `budget_s` seconds per callable have been spent.

    Each block starts with untimed calls: at least `settle`, and for at least `settle_s` seconds.
    Switching runtimes has a cost that belongs to neither: the thread pools of the runtime just
    used keep spinning for a while, PyTorch's OpenMP threads for milliseconds after an operator,
    and they slow the other runtime's next calls. benchmarks/interleave_bias.py (MiniLM teacher
    in PyTorch vs its 2-layer int8 student in ONNX Runtime, quiet machine): each alone
    9.35-9.80x; call by call 12.6-14.3x; blocks after one untimed call 9.35-9.48x; after 50 ms
    of untimed calls 9.55-9.69x. On a busier afternoon one untimed call left the int8 model's
    median 1.4x slow (5.0-5.3x against 6.9-7.3x after 50 ms).

    Returns:
        {name: the same dict as `latency`}.
    """
    samplers = {name: (lambda fn=fn: [timer(fn)]) for name, fn in fns.items()}
    return interleaved_samples(samplers, untimed=fns, warmup=warmup, budget_s=budget_s, min_iters=min_iters,
                               max_iters=max_iters, target_rel=target_rel, settle=settle, settle_s=settle_s,
                               block=block)


Sampler = Callable[[], list[float]]  # one call: one or more timed durations, in seconds


def interleaved_samples(samplers: dict[str, Sampler], *, untimed: dict[str, Callable[[], object]] | None = None,
                        warmup: int = 3, budget_s: float = 3.0, min_iters: int = 10, max_iters: int = 10_000,
                        target_rel: float = 0.02, settle: int = 1, settle_s: float = 0.05,
                        block: int = 4) -> dict[str, dict]:
    """`interleaved_latency` for samplers: callables that time their own work and return the durations.

    A sampler may return several samples per call: a decode run times each of its steps
    after an untimed prefill (`compress.bench.workloads`). Rounds, rotation, the untimed
    settling calls before each block and the stopping rule are those of `interleaved_latency`,
    counted in samples: the interval is checked once every callable has `min_iters` samples,
    and the budget is `budget_s` seconds of timed work per callable.

    Args:
        samplers: {name: sampler}.
        untimed: {name: the same work untimed} for warm-up and settling; default the samplers.
        block: sampler calls per callable per round.

    Returns:
        {name: the same dict as `latency`}, `iters` counting samples.
    """
    names = list(samplers)
    plain = untimed or samplers
    for name in names:
        for _ in range(warmup):
            plain[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    spent, rounds = 0.0, 0
    next_check = max(MIN_CI_SAMPLES, min_iters)
    while min(len(v) for v in times.values()) < max_iters:
        order = names[rounds % len(names):] + names[:rounds % len(names)]
        for name in order:
            start, calls = time.perf_counter(), 0
            while calls < settle or (calls and time.perf_counter() - start < settle_s):
                plain[name]()
                calls += 1
            for _ in range(block):
                got = samplers[name]()
                times[name].extend(got)
                spent += sum(got)
        rounds += 1
        n = min(len(v) for v in times.values())
        if n >= next_check:
            if all(median_ci_rel(v) <= target_rel for v in times.values()):
                break
            next_check = n + max(1, n // 10)
        if spent >= budget_s * len(names) and n >= 3:
            break
    return {n: summarize(v, target_rel) for n, v in times.items()}


def sampled_latency(sampler: Sampler, *, warmup: int = 3, budget_s: float = 3.0, min_iters: int = 10,
                    max_iters: int = 10_000, target_rel: float = 0.02) -> dict:
    """`latency` for one sampler (see `interleaved_samples`): the same stopping rule, in samples."""
    return interleaved_samples({"one": sampler}, warmup=warmup, budget_s=budget_s, min_iters=min_iters,
                               max_iters=max_iters, target_rel=target_rel, settle=0, settle_s=0.0, block=1)["one"]


def make_batch(tokenizer, texts: Sequence[str] | Sequence[tuple[str, str]], batch_size: int,
               seq_len: int) -> dict[str, np.ndarray]:
    """A batch of real texts padded or truncated to exactly `seq_len` tokens.

    Texts are taken in order and repeated when there are fewer than `batch_size`; pairs
    (tuples) are encoded as sentence pairs. Returns int64 arrays input_ids,
    attention_mask (and token_type_ids when the tokenizer makes them), shape
    (batch_size, seq_len).
    """
    if not texts:
        raise ValueError("make_batch needs at least one text")
    chosen = [texts[i % len(texts)] for i in range(batch_size)]
    if isinstance(chosen[0], (tuple, list)):
        args = ([a for a, _ in chosen], [b for _, b in chosen])
    else:
        args = (list(chosen),)
    enc = tokenizer(*args, padding="max_length", truncation=True, max_length=seq_len, return_tensors="np")
    batch = {k: np.ascontiguousarray(enc[k], dtype=np.int64) for k in MODEL_INPUTS if k in enc}
    assert batch["input_ids"].shape == (batch_size, seq_len), batch["input_ids"].shape
    return batch


# --------------------------------------------------------------------------- memory (Linux /proc)

def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_mb() -> float | None:
    """Resident memory of this process now, in MiB."""
    kb = _status_kb("VmRSS")
    return round(kb / 1024, 1) if kb is not None else None


def peak_rss_mb() -> float | None:
    """High-water resident memory of this process (VmHWM), in MiB."""
    kb = _status_kb("VmHWM")
    if kb is None:  # not Linux: ru_maxrss is KiB on Linux, bytes on macOS
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return round(peak / (2**20 if sys.platform == "darwin" else 1024), 1)
    return round(kb / 1024, 1)


def reset_peak_rss() -> bool:
    """Reset the high-water mark to the current RSS (Linux >= 4.0). False where impossible."""
    try:
        with open(f"/proc/{os.getpid()}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
