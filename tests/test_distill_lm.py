"""Distilling causal LMs on tiny decoders: students from the teacher's layers (GPT-2, Llama,
Qwen2), the top-k teacher cache, the token-level KD losses, decoder pruning, and the CLI."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from compress.cli import main
from compress.errors import UserError

from conftest import hamlet_path


def random_lm(arch="gpt2", layers=4, hidden=32, heads=4, kv=None, vocab=97, seed=0, tie=True):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    if arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads,
                                           n_positions=64, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0,
                                           tie_word_embeddings=tie))
    elif arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                                             num_attention_heads=heads, num_key_value_heads=kv or heads,
                                             intermediate_size=2 * hidden, max_position_embeddings=64,
                                             tie_word_embeddings=tie))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                                             num_attention_heads=heads, num_key_value_heads=kv or heads,
                                             intermediate_size=2 * hidden, max_position_embeddings=64,
                                             tie_word_embeddings=tie))
    # Larger weights than the default init, so outputs are far from uniform and heads differ.
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.3)
    return model.eval()


def ids(batch=3, length=12, vocab=97, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g)


# --------------------------------------------------------------------------- students


@pytest.mark.parametrize("arch,tie", [("gpt2", True), ("llama", True), ("llama", False), ("qwen2", False)])
def test_lm_student_copies_the_chosen_layers_and_keeps_ties(arch, tie):
    from compress.anatomy import embeddings_tied, layer_list
    from compress.distill.student import from_teacher_layers

    teacher = random_lm(arch, layers=4, kv=2 if arch != "gpt2" else None, tie=tie)
    if arch == "qwen2":
        teacher.config.layer_types = ["full_attention"] * 4
    student = from_teacher_layers(teacher, None, [1, 3], same_class=True).model
    assert type(student) is type(teacher) and student.config.num_hidden_layers == 2
    assert embeddings_tied(student) == tie == embeddings_tied(teacher)
    t = teacher.state_dict()
    prefix, _ = layer_list(teacher)
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.(.*)$")
    for key, value in student.state_dict().items():
        m = pattern.match(key)
        source = f"{prefix}.{[1, 3][int(m.group(1))]}.{m.group(2)}" if m else key
        assert torch.equal(value, t[source]), key
    if arch == "qwen2":
        assert student.config.layer_types == ["full_attention"] * 2
    # All layers copied: the student computes exactly the teacher's logits.
    whole = from_teacher_layers(teacher, None, [0, 1, 2, 3], same_class=True).model.eval()
    x = ids()
    with torch.no_grad():
        assert torch.equal(whole(input_ids=x).logits, teacher(input_ids=x).logits)


def test_lm_size_spec_and_depth_checks(tiny_lm):
    from compress.distill.student import build_lm_student
    from compress.models import load_causal_lm

    teacher, tok = load_causal_lm(tiny_lm)
    s = build_lm_student("llama:layers=1,hidden=32,heads=4,kv_heads=2", teacher, tok)
    assert s.kind == "spec" and s.model.config.vocab_size == teacher.config.vocab_size
    assert s.model.config.max_position_embeddings == teacher.config.n_positions
    for bad, says in [("gpt2:layers=3,hidden=32,heads=4", "more than the teacher's 2"),
                      ("gpt2:layers=1,hidden=32,heads=4,vocab=50", "vocab=50"),
                      ("bert:layers=1,hidden=32,heads=4", "causal language model"),
                      ("layers=3", "teacher has 2")]:
        with pytest.raises(UserError, match=says):
            build_lm_student(bad, teacher, tok)


# --------------------------------------------------------------------------- the cache and the losses


def test_topk_cache_holds_the_teachers_top_k_and_leftover_mass(tmp_path):
    from compress.tasks.lm_kd import TopKTargets

    teacher = random_lm("gpt2", layers=2)
    blocks = ids(batch=5, length=16).numpy()
    k, temperature = 8, 2.0
    cache = TopKTargets.build(teacher, blocks, k=k, temperature=temperature, batch_size=2, device="cpu",
                              precision="fp32", directory=tmp_path / "c")
    with torch.no_grad():
        logp = torch.log_softmax(teacher(input_ids=torch.from_numpy(blocks)).logits / temperature, -1)
    top, top_ids = logp.topk(k, -1)
    assert cache.ids.dtype == np.uint16 and cache.ids.shape == (5, 16, k)
    assert np.array_equal(cache.ids.astype(np.int64), top_ids.numpy())
    assert np.allclose(cache.logp.astype(np.float32), top.numpy(), atol=2e-3)
    rest = np.log1p(-top.exp().sum(-1).numpy())
    assert np.allclose(cache.rest, rest, atol=1e-4)
    assert cache.bytes_on_disk == 5 * 16 * (k * 2 + k * 2 + 4)
    # A finished cache with the same key is reused as is; another k builds a new one.
    stamp = (tmp_path / "c" / "ids.bin").stat().st_mtime_ns
    again = TopKTargets.build(teacher, blocks, k=k, temperature=temperature, batch_size=2, device="cpu",
                              precision="fp32", directory=tmp_path / "c")
    assert (tmp_path / "c" / "ids.bin").stat().st_mtime_ns == stamp and again.meta == cache.meta
    assert TopKTargets.build(teacher, blocks, k=4, temperature=temperature, batch_size=2, device="cpu",
                             precision="fp32", directory=tmp_path / "c").k == 4
    with pytest.raises(UserError, match="vocabulary"):
        TopKTargets.build(teacher, blocks, k=98, temperature=1.0, batch_size=2, device="cpu", precision="fp32",
                          directory=tmp_path / "d")


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "skew_kl", "skew_reverse_kl", "jsd"])
def test_cached_kd_is_exact_at_full_k_and_a_lower_bound_below(name, tmp_path):
    """With k = vocabulary the cache loses nothing: the cached loss equals the online one. With
    fewer ids, merging the rest into one bucket can only lower the divergence."""
    from compress.tasks.lm_kd import LMDistillLoss, LMDistillSettings, TopKTargets

    teacher, student = random_lm("gpt2", layers=2, seed=0), random_lm("gpt2", layers=1, seed=3)
    blocks = ids(batch=4, length=10).numpy()
    batch = {"input_ids": torch.from_numpy(blocks), "labels": torch.from_numpy(blocks), "index": torch.arange(4)}
    settings = LMDistillSettings(divergences={name: 1.0}, temperature=1.5, alpha=1.0)
    with torch.no_grad():
        online = float(LMDistillLoss(teacher, None, settings)(student, batch)[0])
        losses = {}
        for k in (97, 5):
            cache = TopKTargets.build(teacher, blocks, k=k, temperature=1.5, batch_size=4, device="cpu",
                                      precision="fp32", directory=tmp_path / str(k))
            losses[k] = float(LMDistillLoss(teacher, cache, settings)(student, batch)[0])
        # The same student and teacher give 0 (student == teacher).
        same = float(LMDistillLoss(teacher, None, settings)(teacher, batch)[0])
    assert online > 0.05
    assert losses[97] == pytest.approx(online, rel=5e-3)
    assert losses[5] < online
    assert abs(same) < 1e-5


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "skew_kl", "skew_reverse_kl", "jsd"])
def test_each_divergence_trains_the_student_toward_the_teacher(name, tmp_path):
    from compress.tasks.lm_kd import LMDistillLoss, LMDistillSettings, TopKTargets, divergence

    teacher, student = random_lm("llama", layers=2, kv=2, seed=0), random_lm("llama", layers=1, kv=2, seed=5)
    student.train()
    blocks = ids(batch=4, length=12).numpy()
    cache = TopKTargets.build(teacher, blocks, k=16, temperature=1.0, batch_size=4, device="cpu", precision="fp32",
                              directory=tmp_path / "c")
    batch = {"input_ids": torch.from_numpy(blocks), "labels": torch.from_numpy(blocks), "index": torch.arange(4)}
    loss_fn = LMDistillLoss(teacher, cache, LMDistillSettings(divergences={name: 1.0}, alpha=1.0))
    opt = torch.optim.Adam(student.parameters(), lr=3e-3)

    def full_forward_kl():
        with torch.no_grad():
            lp = torch.log_softmax(teacher(input_ids=batch["input_ids"]).logits, -1)
            lq = torch.log_softmax(student(input_ids=batch["input_ids"]).logits, -1)
        return float(divergence("forward_kl", lp, lq).mean())

    start, kl_start = float(loss_fn(student, batch)[0]), full_forward_kl()
    for _ in range(25):
        loss, _ = loss_fn(student, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss_fn(student, batch)[0]) < 0.7 * start
    assert full_forward_kl() < kl_start  # the full-vocabulary distributions moved together too


def test_hidden_loss_with_a_projection_is_trained_and_zero_for_the_teacher():
    from compress.distill.losses import make_projections
    from compress.tasks.lm_kd import LMDistillLoss, LMDistillSettings

    teacher = random_lm("gpt2", layers=2, hidden=32)
    narrow = random_lm("gpt2", layers=1, hidden=16, seed=2)
    blocks = ids(batch=2, length=8)
    batch = {"input_ids": blocks, "labels": blocks, "index": torch.arange(2)}
    same = LMDistillLoss(teacher, None, LMDistillSettings(divergences={}, hidden_weight=1.0, pairs=[(1, 1), (2, 2)]))
    loss, parts = same(teacher, batch)
    assert parts["hidden"] == 0.0 and float(loss) == pytest.approx(parts["ce"])
    s = LMDistillSettings(divergences={}, hidden_weight=1.0, pairs=[(1, 2)])
    proj = make_projections([(1, 2)], 16, 32)
    loss, parts = LMDistillLoss(teacher, None, s, proj)(narrow, batch)
    loss.backward()
    assert parts["hidden"] > 0 and proj["1_2"].weight.grad is not None


# --------------------------------------------------------------------------- pruning


def _zeroed_heads(model, layout, dropped, group, d):
    """A copy of `model` with the dropped heads' inputs of the output projection zeroed."""
    import copy

    from compress.anatomy import DECODER_LAYOUTS, layer_list

    ref = copy.deepcopy(model)
    parts = DECODER_LAYOUTS[layout]
    with torch.no_grad():
        for i, layer in enumerate(layer_list(ref)[1]):
            w = layer.get_submodule(parts["output"]).weight
            for g in dropped[i]:
                cols = slice(g * group * d, (g + 1) * group * d)
                if parts["conv1d"]:
                    w[cols, :] = 0
                else:
                    w[:, cols] = 0
    return ref


