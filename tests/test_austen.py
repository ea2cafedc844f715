"""The built-in `austen` corpus: reading R's lazy-load database, the chapter split, and the
message when the corpus is not installed."""

import bz2
import lzma
import struct
import zlib

import pytest

from compress import austen
from compress.errors import UserError

TITLES = [
    "Sense & Sensibility",
    "Pride & Prejudice",
    "Mansfield Park",
    "Emma",
    "Northanger Abbey",
    "Persuasion",
]
# (train, validation, test) chapters per book, as the module docstring documents.
CHAPTERS = {
    "Sense & Sensibility": (44, 3, 3),
    "Pride & Prejudice": (55, 3, 3),
    "Mansfield Park": (44, 2, 2),
    "Emma": (49, 3, 3),
    "Northanger Abbey": (27, 2, 2),
    "Persuasion": (22, 1, 1),
}
CHARACTERS = {"train": 3_606_856, "validation": 234_105, "test": 164_339}


def _installed() -> bool:
    try:
        austen.austen_dir()
    except UserError:
        return False
    return True


needs_corpus = pytest.mark.skipif(
    not _installed(), reason="the austen corpus is not installed (bash scripts/setup.sh)"
)


@needs_corpus
def test_six_books_in_publication_order():
    books = austen.load_austen_books()
    assert list(books) == TITLES
    chapters = [len(austen.book_chapters(lines)) for lines in books.values()]
    assert chapters == [50, 61, 48, 55, 31, 24]
    assert books["Pride & Prejudice"][6] == "Chapter 1"
    assert books["Pride & Prejudice"][9].startswith("It is a truth universally acknowledged")


@needs_corpus
def test_split_counts_match_the_docstring():
    splits = austen.austen_splits()
    assert {name: len(docs) for name, docs in splits.items()} == {
        "train": 241,
        "validation": 14,
        "test": 14,
    }
    assert {name: sum(map(len, docs)) for name, docs in splits.items()} == CHARACTERS


@needs_corpus
def test_every_book_in_every_split_and_splits_disjoint():
    splits = austen.austen_splits()
    title_of = {
        text: title
        for title, lines in austen.load_austen_books().items()
        for text in austen.book_chapters(lines)
    }
    assert len(title_of) == 269  # no two chapters have the same text
    for i, name in enumerate(("train", "validation", "test")):
        per_book = {title: 0 for title in TITLES}
        for text in splits[name]:
            per_book[title_of[text]] += 1
        assert per_book == {title: counts[i] for title, counts in CHAPTERS.items()}
    train, validation, test = (set(splits[name]) for name in ("train", "validation", "test"))
    assert not train & validation and not train & test and not validation & test
    assert len(train | validation | test) == 269


@needs_corpus
def test_split_is_deterministic():
    first = austen.austen_splits()
    austen._splits.cache_clear()
    austen._load.cache_clear()
    assert austen.austen_splits() == first


@needs_corpus
def test_documents_are_chapters_without_front_or_back_matter():
    docs = austen.austen_splits()["train"]
    assert all(austen.CHAPTER_HEADING.match(doc.split("\n", 1)[0]) for doc in docs)
    joined = "\n".join(docs)
    assert "\n\n\n" not in joined
    assert "A NOTE ON THE TEXT" not in joined and "VOLUME II" not in joined
    assert "By Jane Austen" not in joined


def test_book_chapters_rules():
    lines = ["EMMA", "", "By Jane Austen", "", "VOLUME I", "", "CHAPTER I", "", "",
             "First  line", "wrapped.", "", "", "", "Second para.", "", "VOLUME II", "",
             "Chapter 1.", "Text.", "", "", "THE END", ""]
    assert austen.book_chapters(lines) == [
        "CHAPTER I\nFirst line wrapped.\nSecond para.",
        "Chapter 1.\nText.",
    ]
    assert austen.book_chapters(["no headings here"]) == []


@pytest.mark.parametrize(
    "compressed, encode",
    [
        (1, zlib.compress),
        (2, lambda raw: b"2" + bz2.compress(raw)),
        (3, lambda raw: b"Z" + lzma.compress(raw)),
        (3, lambda raw: b"1" + zlib.compress(raw)),
        (3, lambda raw: b"0" + raw),
    ],
)
def test_record_decompression_follows_r(compressed, encode):
    raw = b"X\n\x00\x00\x00\x03" + bytes(range(256)) * 20
    record = struct.pack(">I", len(raw)) + encode(raw)
    assert austen._decompress_record(record, compressed, "x") == raw


def test_unknown_record_type_is_an_error():
    with pytest.raises(ValueError, match="type byte"):
        austen._decompress_record(struct.pack(">I", 1) + b"Q!", 3, "x")


def test_explicit_dir_without_the_files_names_it(tmp_path, monkeypatch):
    monkeypatch.setenv(austen.ENV_VAR, str(tmp_path))
    with pytest.raises(UserError) as caught:
        austen.load_austen_books()
    message = str(caught.value)
    assert f"{austen.ENV_VAR}={tmp_path}" in message
    assert "\n" not in message
    for hint in ("bash scripts/setup.sh", "apt-get download r-cran-janeaustenr", "dpkg -x",
                 "--dataset path/to/file.txt", "directory of .txt files"):
        assert hint in message


def test_not_installed_anywhere(tmp_path, monkeypatch):
    monkeypatch.delenv(austen.ENV_VAR, raising=False)
    monkeypatch.setattr(austen.sys, "prefix", str(tmp_path / "venv"))
    monkeypatch.setattr(austen, "SYSTEM_DIR", tmp_path / "site-library" / "janeaustenr")
    with pytest.raises(UserError, match="corpus 'austen' is not installed") as caught:
        austen.austen_splits()
    assert str(tmp_path / "venv" / "share" / "compress" / "janeaustenr") in str(caught.value)
