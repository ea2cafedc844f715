"""A causal LM quantized three ways on the same teacher: compress's int8 and int4 against
Optimum's `ORTQuantizer` (AutoQuantizationConfig.avx512_vnni, dynamic), decode speed and
perplexity side by side, in one interleaved run.

Optimum gets its documented flow and settings: `optimum.exporters.onnx.main_export(task=
"text-generation-with-past")`, `ORTQuantizer.from_pretrained(dir, file_name="model.onnx")` with
`AutoQuantizationConfig.avx512_vnni(is_static=False)` (its defaults: per-channel, symmetric
weights, every operator its dynamic registry quantizes), loaded with
`ORTModelForCausalLM.from_pretrained(dir, use_cache=True)`, once without and once with I/O
binding (its default on the CPU is off; the faster of the two is the one compared), with the
same thread count. Its model is driven step by step through its own `forward` with
`past_key_values`, exactly the calls its `generate()` makes, so both sides are timed by the
same code (`compress.bench.workloads`: prefill, time to first token, and per-token decode
after a 128-token prompt) and in the same rounds (`compress.bench.measure.interleaved_samples`,
50 ms of untimed calls before each block). Perplexity is the same sliding-window score as
`compress eval` (the test split, windows of the teacher's block, stride half of it) through
each model's logits.

Also timed, to separate the graph from the loop around it: Optimum's int8 graph run by
compress's ONNX Runtime runner.

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 .venv/bin/python benchmarks/lm_vs_optimum.py \\
        --teacher runs/austen-gpt [--int8 DIR --int4 DIR]

Without --int8/--int4 it makes ours with the real CLI functions (`compress export`, then
`compress quantize` with the methods named by --int8-method/--int4-method). Writes
benchmarks/results/lm_vs_optimum.json (the data) and .md (rendered from it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = Path(__file__).resolve().parent


class OptimumLM:
    """ORTModelForCausalLM behind the runner interface bench times: logits, start, step."""

    def __init__(self, directory: Path, file_name: str, threads: int, io_binding: bool, tokenizer):
        import onnxruntime as ort
        from optimum.onnxruntime import ORTModelForCausalLM

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.model = ORTModelForCausalLM.from_pretrained(str(directory), file_name=file_name, use_cache=True,
                                                         use_io_binding=io_binding, session_options=options,
                                                         provider="CPUExecutionProvider")
        self.tokenizer, self.config = tokenizer, self.model.config
        self.format, self.device = "optimum-ort", "cpu"

    def logits(self, batch):
        import torch

        ids = torch.from_numpy(batch["input_ids"])
        mask = torch.from_numpy(batch.get("attention_mask", torch.ones_like(ids).numpy()))
        with torch.inference_mode():
            return self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float().numpy()

    def _call(self, ids, past, length):
        import torch

        with torch.inference_mode():
            out = self.model(input_ids=ids, attention_mask=torch.ones((ids.shape[0], length), dtype=torch.long),
                             past_key_values=past, use_cache=True)
        return out.logits[:, -1].float().numpy(), out.past_key_values

    def start(self, input_ids):
        import torch

        ids = torch.from_numpy(input_ids)
        logits, past = self._call(ids, None, ids.shape[1])
        return logits, (past, ids.shape[1])

    def step(self, token_ids, state):
        import torch

        past, length = state
        logits, past = self._call(torch.from_numpy(token_ids.reshape(-1, 1)), past, length + 1)
        return logits, (past, length + 1)


def onnx_file(directory: Path) -> str:
    found = sorted(p.name for p in directory.glob("*.onnx"))
    return next((f for f in found if "quantized" in f), found[0])


def build(teacher: Path, work: Path, args) -> dict[str, dict]:
    """{name: {runner, size_bytes, how, side}} for every variant."""
    from optimum.exporters.onnx import main_export
    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    from compress.artifacts import copy_support_files, weights_size
    from compress.runners import load_runner
    from compress.runners.ort import OrtRunner

    variants: dict[str, dict] = {}
    fp32 = load_runner(teacher, threads=args.threads)
    variants["teacher, PyTorch fp32"] = {"runner": fp32, "size_bytes": weights_size(teacher), "side": "reference",
                                         "how": "transformers eager with the DynamicCache (compress's PyTorch runner)"}

    ours = {"int8": Path(args.int8) if args.int8 else None, "int4": Path(args.int4) if args.int4 else None}
    int4_settings = {"quantize_embeddings": args.int4_embeddings, "block_size": args.int4_block_size}
    made = {"int8": (args.int8_method, {}), "int4": (args.int4_method, int4_settings)}
    if args.int4_embedding_bits and args.int4_embeddings:
        # The same 4-bit body with the tied embedding table and LM head in 8-bit blocks.
        name = f"int4, {args.int4_embedding_bits}-bit tables"
        ours[name] = None
        made[name] = (args.int4_method, {**int4_settings, "embedding_bits": args.int4_embedding_bits})
    if args.int8_embedding_bits:
        # Dynamic int8 projections with the head and tables as blockwise kernels (the LM quickstart ships bits 4).
        name = f"int8, {args.int8_embedding_bits}-bit tables"
        ours[name] = None
        made[name] = (args.int8_method, {"quantize_embeddings": True, "embedding_bits": args.int8_embedding_bits,
                                         "block_size": 128})
    if not all(ours.values()):
        from compress.export import ExportConfig, export
        from compress.quantize import QuantizeConfig, quantize

        onnx_dir = Path(args.onnx) if args.onnx else work / "ours-onnx"
        if not args.onnx:
            export(ExportConfig(model=str(teacher), out=str(onnx_dir), threads=args.threads))
        for i, (kind, (method, extra)) in enumerate(made.items()):
            if ours[kind] is None:
                ours[kind] = work / f"ours-{i}"
                quantize(QuantizeConfig(model=str(onnx_dir), out=str(ours[kind]), method=method, threads=args.threads,
                                        **extra))
    for kind, path in ours.items():
        manifest = json.loads((path / "manifest.json").read_text())
        variants[f"compress {kind}"] = {
            "runner": load_runner(path, threads=args.threads), "size_bytes": weights_size(path), "side": "ours",
            "how": f"compress quantize --method {manifest.get('method')} "
                   f"{json.dumps(manifest.get('settings') or {}, sort_keys=True)}"}

    opt_fp32, opt_int8 = work / "optimum-fp32", work / "optimum-int8"
    main_export(str(teacher), output=str(opt_fp32), task="text-generation-with-past")
    copy_support_files(teacher, opt_fp32)
    quantizer = ORTQuantizer.from_pretrained(str(opt_fp32), file_name="model.onnx")
    qconfig = AutoQuantizationConfig.avx512_vnni(is_static=False)
    quantizer.quantize(save_dir=str(opt_int8), quantization_config=qconfig)
    copy_support_files(teacher, opt_int8)
    name = onnx_file(opt_int8)
    size = (opt_int8 / name).stat().st_size
    how = (f"main_export(task='text-generation-with-past'); ORTQuantizer + AutoQuantizationConfig.avx512_vnni("
           f"is_static=False): per_channel={qconfig.per_channel}, operators {', '.join(qconfig.operators_to_quantize)}")
    for binding in (False, True):
        variants[f"optimum int8, ORTModelForCausalLM, io_binding={binding}"] = {
            "runner": OptimumLM(opt_int8, name, args.threads, binding, fp32.tokenizer), "size_bytes": size,
            "side": "optimum", "how": how + f"; ORTModelForCausalLM(use_cache=True, use_io_binding={binding})"}
    variants["optimum int8 graph, compress's runner"] = {
        "runner": OrtRunner(opt_int8, threads=args.threads, onnx_file=name), "size_bytes": size, "side": "graph",
        "how": "Optimum's int8 model.onnx run by compress's ONNX Runtime decode loop"}
    return variants


def render(result: dict) -> str:
    """The Markdown page: a pure function of the JSON."""
    c, env = result["config"], result["environment"]
    lines = ["# Causal LM: compress int8 / int4 vs Optimum's ORTQuantizer", "",
             f"Teacher `{c['teacher']}`; perplexity on the {result['dataset']} test split ({result['tokens']} tokens, "
             f"windows of {result['block']}). Decode: batch 1 and {c['batch']}, {c['new_tokens']} cached steps after a "
             f"{c['prompt']}-token prompt, {c['threads']} threads, all variants timed in the same interleaved rounds. "
             f"CPU: {env['cpu']['model']} ({', '.join(env['cpu']['isa'])}); load average at the start "
             f"{env['load_average_start']}, at the end {env['load_average_end']}.", "",
             f"| variant | perplexity | size MB | decode tok/s b1 | p50 ms/token b1 | decode tok/s b{c['batch']} | "
             f"TTFT ms ({c['prompt']} tokens) | tok/s vs Optimum |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["results"]:
        vs = f"{r['speed_vs_optimum']:.2f}x" if r.get("speed_vs_optimum") else ""
        lines.append(f"| {r['name']} | {r['perplexity']:.2f} | {r['size_bytes'] / 1e6:.2f} | "
                     f"{r['decode_b1']['tokens_per_s']:.0f} | {r['decode_b1']['p50_ms']:.3f} | "
                     f"{r['decode_bn']['tokens_per_s']:.0f} | {r['ttft']['p50_ms']:.2f} | {vs} |")
    lines += ["", f"Optimum compared: **{result['optimum_best']}** (the faster of its two I/O-binding settings at "
                  "batch 1).", "", "How each was made:", ""]
    lines += [f"- **{r['name']}**: {r['how']}" for r in result["results"]]
    lines += ["", "Against the target (ours >= 1.3x Optimum's decode tokens/s at batch 1, at no worse perplexity):", ""]
    for r in result["results"]:
        if r["side"] == "ours":
            ok = r["speed_vs_optimum"] >= 1.3 and r["perplexity"] <= result["optimum_perplexity"]
            lines.append(f"- {r['name']}: {r['speed_vs_optimum']:.2f}x, perplexity {r['perplexity']:.2f} vs "
                         f"{result['optimum_perplexity']:.2f}: {'met' if ok else 'not met'}")
    if result.get("notes"):
        lines += ["", *result["notes"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default="runs/austen-gpt")
    p.add_argument("--int8", help="our int8 artifact (default: made here from the teacher)")
    p.add_argument("--int4", help="our int4 artifact (default: made here from the teacher)")
    p.add_argument("--onnx", help="our ONNX export of the teacher to quantize (default: exported here)")
    p.add_argument("--int8-method", default="ort-dynamic-int8")
    p.add_argument("--int4-method", default="ort-int4")
    p.add_argument("--int4-block-size", type=int, default=64, help="as recipes/lm-quickstart.yaml")
    p.add_argument("--int4-embeddings", action=argparse.BooleanOptionalAction, default=True,
                   help="also quantize the embedding and the LM head (as recipes/lm-quickstart.yaml)")
    p.add_argument("--int4-embedding-bits", type=int, default=8,
                   help="also time an int4 whose embedding and head are 8-bit blocks (0: not)")
    p.add_argument("--int8-embedding-bits", type=int, default=8,
                   help="also time a dynamic int8 whose head and tables are blocks of 128 at these bits (0: not)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--batch", type=int, default=8, help="the larger decode batch")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--budget-s", type=float, default=3.0, help="seconds of timed work per variant and point")
    p.add_argument("--out-dir", default=str(HERE / "results"))
    args = p.parse_args()

    import torch

    from compress.artifacts import library_versions
    from compress.bench.environment import load_average
    from compress.bench.measure import interleaved_samples, wall_timer
    from compress.bench.workloads import BLOCK, Inputs, build as build_point, finish_point
    from compress.data import DataConfig
    from compress.hardware import cpu_info
    from compress.lineage import recorded_data
    from compress.tasks.causal_lm import CausalLMTask

    torch.set_num_threads(args.threads)
    teacher = Path(args.teacher)
    data_cfg = DataConfig(**{**(recorded_data(teacher) or {}), "task": "causal-lm"})
    task = CausalLMTask()
    data = task.load_data(data_cfg)
    load_start = load_average()
    work = Path(tempfile.mkdtemp(prefix="lm-vs-optimum-"))
    started = time.perf_counter()
    try:
        variants = build(teacher, work, args)
        for name, v in variants.items():
            runner = v["runner"]
            split = task.encode(data, runner.tokenizer, data_cfg, splits=("test",))["test"]
            v["quality"] = task.evaluate_runner(runner, split, 16)
            v["inputs"] = Inputs(texts=[], tokens=split.tokens)
            print(f"{name}: perplexity {v['quality']['perplexity']:.2f}", flush=True)
        plan = [{"kind": "ttft", "batch_size": 1, "seq_len": args.prompt},
                {"kind": "decode", "batch_size": 1, "seq_len": args.prompt, "new_tokens": args.new_tokens},
                {"kind": "decode", "batch_size": args.batch, "seq_len": args.prompt, "new_tokens": args.new_tokens}]
        timed: dict[str, list[dict]] = {name: [] for name in variants}
        for point in plan:
            made = {n: build_point(v["runner"], point, v["inputs"], wall_timer, n) for n, v in variants.items()}
            stats = interleaved_samples({n: m[0] for n, m in made.items()}, untimed={n: m[1] for n, m in made.items()},
                                        warmup=2, budget_s=args.budget_s, min_iters=20, target_rel=0.02,
                                        block=BLOCK[point["kind"]])
            for n, st in stats.items():
                timed[n].append(finish_point(point, st))
            print(f"{point['kind']} b{point['batch_size']}: " + ", ".join(
                f"{n} {st['p50_ms']:.3f} ms" for n, st in stats.items()), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    results = []
    for name, v in variants.items():
        ttft, b1, bn = timed[name]
        results.append({"name": name, "side": v["side"], "how": v["how"], "size_bytes": v["size_bytes"],
                        "perplexity": v["quality"]["perplexity"], "nll": v["quality"]["nll"],
                        "bits_per_char": v["quality"]["bits_per_char"], "ttft": ttft, "decode_b1": b1,
                        "decode_bn": bn})
    optimum = [r for r in results if r["side"] == "optimum"]
    best = max(optimum, key=lambda r: r["decode_b1"]["tokens_per_s"])
    for r in results:
        r["speed_vs_optimum"] = round(r["decode_b1"]["tokens_per_s"] / best["decode_b1"]["tokens_per_s"], 3)
    any_result = next(iter(variants.values()))["quality"]
    result = {"config": {**vars(args), "teacher": str(teacher)}, "dataset": data.source,
              "tokens": any_result["tokens"], "block": data_cfg.max_length,
              "optimum_best": best["name"], "optimum_perplexity": best["perplexity"],
              "wall_s": round(time.perf_counter() - started, 1),
              "environment": {"cpu": dict(cpu_info()), "versions": library_versions(),
                              "thread_env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")
                                             if k in os.environ},
                              "load_average_start": load_start, "load_average_end": load_average()},
              "results": results}
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "lm_vs_optimum.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "lm_vs_optimum.md").write_text(render(result))
    print(render(result))


if __name__ == "__main__":
    main()
