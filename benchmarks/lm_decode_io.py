"""How the ONNX Runtime LM runner should keep its KV cache: numpy arrays or OrtValues (I/O binding).

Times one cached decode step of an exported causal LM (`compress export`) at batch 1 and a
larger batch, after prompts of two lengths, with the cache kept as numpy arrays (each step's
presents come back through `session.run` as new numpy arrays and go in again) and with I/O
binding (presents stay ONNX Runtime OrtValues, bound as the next step's inputs). Every
variant is timed in one interleaved run (`compress.ort_settings.time_interleaved`), so the
ratio survives a busy machine.

    HF_HUB_OFFLINE=1 python benchmarks/lm_decode_io.py runs/austen-gpt-onnx

Writes benchmarks/results/lm_decode_io.json and .md (the CPU named in both).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    import numpy as np

    from compress.hardware import cpu_info
    from compress.ort_settings import time_interleaved
    from compress.runners.ort import OrtRunner

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("onnx_artifact")
    ap.add_argument("--contexts", type=int, nargs="+", default=[128, 512])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=str(RESULTS / "lm_decode_io"))
    args = ap.parse_args()

    runners = {"numpy": OrtRunner(Path(args.onnx_artifact), threads=args.threads, io_binding=False),
               "io_binding": OrtRunner(Path(args.onnx_artifact), threads=args.threads, io_binding=True)}
    vocab = runners["numpy"].config.vocab_size
    rng = np.random.default_rng(0)
    calls, shapes = {}, []
    for b in args.batches:
        for t in args.contexts:
            ids = rng.integers(0, vocab, (b, t), dtype=np.int64)
            token = rng.integers(0, vocab, b, dtype=np.int64)
            for name, runner in runners.items():
                _, state = runner.start(ids)  # the ONNX Runtime state is never modified: each call is the same step
                calls[f"{name} b{b} ctx{t}"] = lambda r=runner, s=state, k=token: r.step(k, s)
            shapes.append((b, t))
    start = time.time()
    ms = time_interleaved(calls, rounds=args.rounds, per_round=20)
    rows = []
    for b, t in shapes:
        row = {"batch": b, "context": t, **{name: ms[f"{name} b{b} ctx{t}"] for name in runners}}
        row["io_binding_speedup"] = round(row["numpy"] / row["io_binding"], 3)
        rows.append(row)
    cpu = cpu_info()
    result = {"artifact": args.onnx_artifact, "threads": args.threads, "rows": rows,
              "cpu": cpu, "load_average": os.getloadavg(), "wall_s": round(time.time() - start, 1)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    names = list(runners)
    lines = ["# One cached decode step: the KV cache as numpy arrays or as bound OrtValues", "",
             f"`python benchmarks/lm_decode_io.py {args.onnx_artifact}` - {cpu['model']} ({', '.join(cpu['isa'])}), {args.threads} threads, load average "
             f"{', '.join(f'{x:.1f}' for x in result['load_average'])}; median ms per step, all variants interleaved "
             f"in one run ({args.rounds} rounds).", "",
             "| batch | context | " + " | ".join(f"{n} ms" for n in names) + " | numpy / io_binding |",
             "|---|---|" + "---|" * len(names) + "---|"]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['context']} | " + " | ".join(f"{r[n]:.3f}" for n in names)
                     + f" | {r['io_binding_speedup']:.2f}x |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
