"""Captions made of fixed random word embeddings: the embedded modalities' stand-in for a frozen
text encoder (no download, no encoder at training or sampling time).

Each word of a closed vocabulary gets one fixed N(0, 1) vector drawn from `embed_seed` (not the
training seed), so a caption is a fixed sequence of token features, as a frozen encoder's output
would be. Captions are padded to `cap_len` with a mask; the empty caption is <bos> alone
(REFERENCE.md: the null caption is the encoder's output of "", not zeros).
"""

from __future__ import annotations

import numpy as np


class WordCaptions:
    """`encode(words) -> (feats [cap_len, cap_dim] float32, mask [cap_len] bool)`; `null()` the empty caption."""

    def __init__(self, vocabulary, *, cap_dim: int, cap_len: int, embed_seed: int = 0):
        vocab = ("<bos>",) + tuple(w for w in vocabulary if w != "<bos>")
        if len(set(vocab)) != len(vocab):
            raise ValueError(f"vocabulary has repeated words: {sorted(w for w in vocab if vocab.count(w) > 1)}")
        if cap_dim <= 0 or cap_len < 1:
            raise ValueError(f"cap_dim={cap_dim} and cap_len={cap_len} must be positive")
        self.cap_dim, self.cap_len, self.vocabulary = int(cap_dim), int(cap_len), vocab
        rng = np.random.default_rng(embed_seed)
        self.table = {w: rng.standard_normal(cap_dim).astype(np.float32) for w in vocab}

    def encode(self, words) -> tuple[np.ndarray, np.ndarray]:
        words = list(words)
        unknown = [w for w in words if w not in self.table]
        if unknown:
            raise ValueError(f"words {unknown} are not in the vocabulary {self.vocabulary}")
        if not words or len(words) > self.cap_len:
            raise ValueError(f"a caption needs 1..{self.cap_len} words (cap_len), got {len(words)}: {words}")
        feats = np.zeros((self.cap_len, self.cap_dim), np.float32)
        feats[: len(words)] = np.stack([self.table[w] for w in words])
        return feats, np.arange(self.cap_len) < len(words)

    def null(self) -> dict[str, np.ndarray]:
        feats, mask = self.encode(["<bos>"])
        return {"cap_feats": feats, "cap_mask": mask}


class WordCaptionEncoder:
    """A text encoder over fixed word embeddings (`WordCaptions`), for `flagdit encode`:
    `encoder(texts: list[str]) -> (feats [B, cap_len, cap_dim] float32, mask [B, cap_len] bool)`.
    A text is its words split on spaces, after an implicit <bos>; "" is <bos> alone (the null caption)."""

    name = "word_embeddings"

    def __init__(self, captions):
        self.captions = captions
        self.max_length = int(captions.cap_len)

    def __call__(self, texts) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise ValueError(f"texts={texts!r}; expected a list of str")
        pairs = [self.captions.encode(["<bos>", *t.split()]) for t in texts]
        if not pairs:
            raise ValueError("texts=[]; expected at least one caption")
        return np.stack([f for f, _ in pairs]), np.stack([m for _, m in pairs])