@pytest.mark.parametrize("arch,kv,keep", [("gpt2", None, 2), ("llama", 2, 2), ("llama", 4, 3)])
def test_decoder_head_pruning_removes_exactly_the_heads_it_drops(arch, kv, keep, tmp_path):
    from transformers import AutoModelForCausalLM

    from compress.distill.prune_decoder import prune_decoder_heads

    model = random_lm(arch, layers=2, hidden=32, heads=4, kv=kv)
    x = ids(batch=2, length=10)
    group = 4 // (kv or 4)
    stats = prune_decoder_heads(model, keep, [{"input_ids": ids(batch=4, length=10, seed=7)}])
    ref = _zeroed_heads(random_lm(arch, layers=2, hidden=32, heads=4, kv=kv), arch, stats["pruned"], group, 8)
    assert all(len(v) == (4 - keep) // group for v in stats["pruned"].values())
    assert stats["params_after"] < stats["params_before"]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, ref(input_ids=x).logits, atol=1e-5, rtol=1e-5)
    model.save_pretrained(tmp_path / "m")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=x).logits, model(input_ids=x).logits)
    if arch == "llama" and kv == 2:
        with pytest.raises(UserError, match="multiple of 2"):
            prune_decoder_heads(random_lm(arch, layers=2, hidden=32, heads=4, kv=kv), 3, [{"input_ids": x}])


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_decoder_mlp_pruning_removes_exactly_the_units_it_drops(arch, tmp_path):
    import copy

    from transformers import AutoModelForCausalLM

    from compress.anatomy import DECODER_LAYOUTS, layer_list
    from compress.distill.prune_decoder import prune_decoder_mlp

    model = random_lm(arch, layers=2, hidden=32)
    ref = copy.deepcopy(model)
    inner = 128 if arch == "gpt2" else 64
    sample = [{"input_ids": ids(batch=4, length=10, seed=7)}]
    # Which units it keeps: rank the same way by hand, from the out-projection's input.
    from compress.distill.prune_decoder import _out_weight, _with_mask
    from compress.distill.prune_ffn import mean_activations

    parts = DECODER_LAYOUTS[arch]
    outs = [layer.get_submodule(parts["mlp_out"]) for layer in layer_list(ref)[1]]
    acts = mean_activations(ref, outs, _with_mask(sample))
    stats = prune_decoder_mlp(model, 20, sample)
    assert stats["width_after"] == 20 and stats["width_before"] == inner
    with torch.no_grad():
        for n, out in enumerate(outs):
            score = acts[n].float() * _out_weight(out, parts["conv1d"]).float().norm(dim=0)
            drop = score.argsort(descending=True)[20:]
            if parts["conv1d"]:
                out.weight[drop, :] = 0
            else:
                out.weight[:, drop] = 0
    x = ids(batch=2, length=10)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, ref(input_ids=x).logits, atol=1e-5, rtol=1e-5)
    model.save_pretrained(tmp_path / "m")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=x).logits, model(input_ids=x).logits)


