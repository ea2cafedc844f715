"""`compress export` of a causal LM: an ONNX decoder with a KV cache, gated on real text.

The graph is optimum's `text-generation-with-past` export (`main_export`, the TorchScript
exporter in optimum-onnx 0.1.0): one `model.onnx` with inputs `input_ids`, `attention_mask`,
`position_ids` (GPT-2, Llama) and `past_key_values.{i}.key|value`, outputs `logits` and
`present.{i}.key|value`. It loads in `optimum.onnxruntime.ORTModelForCausalLM` as it is, and
in compress's ONNX Runtime runner (`compress.runners.ort`), which decodes over the cache.

Every graph written is first checked against the PyTorch model on the task's validation
text (`check_lm_parity`): logits of whole windows (prefill), the logits of every cached
decode step fed the real next tokens (teacher forcing, against an uncached PyTorch forward),
and greedy continuations that must be identical token for token. ONNX Runtime's transformer
fusions are kept only where the fused graph passes the same gate and decodes faster on this
machine (timed interleaved); the manifest records the timings and the choice.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from compress.artifacts import atomic_output, check_output, read_manifest, write_manifest
from compress.errors import GateFailed, UserError
from compress.onnx_graph import (add_logits_to_keep, convert_to_fp16, fusion_model_type, operator_counts,
                                 optimize_graph, save)
from compress.ort_settings import DENORMAL_AS_ZERO, DISABLE_OPTIMIZERS, SKIP_LAYER_NORM_FUSION, choose_skip_layer_norm
from compress.ort_settings import time_interleaved
from compress.runners import detect_format
from compress.runners.ort import ONNX_FILE, OrtRunner
from compress.runners.pytorch import TorchRunner

LM_TASK = "text-generation-with-past"
# Opset 18 rather than optimum's default (14 for GPT-2): ReduceMean's axes became an input at
# 18, so a graph of 18 or later stays valid when 4-bit Gather quantization lifts it to 21.
LM_OPSET = 18
# What the fusion choice times: a 128-token prompt, then decode steps at batch 1 with that cache.
TIMED_PROMPT, TIMED_STEPS = 128, 64
# The fused graph must be this much faster to be kept: timing noise should not flip the choice.
FUSED_MARGIN = 0.97


# --------------------------------------------------------------------------- the gate


@dataclass
class LmReference:
    """Real validation text and what the PyTorch model makes of it."""

    windows: dict[str, np.ndarray]  # prefill cases: name -> input_ids [b, t]
    window_logits: dict[str, np.ndarray]  # name -> PyTorch logits [b, t, vocab]
    prompts: np.ndarray  # [p, prompt_len]
    continuation: np.ndarray  # [p, steps]: the text's real next tokens, fed one per cached step
    cached_logits: np.ndarray  # [p, steps + 1, vocab]: uncached PyTorch logits at those positions
    greedy_tokens: int  # tokens asked of each greedy continuation
    greedy: list[np.ndarray] = field(default_factory=list)  # per prompt: PyTorch's greedy tokens
    margins: list[np.ndarray] = field(default_factory=list)  # per prompt: PyTorch's top-1 minus top-2 logit


def build_reference(torch_runner, stream, n_prompts: int, prompt_len: int, steps: int, greedy_tokens: int,
                    n_windows: int) -> LmReference:
    """Cut prompts and windows from the validation token stream and score them in PyTorch."""
    tokens, block = stream.tokens, stream.block
    need = prompt_len + max(steps, greedy_tokens) + 1
    if len(tokens) < max(need, block) + n_prompts:
        raise UserError(f"The validation split has {len(tokens)} tokens, too few for the export gate ({n_prompts} "
                        f"prompts of {prompt_len} tokens and {max(steps, greedy_tokens)} more, and windows of "
                        f"{block}). Give more validation text, or lower --parity-steps / --max-length.")
    starts = np.linspace(0, len(tokens) - need, n_prompts).astype(int)
    text = np.stack([tokens[s:s + prompt_len + steps] for s in starts])
    prompts, continuation = text[:, :prompt_len], text[:, prompt_len:]
    wstarts = np.linspace(0, len(tokens) - block, n_windows).astype(int)
    full = np.stack([tokens[s:s + block] for s in wstarts])
    windows = {f"windows[{n_windows}x{block}]": full, f"window[1x{block}]": full[-1:], f"length1[{n_windows}]": full[:, :1]}
    logits = {name: _torch_logits(torch_runner, ids) for name, ids in windows.items()}
    whole = _torch_logits(torch_runner, text)
    ref = LmReference(windows, logits, prompts, continuation, whole[:, prompt_len - 1:], greedy_tokens)
    for prompt in prompts:
        tokens_, margins = greedy_with_margins(torch_runner, prompt[None], greedy_tokens)
        ref.greedy.append(tokens_)
        ref.margins.append(margins)
    return ref


def _torch_logits(runner, ids: np.ndarray) -> np.ndarray:
    return runner.logits({"input_ids": ids, "attention_mask": np.ones_like(ids)})


def greedy_with_margins(runner, prompt: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Greedy tokens of one prompt [1, t] through start/step (stopping after EOS, as generate
    does), and the top-1 minus top-2 logit at each step (how close the choice was)."""
    eos = runner.tokenizer.eos_token_id
    logits, state = runner.start(prompt)
    tokens, margins = [], []
    for i in range(n):
        top2 = np.sort(logits[0])[-2:]
        token = int(logits[0].argmax())
        tokens.append(token)
        margins.append(float(top2[1] - top2[0]))
        if token == eos or i == n - 1:
            break
        logits, state = runner.step(np.array([token]), state)
    return np.asarray(tokens, dtype=np.int64), np.asarray(margins)


