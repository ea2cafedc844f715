"""Measure one artifact: quality (its task's metrics), size, parameters, latency grid, memory.

Run in a fresh process by default (`python -m compress.bench.worker JOB.json OUT.json`)
so that the peak RSS it reports belongs to this artifact alone: a process's high-water
mark never goes down, and memory freed by an earlier artifact is often kept by the
allocator. Everything goes through `load_runner`, so any registered backend works.
"""

from __future__ import annotations

import gc
import json
import sys
import time
import traceback
from pathlib import Path

from compress.artifacts import read_manifest, weights_size
from compress.bench.analysis import artifact_precision
from compress.bench.flops import architecture, count_parameters
from compress.bench.measure import latency, make_batch, peak_rss_mb, reset_peak_rss, rss_mb, timer_for
from compress.bench.schema import quality_block, quality_fields
from compress.errors import UserError


def _ort_threads(runner) -> int | None:
    """intra_op_num_threads of an onnxruntime session held by the runner, if any."""
    if "onnxruntime" not in sys.modules:
        return None
    import onnxruntime as ort

    # The session may sit on the runner or one level down (e.g. inside an optimum model).
    found = list(vars(runner).values())
    found += [v for obj in list(found) if hasattr(obj, "__dict__") for v in vars(obj).values()]
    for obj in found:
        if isinstance(obj, ort.InferenceSession):
            return obj.get_session_options().intra_op_num_threads
    return None


def _graph_fused(path: Path, depth: int = 5) -> bool | None:
    """Whether the artifact's ONNX graph was fused, as its manifests record it.

    The export stage writes `fused`; the quantize stage keeps the source graph's under
    `quantization.source_graph`. Parent pointers are followed for artifacts that record
    neither. None when no manifest says.
    """
    for _ in range(depth):
        manifest = read_manifest(path)
        if not manifest:
            return None
        source_graph = (manifest.get("quantization") or {}).get("source_graph") or {}
        for value in (manifest.get("fused"), source_graph.get("fused")):
            if isinstance(value, bool):
                return value
        if not manifest.get("parent"):
            return None
        path = Path(manifest["parent"])
    return None


def _texts(data, split: str) -> list:
    """The split's texts (or text pairs), longest first, so a batch carries the most real tokens."""
    ds = data[split]
    texts = list(ds["text"])
    if "text_pair" in ds.column_names:
        texts = list(zip(texts, ds["text_pair"]))
    return sorted(texts, key=lambda t: -len(t[0] + t[1]) if isinstance(t, tuple) else -len(t))