# --------------------------------------------------------------------------- the stage


def lm_distill_args(teacher, out, *extra):
    # No --dataset: the teacher's (Hamlet, 64-token blocks) is read from its manifest.
    return ["distill", "--teacher", str(teacher), "--batch-size", "16", "--lr", "0.003", "--precision", "fp32", "--threads", "1", "--no-progress",
            "--checkpoint-every", "0", "--out", str(out), *extra]


def test_distill_lm_with_the_topk_cache_writes_report_and_baseline(tiny_lm, tmp_path):
    from compress.eval import EvalConfig, evaluate

    out = tmp_path / "student"
    assert main(lm_distill_args(tiny_lm, out, "--student", "layers=1", "--max-steps", "10", "--top-k", "16")) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["task"] == "causal-lm" and m["student"]["teacher_layers"] == [0]
    cache = m["teacher_cache"]
    # k ids and log-probs (2 + 2 bytes), the rest (4), and the default 32 tail draws (2 + 2 each).
    assert cache["k"] == 16 and cache["tail_samples"] == 32 and cache["seconds"] > 0
    assert cache["bytes_on_disk"] == cache["positions"] * (16 * 4 + 4 + 32 * 4)
    assert m["teacher_forward_calls"]["training"] == 0  # the epochs read the cache, never the teacher
    assert [r["name"] for r in m["comparison"]] == ["teacher", "student (KD)", "student (no KD)"]
    assert m["baseline"]["steps"] == m["metrics"]["steps"] == 10
    assert m["baseline"]["test"]["perplexity"] != m["metrics"]["test"]["perplexity"]
    report = (out / "distill_report.md").read_text()
    assert "top-16 cache + 32 tail draws" in report and "MB on disk" in report and "student (no KD)" in report
    assert not Path(str(out) + ".work").exists()  # the cache lived in the work directory only
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert any("forward_kl" in r for r in log if r["event"] == "train")
    again = evaluate(EvalConfig(model=str(out), split="test", dataset=str(hamlet_path()), max_length=64,
                                threads=1))
    assert again["perplexity"] == pytest.approx(m["metrics"]["test"]["perplexity"], rel=1e-4)