def check_lm_parity(runner, ref: LmReference, atol: float, graph: str) -> dict:
    """Compare `runner` (an ONNX graph) with the PyTorch reference; raise GateFailed with the numbers.

    Logits of every prefill case and every cached step must be within `atol`. Greedy tokens
    must be identical; a first difference is forgiven only where PyTorch's top two logits
    were within 2 * atol (a tie the tolerance allows either way), and is reported.
    """
    prefill = {}
    for name, ids in ref.windows.items():
        got = runner.logits({"input_ids": ids, "attention_mask": np.ones_like(ids)})
        prefill[name] = _max_diff(got, ref.window_logits[name])
    logits, state = runner.start(ref.prompts)
    cached = [_max_diff(logits, ref.cached_logits[:, 0])]
    for j in range(ref.continuation.shape[1]):
        logits, state = runner.step(ref.continuation[:, j], state)
        cached.append(_max_diff(logits, ref.cached_logits[:, j + 1]))
    identical, ties, differ = 0, [], []
    for i, prompt in enumerate(ref.prompts):
        got = np.asarray(runner.generate(prompt[None], max_new_tokens=ref.greedy_tokens,
                                         sampling={"temperature": 0.0})).reshape(-1)
        want = ref.greedy[i]
        if len(got) == len(want) and np.array_equal(got, want):
            identical += 1
            continue
        k = next((k for k in range(min(len(got), len(want))) if got[k] != want[k]), min(len(got), len(want)))
        margin = float(ref.margins[i][k]) if k < len(ref.margins[i]) else float("inf")
        entry = {"prompt": i, "position": k, "pytorch_top2_margin": margin}
        (ties if margin <= 2 * atol else differ).append(entry)
    worst_prefill, worst_cached = max(prefill.values()), max(cached)
    result = {"graph": graph, "atol": atol, "max_abs_diff": max(worst_prefill, worst_cached),
              "prefill_max_abs_diff": worst_prefill, "prefill": prefill,
              "cached_steps": len(cached) - 1, "cached_max_abs_diff": worst_cached,
              "cached_by_step": [round(c, 8) for c in cached],
              "greedy": {"prompts": len(ref.prompts), "tokens": ref.greedy_tokens,
                         "identical": identical, "near_ties": ties, "different": differ}}
    if result["max_abs_diff"] > atol or differ:
        where = "prefill" if worst_prefill >= worst_cached else f"cached step {int(np.argmax(cached))}"
        shown = "; ".join(f"prompt {d['prompt']} from token {d['position']}" for d in differ[:4])
        raise GateFailed(
            f"Parity gate failed for the {graph} ONNX graph: the largest |logit difference| from PyTorch is "
            f"{result['max_abs_diff']:.3g} (atol {atol:g}, worst at {where}); greedy continuations identical on "
            f"{identical} of {len(ref.prompts)} prompts{': differ at ' + shown if differ else ''}. Nothing was written. "
            "If fusion caused it, try --optimize none; if the difference is acceptable, raise --atol.")
    return result


def _max_diff(got: np.ndarray, want: np.ndarray) -> float:
    # NaN compares false with everything: count it as an infinite difference.
    diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
    return float(np.nan_to_num(diff, nan=np.inf).max())


# --------------------------------------------------------------------------- export and fusion


def supported_model_types() -> list[str]:
    """Model types optimum-onnx exports for text generation with past key values."""
    import optimum.exporters.onnx.model_configs  # noqa: F401  (registers the ONNX configs)
    from optimum.exporters.tasks import TasksManager

    return sorted(TasksManager.get_supported_model_type_for_task(LM_TASK, exporter="onnx"))


