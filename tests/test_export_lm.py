"""`compress export` of a causal LM and the LM runners: optimum's text-generation-with-past
layout, the parity gate on real text (prefill, cached steps, greedy tokens), the ONNX
Runtime decode loop, one sampling loop for every runner, and eval/generate on the graph."""

import json

import numpy as np
import onnx
import pytest

from compress.cli import main
from compress.errors import GateFailed

from conftest import LM_EXPORT_FAST


def manifest(directory) -> dict:
    return json.loads((directory / "manifest.json").read_text())


def prompt_ids(runner, text: str) -> np.ndarray:
    return np.asarray([runner.tokenizer(text, add_special_tokens=False)["input_ids"]], dtype=np.int64)


def test_lm_export_has_the_optimum_layout_and_passes_its_gates(tiny_lm_onnx):
    m = manifest(tiny_lm_onnx)
    assert m["format"] == "onnx" and m["task"] == "causal-lm" and m["onnx_file"] == "model.onnx" and m["opset"] == 18
    graph = onnx.load(str(tiny_lm_onnx / "model.onnx")).graph
    inputs, outputs = [i.name for i in graph.input], [o.name for o in graph.output]
    layers = json.loads((tiny_lm_onnx / "config.json").read_text())["n_layer"]
    past = [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    # logits_to_keep is an initializer that is also an input: optional, default 0 (every position).
    assert sorted(inputs) == sorted(["input_ids", "attention_mask", "position_ids", *past, "logits_to_keep"])
    assert sorted(outputs) == sorted(["logits", *[p.replace("past_key_values", "present") for p in past]])
    assert m["graph_io"] == {"inputs": inputs, "outputs": outputs}
    for gate in m["parity"].values():  # the exported graph, and the fused one if it was kept
        assert gate["max_abs_diff"] <= 1e-4 and gate["cached_steps"] == LM_EXPORT_FAST["parity_steps"]
        assert len(gate["cached_by_step"]) == LM_EXPORT_FAST["parity_steps"] + 1
        assert gate["greedy"]["identical"] == LM_EXPORT_FAST["parity_prompts"] and not gate["greedy"]["different"]
    fusion = m["fusion"]
    assert fusion["choice"] in ("plain", "fused") and m["optimize"] == ("transformer" if fusion["choice"] == "fused" else "none")
    assert set(fusion["ms"]) == {"plain_prefill", "fused_prefill", "plain_step", "fused_step"}
    assert {"tokenizer.json", "config.json", "generation_config.json"} <= {p.name for p in tiny_lm_onnx.iterdir()}


def test_optimum_loads_the_export_offline_and_generates_what_we_generate(tiny_lm_onnx):
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    from compress.runners import load_runner

    ours = load_runner(tiny_lm_onnx, threads=1)
    model = ORTModelForCausalLM.from_pretrained(tiny_lm_onnx)  # a local directory: no hub involved
    assert model.can_use_cache
    for text in ("HAMLET. To be, or not", "Enter the Ghost"):
        ids = prompt_ids(ours, text)
        theirs = model.generate(torch.from_numpy(ids), max_new_tokens=20, do_sample=False,
                                pad_token_id=ours.tokenizer.pad_token_id)[0, ids.shape[1]:].numpy()
        mine = ours.generate(ids, max_new_tokens=20, sampling={"temperature": 0.0})
        assert len(mine) > 0 and np.array_equal(theirs, mine)


def test_a_prefill_projects_only_the_last_position_and_perplexity_every_position(tiny_lm_onnx, tiny_lm):
    import onnxruntime as ort
    from onnx import numpy_helper

    from compress.runners import load_runner

    graph = onnx.load(str(tiny_lm_onnx / "model.onnx")).graph
    default = [numpy_helper.to_array(t) for t in graph.initializer if t.name == "logits_to_keep"]
    assert len(default) == 1 and default[0].tolist() == [0]
    session = ort.InferenceSession(str(tiny_lm_onnx / "model.onnx"), providers=["CPUExecutionProvider"])
    assert "logits_to_keep" not in [i.name for i in session.get_inputs()]  # what optimum feeds
    assert [i.name for i in session.get_overridable_initializers()] == ["logits_to_keep"]
    ours = load_runner(tiny_lm_onnx, threads=1)
    assert ours.keep_last
    ids = prompt_ids(ours, "HAMLET. To be, or not to be, that is the question")
    feeds = {**ours._feeds(ids, 0), **ours._empty_cache(1)}
    full = session.run(["logits"], feeds)[0]
    last = session.run(["logits"], {**feeds, "logits_to_keep": np.ones(1, np.int64)})[0]
    assert full.shape == (1, ids.shape[1], ours.config.vocab_size) and last.shape == (1, 1, ours.config.vocab_size)
    np.testing.assert_allclose(last[:, 0], full[:, -1], atol=1e-5)
    logits, _ = ours.start(ids)
    np.testing.assert_allclose(logits, full[:, -1], atol=1e-5)
    assert ours.logits({"input_ids": ids, "attention_mask": np.ones_like(ids)}).shape == full.shape
    # The PyTorch runner asks transformers for the last position only, as generate does.
    torch_runner = load_runner(tiny_lm, threads=1)
    seen = []
    hook = torch_runner.model.lm_head.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    torch_runner.start(ids)
    hook.remove()
    assert seen == [(1, 1, ours.config.vocab_size)]


def test_our_decode_loop_gives_transformers_greedy_tokens(tiny_lm):
    """The PyTorch runner generates through the shared start/step loop; it must pick the tokens
    transformers' own generate() picks."""
    import torch

    from compress.runners.pytorch import TorchRunner

    runner = TorchRunner(tiny_lm, threads=1)
    for text in ("HORATIO. Well, sit we down,", "O, what a rogue", "The king"):
        ids = prompt_ids(runner, text)
        x = torch.from_numpy(ids)
        with torch.inference_mode():
            hf = runner.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=32, do_sample=False,
                                       pad_token_id=runner.tokenizer.pad_token_id)[0, ids.shape[1]:].numpy()
        assert np.array_equal(runner.generate(ids, max_new_tokens=32, sampling={"temperature": 0.0}), hf)


