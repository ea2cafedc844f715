"""Every quantization method on one model: accuracy, size and latency in one table.

Quantizes the model with each method `compress quantize` offers on this device (ORT dynamic
int8; ORT static int8 with minmax, entropy and percentile calibration; torch dynamic int8;
bitsandbytes int8, nf4 and fp4; bf16), then measures all of them and the fp32 original in a
single `compress bench` run (interleaved timing, so the rows are comparable on a busy machine).
A method that fails is a row with its error, not a crash of the whole table.

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python benchmarks/quantize_methods.py --model runs/teacher

Writes benchmarks/results/quantize_methods.json (quantize manifests' accuracy figures and the
bench results) and quantize_methods.md (rendered from the JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = [
    ("ort-dynamic-int8", {"method": "ort-dynamic-int8"}),
    ("ort-static-int8 minmax", {"method": "ort-static-int8", "calib_method": "minmax"}),
    ("ort-static-int8 entropy", {"method": "ort-static-int8", "calib_method": "entropy"}),
    ("ort-static-int8 percentile", {"method": "ort-static-int8", "calib_method": "percentile"}),
    ("torch-dynamic-int8", {"method": "torch-dynamic-int8"}),
    ("bnb-int8", {"method": "bnb-int8"}),
    ("bnb-nf4", {"method": "bnb-nf4"}),
    ("bnb-fp4", {"method": "bnb-fp4"}),
    ("bf16", {"method": "bf16"}),
]


def main() -> None:
    from compress.bench import BenchConfig, bench
    from compress.quantize import QuantizeConfig, quantize

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="runs/teacher")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--budget-s", type=float, default=3.0)
    ap.add_argument("--max-examples", type=int, default=None, help="fewer test examples (quick runs)")
    ap.add_argument("--only", default=None, help="comma-separated method labels to run (default: all)")
    ap.add_argument("--out-dir", default=str(RESULTS))
    args = ap.parse_args()

    wanted = [m for m in METHODS if args.only is None or m[0] in args.only.split(",")]
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="qmethods-") as tmp:
        artifacts = [f"fp32={args.model}"]
        for label, kw in wanted:
            out = Path(tmp) / label.replace(" ", "-")
            t0 = time.perf_counter()
            try:
                quantize(QuantizeConfig(model=args.model, out=str(out), device="cpu", threads=args.threads,
                                        calib_samples=args.calib_samples, **kw))
            except Exception as err:  # a failing method is a row, not the end of the table
                rows[label] = {"error": f"{type(err).__name__}: {err}"}
                print(f"{label}: FAILED: {err}")
                continue
            m = json.loads((out / "manifest.json").read_text())
            val = m["metrics"]["validation"]
            rows[label] = {"seconds_to_quantize": round(time.perf_counter() - t0, 1), "config": kw,
                           "validation_before": val["before"]["accuracy"], "validation_after": val["after"]["accuracy"],
                           "drop_points": val.get("drop_points"), "quantized": m.get("quantization", {}).get("quantized"),
                           "skipped": len(m.get("quantization", {}).get("skipped") or [])}
            artifacts.append(f"{label.replace(' ', '-')}={out}")
        results = bench(BenchConfig(artifacts=artifacts, baseline="fp32", out=str(Path(tmp) / "report"),
                                    batch_sizes=[1, 32], seq_lens=[128], threads=args.threads, budget_s=args.budget_s,
                                    max_examples=args.max_examples, progress=True))
    by_name = {a["name"]: a for a in results["artifacts"]}
    for label, row in rows.items():
        a = by_name.get(label.replace(" ", "-"))
        if a is not None:
            row.update(_bench_fields(a))
    report = {"benchmark": "quantize_methods", "model": args.model, "threads": args.threads,
              "calib_samples": args.calib_samples, "fp32": _bench_fields(by_name["fp32"]), "methods": rows,
              "environment": results["environment"], "notes": results.get("notes", [])}
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "quantize_methods.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "quantize_methods.md").write_text(render(report))
    print(render(report))


def _bench_fields(a: dict) -> dict:
    lat = {(p["batch_size"], p["seq_len"]): p for p in a["latency"]}
    return {"format": a["format"], "precision": a["precision"], "test_accuracy": a["accuracy"],
            "size_bytes": a["size_bytes"], "p50_ms_b1": lat[(1, 128)]["p50_ms"],
            "p50_ms_b32": lat[(32, 128)]["p50_ms"], "speedup_b1": lat[(1, 128)]["speedup_vs_baseline"],
            "speedup_b32": lat[(32, 128)]["speedup_vs_baseline"]}


def render(report: dict) -> str:
    """Markdown from the JSON (never from logs)."""
    f = report["fp32"]
    env = report["environment"]
    cpu = env.get("cpu", {})
    lines = ["# Every quantization method on one model", "",
             f"Model `{report['model']}`, rt-snippets. Test accuracy on the test split; validation drop from "
             f"`compress quantize` (fp32 minus quantized, points); latency p50 at sequence 128, "
             f"{report['threads']} threads, all artifacts timed interleaved in one `compress bench` run. "
             f"CPU: {cpu.get('model', '?')} ({', '.join(cpu.get('isa', [])) or '?'}). "
             f"Static calibration: {report['calib_samples']} training examples.", "",
             "| method | test acc | val drop (pts) | size MB | vs fp32 size | p50 b1 ms | speed-up b1 | p50 b32 ms | "
             "speed-up b32 | slower than fp32? |",
             "|---|---|---|---|---|---|---|---|---|---|",
             f"| fp32 (PyTorch) | {f['test_accuracy']:.4f} | - | {f['size_bytes'] / 1e6:.1f} | 1.00x | "
             f"{f['p50_ms_b1']:.2f} | 1.00x | {f['p50_ms_b32']:.1f} | 1.00x | - |"]
    for label, r in report["methods"].items():
        if "error" in r:
            lines.append(f"| {label} | failed: {r['error'][:120]} | | | | | | | | |")
            continue
        slower = [f"b{b}" for b in (1, 32) if r[f"speedup_b{b}"] < 1.0]
        lines.append(f"| {label} | {r['test_accuracy']:.4f} | {r['drop_points']:.2f} | {r['size_bytes'] / 1e6:.1f} | "
                     f"{f['size_bytes'] / r['size_bytes']:.2f}x smaller | {r['p50_ms_b1']:.2f} | {r['speedup_b1']:.2f}x | "
                     f"{r['p50_ms_b32']:.1f} | {r['speedup_b32']:.2f}x | "
                     f"{'**yes** (' + ', '.join(slower) + ')' if slower else 'no'} |")
    lines += [""] + [f"- {n['text']}" for n in report["notes"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
