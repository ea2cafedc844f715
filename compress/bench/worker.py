"""Measure one artifact: quality (its task's metrics), size, parameters, latency points, memory.

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

from typing import Any

from compress.artifacts import read_manifest, weights_size
from compress.bench.analysis import artifact_precision
from compress.bench.flops import architecture, count_parameters, decode_weight_bytes
from compress.bench.measure import interleaved_samples, peak_rss_mb, reset_peak_rss, rss_mb, sampled_latency, timer_for
from compress.bench.schema import quality_block, quality_fields
from compress.bench.workloads import BLOCK, Inputs, build, finish_point, kind_of, split_texts
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


def artifact_task(path: Path, asked: str | None):
    """The Task of the artifact at `path` (its manifest, else its config), as bench measures it."""
    from compress.tasks.registry import task_for_artifact

    return task_for_artifact(path, asked)


def task_inputs(task, data, runner, cfg) -> tuple[Any, Inputs]:
    """(the task-encoded evaluation split, the samplers' inputs) for one runner."""
    split = task.encode(data, runner.tokenizer, cfg, model_config=runner.config, splits=(cfg.split,))[cfg.split]
    return split, Inputs(texts=split_texts(data, cfg.split), tokens=getattr(split, "tokens", None))


def _quantization(manifest: dict) -> dict | None:
    """The quantize stage's method and settings, as the manifest records them, and the
    MatMulNBits accuracy level it chose (the notes read them)."""
    if manifest.get("stage") != "quantize":
        return None
    level = ((manifest.get("quantization") or {}).get("accuracy_level") or {})
    return {"method": manifest.get("method") or (manifest.get("config") or {}).get("method"),
            "settings": manifest.get("settings") or {},
            "accuracy_level": level.get("choice") if isinstance(level, dict) else level}


def measure_artifact(job: dict) -> dict:
    """All raw figures of one artifact. `job` holds name, path, device, threads, isolated and
    the bench config (a BenchConfig dump)."""
    import torch

    from compress.bench.config import BenchConfig
    from compress.runners import load_runner

    cfg = BenchConfig.model_validate(job["config"])
    device, threads, path = job["device"], job["threads"], Path(job["path"])
    if threads:
        torch.set_num_threads(threads)
    task = artifact_task(path, cfg.task)
    data = task.load_data(cfg)
    manifest = read_manifest(path)

    # Libraries every artifact needs are loaded before the memory baseline, so that the
    # model memory figure is the artifact's own and not the first-import cost of transformers.
    from transformers import AutoConfig, AutoTokenizer  # noqa: F401

    task.preload()

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
    plan = task.bench_plan(cfg, config, job["name"])
    split, inputs = task_inputs(task, data, runner, cfg)
    built = [(point, build(runner, point, inputs, timer_for(device), job["name"])) for point in plan]
    # One untimed call of each point before scoring: the high-water mark then holds what running
    # the model takes (the weights, the longest prefill, the KV cache of the largest decode
    # batch) and not yet the scoring's buffers (an LM's perplexity pass holds up to 256 MB of logits).
    for _, (_, untimed) in built:
        untimed()
    run_peak = peak_rss_mb()
    if cuda:
        cuda_run_peak = torch.cuda.max_memory_allocated()
    metrics = task.evaluate_runner(runner, split, cfg.eval_batch_size)

    points = []
    if not cfg.interleave:  # else the parent times all artifacts together (bench_latency_interleaved)
        for point, (sampler, _) in built:
            stats = sampled_latency(sampler, warmup=cfg.warmup, budget_s=cfg.budget_s, min_iters=cfg.min_iters,
                                    target_rel=cfg.target_ci)
            points.append(finish_point(point, stats))

    memory = {
        "method": "subprocess" if job.get("isolated") else "in-process",
        "rss_before_load_mb": rss_before,
        "peak_rss_mb": peak_rss_mb(),
        "run_peak_rss_mb": run_peak,
        "peak_reset": peak_reset,
    }
    if memory["peak_rss_mb"] is not None and rss_before is not None:
        memory["rss_delta_mb"] = round(memory["peak_rss_mb"] - rss_before, 1)
        memory["run_delta_mb"] = round(run_peak - rss_before, 1)
    if cuda:
        memory["cuda_max_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        # Device-wide, so it also sees memory that onnxruntime's own CUDA arena holds.
        memory["cuda_used_delta_mb"] = round((cuda_free_before - torch.cuda.mem_get_info()[0]) / 2**20, 1)
        # torch's allocator does not see onnxruntime's CUDA arena, so ONNX artifacts use the device-wide figure.
        key = "cuda_used_delta_mb" if runner.format.startswith("onnx") else "cuda_max_allocated_mb"
        memory["cuda_run_allocated_mb"] = round(cuda_run_peak / 2**20, 1)
        memory["model_memory_mb"] = memory[key]
    else:
        memory["model_memory_mb"] = memory.get("run_delta_mb")

    params, params_method = count_parameters(runner, path)
    result = {
        "name": job["name"], "path": str(path), "resolved_path": str(path.resolve()),
        "format": runner.format, "device": runner.device,
        "precision": artifact_precision(manifest, runner.format),
        "stage": manifest.get("stage"), "parent": manifest.get("parent"),
        **quality_fields(quality_block(task.name, metrics, task.primary_metric, task.higher_is_better)),
        "size_bytes": weights_size(path), "params": params, "params_method": params_method,
        "arch": architecture(config),
        "fused": _graph_fused(path),
        "ort_session_config": getattr(runner, "session_config", None) or None,
        "threads": {"torch_intra_op": torch.get_num_threads(), "ort_intra_op": _ort_threads(runner)},
        "load_s": round(load_s, 3),
        "memory": memory,
        "latency": points,
    }
    quantization = _quantization(manifest)
    if quantization:
        result["quantization"] = quantization
    if any(kind_of(p) == "decode" for p in plan):
        result["decode_weight_bytes"], result["decode_weight_bytes_method"] = decode_weight_bytes(runner, path)
    del runner, built
    gc.collect()
    return result


def bench_latency_interleaved(artifacts: list[tuple[str, Path]], cfg, device: str, threads: int | None) -> dict:
    """{name: latency points} for all artifacts, timed together in one process, round-robin.

    Every artifact is timed at the points of its own plan; a point several artifacts share
    (the same kind, batch and length) is timed in the same rounds for all of them.
    """
    import torch

    from compress.runners import load_runner

    if threads:
        torch.set_num_threads(threads)
    timer = timer_for(device)
    runners, plans, inputs = {}, {}, {}
    data_by_task: dict[str, Any] = {}
    for name, path in artifacts:
        task = artifact_task(path, cfg.task)
        if task.name not in data_by_task:
            data_by_task[task.name] = task.load_data(cfg)
        runner = load_runner(path, device=device, threads=threads, trust_remote_code=cfg.trust_remote_code)
        runners[name] = runner
        plans[name] = task.bench_plan(cfg, runner.config, name)
        inputs[name] = task_inputs(task, data_by_task[task.name], runner, cfg)[1]
    keys: dict[tuple, dict] = {}
    for name in runners:
        for point in plans[name]:
            keys.setdefault(_key(point), point)
    points: dict[str, list] = {name: [] for name in runners}
    for key, point in keys.items():
        names = [n for n in runners if any(_key(p) == key for p in plans[n])]
        own = {n: next(p for p in plans[n] if _key(p) == key) for n in names}
        made = {n: build(runners[n], own[n], inputs[n], timer, n) for n in names}
        stats = interleaved_samples({n: m[0] for n, m in made.items()}, untimed={n: m[1] for n, m in made.items()},
                                    warmup=cfg.warmup, budget_s=cfg.budget_s, min_iters=cfg.min_iters,
                                    target_rel=cfg.target_ci, block=BLOCK[kind_of(point)])
        for n, st in stats.items():
            points[n].append(finish_point(own[n], st))
    return points


def _key(point: dict) -> tuple:
    return kind_of(point), point["batch_size"], point["seq_len"], point.get("new_tokens")


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
