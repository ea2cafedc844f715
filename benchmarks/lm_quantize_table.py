"""Size and perplexity of quantized causal LMs against their fp32 parent, from the artifacts.

Reads each artifact's manifest (method, settings, what was quantized, validation perplexity
before and after) and scores the test split with `compress eval` (the same sliding-window
perplexity and bits per character for every format). No timing: sizes and perplexities do
not depend on the machine's load.

    HF_HUB_OFFLINE=1 python benchmarks/lm_quantize_table.py runs/austen-gpt runs/austen-gpt-onnx \
        runs/austen-int4 runs/austen-int8 [--test runs/austen-int4 ...] --out benchmarks/results/lm_quantize_austen

Writes OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def main() -> None:
    from compress.artifacts import read_manifest, weights_size
    from compress.eval import EvalConfig, evaluate
    from compress.hardware import cpu_info

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("artifacts", nargs="+", help="the fp32 PyTorch parent first, then the others")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--test", nargs="*", default=None,
                    help="score the test split of these artifacts only (default: all); the validation figures "
                         "come from the manifests either way")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    rows, started = [], time.time()
    for path in args.artifacts:
        m = read_manifest(path)
        scored = args.test is None or path in args.test or path == args.artifacts[0]
        test = evaluate(EvalConfig(model=path, split="test", threads=args.threads)) if scored else \
            {"format": m.get("format"), "perplexity": None, "bits_per_char": None, "tokens": None}
        q = m.get("quantization") or {}
        val = (m.get("metrics") or {}).get("validation") or {}
        rows.append({"artifact": path, "stage": m.get("stage"), "method": m.get("method"),
                     "settings": m.get("settings"), "format": test["format"], "size_bytes": weights_size(path),
                     "quantized": q.get("quantized"), "accuracy_level": (q.get("accuracy_level") or {}).get("choice"),
                     "validation_before": (val.get("before") or {}).get("perplexity"),
                     "validation_after": (val.get("after") or {}).get("perplexity"),
                     "test_perplexity": test["perplexity"], "test_bits_per_char": test["bits_per_char"],
                     "test_tokens": test["tokens"]})
    base = rows[0]
    base_val = next((r["validation_before"] for r in rows if r["validation_before"]), None)
    for r in rows:
        r["smaller"] = round(base["size_bytes"] / r["size_bytes"], 2)
        r["test_perplexity_ratio"] = round(r["test_perplexity"] / base["test_perplexity"], 4) if r["test_perplexity"] else None
        r["validation_ratio"] = round(r["validation_after"] / r["validation_before"], 4) if r["validation_after"] else None
    cpu = cpu_info()
    result = {"rows": rows, "cpu": cpu, "wall_s": round(time.time() - started, 1)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    lines = ["# Quantized causal LMs: size and perplexity against the fp32 parent", "",
             f"`python benchmarks/lm_quantize_table.py {' '.join(args.artifacts)}"
             + (f" --test {' '.join(args.test)}" if args.test is not None else "") + f" --out {args.out}` "
             f"({cpu['model']}; test split scored by `compress eval`, validation figures from each quantize manifest).",
             "", "| artifact | method | settings | size MB | smaller | quantized | val ppl (fp32 -> q) | val ppl / fp32 | "
             "test ppl | test ppl / fp32 | test bits/char |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r["settings"] or {}
        shown = ", ".join(f"{k}={v}" for k, v in s.items() if k in ("algorithm", "block_size", "quantize_embeddings",
                                                                      "accuracy_level", "per_channel"))
        if r["accuracy_level"] is not None:
            shown += f" (level {r['accuracy_level']} kept)"
        val = (f"{r['validation_before']:.2f} -> {r['validation_after']:.2f}" if r["validation_after"] else "")
        test = (f"{r['test_perplexity']:.2f} | {r['test_perplexity_ratio']:.4f} | {r['test_bits_per_char']:.4f}"
                if r["test_perplexity"] else "- | - | -")
        lines.append(f"| {r['artifact']} | {r['method'] or r['stage']} | {shown} | {r['size_bytes'] / 1e6:.2f} | "
                     f"{r['smaller']:.2f}x | {json.dumps(r['quantized']) if r['quantized'] else ''} | {val} | "
                     f"{r['validation_ratio'] if r['validation_ratio'] is not None else ''} | {test} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