def test_distill_lm_teacher_online_and_pruned_llama_spec(tiny_lm, tmp_path):
    out = tmp_path / "online"
    assert main(lm_distill_args(tiny_lm, out, "--student", "layers=1", "--max-steps", "4", "--teacher-online",
                                "--losses", "forward_kl:0.5,jsd:0.5,hidden", "--no-baseline")) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["teacher_cache"] is None and m["teacher_forward_calls"]["training"] == 4
    assert m["distillation"]["divergences"] == {"forward_kl": 0.5, "jsd": 0.5} and m["baseline"] is None

    out = tmp_path / "llama"
    assert main(lm_distill_args(tiny_lm, out, "--student", "llama:layers=1,hidden=64,heads=4,kv_heads=2",
                                "--prune-heads", "2", "--prune-ffn", "96", "--max-steps", "3", "--no-baseline",
                                "--losses", "reverse_kl")) == 0
    m = json.loads((out / "manifest.json").read_text())
    cfg = json.loads((out / "config.json").read_text())
    assert m["heads"]["kv_heads_after"] == 1 and cfg["num_attention_heads"] == 2 and cfg["num_key_value_heads"] == 1
    assert cfg["intermediate_size"] == 96 and cfg["head_dim"] == 16


def test_picked_log_softmax_has_autograds_values_and_gradients():
    from compress.tasks.lm_kd import bucket_log_probs, picked_log_softmax

    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 5, 40, generator=g, dtype=torch.float64, requires_grad=True)
    idx = torch.randint(0, 40, (3, 5, 6), generator=g)
    assert torch.autograd.gradcheck(picked_log_softmax, (z, idx))
    got = picked_log_softmax(z, idx)
    assert torch.allclose(got, torch.log_softmax(z, -1).gather(-1, idx))
    # The buckets: k ids then the rest, summing to one; the target picked in the same pass.
    ids = torch.argsort(torch.randn(3, 5, 40, generator=g), -1)[..., :6]
    target = torch.randint(0, 40, (3, 5), generator=g)
    zf = z.detach().float()
    buckets, target_lp, _ = bucket_log_probs(zf, ids, 1.0, target)
    full = torch.log_softmax(zf, -1)
    assert torch.allclose(buckets.exp().sum(-1), torch.ones(3, 5), atol=1e-5)
    assert torch.allclose(buckets[..., :-1], full.gather(-1, ids), atol=1e-6)
    assert torch.allclose(target_lp, full.gather(-1, target.unsqueeze(-1))[..., 0], atol=1e-6)
    at_t2, _, _ = bucket_log_probs(zf, ids, 2.0)
    assert torch.allclose(at_t2[..., :-1], torch.log_softmax(zf / 2, -1).gather(-1, ids), atol=1e-6)
    # Every id in the buckets: the rest is ~0 (to float32's log-sum-exp, ~1e-6 of the mass), not nan.
    everything, _, _ = bucket_log_probs(zf, torch.argsort(zf, -1), 1.0)
    assert torch.isfinite(everything).all() and float(everything[..., -1].exp().max()) < 2e-6


