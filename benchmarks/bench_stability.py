"""Is `compress bench` repeatable? Measure the same artifact twice in one run and compare p50s.

    python benchmarks/bench_stability.py runs/teacher [--tiny] [--threads 1] [--budget-s 3]

For each artifact, one `compress bench` run measures it twice (as `a` and `b`, each in
its own fresh process, as by default) at every (batch, seq) point; the relative p50
difference |a - b| / min(a, b) should stay within 5%. `--tiny` first trains the 2-layer
test model (about 30 s) and includes it. Writes benchmarks/results/bench_stability.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = Path(__file__).resolve().parent
TINY_SPEC = "bert:layers=2,hidden=64,heads=4,ff=128,vocab=1500"  # the tests' tiny teacher
TOLERANCE = 0.05


def train_tiny(out: Path) -> Path:
    from compress.train import TrainConfig, train

    return train(TrainConfig(model=TINY_SPEC, dataset="rt-snippets", max_examples=400, epochs=2, batch_size=32,
                             lr=2e-3, out=str(out), progress=False, precision="fp32", threads=1))


def twice(artifact: Path, args, out: Path) -> dict:
    """Bench `artifact` twice in one run; return per-point p50s and their relative difference."""
    from compress.bench import BenchConfig, bench

    cfg = BenchConfig(artifacts=[f"a={artifact}", f"b={artifact}"], out=str(out), force=True,
                      batch_sizes=args.batch_sizes, seq_lens=args.seq_lens, threads=args.threads,
                      budget_s=args.budget_s, max_examples=args.max_examples, peak_probe=False)
    results = bench(cfg)
    a, b = results["artifacts"]
    points = []
    for pa, pb in zip(a["latency"], b["latency"]):
        rel = abs(pa["p50_ms"] - pb["p50_ms"]) / min(pa["p50_ms"], pb["p50_ms"])
        points.append({"batch_size": pa["batch_size"], "seq_len": pa["seq_len"], "p50_a_ms": pa["p50_ms"],
                       "p50_b_ms": pb["p50_ms"], "ci95_rel_a": pa["ci95_rel"], "ci95_rel_b": pb["ci95_rel"],
                       "iters_a": pa["iters"], "iters_b": pb["iters"], "rel_diff": round(rel, 4)})
    worst = max(p["rel_diff"] for p in points)
    env = results["environment"]
    return {"artifact": str(artifact), "params": a["params"], "points": points, "max_rel_diff": worst,
            "within_tolerance": worst <= TOLERANCE, "load_average_start": env["load_average_start"],
            "load_average_end": env["load_average_end"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifacts", nargs="*", help="artifact directories")
    parser.add_argument("--tiny", action="store_true", help="also train and measure the 2-layer test model")
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads (default 1: on a shared machine more threads wait on each other)")
    parser.add_argument("--budget-s", type=float, default=3.0)
    parser.add_argument("--batch-sizes", default="1,32")
    parser.add_argument("--seq-lens", default="32,128")
    parser.add_argument("--max-examples", type=int, default=200, help="test examples for the accuracy pass")
    parser.add_argument("--out", default=str(HERE / "results" / "bench_stability.json"))
    args = parser.parse_args(argv)
    args.batch_sizes = [int(x) for x in args.batch_sizes.split(",")]
    args.seq_lens = [int(x) for x in args.seq_lens.split(",")]
    if not args.artifacts and not args.tiny:
        parser.error("give artifact directories, --tiny, or both")

    from compress.bench.environment import environment

    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-stability-") as tmp:
        work = Path(tmp)
        artifacts = [Path(a) for a in args.artifacts]
        if args.tiny:
            artifacts.insert(0, train_tiny(work / "tiny-teacher"))
        for i, art in enumerate(artifacts):
            run = twice(art, args, work / f"bench-{i}")
            if args.tiny and art == artifacts[0]:
                run["artifact"] = f"tiny model ({TINY_SPEC}, trained by this script)"
            runs.append(run)
            print(f"{run['artifact']}: max |p50 a - p50 b| / p50 = {run['max_rel_diff']:.1%} "
                  f"({'within' if run['within_tolerance'] else 'OUTSIDE'} {TOLERANCE:.0%})", flush=True)
    env = environment("cpu", args.threads)
    out = {"tolerance": TOLERANCE, "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
           "config": {"threads": args.threads, "budget_s": args.budget_s, "batch_sizes": args.batch_sizes,
                      "seq_lens": args.seq_lens, "isolate": True},
           "cpu": env["cpu"], "versions": env["versions"], "compress_commit": env["compress_commit"],
           "shared_machine_note": env["shared_machine_note"], "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0 if all(r["within_tolerance"] for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