def measure_artifact(job: dict) -> dict:
    """All raw figures of one artifact. `job` holds name, path, device, threads, isolated and
    the bench config (a BenchConfig dump)."""
    import torch

    from compress.bench.config import BenchConfig
    from compress.data import check_labels, encode, load_data
    from compress.metrics import classification_metrics
    from compress.runners import load_runner, score

    cfg = BenchConfig.model_validate(job["config"])
    device, threads, path = job["device"], job["threads"], Path(job["path"])
    if threads:
        torch.set_num_threads(threads)
    data = load_data(cfg)
    manifest = read_manifest(path)

    # Libraries every artifact needs are loaded before the memory baseline, so that the
    # model memory figure is the artifact's own and not the first-import cost of transformers.
    from transformers import AutoConfig, AutoTokenizer  # noqa: F401

    from compress.metrics import load_metric

    load_metric("accuracy")
    load_metric("f1")

    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        cuda_free_before = torch.cuda.mem_get_info()[0]
    gc.collect()
    peak_reset = reset_peak_rss()
    rss_before = rss_mb()
    t0 = time.perf_counter()
    runner = load_runner(path, device=device, threads=threads, trust_remote_code=cfg.trust_remote_code)
    load_s = time.perf_counter() - t0

    config = runner.config
    max_pos = getattr(config, "max_position_embeddings", None)
    if max_pos and max(cfg.seq_lens) > max_pos:
        raise UserError(
            f"--seq-lens asks for {max(cfg.seq_lens)} tokens but '{job['name']}' accepts at most "
            f"{max_pos} (max_position_embeddings). Use sequence lengths up to {max_pos}."
        )
    mapping = check_labels(data, getattr(config, "label2id", None), config.num_labels)
    split = encode(data, runner.tokenizer, cfg.max_length, mapping, splits=(cfg.split,))[cfg.split]
    metrics = classification_metrics(score(runner, split, cfg.eval_batch_size), split.labels, config.num_labels)

    points = []
    if not cfg.interleave:  # else the parent times all artifacts together (bench_latency_interleaved)
        texts = _texts(data, cfg.split)
        timer = timer_for(device)
        for b in cfg.batch_sizes:
            for s in cfg.seq_lens:
                batch = make_batch(runner.tokenizer, texts, b, s)
                stats = latency(lambda r=runner, x=batch: r.logits(x), warmup=cfg.warmup, budget_s=cfg.budget_s,
                                min_iters=cfg.min_iters, target_rel=cfg.target_ci, timer=timer)
                points.append(_point(b, s, stats))

    memory = {
        "method": "subprocess" if job.get("isolated") else "in-process",
        "rss_before_load_mb": rss_before,
        "peak_rss_mb": peak_rss_mb(),
        "peak_reset": peak_reset,
    }
    if memory["peak_rss_mb"] is not None and rss_before is not None:
        memory["rss_delta_mb"] = round(memory["peak_rss_mb"] - rss_before, 1)
    if cuda:
        memory["cuda_max_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        # Device-wide, so it also sees memory that onnxruntime's own CUDA arena holds.
        memory["cuda_used_delta_mb"] = round((cuda_free_before - torch.cuda.mem_get_info()[0]) / 2**20, 1)
        # torch's allocator does not see onnxruntime's CUDA arena, so ONNX artifacts use the device-wide figure.
        key = "cuda_used_delta_mb" if runner.format.startswith("onnx") else "cuda_max_allocated_mb"
        memory["model_memory_mb"] = memory[key]
    else:
        memory["model_memory_mb"] = memory.get("rss_delta_mb")

    params, params_method = count_parameters(runner, path)
    result = {
        "name": job["name"], "path": str(path), "resolved_path": str(path.resolve()),
        "format": runner.format, "device": runner.device,
        "precision": artifact_precision(manifest, runner.format),
        "stage": manifest.get("stage"), "parent": manifest.get("parent"),
        **quality_fields(quality_block("classification", metrics)),
        "size_bytes": weights_size(path), "params": params, "params_method": params_method,
        "arch": architecture(config),
        "fused": _graph_fused(path),
        "ort_session_config": getattr(runner, "session_config", None) or None,
        "threads": {"torch_intra_op": torch.get_num_threads(), "ort_intra_op": _ort_threads(runner)},
        "load_s": round(load_s, 3),
        "memory": memory,
        "latency": points,
    }
    del runner
    gc.collect()
    return result


def _point(batch_size: int, seq_len: int, stats: dict) -> dict:
    return {"batch_size": batch_size, "seq_len": seq_len, **stats,
            "throughput_sps": round(batch_size / (stats["p50_ms"] / 1e3), 2)}


def bench_latency_interleaved(artifacts: list[tuple[str, Path]], cfg, device: str, threads: int | None) -> dict:
    """{name: latency points} for all artifacts, timed together in one process, round-robin."""
    import torch

    from compress.bench.measure import interleaved_latency
    from compress.data import load_data
    from compress.runners import load_runner

    if threads:
        torch.set_num_threads(threads)
    texts = _texts(load_data(cfg), cfg.split)
    runners = {name: load_runner(path, device=device, threads=threads, trust_remote_code=cfg.trust_remote_code)
               for name, path in artifacts}
    points: dict[str, list] = {name: [] for name in runners}
    for b in cfg.batch_sizes:
        for s in cfg.seq_lens:
            batches = {name: make_batch(r.tokenizer, texts, b, s) for name, r in runners.items()}
            fns = {name: (lambda r=r, x=batches[name]: r.logits(x)) for name, r in runners.items()}
            stats = interleaved_latency(fns, warmup=cfg.warmup, budget_s=cfg.budget_s, min_iters=cfg.min_iters,
                                        target_rel=cfg.target_ci, timer=timer_for(device))
            for name, st in stats.items():
                points[name].append(_point(b, s, st))
    return points


def main(argv: list[str]) -> int:
    job_path, out_path = argv
    job = json.loads(Path(job_path).read_text())
    try:
        result = {"ok": measure_artifact(job)}
    except UserError as err:
        result = {"error": str(err), "exit_code": err.exit_code}
    except Exception:  # a bug: hand the traceback to the parent, which re-raises it
        result = {"crash": traceback.format_exc()}
    Path(out_path).write_text(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
