"""The embedded text-to-image data: MNIST digits placed on canvases of three shapes, with captions.

No download: the digits are the embedded MNIST split (`mnist.load_split`). Every record is one
digit, small (16 px, resized with PIL) or large (28 px, as stored), on a background of -1 in one of
three canvases (pixels, H x W): square 32x32, wide 32x64, tall 64x32. Where it sits:

  square: large -> centre; small -> top left / top right / bottom left / bottom right / centre
  wide:   left / centre / right (both sizes, vertically centred)
  tall:   top / centre / bottom (both sizes, horizontally centred)

Non-centre places keep a `MARGIN` (2 px) from the edges. The caption says the digit (as a word or a
numeral), its size, its place and the canvas, in one of several phrasings (`TEMPLATES`). Record i
uses digit `i % n_digits`; its canvas, size, place and phrasing are drawn from
`np.random.default_rng((seed, i))`, so the data is a pure function of (split, seed, repeats).

The tables (`CANVASES`, `POSITIONS`, `SIZES`, `TEMPLATES`, ...) and `caption_for` / `box_for` are
public so that a sampler can ask for a layout and an evaluator can check where the digit is.

This is a raw source (pixels + text): `encoded.encode_dataset` runs the VAE and the text encoder over
it once; training reads the result through `encoded.EncodedSource`.
"""

from __future__ import annotations

import numpy as np

from flagdit_jax.data import mnist

CANVAS_NAMES = ("square", "wide", "tall")
CANVASES = ((32, 32), (32, 64), (64, 32))  # (H, W) pixels, indexed like CANVAS_NAMES
SIZE_WORDS = ("small", "large")
SIZES = (16, 28)  # digit box side in pixels, indexed like SIZE_WORDS
MARGIN = 2
# Per canvas: the place names (the 'position' index points into these) and each place's
# (vertical, horizontal) alignment: 0 start (top / left), 1 centre, 2 end (bottom / right).
POSITIONS = (("top left", "top right", "bottom left", "bottom right", "centre"),
             ("left", "centre", "right"),
             ("top", "centre", "bottom"))
_ALIGN = (((0, 0), (0, 2), (2, 0), (2, 2), (1, 1)),
          ((1, 0), (1, 1), (1, 2)),
          ((0, 1), (1, 1), (2, 1)))
# How each place is said in a caption.
PLACE_PHRASES = (("in the top left corner", "in the top right corner", "in the bottom left corner",
                  "in the bottom right corner", "in the centre"),
                 ("on the left", "in the centre", "on the right"),
                 ("at the top", "in the centre", "at the bottom"))
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# {word}: the digit as a word, {num}: as a numeral; {size}, {where}, {canvas}: the words above.
TEMPLATES = ("a {size} handwritten {word} {where} of a {canvas} canvas",
             "a {canvas} image with a {size} {num} {where}",
             "the digit {num}, {size}, {where}, on a {canvas} canvas",
             "a {size} number {word} written {where} of a {canvas} picture",
             "a {canvas} picture showing a {size} handwritten {num} {where}")