def export_graph(src: Path, out: Path, opset: int, device: str, trust_remote_code: bool) -> None:
    """optimum's main_export with past key values into `out` (model.onnx, config, tokenizer)."""
    from optimum.exporters.onnx import main_export

    with warnings.catch_warnings():
        # Tracer warnings about shape arithmetic; the gate checks the graph on real text.
        warnings.simplefilter("ignore")
        # optimum's own validation feeds random dummies; ours runs on real text below.
        main_export(str(src), output=str(out), task=LM_TASK, opset=opset, device=device, do_validation=False,
                    local_files_only=True, trust_remote_code=trust_remote_code)


def decode_timing(runner, prompt: np.ndarray) -> dict:
    """Closures timing a prefill of `prompt` [1, t] and one cached step after it (state reused)."""
    logits, state = runner.start(prompt)
    token = logits.argmax(-1)
    return {"prefill": lambda: runner.start(prompt), "step": lambda: runner.step(token, state)}


def choose_fusion(plain, fused, prompt: np.ndarray) -> dict:
    """Time a 128-token prefill and a decode step of both graphs, interleaved; keep the faster.

    The score is what a generation of TIMED_STEPS tokens after the prompt costs: one prefill
    plus TIMED_STEPS steps.
    """
    a, b = decode_timing(plain, prompt), decode_timing(fused, prompt)
    ms = time_interleaved({"plain_prefill": a["prefill"], "fused_prefill": b["prefill"],
                           "plain_step": a["step"], "fused_step": b["step"]}, rounds=5, per_round=10)
    plain_total = ms["plain_prefill"] + TIMED_STEPS * ms["plain_step"]
    fused_total = ms["fused_prefill"] + TIMED_STEPS * ms["fused_step"]
    keep = fused_total < FUSED_MARGIN * plain_total
    return {"choice": "fused" if keep else "plain", "ms": ms,
            "how": f"prefill of {prompt.shape[1]} tokens + {TIMED_STEPS} decode steps at batch 1, timed interleaved "
                   f"on this machine: plain {plain_total:.2f} ms, fused {fused_total:.2f} ms (fused kept only when "
                   f"{100 * (1 - FUSED_MARGIN):.0f} % faster)"}


def start_export(cfg, what: str) -> tuple[Path, str, dict]:
    """What every export checks before any work: the output can be written, fp16 only on CUDA,
    and the source is an fp32 PyTorch `what` (a classifier, a causal LM).

    Returns:
        (the checked output path, the resolved device, the source's manifest).
    """
    import onnxruntime as ort

    from compress.hardware import resolve_device

    # Errors only. On CUDA, initialising a session warns about every shape operator kept on the
    # CPU through ONNX Runtime's default logger, which the session's own log level leaves alone,
    # and the optimizer's sessions use it too.
    ort.set_default_logger_severity(3)
    out = check_output(cfg.out, cfg.force)
    device = resolve_device(cfg.device)
    if cfg.dtype == "fp16" and device != "cuda":
        raise UserError("--dtype fp16 makes a graph for CUDA and is checked on CUDA, but the device is the CPU. "
                        "Use --device cuda on a machine with a GPU (and onnxruntime-gpu), or --dtype fp32.")
    fmt, manifest = detect_format(cfg.model), read_manifest(cfg.model)
    if fmt != "pytorch" or manifest.get("dtype") in ("bf16", "fp16"):
        raise UserError(f"'{cfg.model}' is a {manifest.get('dtype') or fmt} artifact; export takes an fp32 PyTorch "
                        f"{what} (the output of train or distill). Export the artifact it was made from.")
    return out, device, manifest


