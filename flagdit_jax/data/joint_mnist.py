"""Paired MNIST digits and text tokens for the joint model (`models/joint.py`), made by code.

Each record is an embedded MNIST digit (32x32, background -1) and its text: two tokens, the
digit's word and a stroke word ("thin" / "thick": the digit's ink mass against the median of its
class in the training split, so the stroke word carries one bit the label does not). The words
are fixed random N(0, 1) vectors (`data/words.py`): the text modality is continuous, as
UniDiffuser's compressed CLIP text embedding is.

Text is read back from generated tokens by the nearest word of each slot (`decode_text`); the stroke
of a generated image by the same ink rule (`stroke_of`), so image -> text and joint samples can be
checked against an independent reading of the image.
"""

from __future__ import annotations

import numpy as np

from flagdit_jax.data import mnist
from flagdit_jax.data.words import WordCaptions

DIGITS = tuple(f"digit_{d}" for d in range(10))
STROKES = ("thin", "thick")


def ink(images: np.ndarray) -> np.ndarray:
    """`[N, ..., H, W, C]` in [-1, 1] -> `[N]` ink mass (sum of (x + 1) / 2)."""
    x = np.asarray(images, np.float32)
    return ((x.reshape(len(x), -1) + 1.0) / 2.0).sum(1)


class JointMnistSource:
    """`source[i]` -> {'frames' [1, 32, 32, 1] float32 in [-1, 1], 'text' [2, text_dim] float32,
    'label' int32, 'stroke' int32 (0 thin, 1 thick)}."""

    def __init__(self, split: str = "train", *, text_dim: int = 16, embed_seed: int = 0):
        self.split, self.text_dim = split, int(text_dim)
        self.images, self.labels = mnist.load_split(split)
        self.words = WordCaptions(DIGITS + STROKES, cap_dim=text_dim, cap_len=2, embed_seed=embed_seed)
        train_images, train_labels = (self.images, self.labels) if split == "train" else mnist.load_split("train")
        mass = ink(train_images)
        # Per-class median ink of the training split: the thin / thick threshold of every split.
        self.thresholds = np.array([np.median(mass[train_labels == d]) for d in range(10)], np.float32)
        self.strokes = self.stroke_of(self.images, self.labels)

    def __len__(self) -> int:
        return len(self.labels)

    def frame_shapes(self) -> np.ndarray:
        return np.tile(np.array([[1, mnist.IMAGE_SIZE, mnist.IMAGE_SIZE]], np.int64), (len(self), 1))

    def stroke_of(self, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """`[N]` 1 where the digit's ink exceeds its class's training median (thick), else 0."""
        return (ink(images) > self.thresholds[np.asarray(labels)]).astype(np.int32)

    def text(self, labels, strokes) -> np.ndarray:
        """`[N, 2, text_dim]` text tokens of (digit, stroke) pairs."""
        return np.stack([self.words.encode([DIGITS[int(d)], STROKES[int(s)]])[0]
                         for d, s in zip(np.asarray(labels), np.asarray(strokes))])

    def decode_text(self, text: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`[N, 2, text_dim]` -> (digit [N], stroke [N]): the nearest word of each slot."""
        text = np.asarray(text, np.float32)
        if text.ndim != 3 or text.shape[1:] != (2, self.text_dim):
            raise ValueError(f"text must be [N, 2, {self.text_dim}], got {text.shape}")
        out = []
        for slot, vocab in enumerate((DIGITS, STROKES)):
            table = np.stack([self.words.table[w] for w in vocab])  # [V, D]
            d = ((text[:, slot, None, :] - table[None]) ** 2).sum(-1)
            out.append(d.argmin(1).astype(np.int32))
        return out[0], out[1]

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        label, stroke = int(self.labels[index]), int(self.strokes[index])
        return {"frames": self.images[index][None], "text": self.text([label], [stroke])[0],
                "label": np.int32(label), "stroke": np.int32(stroke)}

    def __repr__(self) -> str:
        return f"JointMnistSource(split={self.split!r}, n={len(self)}, text_dim={self.text_dim})"
