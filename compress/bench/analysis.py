"""Figures derived from the raw measurements: FLOPs and roofline, ratios to the baseline,
the Pareto front, and plain-language notes where a compressed model is slower.

All functions here are pure: they read and extend a results dict, so `compress report`
can recompute nothing and still render the same tables, and tests need no model.
"""

from __future__ import annotations

from pathlib import Path

from compress.bench.flops import kv_cache_bytes, point_flops
from compress.bench.schema import metric_info, normalise_artifact, primary_comparison

PRECISIONS = ("fp32", "bf16", "fp16", "int8", "int4")
QUANTIZED = ("int8", "int4")
# Which measured matmul peak an artifact of each precision is held against. fp16 uses the
# bf16 figure: both are 16-bit tensor-core/AMX paths where they exist.
PEAK_KEY = {"fp32": "fp32_gflops", "bf16": "bf16_gflops", "fp16": "bf16_gflops", "int8": "int8_gops"}
SMALL_WORK_TOKENS = 256  # batch*seq at or below which quantize/dequantize overhead dominates
# Bytes per element of the KV cache: fp32 unless the model computes in 16 bits (the
# quantized graphs keep fp32 activations and cache).
CACHE_BYTES = {"bf16": 2, "fp16": 2}
# Below this share of the measured read bandwidth, a decode step is not bound by reading
# weights: per-operator and per-call overhead dominate, and fewer weight bytes cannot help.
MEMORY_BOUND_SHARE = 0.25


def artifact_precision(manifest: dict, fmt: str) -> str:
    """The arithmetic an artifact computes in: fp32, bf16, fp16, int8 or int4.

    Read from the manifest: an explicit `precision` key wins, then a 16-bit `dtype`;
    a quantize-stage artifact is int8 unless its method names 4-bit or 16-bit
    (bnb-nf4, bnb-fp4, bf16, fp16); the runner's format is the last resort.
    """
    explicit = str(manifest.get("precision") or "").lower()
    if explicit in PRECISIONS:
        return explicit
    dtype = str(manifest.get("dtype") or "").lower()
    if dtype in ("bf16", "fp16"):
        return dtype
    if manifest.get("stage") == "quantize" or fmt in ("bnb", "torch-int8"):
        method = " ".join(str(m) for m in (manifest.get("method"), (manifest.get("config") or {}).get("method")) if m)
        method = method.lower()
        if any(w in method for w in ("nf4", "fp4", "4bit", "int4")):
            return "int4"
        for p in ("bf16", "fp16"):
            if p in method:
                return p
        return "int8"
    for p in ("bf16", "fp16", "int8", "int4"):
        if fmt.lower().endswith(p):
            return p
    return "fp32"


def point_kind(point: dict) -> str:
    """The workload a point timed (compress.bench.workloads); points written before LMs were
    benchmarked carry none and are `forward`."""
    return point.get("kind", "forward")


def point_key(point: dict) -> tuple[str, int, int]:
    """What makes two artifacts' points comparable: (kind, batch size, sequence length)."""
    return point_kind(point), point["batch_size"], point["seq_len"]


def headline_point(results: dict) -> tuple[int, int] | None:
    """(batch, seq) of `headline_key`."""
    key = headline_key(results)
    return key[1:] if key else None


def headline_key(results: dict) -> tuple[str, int, int] | None:
    """The point plotted against quality: for LMs, cached decode at the smallest batch (one
    user's generation speed); else the smallest batch at the longest sequence (online
    inference on a full-length input). (kind, batch, seq), or None without points."""
    points = {point_key(p) for a in results.get("artifacts", []) for p in a.get("latency", [])}
    if not points:
        return None
    kind = "decode" if any(k == "decode" for k, _, _ in points) else "forward"
    of_kind = {(b, s) for k, b, s in points if k == kind}
    if not of_kind:
        return None
    batch = min(b for b, _ in of_kind)
    if kind == "decode":
        return kind, batch, min(s for b, s in of_kind if b == batch)
    return kind, batch, max(s for b, s in of_kind if b == batch)