def _check_index(name: str, value, n: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value < n:
        raise ValueError(f"{name}={value!r}; expected an int in [0, {n})")
    return int(value)


def positions_for(size: int, canvas: int) -> tuple[int, ...]:
    """Position indices allowed for `size` (0 small, 1 large) on `canvas` (0 square, 1 wide, 2 tall):
    a large digit fills a square canvas, so only its centre (4) is allowed there."""
    size, canvas = _check_index("size", size, len(SIZES)), _check_index("canvas", canvas, len(CANVASES))
    return (POSITIONS[0].index("centre"),) if (canvas, size) == (0, 1) else tuple(range(len(POSITIONS[canvas])))


def layouts() -> list[tuple[int, int, int]]:
    """Every valid (size, position, canvas) triple (18)."""
    return [(s, p, c) for c in range(len(CANVASES)) for s in range(len(SIZES)) for p in positions_for(s, c)]


def _check_layout(size, position, canvas) -> tuple[int, int, int]:
    size, canvas = _check_index("size", size, len(SIZES)), _check_index("canvas", canvas, len(CANVASES))
    position = _check_index("position", position, len(POSITIONS[canvas]))
    if position not in positions_for(size, canvas):
        raise ValueError(f"position={position} ({POSITIONS[canvas][position]!r}) is not a place for a "
                         f"{SIZE_WORDS[size]} digit on a {CANVAS_NAMES[canvas]} canvas; "
                         f"expected one of {positions_for(size, canvas)}")
    return size, position, canvas


def box_for(size: int, position: int, canvas: int) -> tuple[int, int, int]:
    """Pixel box `(y0, x0, side)` of the digit for a layout (the digit covers [y0, y0+side) x [x0, x0+side))."""
    size, position, canvas = _check_layout(size, position, canvas)
    side, (h, w) = SIZES[size], CANVASES[canvas]

    def at(align: int, length: int) -> int:
        return (MARGIN, (length - side) // 2, length - MARGIN - side)[align]

    v, u = _ALIGN[canvas][position]
    return at(v, h), at(u, w), side


def caption_for(label: int, size: int, position: int, canvas: int, template: int = 0) -> str:
    """The caption of a layout in phrasing `template` (an index into `TEMPLATES`), e.g.
    `caption_for(7, 0, 0, 0, 0)` -> 'a small handwritten seven in the top left corner of a square canvas'."""
    label = _check_index("label", label, mnist.NUM_CLASSES)
    size, position, canvas = _check_layout(size, position, canvas)
    template = _check_index("template", template, len(TEMPLATES))
    return TEMPLATES[template].format(size=SIZE_WORDS[size], word=DIGIT_WORDS[label], num=str(label),
                                      where=PLACE_PHRASES[canvas][position], canvas=CANVAS_NAMES[canvas])


def resize_digit(digit28: np.ndarray, side: int) -> np.ndarray:
    """`[28, 28]` digit in [-1, 1] -> `[side, side]` with PIL's antialiased bilinear filter (no overshoot)."""
    from PIL import Image

    if side == digit28.shape[0]:
        return digit28
    img = Image.fromarray(np.ascontiguousarray(digit28, np.float32), mode="F")
    return np.asarray(img.resize((side, side), Image.Resampling.BILINEAR), np.float32).clip(-1.0, 1.0)


class MnistT2I:
    """Raw text-to-image MNIST: `source[i]` -> {'image' [H, W, 1] float32 in [-1, 1], 'caption' str,
    'label', 'size', 'position', 'canvas', 'template' int32, 'box' int32 [3] (y0, x0, side)}.

    Args:
      split: 'train' (4,500 digits) or 'eval' (500).
      seed: fixes every record's layout and phrasing.
      repeats: each digit appears `repeats` times (with independent layouts); `len = repeats * n_digits`.
    """

    def __init__(self, split: str = "train", *, seed: int = 0, repeats: int = 2):
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
            raise ValueError(f"seed={seed!r}; expected an int in [0, 2**32)")
        if isinstance(repeats, bool) or not isinstance(repeats, (int, np.integer)) or repeats < 1:
            raise ValueError(f"repeats={repeats!r}; expected an int >= 1")
        self.split, self.seed, self.repeats = split, int(seed), int(repeats)
        images, self.labels = mnist.load_split(split)
        pad = (mnist.IMAGE_SIZE - 28) // 2
        self.digits = images[:, pad:pad + 28, pad:pad + 28, 0]  # the 28x28 digits as MNIST ships them

    def __len__(self) -> int:
        return self.repeats * len(self.labels)

    def _index(self, index) -> int:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} out of range [0, {len(self)})")
        return index

    def layout(self, index: int) -> tuple[int, int, int, int]:
        """`(size, position, canvas, template)` of record `index` (canvas, then size, place, phrasing)."""
        rng = np.random.default_rng((self.seed, self._index(index)))
        canvas = int(rng.integers(len(CANVASES)))
        size = int(rng.integers(len(SIZES)))
        allowed = positions_for(size, canvas)
        position = allowed[int(rng.integers(len(allowed)))]
        return size, position, canvas, int(rng.integers(len(TEMPLATES)))

    def image_shapes(self) -> np.ndarray:
        """`[N, 2]` (H, W) pixels of every record, without drawing them."""
        return np.array([CANVASES[self.layout(i)[2]] for i in range(len(self))], np.int64)

    def __getitem__(self, index: int) -> dict:
        index = self._index(index)
        size, position, canvas, template = self.layout(index)
        digit = index % len(self.labels)
        label = int(self.labels[digit])
        y0, x0, side = box_for(size, position, canvas)
        image = np.full((*CANVASES[canvas], 1), -1.0, np.float32)
        image[y0:y0 + side, x0:x0 + side, 0] = resize_digit(self.digits[digit], side)
        return {"image": image, "caption": caption_for(label, size, position, canvas, template),
                "label": np.int32(label), "size": np.int32(size), "position": np.int32(position),
                "canvas": np.int32(canvas), "template": np.int32(template),
                "box": np.array([y0, x0, side], np.int32)}

    def __repr__(self) -> str:
        return f"MnistT2I(split={self.split!r}, seed={self.seed}, repeats={self.repeats}, n={len(self)})"
