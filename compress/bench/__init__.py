"""`compress bench`: quality, size, latency and memory of artifacts side by side.

Each artifact is loaded through `compress.runners.load_runner` (any backend) and
measured by `compress.bench.worker`, by default in a fresh process so that its peak
memory is its own. What is timed is the artifact's Task's plan (`Task.bench_plan`):
padded forward calls for a classifier; prefill, time to first token and cached decode for
a causal LM (`compress.bench.workloads`). The raw figures, the environment and a
matmul-peak probe (and a memory-bandwidth probe for decode) go into
`results.json` (schema: docs/results-schema.md); derived figures (ratios to a baseline,
roofline, notes) are added by `compress.bench.analysis`; `report.md` and `report.html`
are rendered from that JSON alone by `compress.bench.report`.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from compress.bench.config import BenchConfig
from compress.bench.schema import SCHEMA_VERSION  # noqa: F401  (re-exported: the version bench writes)
from compress.errors import UserError
from compress.lineage import inherits_data


def parse_artifacts(specs: list[str], baseline: str | None) -> tuple[list[tuple[str, Path]], str | None]:
    """[(display name, directory)] and the baseline's name, from `name=path` or `path` specs.

    A bare path is named after its directory; repeated names get -2, -3 appended.
    """
    from compress.runners import detect_format

    def split(spec: str) -> tuple[str | None, Path]:
        if "=" in spec and not Path(spec).exists():
            name, _, path = spec.partition("=")
            if not name or not path:
                raise UserError(f"Cannot read the artifact '{spec}': write name=path or a plain directory path.")
            return name, Path(path)
        return None, Path(spec)

    entries = [split(s) for s in specs]
    base_index = None
    if baseline:
        bname, bpath = split(baseline)
        for i, (name, path) in enumerate(entries):
            same_path = bname is None and bpath.exists() and path.exists() and bpath.resolve() == path.resolve()
            if same_path or (name or path.resolve().name) == (bname or baseline):
                base_index = i
                break
        if base_index is None:  # the baseline is not among the artifacts: measure it too, first
            entries.insert(0, (bname, bpath))
            base_index = 0
    names: list[str] = []
    for name, path in entries:
        detect_format(path)  # fails now, with its message, rather than after minutes of measuring
        if name is not None and name in names:
            raise UserError(f"Two artifacts are named '{name}'. Give each a distinct name with name=path.")
        name = name or path.resolve().name
        unique, k = name, 2
        while unique in names:
            unique, k = f"{name}-{k}", k + 1
        names.append(unique)
    out = [(n, p) for n, (_, p) in zip(names, entries)]
    base_name = names[base_index] if base_index is not None else None
    return out, base_name


def one_task(artifacts: list[tuple[str, Path]]) -> str:
    """The task all artifacts share; a mix (a classifier beside an LM) is refused before any work."""
    from compress.tasks.registry import task_for_artifact

    # Each artifact's own task: `asked` may have been filled in from the first artifact's manifest.
    tasks = {name: task_for_artifact(path).name for name, path in artifacts}
    if len(set(tasks.values())) > 1:
        listed = ", ".join(f"{n} ({t})" for n, t in tasks.items())
        raise UserError(f"The artifacts are of different tasks: {listed}. One benchmark compares models of one "
                        "task on one dataset (accuracy and perplexity do not rank together): run compress bench "
                        "once per task.")
    return next(iter(tasks.values()))


def _run_isolated(job: dict) -> dict:
    """Run the worker in a fresh Python process and return its result (errors re-raised here)."""
    with tempfile.TemporaryDirectory(prefix="compress-bench-") as tmp:
        job_path, out_path = Path(tmp, "job.json"), Path(tmp, "out.json")
        job_path.write_text(json.dumps(job))
        proc = subprocess.run([sys.executable, "-m", "compress.bench.worker", str(job_path), str(out_path)],
                              capture_output=True, text=True, env=os.environ.copy())
        if not out_path.is_file():
            raise RuntimeError(f"The benchmark worker for '{job['name']}' died (exit {proc.returncode}):\n"
                               f"{proc.stderr[-4000:]}")
        answer = json.loads(out_path.read_text())
    if "error" in answer:
        err = UserError(answer["error"])
        err.exit_code = answer.get("exit_code", 2)
        raise err
    if "crash" in answer:
        raise RuntimeError(f"The benchmark worker for '{job['name']}' failed:\n{answer['crash']}")
    return answer["ok"]


def _say(cfg: BenchConfig, msg: str) -> None:
    if cfg.progress:
        print(f"compress bench: {msg}", file=sys.stderr, flush=True)


def _input_paths(cfg: BenchConfig) -> list[str]:
    """The artifacts' directories, the baseline first (whose data a bench given none reads)."""
    specs = ([cfg.baseline] if cfg.baseline else []) + list(cfg.artifacts)
    return [s.partition("=")[2] if "=" in s and not Path(s).exists() else s for s in specs]


