"""Teacher-labelled augmented text for distillation.

A two-layer student learns little more from 10k sentences seen six times; it learns more from
perturbed copies of them labelled by the teacher's soft targets (Tang et al., 2019, "Distilling
Task-Specific Knowledge from BERT into Simple Neural Networks"; TinyBERT's augmentation is the
same idea with a language model proposing the words). The perturbations are theirs, without the
part-of-speech tagger this toolkit does not have offline:

- each word, with probability `p_mask`, becomes the tokenizer's mask token;
- each other word, with probability `p_replace`, becomes a word drawn from the training text
  (by frequency: the unigram distribution of the corpus);
- then, with probability `p_ngram`, only a random span of 1 to 5 words is kept.

Copies that come out identical to their source are drawn again (up to a few tries), because the
teacher's label on them adds nothing. The hard label of a copy is the teacher's argmax (set by the
caller once the teacher has scored it), so no copy is trained toward a label it may no longer
carry: "not bad at all" cut to "bad" is labelled by the teacher, not by the review.
"""

from __future__ import annotations

import numpy as np

P_MASK, P_REPLACE, P_NGRAM, MAX_NGRAM = 0.1, 0.1, 0.25, 5


def augment_texts(texts: list[str], copies: int, *, seed: int, mask_token: str | None, p_mask: float = P_MASK,
                  p_replace: float = P_REPLACE, p_ngram: float = P_NGRAM) -> tuple[list[str], np.ndarray]:
    """`copies` perturbed versions of every text.

    Returns:
        (new texts, source index of each new text), copy-major: all first copies, then all second
        copies, so a run with fewer copies is a prefix of a run with more.
    """
    rng = np.random.default_rng([seed, 8])
    words = [t.split() for t in texts]
    corpus = [w for ws in words for w in ws]
    out, source = [], []
    for _ in range(copies):
        for i, ws in enumerate(words):
            new = ws
            for _try in range(4):
                new = _perturb(ws, rng, corpus, mask_token, p_mask, p_replace, p_ngram)
                if new != ws:
                    break
            out.append(" ".join(new))
            source.append(i)
    return out, np.asarray(source, dtype=np.int64)


def _perturb(ws: list[str], rng, corpus: list[str], mask_token: str | None, p_mask: float, p_replace: float,
             p_ngram: float) -> list[str]:
    if not ws:
        return ws
    new = []
    for w in ws:
        r = rng.random()
        if mask_token is not None and r < p_mask:
            new.append(mask_token)
        elif r < p_mask + p_replace and corpus:
            new.append(corpus[rng.integers(len(corpus))])
        else:
            new.append(w)
    if len(new) > 1 and rng.random() < p_ngram:
        n = int(rng.integers(1, min(MAX_NGRAM, len(new)) + 1))
        start = int(rng.integers(0, len(new) - n + 1))
        new = new[start:start + n]
    return new