def test_tail_draws_make_the_cached_forward_kl_unbiased(tmp_path):
    """Top-k buckets alone under-count forward KL; with draws from the teacher's tail the cached
    estimate matches the full-vocabulary loss (here to 3 %, with 512 draws over 97 ids)."""
    from compress.tasks.lm_kd import LMDistillLoss, LMDistillSettings, TopKTargets

    teacher, student = random_lm("gpt2", layers=2, seed=0), random_lm("gpt2", layers=1, seed=3)
    blocks = ids(batch=4, length=10).numpy()
    batch = {"input_ids": torch.from_numpy(blocks), "labels": torch.from_numpy(blocks), "index": torch.arange(4)}
    settings = LMDistillSettings(divergences={"forward_kl": 1.0}, temperature=1.0, alpha=1.0)
    build = dict(k=5, temperature=1.0, batch_size=4, device="cpu", precision="fp32")
    buckets = TopKTargets.build(teacher, blocks, directory=tmp_path / "b", **build)
    tailed = TopKTargets.build(teacher, blocks, directory=tmp_path / "t", tail_samples=512, seed=0, **build)
    assert tailed.tail_samples == 512 and tailed.tail_ids.shape == (4, 10, 512)
    assert tailed.bytes_on_disk == buckets.bytes_on_disk + 4 * 10 * 512 * 4
    top = set(map(tuple, np.stack([tailed.ids[..., j] for j in range(5)], -1).reshape(-1, 5)))
    assert all(int(t) not in row for row, draws in zip(tailed.ids.reshape(-1, 5), tailed.tail_ids.reshape(-1, 512))
               for t in draws[:20]) and top
    with torch.no_grad():
        online = float(LMDistillLoss(teacher, None, settings)(student, batch)[0])
        bucket = float(LMDistillLoss(teacher, buckets, settings)(student, batch)[0])
        sampled = float(LMDistillLoss(teacher, tailed, settings)(student, batch)[0])
    assert bucket < 0.9 * online
    assert sampled == pytest.approx(online, rel=0.03)
    # The same seed draws the same ids; the cache key holds the draws.
    again = TopKTargets.build(teacher, blocks, directory=tmp_path / "t2", tail_samples=512, seed=0, **build)
    assert np.array_equal(again.tail_ids, tailed.tail_ids) and again.meta["key"]["tail_samples"] == 512


def test_fast_kernels_swap_gelu_new_for_the_same_function_and_put_it_back():
    from transformers.activations import NewGELUActivation

    from compress.anatomy import fast_kernels

    model = random_lm("gpt2", layers=2, seed=1).eval()
    x = ids(batch=2, length=12)
    with torch.no_grad():
        before = model(input_ids=x).logits
        with fast_kernels(model, None):
            assert not any(isinstance(m, NewGELUActivation) for m in model.modules())
            during = model(input_ids=x).logits
    assert all(isinstance(block.mlp.act, NewGELUActivation) for block in model.transformer.h)
    assert torch.allclose(before, during, atol=1e-5) and not torch.equal(before, torch.zeros_like(before))


def test_picked_log_softmax_reads_bf16_logits_and_gives_bf16_gradients():
    from compress.tasks import lm_kd

    g = torch.Generator().manual_seed(0)
    z32 = torch.randn(150, 300, generator=g)  # more rows than one block (_ROWS), not a multiple of it
    idx = torch.randint(0, 300, (150, 7), generator=g)
    z = z32.bfloat16().requires_grad_()
    got = lm_kd.picked_log_softmax(z, idx, 2.0)
    assert got.dtype == torch.float32
    ref_z = z.detach().float().requires_grad_()
    ref = torch.log_softmax(ref_z / 2.0, -1).gather(-1, idx)
    assert torch.allclose(got, ref, atol=1e-5)
    weights = torch.randn(150, 7, generator=g)
    (got * weights).sum().backward()
    (ref * weights).sum().backward()
    assert z.grad.dtype == torch.bfloat16
    assert torch.allclose(z.grad.float(), ref_z.grad, atol=2e-2 * float(ref_z.grad.abs().max()))
