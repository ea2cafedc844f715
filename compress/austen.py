"""The built-in plain-text corpus `austen`: six Jane Austen novels for causal-LM training.

The novels come from Debian's `r-cran-janeaustenr` (public domain texts, about 4 MB), which
`scripts/setup.sh` unpacks into `<venv>/share/compress/janeaustenr`. They are stored in R's
lazy-load format, which this module reads without R:

- `data/Rdata.rdx` is a gzip-compressed R serialization of a list with `variables` (object
  name -> [offset, length] in the .rdb file), `references` and `compressed`;
- each record of `data/Rdata.rdb` is a 4-byte big-endian uncompressed length followed by a
  compressed R serialization. How it is compressed follows R's `lazyLoadDBfetch`: with
  `compressed` TRUE/1 the rest is a zlib stream; with 2 or 3 a type byte comes first
  ('1' zlib, '2' bzip2, 'Z' xz, '0' stored).

PyPI `rdata` parses each serialization; every novel is one character vector of lines.

The split is by chapter (`austen_splits`), counted on janeaustenr 1.0.0 (Debian 1.0.0-1).
Characters are of the documents (newlines included), lines are lines of the documents (one
per paragraph, and the heading):

| split      | chapters | characters | lines |
|------------|---------:|-----------:|------:|
| train      |      241 |  3,606,856 | 9,154 |
| validation |       14 |    234,105 |   662 |
| test       |       14 |    164,339 |   454 |

Chapters per book (train / validation / test): Sense & Sensibility 44/3/3, Pride & Prejudice
55/3/3, Mansfield Park 44/2/2, Emma 49/3/3, Northanger Abbey 27/2/2, Persuasion 22/1/1.

6 books, 269 chapters in all. A chapter starts at a heading line matching `CHAPTER_HEADING`
("CHAPTER I", "CHAPTER 12", "Chapter 3", optionally with a trailing dot); the six novels use
only these forms. Dropped: what precedes the first heading (title, author, date; in Northanger
Abbey also the author's 12-line advertisement), Emma's "VOLUME I/II/III" lines, and the back
matter from a "THE END" / "FINIS" / "A NOTE ON THE TEXT" line after the last heading (the last
is an editor's note in Northanger Abbey). Each document is one chapter: its heading, then
one line per paragraph (the printed line breaks inside a paragraph are joined with a space,
and runs of spaces become one), paragraphs separated by "\\n".

Within each book, chapters are sorted by sha256("<title>|<chapter number in the book, from 1>")
(the position, not the heading's numeral: Emma restarts at I in each volume), and the first
5 % of them, rounded half up and at least 1, go to validation, the next as many to test, the
rest to train: every book is in every split, and no random-number generator is involved.
Within a split, documents are in book order, then chapter order.
"""

from __future__ import annotations

import bz2
import functools
import gzip
import hashlib
import lzma
import os
import re
import struct
import sys
import warnings
import zlib
from pathlib import Path

from compress.errors import UserError

ENV_VAR = "COMPRESS_AUSTEN_DIR"
SYSTEM_DIR = Path("/usr/lib/R/site-library/janeaustenr")

