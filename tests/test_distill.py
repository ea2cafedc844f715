"""Distillation on tiny models: student initialisation, losses, the teacher cache, the CLI."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from compress.cli import main
from compress.distill.losses import DistillLoss, disable_attention_dropout, layer_pairs, make_projections
from compress.distill.student import build_student, choose_layers, from_teacher_layers
from compress.errors import UserError


def random_classifier(layers=4, hidden=64, heads=4, vocab=1500, seed=0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=2 * hidden, num_labels=2, id2label={0: "negative", 1: "positive"},
                     label2id={"negative": 0, "positive": 1})
    return BertForSequenceClassification(cfg).eval()


@pytest.fixture(scope="module")
def tokenizer(tiny_teacher):
    from compress.models import load_tokenizer

    return load_tokenizer(tiny_teacher)


@pytest.fixture(scope="module")
def toy_batch(tokenizer):
    texts = ["a gripping , beautifully acted film", "dull and far too long", "the best comedy of the year",
             "a mess from start to finish", "warm , funny and wise", "nothing works here"] * 2
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "token_type_ids": enc["token_type_ids"], "labels": torch.tensor([1, 0, 1, 0, 1, 0] * 2),
            "index": torch.arange(len(texts))}


def test_evenly_spaced_and_explicit_layers():
    assert choose_layers("layers=2", 6) == [0, 3]
    assert choose_layers("layers=3", 6) == [0, 2, 4]
    assert choose_layers("layers=6", 6) == list(range(6))
    assert choose_layers("layers=0,5", 6) == [0, 5]
    for bad in ("layers=7", "layers=0,6", "layers=3,1", "layers=x"):
        with pytest.raises(UserError):
            choose_layers(bad, 6)


def test_student_copies_exactly_the_chosen_layers(tokenizer):
    teacher = random_classifier(layers=4)
    student = from_teacher_layers(teacher, tokenizer, [1, 3]).model
    t, s = teacher.state_dict(), student.state_dict()
    assert student.config.num_hidden_layers == 2
    assert len(s) == len(t) - 2 * sum(k.startswith("bert.encoder.layer.0.") for k in t)
    for key, value in s.items():
        source = key.replace("encoder.layer.0.", "encoder.layer.1.") if ".layer.0." in key else \
            key.replace("encoder.layer.1.", "encoder.layer.3.")
        assert torch.equal(value, t[source]), key
    # Embeddings, pooler and classifier come along unchanged.
    for key in ("bert.embeddings.word_embeddings.weight", "bert.pooler.dense.weight", "classifier.weight"):
        assert torch.equal(s[key], t[key])


def test_size_spec_student_shares_the_teacher_tokenizer(tokenizer):
    teacher = random_classifier(layers=2)
    student = build_student("bert:layers=1,hidden=32,heads=2,ff=64", teacher, tokenizer)
    assert student.kind == "spec" and student.tokenizer is tokenizer
    assert student.model.config.vocab_size == len(tokenizer)
    assert student.model.config.id2label == teacher.config.id2label
    with pytest.raises(UserError, match="not divisible"):
        build_student("bert:layers=1,hidden=30,heads=4", teacher, tokenizer)


def test_layer_maps():
    assert layer_pairs("uniform", 2, 6) == [(1, 3), (2, 6)]
    assert layer_pairs("uniform", 3, 6) == [(1, 2), (2, 4), (3, 6)]
    assert layer_pairs("last", 2, 6) == [(1, 5), (2, 6)]
    assert layer_pairs("1:1,2:6", 2, 6) == [(1, 1), (2, 6)]
    for bad in ("3:1", "1:7", "1-2", ""):
        with pytest.raises(UserError):
            layer_pairs(bad, 2, 6)


@pytest.mark.parametrize("name", ["logits", "hidden", "attention"])
def test_each_loss_decreases(name, toy_batch):
    teacher = random_classifier(layers=4, seed=1)
    # A narrower student exercises the learned projection of the hidden-state loss.
    student = random_classifier(layers=2, hidden=64 if name == "attention" else 32, seed=2).train()
    if name == "attention":
        # Random weights attend almost uniformly; sharpen the teacher so there is something to learn.
        with torch.no_grad():
            for layer in teacher.bert.encoder.layer:
                layer.attention.self.query.weight.mul_(4)
                layer.attention.self.key.weight.mul_(4)
    with torch.no_grad():
        cache = teacher(**{k: toy_batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}).logits.numpy()
    pairs = layer_pairs("uniform", 2, 4)
    proj = make_projections(pairs, student.config.hidden_size, 64) if name == "hidden" else None
    if name == "attention":
        assert disable_attention_dropout(student) == 2
    loss_fn = DistillLoss(teacher, cache, losses=[name], temperature=2.0, alpha=1.0, hidden_weight=1.0,
                          attention_weight=1.0, pairs=pairs, projections=proj)
    params = list(student.parameters()) + (list(proj.parameters()) if proj is not None else [])
    opt = torch.optim.Adam(params, lr=3e-3)
    key = {"logits": "kd"}.get(name, name)
    values = []
    for _ in range(8):
        loss, parts = loss_fn(student, toy_batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        values.append(parts[key])
    assert values[-1] < 0.7 * values[0], values


def test_soft_target_loss_is_zero_when_student_equals_teacher(toy_batch):
    teacher = random_classifier(layers=2, seed=3)
    inputs = {k: toy_batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    with torch.no_grad():
        cache = teacher(**inputs).logits.numpy()
    loss_fn = DistillLoss(teacher, cache, losses=["logits"], temperature=4.0, alpha=1.0, hidden_weight=0,
                          attention_weight=0, pairs=[(1, 1)])
    with torch.no_grad():
        loss, parts = loss_fn(teacher, toy_batch)
    assert abs(parts["kd"]) < 1e-5


def distill_args(teacher, out, *extra):
    return ["distill", "--teacher", str(teacher), "--out", str(out), "--max-examples", "96", "--batch-size", "32",
            "--precision", "fp32", "--threads", "2", "--no-progress", "--lr", "1e-3", *extra]


def test_distill_logit_kd_uses_the_cache_and_writes_the_report(tiny_teacher, tmp_path):
    from compress.models import load_classifier

    out = tmp_path / "student"
    assert main(distill_args(tiny_teacher, out, "--student", "layers=1", "--losses", "logits", "--epochs", "2",
                             "--prune-vocab")) == 0
    m = json.loads((out / "manifest.json").read_text())
    # One length-sorted pass caches the logits (96 examples, 64 per batch); epochs never run the teacher.
    assert m["teacher_forward_calls"] == {"cache": 2, "training": 0}
    from compress.hardware import resolve_precision

    # The cache pass runs at --teacher-precision auto, whatever the student's --precision fp32.
    assert m["teacher_cache"]["precision"] == resolve_precision("auto", "cpu") and m["teacher_cache"]["examples"] == 96
    assert [r["name"] for r in m["comparison"]] == ["teacher", "student (KD)", "student (no KD)"]
    assert m["comparison"][1]["parameters"] < m["comparison"][0]["parameters"]
    assert m["metrics"]["steps"] == 6 and m["baseline"]["steps"] == 6
    v = m["vocab"]
    assert v["tokens_after"] < v["tokens_before"] and v["size_bytes_after"] < v["size_bytes_before"]
    assert v["embedding_params_after"] == v["tokens_after"] * 64
    assert "| student (no KD) |" in (out / "distill_report.md").read_text()
    model, tok = load_classifier(out)
    assert model.config.vocab_size == len(tok) == v["tokens_after"]
    assert model.config.num_hidden_layers == 1


def test_augmented_copies_are_perturbed_deterministic_and_prefix_stable():
    from compress.distill.augment import augment_texts

    texts = ["a gripping , beautifully acted film about grief", "dull and far too long for its own good"] * 20
    a, src = augment_texts(texts, 2, seed=0, mask_token="[MASK]")
    assert len(a) == 80 and src.tolist() == list(range(40)) * 2
    assert a == augment_texts(texts, 2, seed=0, mask_token="[MASK]")[0]
    assert augment_texts(texts, 1, seed=0, mask_token="[MASK]")[0] == a[:40]  # fewer copies: a prefix
    assert sum(t != texts[i] for t, i in zip(a, src)) >= 76  # identical copies are drawn again
    assert any("[MASK]" in t for t in a)
    assert any(len(t.split()) <= 5 for t in a)  # n-gram spans
    vocab = {w for t in texts for w in t.split()} | {"[MASK]"}
    assert all(set(t.split()) <= vocab for t in a)  # replacements come from the training words
    assert augment_texts(texts, 1, seed=0, mask_token=None)[0] != a[:40]
    assert not any("[MASK]" in t for t in augment_texts(texts, 1, seed=0, mask_token=None)[0])


def test_distill_with_augmentation_labels_copies_by_the_teacher(tiny_teacher, tmp_path):
    out = tmp_path / "student"
    assert main(distill_args(tiny_teacher, out, "--student", "layers=1", "--losses", "logits,hidden", "--augment", "2",
                             "--epochs", "1")) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["data"]["augmented_train_examples"] == 3 * 96
    assert m["metrics"]["steps"] == 9  # 288 examples in batches of 32
    assert m["baseline"]["steps"] == 9  # 3 epochs over the 96 originals: as many steps, no teacher labels
    assert m["teacher_forward_calls"] == {"cache": 5, "training": 0}  # 288 examples: five cache batches of 64


@pytest.mark.parametrize("losses, cache_gb, calls", [
    ("logits,hidden", "4", {"cache": 2, "training": 0}),  # one pass (2 batches) caches logits and hidden states
    ("hidden,attention", "0", {"cache": 0, "training": 2}),  # nothing cached: the teacher runs every step
])
def test_teacher_calls_per_loss(losses, cache_gb, calls, tiny_teacher, tmp_path):
    out = tmp_path / "student"
    assert main(distill_args(tiny_teacher, out, "--student", "bert:layers=1,hidden=32,heads=4,ff=64",
                             "--losses", losses, "--hidden-cache-gb", cache_gb, "--max-steps", "2",
                             "--no-baseline")) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["teacher_forward_calls"] == calls
    assert m["baseline"] is None and len(m["comparison"]) == 2


def test_cached_hidden_states_match_the_live_teacher(tiny_teacher):
    from compress.data import DataConfig, encode, load_data
    from compress.distill.losses import TeacherCache
    from compress.models import load_classifier

    teacher, tok = load_classifier(tiny_teacher)
    split = encode(load_data(DataConfig(max_examples=40)), tok, 128, splits=("train",))["train"]
    cache = TeacherCache(teacher, split, tok.pad_token_id, layers=[1, 2], batch_size=16, device="cpu",
                         precision="fp32")
    from compress.data import collate

    idx = np.array([3, 17, 5])
    b = collate(split, idx, tok.pad_token_id)
    with torch.no_grad():
        out = teacher.eval()(**{k: b[k] for k in ("input_ids", "attention_mask", "token_type_ids")},
                             output_hidden_states=True)
    live, live_logits = out.hidden_states[2], out.logits
    cached = cache.hidden(2, idx, b["input_ids"].shape[1], "cpu").float()
    assert np.allclose(cache.logits[idx], live_logits.numpy(), atol=1e-5)
    mask = b["attention_mask"].unsqueeze(-1).bool()
    assert torch.allclose(cached.masked_select(mask), live.masked_select(mask), atol=0.05, rtol=0.01)
    assert float(cached.masked_select(~mask).abs().sum()) == 0.0


@pytest.mark.parametrize("case", ["missing", "not_classifier", "labels", "too_many_layers", "heads", "index",
                                  "temperature", "loss", "vocab", "layer_map"])
def test_bad_input_exits_2_without_output(case, tiny_teacher, tiny_csv_dir, tmp_path, capsys):
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    from compress.models import train_wordpiece

    teacher, extra = tiny_teacher, []
    if case == "missing":
        teacher = tmp_path / "nope"
    elif case == "not_classifier":
        teacher = tmp_path / "bare"
        BertModel(BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=32)).save_pretrained(teacher)
    elif case == "labels":
        extra = ["--dataset", str(tiny_csv_dir), "--text-column", "review", "--label-column", "sentiment"]
    elif case == "vocab":
        other = tmp_path / "other"
        tok = train_wordpiece(["some other words entirely"] * 10, vocab_size=100)
        BertForSequenceClassification(BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1,
                                                 num_attention_heads=2, intermediate_size=32)).save_pretrained(other)
        tok.save_pretrained(other)
        extra = ["--student", str(other)]
    extra += {"too_many_layers": ["--student", "layers=3"], "heads": ["--student", "bert:layers=1,hidden=30,heads=4"],
              "index": ["--student", "layers=0,2"], "temperature": ["--temperature", "0"],
              "loss": ["--losses", "logits,dark_knowledge"], "layer_map": ["--layer-map", "1:9"]}.get(case, [])
    out = tmp_path / "out"
    assert main(distill_args(teacher, out, *extra)) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err
    assert not out.exists() and not Path(str(out) + ".work").exists()


def test_prune_ffn_removes_exactly_the_units_it_drops():
    from compress.distill.prune_ffn import prune_ffn

    model = random_classifier()  # 4 layers, hidden 64, feed-forward 128
    dead = {}
    with torch.no_grad():
        for i, layer in enumerate(model.bert.encoder.layer):
            dead[i] = torch.randperm(128, generator=torch.Generator().manual_seed(i))[:80]
            layer.output.dense.weight[:, dead[i]] = 0  # these units feed nothing forward
    ids = torch.randint(5, 1500, (3, 12))
    before = model(input_ids=ids).logits
    stats = prune_ffn(model, 48)
    assert stats["width_before"] == 128 and stats["width_after"] == 48 == model.config.intermediate_size
    assert stats["kept_score_share"] == [1.0] * 4  # every unit with weight was kept
    assert stats["params_before"] - stats["params_after"] == 4 * 80 * (64 + 1 + 64)
    for layer in model.bert.encoder.layer:
        assert layer.intermediate.dense.weight.shape == (48, 64) and layer.output.dense.weight.shape == (64, 48)
    torch.testing.assert_close(model(input_ids=ids).logits, before, atol=1e-6, rtol=0)
    with pytest.raises(UserError, match="between 1 and"):
        prune_ffn(model, 48)


def test_distill_with_prune_ffn_saves_a_narrower_student_that_exports(tiny_teacher, tmp_path):
    from compress.export import ExportConfig, export
    from compress.models import load_classifier

    out = tmp_path / "student"
    assert main(distill_args(tiny_teacher, out, "--student", "layers=1", "--prune-ffn", "24", "--losses", "logits,hidden",
                             "--epochs", "1", "--no-baseline")) == 0
    m = json.loads((out / "manifest.json").read_text())
    teacher_width = json.loads((tiny_teacher / "config.json").read_text())["intermediate_size"]
    assert m["ffn"]["width_before"] == teacher_width and m["ffn"]["width_after"] == 24
    model, _ = load_classifier(out)
    assert model.config.intermediate_size == 24
    assert model.bert.encoder.layer[0].intermediate.dense.weight.shape[0] == 24
    onnx_dir = export(ExportConfig(model=str(out), out=str(tmp_path / "onnx"), optimize="transformer",
                                   max_examples=96, parity_examples=16, threads=1))
    assert json.loads((onnx_dir / "manifest.json").read_text())["parity"]["optimized"]["label_disagreements"] == 0


def test_prune_ffn_ranks_units_by_what_they_do_on_data():
    from compress.distill.prune_ffn import prune_ffn

    def model_with_silent_units():
        model = random_classifier()  # 4 layers, hidden 64, feed-forward 128
        with torch.no_grad():
            for layer in model.bert.encoder.layer:
                silent = torch.arange(0, 128, 2)  # 64 units with big weights that never fire
                layer.intermediate.dense.weight[silent] *= 10
                layer.intermediate.dense.bias[silent] = -1000.0  # GELU(-1000) = 0
        return model

    ids = torch.randint(5, 1500, (4, 12), generator=torch.Generator().manual_seed(0))  # not the global stream
    batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]
    by_data, by_weight = model_with_silent_units(), model_with_silent_units()
    before = by_data.bert(input_ids=ids).last_hidden_state  # unit-scale, unlike this model's tiny logits
    stats = prune_ffn(by_data, 64, batches)
    assert stats["ranking"] == "mean |activation| x ||W_out||"
    assert stats["kept_score_share"] == [1.0] * 4  # the silent units had no activation to lose
    torch.testing.assert_close(by_data.bert(input_ids=ids).last_hidden_state, before, atol=1e-5, rtol=0)
    # Weight norms alone keep the big silent units and drop working ones.
    assert prune_ffn(by_weight, 64)["ranking"] == "||W_in|| x ||W_out||"
    # (0.097 with these ids: thousands of times the data ranking's error, which is below 1e-5)
    assert (by_weight.bert(input_ids=ids).last_hidden_state - before).abs().max() > 0.05


def test_too_wide_prune_ffn_exits_2_and_leaves_nothing(tiny_teacher, tmp_path, capsys):
    out = tmp_path / "student"
    width = json.loads((tiny_teacher / "config.json").read_text())["intermediate_size"]
    assert main(distill_args(tiny_teacher, out, "--student", "layers=1", "--prune-ffn", str(width),
                             "--no-baseline")) == 2
    assert f"--prune-ffn {width} must be between 1 and" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # neither the output nor its work directory


def test_prune_heads_removes_exactly_the_heads_it_drops(tmp_path):
    from transformers import BertForSequenceClassification

    from compress.distill.prune_heads import prune_heads

    model = random_classifier()  # 4 layers, hidden 64, 4 heads of 16
    dead = {i: [i % 4] for i in range(4)}  # a different head per layer
    with torch.no_grad():
        for i, layer in enumerate(model.bert.encoder.layer):
            for h in dead[i]:
                layer.attention.output.dense.weight[:, h * 16:(h + 1) * 16] = 0  # its output goes nowhere
    ids = torch.randint(5, 1500, (3, 12))
    before = model(input_ids=ids).logits
    stats = prune_heads(model, 3)  # weight norms: the dead head scores 0 in every layer
    assert stats["pruned"] == dead and stats["kept_score_share"] == [1.0] * 4
    assert stats["params_before"] - stats["params_after"] == 4 * (3 * (16 * 64 + 16) + 64 * 16)
    assert model.bert.encoder.layer[0].attention.self.query.weight.shape == (48, 64)
    torch.testing.assert_close(model(input_ids=ids).logits, before, atol=1e-6, rtol=0)
    # transformers rebuilds the narrower layers from config.pruned_heads.
    model.save_pretrained(tmp_path / "m")
    again = BertForSequenceClassification.from_pretrained(tmp_path / "m").eval()
    torch.testing.assert_close(again(input_ids=ids).logits, before, atol=1e-6, rtol=0)
    with pytest.raises(UserError, match="never pruned"):
        prune_heads(again, 2)
    with pytest.raises(UserError, match="between 1 and"):
        prune_heads(random_classifier(), 4)


def test_prune_heads_ranks_heads_by_their_output_on_data():
    from compress.distill.prune_heads import prune_heads

    def model_with_a_bias_only_head():
        model = random_classifier()
        with torch.no_grad():
            for layer in model.bert.encoder.layer:
                value, out = layer.attention.self.value, layer.attention.output.dense
                value.weight[16:32] = 0  # head 1 has no value weights: its output is its (large) bias
                value.bias[16:32] = 5.0
                out.weight[:, 0:16] *= 1e-3  # head 0 has weights but sends almost nothing forward
        return model

    ids = torch.randint(5, 1500, (4, 12), generator=torch.Generator().manual_seed(0))  # not the global stream
    batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]
    by_data, by_weight = model_with_a_bias_only_head(), model_with_a_bias_only_head()
    before = by_data.bert(input_ids=ids).last_hidden_state
    stats = prune_heads(by_data, 3, batches)
    assert stats["ranking"] == "mean ||c_h W_O[:, h]||" and stats["pruned"] == {i: [0] for i in range(4)}
    assert (by_data.bert(input_ids=ids).last_hidden_state - before).abs().max() < 0.05
    # Weight norms alone see no value weights in head 1 and drop the head that matters.
    assert prune_heads(by_weight, 3)["pruned"] == {i: [1] for i in range(4)}
    assert (by_weight.bert(input_ids=ids).last_hidden_state - before).abs().max() > 0.5


def test_distill_with_prune_heads_saves_a_student_that_exports(tiny_teacher, tmp_path):
    from compress.bench.flops import architecture
    from compress.export import ExportConfig, export
    from compress.models import load_classifier

    out = tmp_path / "student"
    assert main(distill_args(tiny_teacher, out, "--student", "layers=2", "--prune-heads", "2", "--prune-ffn", "64",
                             "--losses", "logits,hidden", "--epochs", "1", "--no-baseline")) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["heads"]["heads_before"] == 4 and m["heads"]["heads_after"] == 2 and m["ffn"]["width_after"] == 64
    model, _ = load_classifier(out)
    assert all(len(v) == 2 for v in model.config.pruned_heads.values())
    assert model.bert.encoder.layer[1].attention.self.key.weight.shape == (32, 64)
    assert architecture(model.config)["attention"] == 32
    onnx_dir = export(ExportConfig(model=str(out), out=str(tmp_path / "onnx"), optimize="transformer",
                                   max_examples=96, parity_examples=16, threads=1))
    e = json.loads((onnx_dir / "manifest.json").read_text())
    assert e["fused_operators"]["after"].get("Attention") == 2  # the fusion found the narrower heads
    assert e["parity"]["optimized"]["label_disagreements"] == 0


@pytest.mark.parametrize("extra, message", [
    (["--prune-heads", "4"], "--prune-heads 4 must be between 1 and"),
    (["--prune-heads", "2", "--losses", "logits,attention"], "cannot train a student with pruned heads"),
])
def test_bad_prune_heads_exits_2_and_leaves_nothing(tiny_teacher, tmp_path, capsys, extra, message):
    out = tmp_path / "student"
    assert main(distill_args(tiny_teacher, out, "--student", "layers=1", "--no-baseline", *extra)) == 2
    assert message in " ".join(capsys.readouterr().err.split())
    assert list(tmp_path.iterdir()) == []


def test_a_bf16_teacher_pass_caches_what_an_fp32_one_does_to_bf16_rounding(tiny_teacher):
    from compress.data import DataConfig, encode, load_data
    from compress.distill.losses import TeacherCache, soft_target_kl
    from compress.models import load_classifier

    teacher, tok = load_classifier(tiny_teacher)
    split = encode(load_data(DataConfig(max_examples=64)), tok, 128, splits=("train",))["train"]
    caches = {p: TeacherCache(teacher, split, tok.pad_token_id, layers=[2], batch_size=16, device="cpu", precision=p)
              for p in ("fp32", "bf16")}
    a, b = (torch.from_numpy(caches[p].logits) for p in ("fp32", "bf16"))
    assert not torch.equal(a, b)  # the bf16 pass really ran in bf16
    assert float(soft_target_kl(b, a, 2.0)) < 1e-3  # the soft targets agree to far below a student's KL
    assert float((a.argmax(-1) == b.argmax(-1)).float().mean()) > 0.95
    h32, h16 = caches["fp32"].states[2].float(), caches["bf16"].states[2].float()
    assert float((h32 - h16).norm() / h32.norm()) < 0.02  # both stored in bf16; the pass adds little
