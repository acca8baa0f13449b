"""Captioned MNIST of mixed sizes and durations, made by code (no text encoder, no download).

Each record is one embedded MNIST digit (32x32, background -1) on a canvas of one of several latent
sizes and frame counts, with a caption made of fixed random "word" embeddings: <bos> "a" <digit>
<canvas> <place>. The embeddings are fixed by `embed_seed` (not the training seed), so they play
the part of a frozen text encoder's output: the text-to-image issue swaps in real MiniLM captions.
Captions have different lengths (the canvas word is absent on square canvases) and are padded to
`cap_len` with a mask; the empty caption is <bos> alone (REFERENCE.md: the null caption is the
encoder's output of "", not zeros).

Record i uses digit i of the MNIST split and canvas `shapes[i % len(shapes)]`; on a wide or tall
canvas the digit sits at one of three places (i // len(shapes) mod 3) that the caption names.
"""

from __future__ import annotations

import numpy as np

from flagdit_jax.data import mnist
from flagdit_jax.data.words import WordCaptions

# (T, H, W): square, wide, tall, and a two-frame clip; 4 shapes with 3 token lengths at patch 4.
DEFAULT_SHAPES = ((1, 32, 32), (1, 32, 48), (1, 48, 32), (2, 32, 32))
_WORDS = ("a", *[f"digit_{d}" for d in range(10)], "wide", "tall", "clip", "left", "middle", "right",
          "top", "bottom")


class CaptionedMnistSource:
    """`source[i]` -> {'frames' [T, H, W, 1] float32 in [-1, 1], 'cap_feats' [cap_len, cap_dim],
    'cap_mask' [cap_len] bool, 'label' int32}; `frame_shapes()` -> [N, 3]; `null_caption()`."""

    def __init__(self, split: str = "train", *, cap_dim: int = 32, cap_len: int = 8,
                 shapes=DEFAULT_SHAPES, embed_seed: int = 0):
        shapes = tuple(tuple(int(v) for v in s) for s in shapes)
        if not shapes or any(len(s) != 3 or min(s) <= 0 for s in shapes):
            raise ValueError(f"shapes must be (T, H, W) triples of positive ints, got {shapes}")
        if any(h < mnist.IMAGE_SIZE or w < mnist.IMAGE_SIZE for _, h, w in shapes):
            raise ValueError(f"canvas sizes must be at least {mnist.IMAGE_SIZE}x{mnist.IMAGE_SIZE}, got {shapes}")
        if cap_len < 5 or cap_dim <= 0:
            raise ValueError(f"cap_len={cap_len} must be >= 5 (the longest caption) and cap_dim={cap_dim} positive")
        self.split, self.shapes, self.cap_len, self.cap_dim = split, shapes, cap_len, cap_dim
        self.images, self.labels = mnist.load_split(split)
        self.captions = WordCaptions(_WORDS, cap_dim=cap_dim, cap_len=cap_len, embed_seed=embed_seed)
        self.words = self.captions.table

    def __len__(self) -> int:
        return len(self.labels)

    def frame_shapes(self) -> np.ndarray:
        return np.array([self.shapes[i % len(self.shapes)] for i in range(len(self))], np.int64)

    def null_caption(self) -> dict[str, np.ndarray]:
        return self.captions.null()

    def layout(self, index: int) -> tuple[tuple[int, int, int], int]:
        """(T, H, W) of record `index` and the digit's place (0, 1, 2 along the long side)."""
        return self.shapes[index % len(self.shapes)], (index // len(self.shapes)) % 3

    def caption_words(self, index: int) -> list[str]:
        (t, h, w), place = self.layout(index)
        words = ["<bos>", "a", f"digit_{int(self.labels[index])}"]
        if w > h:
            words += ["wide", ("left", "middle", "right")[place]]
        elif h > w:
            words += ["tall", ("top", "middle", "bottom")[place]]
        elif t > 1:
            words += ["clip"]
        return words

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        (t, h, w), place = self.layout(index)
        s = mnist.IMAGE_SIZE
        y0 = (h - s) * place // 2 if h > w else (h - s) // 2
        x0 = (w - s) * place // 2 if w > h else (w - s) // 2
        frames = np.full((t, h, w, 1), -1.0, np.float32)
        frames[:, y0:y0 + s, x0:x0 + s] = self.images[index]
        feats, mask = self.captions.encode(self.caption_words(index))
        return {"frames": frames, "cap_feats": feats, "cap_mask": mask, "label": self.labels[index]}

    def __repr__(self) -> str:
        return f"CaptionedMnistSource(split={self.split!r}, n={len(self)}, shapes={self.shapes})"
