"""Seed determinism and kill -9 / --resume on the real teacher, in one program.

Runs `compress train` with the reference settings, kills it with SIGKILL during epoch 2,
checks that nothing finished-looking was left, resumes it with `--resume`, and compares its
test accuracy with a reference run of the same command and seed (an earlier run passed with
--reference, or a fresh uninterrupted run). Exact resume + a fixed seed => identical figures.

    python benchmarks/train_reproducibility.py --reference runs/teacher
Writes benchmarks/results/train_reproducibility.json.
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def train_cmd(out: Path, args, *extra) -> list[str]:
    return [sys.executable, "-m", "compress", "train", "--model", args.model, "--dataset", "rt-snippets",
            "--epochs", str(args.epochs), "--lr", "5e-5", "--batch-size", "32", "--precision", "fp32",
            "--seed", "0", "--no-progress", "--out", str(out), *extra]


def test_metrics(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())["metrics"]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--reference", help="an earlier run of the same command (else one is trained)")
    p.add_argument("--model", default="minilm-l6")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--workdir", default=str(ROOT / "runs" / "repro"))
    args = p.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)

    reference = Path(args.reference) if args.reference else work / "reference"
    if not args.reference:
        subprocess.run(train_cmd(reference, args), env=env, check=True)

    out = work / "killed"
    state = out.with_name("killed.work") / "checkpoint" / "state.json"
    t0 = time.time()
    proc = subprocess.Popen(train_cmd(out, args), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed_at = None
    while proc.poll() is None:
        if state.is_file():
            try:
                s = json.loads(state.read_text())
            except ValueError:
                s = {}
            # Kill in the middle of epoch 2, after at least one checkpoint inside it.
            if s.get("epoch") == 1 and s.get("batch_in_epoch", 0) >= 100:
                killed_at = {"epoch": 2, "step": s["step"], "batch_in_epoch": s["batch_in_epoch"]}
                time.sleep(5)  # let it train past the checkpoint, so work is lost and redone
                os.kill(proc.pid, signal.SIGKILL)
                break
        time.sleep(0.5)
    proc.wait()
    if killed_at is None:
        print("the run ended before it could be killed in epoch 2", file=sys.stderr)
        return 1
    left_finished = out.exists() or (out.with_name("killed.work") / "manifest.json").exists()
    r = subprocess.run(train_cmd(out, args, "--resume"), env=env, capture_output=True, text=True)
    ok = r.returncode == 0 and (out / "manifest.json").is_file()
    ref, res = test_metrics(reference), test_metrics(out) if ok else {}
    result = {
        "command": " ".join(train_cmd(Path("OUT"), args)),
        "killed_at": killed_at,
        "killed_run_left_finished_looking_output": left_finished,
        "resume_exit_code": r.returncode,
        "reference_test": ref["test"],
        "resumed_test": res.get("test"),
        "identical_test_accuracy": ok and ref["test"]["accuracy"] == res["test"]["accuracy"],
        "identical_test_metrics": ok and ref["test"] == res["test"],
        "wall_seconds": round(time.time() - t0, 1),
    }
    dest = ROOT / "benchmarks" / "results" / "train_reproducibility.json"
    dest.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0 if result["identical_test_accuracy"] and not left_finished else 1


if __name__ == "__main__":
    raise SystemExit(main())