def headline_speed(point: dict) -> float:
    """The x value of the quality plot: decode tokens/s for a decode point, else p50 ms."""
    if point_kind(point) == "decode":
        return point.get("tokens_per_s") or point["batch_size"] / (point["p50_ms"] / 1e3)
    return point["p50_ms"]


def pareto_front(items: list[tuple[float, float]], higher_is_better: bool = True) -> list[bool]:
    """For (latency, quality) pairs: True where no other item is at least as fast and at
    least as good and strictly better in one of the two.

    Args:
        items: (latency, value of the primary metric) per artifact.
        higher_is_better: the metric's direction (accuracy: True; perplexity: False).
    """
    sign = 1 if higher_is_better else -1
    scored = [(lat, sign * q) for lat, q in items]
    front = []
    for i, (lat, q) in enumerate(scored):
        dominated = any(l2 <= lat and q2 >= q and (l2 < lat or q2 > q)
                        for j, (l2, q2) in enumerate(scored) if j != i)
        front.append(not dominated)
    return front


def _ratio(a, b, digits: int = 4):
    return round(a / b, digits) if a is not None and b not in (None, 0) else None


def _delta_pts(a, b):
    return round((a - b) * 100, 2) if a is not None and b is not None else None


def quality_vs_baseline(quality: dict | None, base: dict | None) -> dict:
    """The quality keys of `vs_baseline`: `primary` (the generic comparison of the primary
    metric) and `<name>_delta_pts` for every fraction metric both have (for classification:
    the schema-1 `accuracy_delta_pts` and `macro_f1_delta_pts`)."""
    out = {"primary": primary_comparison(quality, base)}
    theirs = (base or {}).get("metrics") or {}
    for name, value in ((quality or {}).get("metrics") or {}).items():
        if metric_info(name).fraction and name in theirs:
            out[f"{name}_delta_pts"] = _delta_pts(value, theirs[name])
    return out


def _find_parent(art: dict, artifacts: list[dict]) -> str | None:
    """The name of the benched artifact the manifest's parent pointer names, if any."""
    parent = art.get("parent")
    if not parent:
        return None
    target = str(Path(parent).expanduser().resolve()) if Path(parent).expanduser().exists() else None
    for other in artifacts:
        if other is art:
            continue
        if target and other.get("resolved_path") == target:
            return other["name"]
    # The stage may have run from another working directory: fall back to the folder name.
    names = [o["name"] for o in artifacts if o is not art and Path(o["path"]).name == Path(parent).name]
    return names[0] if len(names) == 1 else None


def derive(results: dict) -> dict:
    """Add flops/achieved_gflops/roofline per point, parents, vs_baseline, and notes. Returns results.

    Artifacts without a quality block (schema 1) get one from their top-level accuracy."""
    artifacts = results["artifacts"]
    peak = results.get("peak") or {}
    by_name = {a["name"]: a for a in artifacts}
    base = by_name.get(results.get("baseline"))
    for art in artifacts:
        normalise_artifact(art)  # a hand-built or schema-1 artifact: its quality block from accuracy
    bandwidth = (peak.get("memory") or {}).get("read_gbs")
    for art in artifacts:
        peak_value = peak.get(PEAK_KEY.get(art["precision"], ""))
        for p in art["latency"]:
            flops = point_flops(art.get("arch"), p)
            achieved = flops / (p["p50_ms"] / 1e3) / 1e9 if flops and p["p50_ms"] > 0 else None
            p["flops"] = flops
            p["achieved_gflops"] = round(achieved, 2) if achieved is not None else None
            # Decode is held against memory bandwidth (below), prefill and forward against the matmul peak.
            compute_bound = point_kind(p) != "decode"
            p["roofline"] = round(achieved / peak_value, 4) if achieved and peak_value and compute_bound else None
            if point_kind(p) == "decode":
                _bandwidth_roofline(art, p, bandwidth)
        art["parent_name"] = _find_parent(art, artifacts)
        if base is not None:
            base_points = {point_key(p): p for p in base["latency"]}
            art["vs_baseline"] = {
                **quality_vs_baseline(art.get("quality"), base.get("quality")),
                "size_ratio": _ratio(art["size_bytes"], base["size_bytes"]),
                "params_ratio": _ratio(art["params"], base["params"]),
                "memory_ratio": _ratio(art["memory"].get("model_memory_mb"), base["memory"].get("model_memory_mb")),
            }
            for p in art["latency"]:
                ref = base_points.get(point_key(p))
                p["speedup_vs_baseline"] = _ratio(ref["p50_ms"], p["p50_ms"]) if ref else None
        else:
            art["vs_baseline"] = None
    results["notes"] = notes(results)
    return results