def test_seeded_sampling_is_the_same_in_pytorch_and_onnx(tiny_lm, tiny_lm_onnx):
    from compress.runners import load_runner

    torch_runner, ort_runner = load_runner(tiny_lm, threads=1), load_runner(tiny_lm_onnx, threads=1)
    ids = prompt_ids(torch_runner, "Enter HAMLET")
    sampling = {"temperature": 0.9, "top_k": 40, "top_p": 0.95}
    runs = []
    for runner in (torch_runner, ort_runner, ort_runner):
        np.random.seed(7)
        runs.append(runner.generate(ids, max_new_tokens=24, sampling=sampling))
    assert np.array_equal(runs[0], runs[1]) and np.array_equal(runs[1], runs[2])
    np.random.seed(8)
    assert not np.array_equal(ort_runner.generate(ids, max_new_tokens=24, sampling=sampling), runs[0])


def test_sampling_warpers_keep_what_they_should():
    from compress.runners.decode import next_tokens, warp

    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    kept = np.isfinite(warp(logits, {"temperature": 1.0, "top_k": 2}))
    assert kept.tolist() == [[True, True, False, False]]
    kept = np.isfinite(warp(logits, {"temperature": 1.0, "top_p": 0.75}))
    assert kept.tolist() == [[True, True, False, False]]  # 0.5 + 0.3 reaches 0.75
    kept = np.isfinite(warp(logits, {"temperature": 1.0, "top_p": 0.85}))
    assert kept.tolist() == [[True, True, True, False]]
    np.random.seed(0)
    drawn = np.bincount([int(next_tokens(logits, {"temperature": 1.0})[0]) for _ in range(4000)], minlength=4) / 4000
    assert np.abs(drawn - [0.5, 0.3, 0.15, 0.05]).max() < 0.03
    assert np.allclose(np.exp(warp(logits, {"temperature": 1.0})).sum(), 1.0)


def test_ort_decode_state_is_not_modified_and_batches_decode(tiny_lm_onnx, tiny_lm):
    from compress.runners import load_runner
    from compress.runners.ort import OrtRunner

    bound = OrtRunner(tiny_lm_onnx, threads=1, io_binding=True)
    plain = load_runner(tiny_lm_onnx, threads=1)
    assert plain.io_binding is False  # the CPU default (benchmarks/results/lm_decode_io.md)
    torch_runner = load_runner(tiny_lm, threads=1)
    ids = np.stack([prompt_ids(bound, "To be, or not to be:")[0][:6], prompt_ids(bound, "Alas, poor Yorick! I")[0][:6]])
    l0, state = bound.start(ids)
    a, _ = bound.step(np.array([11, 12]), state)
    b, _ = bound.step(np.array([11, 12]), state)  # the same state again: the same logits
    assert np.array_equal(a, b)
    pl0, pstate = plain.start(ids)
    pa, _ = plain.step(np.array([11, 12]), pstate)
    assert np.allclose(pa, a, atol=1e-5) and np.allclose(pl0, l0, atol=1e-5)
    t0, tstate = torch_runner.start(ids)
    ta, _ = torch_runner.step(np.array([11, 12]), tstate)
    assert np.abs(t0 - l0).max() < 1e-4 and np.abs(ta - a).max() < 1e-4