@inherits_data(_input_paths)
def bench(cfg: BenchConfig) -> dict:
    """Measure every artifact of `cfg`; write results.json, report.md and report.html to cfg.out.

    Returns:
        The results dict written to results.json (schema in docs/results-schema.md).
    """
    from compress.artifacts import atomic_output, check_output
    from compress.bench.analysis import derive
    from compress.bench.environment import environment, load_average
    from compress.bench.peak import matmul_peak
    from compress.bench.report import write_reports
    from compress.bench.worker import measure_artifact
    from compress.hardware import resolve_device

    check_output(cfg.out, cfg.force)
    device = resolve_device(cfg.device)
    threads = cfg.threads or os.cpu_count()
    artifacts, base_name = parse_artifacts(cfg.artifacts, cfg.baseline)
    one_task(artifacts)
    with atomic_output(cfg.out, cfg.force) as tmp:
        env = environment(device, threads)
        peak = None
        if cfg.peak_probe:
            peak = matmul_peak(device, threads)
            _say(cfg, f"matmul peak: fp32 {peak['fp32_gflops']} GFLOP/s, bf16 {peak['bf16_gflops']}, "
                      f"int8 {peak['int8_gops']} GOP/s ({peak['seconds']} s)")
        measured = []
        for i, (name, path) in enumerate(artifacts, 1):
            _say(cfg, f"[{i}/{len(artifacts)}] {name} ({path})")
            job = {"name": name, "path": str(path), "device": device, "threads": threads,
                   "isolated": cfg.isolate, "config": cfg.model_dump(mode="json")}
            measured.append(_run_isolated(job) if cfg.isolate else measure_artifact(job))
        if peak is not None and any("decode_weight_bytes" in m for m in measured):
            from compress.bench.peak import memory_bandwidth

            peak["memory"] = memory_bandwidth(device, threads)
            _say(cfg, f"memory bandwidth: read {peak['memory']['read_gbs']} GB/s, copy "
                      f"{peak['memory']['copy_gbs']} GB/s ({peak['memory']['seconds']} s)")
        if cfg.interleave:
            from compress.bench.worker import bench_latency_interleaved

            _say(cfg, "timing all artifacts together, round-robin")
            timed = bench_latency_interleaved(artifacts, cfg, device, threads)
            for m in measured:
                m["latency"] = timed[m["name"]]
        env["load_average_end"] = load_average()
        results = {
            "schema_version": SCHEMA_VERSION,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "config": cfg.model_dump(mode="json"),
            "dataset": {"source": cfg.dataset, "split": cfg.split, "max_length": cfg.max_length},
            "baseline": base_name,
            "environment": env,
            "peak": peak,
            "artifacts": measured,
        }
        derive(results)
        Path(tmp, "results.json").write_text(json.dumps(results, indent=2) + "\n")
        write_reports(results, tmp)
    _say(cfg, f"wrote {Path(cfg.out) / 'report.md'} and report.html")
    return results