def _bandwidth_roofline(art: dict, p: dict, bandwidth: float | None) -> None:
    """A decode point's bytes read per step (weights once, every sequence's KV cache) and the
    share of the measured read bandwidth that reading them at the p50 step time takes."""
    weights = art.get("decode_weight_bytes")
    kv = kv_cache_bytes(art.get("arch"), p, CACHE_BYTES.get(art.get("precision"), 4))
    step = weights + (kv or 0) if weights else None
    achieved = step / (p["p50_ms"] / 1e3) / 1e9 if step and p["p50_ms"] > 0 else None
    p["bytes_per_step"] = step
    p["achieved_gbs"] = round(achieved, 2) if achieved is not None else None
    p["bandwidth_roofline"] = round(achieved / bandwidth, 4) if achieved and bandwidth else None


# --------------------------------------------------------------------------- honesty notes

def _within_noise(p: dict, ref: dict) -> bool:
    """True when the slowdown is smaller than the two medians' 95% intervals together."""
    ci_p, ci_r = p.get("ci95_rel"), ref.get("ci95_rel")
    if ci_p is None or ci_r is None:
        return False
    return p["p50_ms"] / ref["p50_ms"] - 1 <= ci_p + ci_r


def _fmt_point(p: dict) -> str:
    kind = point_kind(p)
    if kind == "forward":
        return f"b={p['batch_size']} s={p['seq_len']}"
    if kind == "decode":
        return f"decode b={p['batch_size']} (context {p['seq_len']})"
    return f"{'TTFT' if kind == 'ttft' else 'prefill'} b={p['batch_size']} s={p['seq_len']}"


def _work_tokens(p: dict) -> int:
    """Tokens one call pushes through the model: a decode step feeds one per sequence."""
    return p["batch_size"] * (1 if point_kind(p) == "decode" else p["seq_len"])


def _accuracy_level(art: dict) -> int | None:
    """The MatMulNBits accuracy level the artifact runs with: the one its quantize stage chose,
    else the one its settings name (None: unset or unknown)."""
    q = art.get("quantization") or {}
    for value in (q.get("accuracy_level"), (q.get("settings") or {}).get("accuracy_level")):
        if isinstance(value, int) or (isinstance(value, str) and value.isdigit()):
            return int(value)
    return None


def _is_matmul_nbits(art: dict) -> bool:
    q = art.get("quantization") or {}
    words = " ".join(str(x) for x in (q.get("method"), *(q.get("settings") or {}).keys())).lower()
    return (art["format"].startswith("onnx") and art["precision"] == "int4") or "nbits" in words \
        or "accuracy_level" in words