def export_lm(cfg, task) -> Path:
    """Export the causal LM `cfg.model` (an ExportConfig) with past key values; gate every graph.

    Returns:
        The artifact directory: model.onnx (optimum's text-generation-with-past layout),
        config.json, generation_config.json, tokenizer files and manifest.json (format "onnx",
        task, opset, the optimisation kept and why, parity figures of every gate).
    """
    import onnx

    out, device, manifest = start_export(cfg, "causal LM")
    src = Path(cfg.model)
    torch_runner = TorchRunner(src, device=device, threads=cfg.threads, trust_remote_code=cfg.trust_remote_code)
    config = torch_runner.config
    if config.model_type not in supported_model_types():
        raise UserError(f"optimum-onnx cannot export '{config.model_type}' models with past key values ({LM_TASK}). "
                        f"Supported: {', '.join(supported_model_types())}.")
    data = task.load_data(cfg)
    stream = task.encode(data, torch_runner.tokenizer, cfg, model_config=config, splits=("validation",))["validation"]
    prompt_len = max(8, min(64, cfg.max_length // 2))
    steps = cfg.parity_steps
    ref = build_reference(torch_runner, stream, cfg.parity_prompts, prompt_len, steps, cfg.greedy_tokens,
                          n_windows=cfg.parity_prompts)
    family = fusion_model_type(config.model_type)
    level = cfg.optimize
    if level == "transformer" and not family:
        raise UserError(f"ONNX Runtime has no transformer fusions for '{config.model_type}' models. "
                        "Use --optimize none, basic or extended.")
    opset = cfg.opset or LM_OPSET

    with atomic_output(out, force=cfg.force) as tmp:
        export_graph(src, tmp, opset, device, cfg.trust_remote_code)
        torch_runner.tokenizer.save_pretrained(tmp)  # the tokenizer as compress loads it (padding set)
        path = tmp / ONNX_FILE
        hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None) or 768
        fuse_skip, skip_info = choose_skip_layer_norm(cfg.skip_layer_norm, hidden, device, cfg.threads)
        session_config = {} if fuse_skip else {DISABLE_OPTIMIZERS: SKIP_LAYER_NORM_FUSION}
        if cfg.flush_denormals and device == "cpu":
            session_config[DENORMAL_AS_ZERO] = "1"

        def graph_runner(name: str = ONNX_FILE):
            return OrtRunner(tmp, device, cfg.threads, name, session_config, trust_remote_code=cfg.trust_remote_code)

        parity = {"exported": check_lm_parity(graph_runner(), ref, cfg.atol, "exported")}
        exported = onnx.load(str(path))
        counts = {"before": operator_counts(exported)}
        fusion = None
        if level in ("basic", "extended", "transformer"):
            save(optimize_graph(path, level, config, use_gpu=device == "cuda", fuse_skip_layer_norm=fuse_skip), path)
            parity["optimized"] = check_lm_parity(graph_runner(), ref, cfg.atol, f"{level}-optimized")
        elif level == "auto" and family:
            candidate = tmp / "fused.onnx"
            save(optimize_graph(path, "transformer", config, use_gpu=device == "cuda", fuse_skip_layer_norm=fuse_skip),
                 candidate)
            try:
                fused_gate = check_lm_parity(graph_runner(candidate.name), ref, cfg.atol, "transformer-fused")
            except GateFailed as err:
                fusion = {"choice": "plain", "how": f"the fused graph failed the parity gate: {err}"}
            else:
                prompt = np.asarray(stream.tokens[None, :min(TIMED_PROMPT, len(stream.tokens))])
                fusion = choose_fusion(graph_runner(), graph_runner(candidate.name), prompt)
                if fusion["choice"] == "fused":
                    candidate.replace(path)
                    parity["optimized"] = fused_gate
                else:
                    fusion["fused_gate"] = fused_gate
            candidate.unlink(missing_ok=True)
        elif level == "auto":
            fusion = {"choice": "plain", "how": f"ONNX Runtime has no transformer fusions for '{config.model_type}'"}
        shipped_level = {"auto": "transformer" if fusion and fusion["choice"] == "fused" else "none"}.get(level, level)
        final = onnx.load(str(path))
        # Prefill computes the head only where generation needs it (transformers' logits_to_keep);
        # the gate runs again on the graph that ships.
        if add_logits_to_keep(final):
            onnx.save(final, str(path))
            parity["logits_to_keep"] = check_lm_parity(graph_runner(), ref, cfg.atol, "logits_to_keep")
        counts["after"] = operator_counts(final)
        if cfg.dtype == "fp16":
            save(convert_to_fp16(final), path)
            parity["fp16"] = check_lm_parity(graph_runner(), ref, cfg.fp16_atol, "fp16")
        fused = any(n.domain == "com.microsoft" for n in final.graph.node)
        shipped = list(parity.values())[-1]
        metrics = {"parity_max_abs_diff": shipped["max_abs_diff"],
                   "parity_cached_steps": shipped["cached_steps"],
                   "parity_greedy_identical": shipped["greedy"]["identical"],
                   "parity_greedy_prompts": shipped["greedy"]["prompts"]}
        graph_io = {"inputs": [i.name for i in final.graph.input], "outputs": [o.name for o in final.graph.output]}
        write_manifest(tmp, stage="export", config=cfg.model_dump(), parent=str(cfg.model), metrics=metrics,
                       format="onnx", task=task.name, onnx_file=ONNX_FILE, opset=opset,
                       exporter=f"optimum main_export ({LM_TASK})", optimize=shipped_level, fusion=fusion, fused=fused,
                       dtype=cfg.dtype, device=device, fused_operators=counts, parity=parity, graph_io=graph_io,
                       skip_layer_norm=skip_info, ort_session_config=session_config,
                       data={"source": data.source, "fingerprint": data.fingerprint})
    g = shipped["greedy"]
    print(f"exported {config.model_type} causal LM with past key values (opset {opset}, optimize {shipped_level}, "
          f"{cfg.dtype}) -> {out}; parity max |diff| {metrics['parity_max_abs_diff']:.2g} over prefill and "
          f"{shipped['cached_steps']} cached steps, greedy identical on {g['identical']}/{g['prompts']} prompts "
          f"({g['tokens']} tokens)")
    return out