# R object name -> title, in publication order (the order janeaustenr's austen_books() uses).
TITLES = {
    "sensesensibility": "Sense & Sensibility",
    "prideprejudice": "Pride & Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}

CHAPTER_HEADING = re.compile(r"^\s*chapter\s+([0-9]+|[ivxlc]+)\.?\s*$", re.IGNORECASE)
VOLUME_HEADING = re.compile(r"^\s*volume\s+[ivx]+\.?\s*$", re.IGNORECASE)
# The back matter starts at the first of these lines after the last chapter heading.
BACK_MATTER = re.compile(r"^\s*(the end|finis|a note on the text)\.?\s*$", re.IGNORECASE)

VALIDATION_FRACTION = 0.05
TEST_FRACTION = 0.05


def _default_dir() -> Path:
    return Path(sys.prefix) / "share" / "compress" / "janeaustenr"


def _has_files(directory: Path) -> bool:
    return all((directory / "data" / name).is_file() for name in ("Rdata.rdx", "Rdata.rdb"))


def _not_installed(where: str) -> UserError:
    return UserError(
        f"The built-in corpus 'austen' is not installed ({where}). On a Debian/Ubuntu machine "
        "with apt, `bash scripts/setup.sh` installs it; by hand: `apt-get download "
        "r-cran-janeaustenr && dpkg -x r-cran-janeaustenr_*.deb DIR`, then set "
        f"{ENV_VAR}=DIR/usr/lib/R/site-library/janeaustenr. Or pass your own text instead: "
        "`--dataset path/to/file.txt` or `--dataset` a directory of .txt files."
    )


def austen_dir() -> Path:
    """Find the unpacked `janeaustenr` R package (the folder holding `data/Rdata.rdx|rdb`).

    Looks at `$COMPRESS_AUSTEN_DIR` (if set, it must hold the files: a wrong explicit path is an
    error, not a reason to look elsewhere), then `<sys.prefix>/share/compress/janeaustenr`
    (where `scripts/setup.sh` puts it), then the system R library `/usr/lib/R/site-library`.

    Returns:
        The package folder.

    Raises:
        UserError: the corpus is in none of these places.
    """
    explicit = os.environ.get(ENV_VAR)
    if explicit:
        directory = Path(explicit).expanduser()
        if _has_files(directory):
            return directory
        raise _not_installed(f"{ENV_VAR}={explicit} has no data/Rdata.rdx and data/Rdata.rdb")
    for directory in (_default_dir(), SYSTEM_DIR):
        if _has_files(directory):
            return directory
    raise _not_installed(f"looked in {_default_dir()} and {SYSTEM_DIR}")


def _parse_serialization(raw: bytes):
    import rdata  # imported here: only the LM corpus needs it

    with warnings.catch_warnings():
        # rdata warns when a buffer has no RDS/RDA header to sniff; these never have one.
        warnings.simplefilter("ignore", UserWarning)
        parsed = rdata.parser.parse_data(raw, extension=".rds")
    return rdata.conversion.convert(parsed)


def _decompress_record(record: bytes, compressed: int, name: str) -> bytes:
    """Undo R's `R_decompress1/2/3` (serialize.c) for one lazy-load record."""
    if not compressed:
        return record
    (length,) = struct.unpack(">I", record[:4])
    if compressed == 1:
        out = zlib.decompress(record[4:])
    else:
        kind, body = record[4:5], record[5:]
        if kind == b"1":
            out = zlib.decompress(body)
        elif kind == b"2":
            out = bz2.decompress(body)
        elif kind == b"Z":
            out = lzma.decompress(body)
        elif kind == b"0":
            out = body
        else:
            raise ValueError(f"austen: record {name!r} has unknown compression type byte {kind!r}")
    if len(out) != length:
        raise ValueError(
            f"austen: record {name!r} decompressed to {len(out)} bytes, its header says {length}"
        )
    return out


@functools.lru_cache(maxsize=4)
def _load(directory: Path) -> dict[str, tuple[str, ...]]:
    data = directory / "data"
    index = _parse_serialization(gzip.decompress((data / "Rdata.rdx").read_bytes()))
    compressed = int(index["compressed"][0]) if "compressed" in index else 1
    blob = (data / "Rdata.rdb").read_bytes()
    by_name: dict[str, tuple[str, ...]] = {}
    for name, (offset, length) in index["variables"].items():
        record = blob[int(offset) : int(offset) + int(length)]
        lines = _parse_serialization(_decompress_record(record, compressed, str(name)))
        # NA lines (none in 1.0.0) read as None; an empty line is what they stand for.
        by_name[str(name)] = tuple("" if line is None else str(line) for line in lines)
    known = [n for n in TITLES if n in by_name]
    others = sorted(n for n in by_name if n not in TITLES)
    return {TITLES.get(n, n): by_name[n] for n in known + others}


def load_austen_books() -> dict[str, list[str]]:
    """Read the six novels from the lazy-load database, without R.

    Returns:
        Title ("Pride & Prejudice", ...) -> the novel's lines as printed (no trailing newlines,
        "" for a blank line), in publication order.

    Raises:
        UserError: the corpus is not installed (see `austen_dir`).
    """
    return {title: list(lines) for title, lines in _load(austen_dir()).items()}


def book_chapters(lines: list[str]) -> list[str]:
    """Cut one novel into chapter documents: the heading, then one line per paragraph.

    Args:
        lines: the novel's lines.

    Returns:
        One string per chapter; front matter, volume headings and back matter are dropped.
    """
    starts = [i for i, line in enumerate(lines) if CHAPTER_HEADING.match(line)]
    if not starts:
        return []
    end = len(lines)
    for i in range(starts[-1] + 1, len(lines)):
        if BACK_MATTER.match(lines[i]):
            end = i
            break
    documents = []
    for start, stop in zip(starts, starts[1:] + [end]):
        # The printed line breaks inside a paragraph are the typesetter's, not the author's:
        # a paragraph becomes one line, so a model learns prose rather than a line width.
        paragraphs: list[list[str]] = [[]]
        for line in lines[start:stop]:
            line = line.strip()
            if VOLUME_HEADING.match(line):
                continue
            if line == "":
                if paragraphs[-1]:
                    paragraphs.append([])
                continue
            paragraphs[-1].append(line)
            if CHAPTER_HEADING.match(line):  # the heading is a paragraph of its own
                paragraphs.append([])
        # Runs of spaces (two after a full stop, in this edition) become one.
        documents.append("\n".join(" ".join(" ".join(p).split()) for p in paragraphs if p))
    return documents


def _round_half_up(x: float) -> int:
    return int(x + 0.5)


def split_key(title: str, chapter_number: int) -> str:
    """The sort key that places a chapter: sha256 of "<title>|<chapter number from 1>"."""
    return hashlib.sha256(f"{title}|{chapter_number}".encode()).hexdigest()


@functools.lru_cache(maxsize=4)
def _splits(directory: Path) -> dict[str, tuple[str, ...]]:
    out: dict[str, list[str]] = {"train": [], "validation": [], "test": []}
    for title, lines in _load(directory).items():
        chapters = book_chapters(list(lines))
        n = len(chapters)
        n_val = max(1, _round_half_up(n * VALIDATION_FRACTION))
        n_test = max(1, _round_half_up(n * TEST_FRACTION))
        if n < n_val + n_test + 1:
            raise ValueError(f"austen: {title!r} has only {n} chapters, too few to split")
        order = sorted(range(1, n + 1), key=lambda number: split_key(title, number))
        split_of = {number: "validation" for number in order[:n_val]}
        split_of.update({number: "test" for number in order[n_val : n_val + n_test]})
        for number, text in enumerate(chapters, start=1):
            out[split_of.get(number, "train")].append(text)
    return {name: tuple(docs) for name, docs in out.items()}


def austen_splits() -> dict[str, list[str]]:
    """The corpus split by chapter into train / validation / test (see the module docstring).

    Returns:
        {"train": [...], "validation": [...], "test": [...]}, each a list of chapter texts in
        book order, then chapter order.

    Raises:
        UserError: the corpus is not installed (see `austen_dir`).
    """
    return {name: list(docs) for name, docs in _splits(austen_dir()).items()}