def _decode_reasons(art: dict, slow: list[tuple[dict, dict]], ref: dict, isa: set) -> list[str]:
    """Why a quantized LM decodes no faster: evidence from the parent's bandwidth roofline."""
    reasons = []
    decode = [(p, r) for p, r in slow if point_kind(p) == "decode"]
    if not decode:
        return reasons
    share = [r.get("bandwidth_roofline") for _, r in decode if r.get("bandwidth_roofline") is not None]
    mib = (ref.get("decode_weight_bytes") or 0) / 2**20
    if share and max(share) > 1:
        reasons.append(f"{ref['name']}'s weights ({mib:.1f} MiB) are read faster than main memory allows "
                       f"({max(share):.1f}x the measured bandwidth): they sit in the CPU's caches, so shrinking "
                       "them saves no memory traffic")
    elif share and max(share) < MEMORY_BOUND_SHARE:
        reasons.append(f"{ref['name']}'s decode steps read their weights at only {max(share):.0%} of the measured "
                       "memory bandwidth, so decode is bound by per-operator and per-call overhead, not by "
                       "memory: fewer weight bytes cannot make a step faster, and every quantized operator "
                       "adds work of its own")
    return reasons


def _nbits_reasons(art: dict, isa: set) -> list[str]:
    level = _accuracy_level(art)
    if level in (None, 0, 1):
        return [f"MatMulNBits ran with accuracy_level {level if level is not None else 'unset'}: it unpacks "
                "the 4-bit weights to fp32 blocks and multiplies in fp32, so it reads fewer bytes but does "
                "more work per weight; only a model whose decode is bound by memory bandwidth gains"]
    if level == 4 and not isa & {"AVX512-VNNI", "AVX-VNNI", "AMX-INT8"}:
        return ["MatMulNBits ran with accuracy_level 4 (int8 activations), but this CPU has no VNNI or AMX "
                "int8 instructions to make that path fast"]
    return []


def _slow_reasons(art: dict, slow: list[tuple[dict, dict]], env: dict, ref: dict | None = None) -> list[str]:
    """Likely causes of an int8/int4 artifact being slower, from what the results show."""
    isa = set((env.get("cpu") or {}).get("isa") or [])
    on_cpu = not str(art.get("device", "cpu")).startswith("cuda")
    if art["format"].startswith("bnb") or (art["precision"] == "int4" and on_cpu and not _is_matmul_nbits(art)):
        # The dominant cause; the others would only distract from it.
        if on_cpu:
            return ["bitsandbytes layers on the CPU turn their weights back into floating point on every call: "
                    "they save memory, not time"]
        return ["bitsandbytes layers run extra GPU kernels on every call (dequantizing 4-bit weights, or "
                "splitting out int8 outlier columns); with matrices this small those launches cost more than "
                "reading fewer bytes saves: they save memory, not time"]
    reasons = []
    if all(_within_noise(p, r) for p, r in slow):
        reasons.append("the differences are within the measurement noise (the 95% intervals of the two medians "
                       "overlap), so this may not be a real slowdown")
    if art["precision"] == "int8" and on_cpu and not isa & {"AVX512-VNNI", "AVX-VNNI", "AMX-INT8"}:
        reasons.append("this CPU has no VNNI or AMX int8 instructions, so int8 matrix products are no "
                       "faster than fp32 ones here")
    if _is_matmul_nbits(art):
        reasons += _nbits_reasons(art, isa)
    if ref is not None:
        reasons += _decode_reasons(art, slow, ref, isa)
    small = [p for p, _ in slow if _work_tokens(p) <= SMALL_WORK_TOKENS]
    if small and (art["precision"] == "int8" or _accuracy_level(art) == 4):
        reasons.append(f"at small inputs ({', '.join(_fmt_point(p) for p in small)}) the cost of quantizing "
                       "activations and converting results back on every call outweighs the faster int8 "
                       "arithmetic")
    hidden = (art.get("arch") or {}).get("hidden")
    if hidden and hidden < 256:
        reasons.append(f"the model is narrow (hidden size {hidden}), so every matrix product is small and "
                       "per-call quantization overhead dominates at any batch size")
    if art["format"].startswith("onnx") and art.get("fused") is False:
        reasons.append("the ONNX graph was not fused before quantization, so attention and LayerNorm run "
                       "as many small operators, each with its own overhead")
    if not reasons:
        reasons.append("no single cause is evident; the int8 kernels may be memory-bound at these shapes, "
                       "or other jobs on the machine slowed this run")
    return reasons