def test_a_graph_that_drifts_fails_the_gate(tiny_lm, tiny_lm_onnx):
    """A graph whose cached steps are off by more than atol fails, and the message says where."""
    from compress.export_lm import build_reference, check_lm_parity
    from compress.lm_data import TokenStream
    from compress.runners import load_runner

    torch_runner, ort_runner = load_runner(tiny_lm, threads=1), load_runner(tiny_lm_onnx, threads=1)
    text = " ".join(["Good night, sweet prince, and flights of angels sing thee to thy rest."] * 20)
    stream = TokenStream(prompt_ids(torch_runner, text)[0], chars=len(text), block=32, stride=16)
    ref = build_reference(torch_runner, stream, n_prompts=2, prompt_len=8, steps=16, greedy_tokens=8, n_windows=2)
    assert check_lm_parity(ort_runner, ref, 1e-4, "exported")["max_abs_diff"] <= 1e-4

    class Drifting:
        def __init__(self, inner):
            self.inner, self.tokenizer = inner, inner.tokenizer

        def logits(self, batch):
            return self.inner.logits(batch)

        def start(self, ids):
            return self.inner.start(ids)

        def step(self, tokens, state):
            logits, state = self.inner.step(tokens, state)
            return logits + 1e-3 * state["length"], state

        def generate(self, ids, **kw):
            return self.inner.generate(ids, **kw)

    with pytest.raises(GateFailed, match="cached step"):
        check_lm_parity(Drifting(ort_runner), ref, 1e-4, "drifting")


def test_eval_and_generate_work_on_the_onnx_lm(tiny_lm, tiny_lm_onnx, capsys):
    from compress.eval import EvalConfig, evaluate

    fp32 = evaluate(EvalConfig(model=str(tiny_lm), split="validation", threads=1))
    onnx_ = evaluate(EvalConfig(model=str(tiny_lm_onnx), split="validation", threads=1))
    assert onnx_["format"] == "onnx" and onnx_["tokens"] == fp32["tokens"]
    assert onnx_["perplexity"] == pytest.approx(fp32["perplexity"], rel=1e-4)
    capsys.readouterr()
    assert main(["generate", "--model", str(tiny_lm_onnx), "--prompt", "HAMLET.", "--max-new-tokens", "12",
                 "--temperature", "0", "--threads", "1"]) == 0
    assert capsys.readouterr().out.startswith("HAMLET.")


@pytest.mark.gpu
def test_fp16_lm_export_and_cached_decode_on_cuda(tiny_lm, tmp_path):
    """Written for CUDA and onnxruntime-gpu; not run on this project's CPU machines."""
    import onnxruntime as ort
    import torch

    from compress.export import ExportConfig, export
    from compress.runners import load_runner

    if not torch.cuda.is_available() or "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("needs a CUDA GPU and onnxruntime-gpu")
    out = export(ExportConfig(model=str(tiny_lm), out=str(tmp_path / "fp16"), dtype="fp16", device="cuda",
                              optimize="none", **LM_EXPORT_FAST))
    m = manifest(out)
    assert m["dtype"] == "fp16" and m["parity"]["fp16"]["max_abs_diff"] <= 1e-2
    runner = load_runner(out, device="cuda")
    assert runner.session.get_providers()[0] == "CUDAExecutionProvider" and runner.cache_device == "cuda"
    ids = prompt_ids(runner, "HAMLET. To be")
    assert len(runner.generate(ids, max_new_tokens=8, sampling={"temperature": 0.0})) > 0


@pytest.mark.slow
def test_the_austen_teacher_exports_within_1e4_and_greedy_identical(tmp_path):
    """The acceptance figures on runs/austen-gpt (8 prompts, 32 cached steps, 32 greedy tokens)."""
    from pathlib import Path

    from compress.export import ExportConfig, export

    teacher = Path(__file__).resolve().parents[1] / "runs" / "austen-gpt"
    if not (teacher / "manifest.json").is_file():
        pytest.skip("train the teacher first (docs/lm.md): runs/austen-gpt")
    out = export(ExportConfig(model=str(teacher), out=str(tmp_path / "onnx"), threads=2))
    gate = list(manifest(out)["parity"].values())[-1]
    assert gate["max_abs_diff"] <= 1e-4 and gate["cached_steps"] == 32
    assert gate["greedy"] == {**gate["greedy"], "prompts": 8, "tokens": 32, "identical": 8}
