"""Vocabulary pruning: same logits on kept text, consistent tokenizer files, documented [UNK] fallback."""

import json

import pytest
import torch

from compress.distill.prune_vocab import choose_tokens, count_tokens, prune_vocab, unk_share

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def wordpiece_tokenizer(words: list[str]):
    """A fast BERT-style tokenizer over an explicit WordPiece vocabulary."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL + words)}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")


def tokens(tok, text):
    return tok.convert_ids_to_tokens(tok(text)["input_ids"])


def test_wordpiece_fallback_after_pruning(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    tok = wordpiece_tokenizer(["play", "playing", "sing", "##ing", "##s", "film", "good"])
    model = BertForSequenceClassification(BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=32))
    assert tokens(tok, "playing plays") == ["[CLS]", "playing", "play", "##s", "[SEP]"]
    train = [tok("play singing good")["input_ids"]]  # keeps play, sing, ##ing, good
    new, vocab = prune_vocab(model, tok, train, directory=tmp_path / "tok")
    assert [t for t in new.get_vocab()] and sorted(new.get_vocab(), key=new.get_vocab().get) == \
        SPECIAL + ["play", "sing", "##ing", "good"]
    # Kept text: the same pieces as before.
    assert tokens(new, "play singing good") == tokens(tok, "play singing good")
    # A dropped whole word is re-segmented greedily into the pieces that remain...
    assert tokens(new, "playing") == ["[CLS]", "play", "##ing", "[SEP]"]
    # ...and a word with a position no remaining piece covers (##s) becomes ONE [UNK], prefix included.
    assert tokens(new, "plays film") == ["[CLS]", "[UNK]", "[UNK]", "[SEP]"]
    assert model.get_input_embeddings().weight.shape == (len(new), 16)


def test_pruned_student_gives_identical_logits_on_kept_text(tiny_teacher, tmp_path):
    from compress.models import load_classifier

    model, tok = load_classifier(tiny_teacher)
    pruned, _ = load_classifier(tiny_teacher)
    texts = ["a gripping , beautifully acted film", "dull and far too long", "the best comedy of the year"]
    new_tok, vocab = prune_vocab(pruned, tok, [tok(t)["input_ids"] for t in texts], directory=tmp_path / "tok")
    assert vocab.new_size < 60 < len(tok)
    for text in texts:
        old_ids, new_ids = tok(text, return_tensors="pt"), new_tok(text, return_tensors="pt")
        assert torch.equal(torch.from_numpy(vocab.kept)[new_ids["input_ids"]], old_ids["input_ids"])
        with torch.no_grad():
            assert torch.equal(model.eval()(**old_ids).logits, pruned.eval()(**new_ids).logits)
    # Padded batches too: [PAD] moved to its new id and the embedding rows moved with it.
    with torch.no_grad():
        a = model(**tok(texts, padding=True, return_tensors="pt")).logits
        b = pruned(**new_tok(texts, padding=True, return_tensors="pt")).logits
    assert torch.allclose(a, b, atol=1e-6)

    # Saved and reloaded, the files agree with each other: tokenizer.json, vocab.txt, tokenizer_config.json.
    out = tmp_path / "student"
    pruned.save_pretrained(out)
    new_tok.save_pretrained(out)
    reloaded, re_tok = load_classifier(out)
    assert reloaded.config.vocab_size == len(re_tok) == vocab.new_size
    spec = json.loads((out / "tokenizer.json").read_text())
    assert spec["post_processor"]["special_tokens"]["[CLS]"]["ids"] == [re_tok.cls_token_id]
    assert re_tok(texts[0])["input_ids"] == new_tok(texts[0])["input_ids"]


def test_bert_tokenizer_files_stay_consistent(tmp_path):
    """A BertTokenizerFast also writes vocab.txt; the slow tokenizer reading it must agree."""
    from transformers import AutoTokenizer, BertTokenizer

    from compress.models import builtin_model_dir
    from compress.distill.prune_vocab import prune_tokenizer

    tok = AutoTokenizer.from_pretrained(str(builtin_model_dir("minilm-l6")))
    texts = ["a gripping, beautifully acted film", "dull and far too long"]
    vocab = choose_tokens(count_tokens([tok(t)["input_ids"] for t in texts], len(tok)), tok.all_special_ids)
    new = prune_tokenizer(tok, vocab, tmp_path / "tok")
    new.save_pretrained(tmp_path / "saved")
    re_tok = AutoTokenizer.from_pretrained(str(tmp_path / "saved"))
    lines = (tmp_path / "saved" / "vocab.txt").read_text().splitlines()
    assert len(lines) == len(re_tok) == vocab.new_size
    assert lines == sorted(re_tok.get_vocab(), key=re_tok.get_vocab().get)
    slow = BertTokenizer(str(tmp_path / "saved" / "vocab.txt"))
    for text in texts + ["an unseen word: magnificent"]:
        assert slow(text)["input_ids"] == re_tok(text)["input_ids"]
        assert [int(vocab.kept[i]) for i in re_tok(texts[0])["input_ids"]] == tok(texts[0])["input_ids"]
    cfg = json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text())
    assert cfg["added_tokens_decoder"][str(re_tok.pad_token_id)]["content"] == "[PAD]"
    assert re_tok.pad_token_id == 0 and re_tok.unk_token_id == 1


def test_min_count_and_unk_share():
    counts = count_tokens([[2, 7, 7, 9, 3], [2, 7, 3]], 12)
    assert counts[7] == 3 and counts[9] == 1
    assert list(choose_tokens(counts, [0, 1, 2, 3], min_count=1).kept) == [0, 1, 2, 3, 7, 9]
    assert list(choose_tokens(counts, [0, 1, 2, 3], min_count=2).kept) == [0, 1, 2, 3, 7]
    assert unk_share([[2, 1, 5, 3], [2, 3]], unk_id=1) == pytest.approx(1 / 6)
