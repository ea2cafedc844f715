"""Does interleaved timing bias a PyTorch-vs-ONNX Runtime comparison? Measured, not assumed.

Times a PyTorch artifact and an ONNX Runtime artifact (batch 1, 128 tokens, 2 threads):
each alone (back-to-back calls); interleaved call by call (what `compress bench` did first);
in blocks of 4 after one untimed call (what it did next); in blocks of 4 after 50 ms of
untimed calls (what it does now). The thread pools of the runtime just used keep spinning
for a while (ONNX Runtime's after a call, PyTorch's OpenMP threads after every operator) and
slow the other runtime's next calls. Run it without OMP_WAIT_POLICY set, as users run
PyTorch: PASSIVE hides the OpenMP spinning but makes PyTorch itself much slower.

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python benchmarks/interleave_bias.py \
        runs/quickstart/teacher runs/quickstart/int8

Writes benchmarks/results/interleave_bias.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    import torch

    from compress.bench.environment import environment
    from compress.bench.measure import interleaved_latency, latency, make_batch
    from compress.data import DataConfig, load_data
    from compress.runners import load_runner

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("torch_artifact")
    ap.add_argument("ort_artifact")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--budget-s", type=float, default=3.0)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    texts = list(load_data(DataConfig())["test"]["text"])
    runners = {"pytorch": load_runner(Path(args.torch_artifact), threads=args.threads),
               "onnxruntime": load_runner(Path(args.ort_artifact), threads=args.threads)}
    fns = {}
    for name, r in runners.items():
        batch = make_batch(r.tokenizer, texts, 1, 128)
        fns[name] = lambda r=r, b=batch: r.logits(b)
    rows = []
    for _ in range(args.repeats):
        timings = {
            "each alone": {n: latency(f, budget_s=args.budget_s) for n, f in fns.items()},
            "interleaved call by call": interleaved_latency(fns, budget_s=args.budget_s, settle=0, block=1),
            "interleaved in blocks of 4 after 1 untimed call": interleaved_latency(fns, budget_s=args.budget_s,
                                                                                   settle_s=0.0),
            "interleaved in blocks of 4 after 50 ms of untimed calls": interleaved_latency(fns, budget_s=args.budget_s),
        }
        for how, stats in timings.items():
            ms = {n: st["p50_ms"] for n, st in stats.items()}
            rows.append({"timing": how, "pytorch_ms": ms["pytorch"], "onnxruntime_ms": ms["onnxruntime"],
                         "speedup": ms["pytorch"] / ms["onnxruntime"]})
            print(rows[-1], flush=True)
    report = {"benchmark": "interleave_bias", "torch_artifact": args.torch_artifact, "ort_artifact": args.ort_artifact,
              "threads": args.threads, "rows": rows, "environment": environment("cpu", args.threads)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "interleave_bias.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / "interleave_bias.md").write_text(render(report))
    print(render(report))


def render(report: dict) -> str:
    lines = ["# Interleaved timing: PyTorch vs ONNX Runtime", "",
             f"`{report['torch_artifact']}` (PyTorch) against `{report['ort_artifact']}` (ONNX Runtime); batch 1, "
             f"128 tokens, {report['threads']} threads, p50 of each timing; load average at start "
             f"{report['environment'].get('load_average_start')}.", "",
             "| timing | PyTorch p50 ms | ONNX Runtime p50 ms | speed-up |", "|---|---|---|---|"]
    lines += [f"| {r['timing']} | {r['pytorch_ms']:.2f} | {r['onnxruntime_ms']:.2f} | {r['speedup']:.2f}x |"
              for r in report["rows"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