def notes(results: dict) -> list[dict]:
    """Plain-language caveats a reader needs next to the numbers."""
    env = results.get("environment") or {}
    artifacts = results["artifacts"]
    by_name = {a["name"]: a for a in artifacts}
    out: list[dict] = []
    for art in artifacts:
        if art["precision"] not in QUANTIZED:
            continue
        ref = by_name.get(art.get("parent_name") or "") or by_name.get(results.get("baseline") or "")
        if ref is None or ref is art:
            continue
        ref_points = {point_key(p): p for p in ref["latency"]}
        slow = [(p, ref_points[point_key(p)]) for p in art["latency"]
                if point_key(p) in ref_points and p["p50_ms"] > ref_points[point_key(p)]["p50_ms"]]
        if not slow:
            continue
        where = ", ".join(f"{_fmt_point(p)} ({p['p50_ms'] / r['p50_ms']:.2f}x the latency)" for p, r in slow)
        relation = "its parent" if ref["name"] == art.get("parent_name") else "the baseline"
        text = (f"{art['name']} ({art['precision']}) is slower than {relation} {ref['name']} at {where}. "
                f"Likely: " + "; ".join(_slow_reasons(art, slow, env, ref)) + ".")
        out.append({"artifact": art["name"], "kind": "quantized-slower", "text": text})

    for art in artifacts:
        if art.get("ort_session_config"):
            settings = ", ".join(f"{k}={v}" for k, v in art["ort_session_config"].items())
            out.append({"artifact": art["name"], "kind": "session-config",
                        "text": f"{art['name']} ran with the ONNX Runtime session config its manifest records "
                                f"({settings}); load it with the same setting to get these latencies "
                                "(docs/export.md#skiplayernormalization)."})

    if (env.get("thread_env") or {}).get("OMP_WAIT_POLICY", "").upper() == "PASSIVE":
        out.append({"artifact": None, "kind": "omp-passive",
                    "text": "OMP_WAIT_POLICY=PASSIVE was set: PyTorch's OpenMP threads sleep after every operator "
                            "and must be woken for the next. Measured here, that made a MiniLM-L6 in PyTorch 1.7x "
                            "slower at batch 1 (35 ms instead of 20 ms), which inflates the speed-up of every "
                            "ONNX Runtime artifact against a PyTorch one. Unset it to compare fairly."})

    load = env.get("load_average_start")
    cores = (env.get("cpu") or {}).get("logical_cores") or 0
    if load and cores and load[0] >= 0.5 * cores:
        text = (f"The machine was busy when the run started (1-minute load {load[0]} on {cores} logical cores): "
                "other jobs competed for the CPU, so latencies are pessimistic and noisier than on an idle machine.")
        threads = env.get("threads_requested") or 1
        if load[0] >= cores and threads > 1:
            # Seen here: a 2-layer model took 250 ms per call at 2 threads and 0.9 ms at 1.
            text += (f" With {threads} threads on an oversubscribed CPU, the threads of each operator wait for "
                     "one another to be scheduled, which can make PyTorch calls many times slower; compare "
                     "with --threads 1.")
        out.append({"artifact": None, "kind": "machine-busy", "text": text})
    target = (results.get("config") or {}).get("target_ci", 0.02)
    for art in artifacts:
        wide = [p for p in art["latency"] if not p.get("converged")]
        if wide:
            worst = max(p["ci95_rel"] if p.get("ci95_rel") is not None else float("inf") for p in wide)
            out.append({"artifact": art["name"], "kind": "not-converged",
                        "text": f"{art['name']}: {len(wide)} of {len(art['latency'])} points used up their time "
                                f"budget before the 95% interval of the median narrowed to +/-{target:.0%} "
                                f"(widest +/-{worst:.1%}). Raise --budget-s or measure on a quieter machine."})
    return out
