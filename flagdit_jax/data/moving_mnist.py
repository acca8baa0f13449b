"""Captioned moving MNIST, made by code: the embedded text-to-video data (issue 14).

Each record is one embedded MNIST digit (the 32x32 padded image shrunk to `digit_size` px with
PIL's antialiased bilinear filter) sliding across a `canvas` x `canvas` background of -1 in a
straight line, a whole number of pixels per frame. The caption says which digit, where it goes and
how fast, as fixed random word embeddings (`data/words.py`):

    ["<bos>", "digit_7", "moves", "left", "fast"]

Record i uses digit `i % n_digits`; its frame count (one of `frames`), direction, speed and start
are drawn from `np.random.default_rng((seed, i))`, so the data is a pure function of its options.
The start is chosen so that the digit's whole box stays on the canvas for `max_frames` frames (not
only the record's own T): the same motion can be sampled longer than it was trained (duration
extrapolation) without leaving the canvas. `clip(i, num_frames)` renders record i at any length up
to `max_frames`, which is how the evaluator gets real clips at extrapolated lengths.

With `raw=True` a record carries its caption as text ("digit_7 moves left fast") instead of
embeddings: the raw form `flagdit encode` reads (`data/encoded.py`, frame by frame through the VAE),
with `caption_encoder()` as its text encoder (the same fixed word embeddings), so the latent-space
run (`configs/t2v/mnist.py:latent`) conditions on exactly the features the pixel run does.
"""

from __future__ import annotations

import pathlib

import numpy as np

from flagdit_jax.data import mnist
from flagdit_jax.data.words import WordCaptionEncoder, WordCaptions

# (dy, dx) per direction word, in pixels per unit speed; rows grow downwards.
DIRECTIONS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}
DIRECTION_WORDS = tuple(DIRECTIONS)
SPEED_WORDS = ("slow", "fast")
_WORDS = (*[f"digit_{d}" for d in range(10)], "moves", *DIRECTION_WORDS, *SPEED_WORDS)


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name}={value!r}; expected a positive int")
    return int(value)


def shrink(image32: np.ndarray, side: int) -> np.ndarray:
    """`[32, 32, 1]` (or `[32, 32]`) digit in [-1, 1] -> `[side, side]` (PIL antialiased bilinear, no overshoot)."""
    from PIL import Image

    x = np.asarray(image32, np.float32)
    x = x[..., 0] if x.ndim == 3 else x
    if side == x.shape[0]:
        return x.copy()
    img = Image.fromarray(np.ascontiguousarray(x), mode="F")
    return np.asarray(img.resize((side, side), Image.Resampling.BILINEAR), np.float32).clip(-1.0, 1.0)


def render(digit: np.ndarray, num_frames: int, start: tuple[int, int], step: tuple[int, int],
           canvas: int) -> np.ndarray:
    """Frames `[T, canvas, canvas, 1]` of `digit [s, s]` whose top-left corner is at `start + k * step`
    (pixels, (y, x)) in frame k; raises ValueError if any frame would put the box off the canvas."""
    d = np.asarray(digit, np.float32)
    s = d.shape[0]
    if d.shape != (s, s):
        raise ValueError(f"digit must be a square [s, s] image, got shape {d.shape}")
    out = np.full((num_frames, canvas, canvas, 1), -1.0, np.float32)
    for k in range(num_frames):
        y, x = start[0] + k * step[0], start[1] + k * step[1]
        if not (0 <= y <= canvas - s and 0 <= x <= canvas - s):
            raise ValueError(f"frame {k}: box at (y, x)=({y}, {x}) of side {s} leaves the {canvas}x{canvas} canvas")
        out[k, y:y + s, x:x + s, 0] = d
    return out


class MovingMnistSource:
    """`source[i]` -> {'frames' [T, canvas, canvas, 1] float32 in [-1, 1], 'cap_feats' [cap_len, cap_dim],
    'cap_mask' [cap_len] bool, 'label', 'direction' (index into DIRECTION_WORDS), 'speed' (index into
    SPEED_WORDS) int32}; `frame_shapes()` -> [N, 3] (T, H, W); `null_caption()`; `save_media`.

    Args:
      split: 'train' (4,500 digits) or 'eval' (500).
      frames: the frame counts records are drawn from (one per record).
      canvas, digit_size: canvas side and the digit's box side (pixels).
      speeds: pixels per frame of 'slow' and 'fast'.
      max_frames: the longest clip any record must be renderable at (>= max(frames)).
      repeats: each digit appears `repeats` times with independent motions; `len = repeats * n_digits`.
      cap_dim, cap_len, embed_seed: the caption embeddings (`WordCaptions`).
      seed: fixes every record's motion.
      raw: records carry 'caption' (the words after <bos>, as text) instead of 'cap_feats' / 'cap_mask'
        (the form `flagdit encode` reads; `caption_encoder()` embeds the text).
    """

    def __init__(self, split: str = "train", *, frames=(3, 4), canvas: int = 32, digit_size: int = 16,
                 speeds=(1, 3), max_frames: int = 6, repeats: int = 2, cap_dim: int = 32, cap_len: int = 8,
                 seed: int = 0, embed_seed: int = 0, raw: bool = False):
        frames = tuple(frames) if not isinstance(frames, (int, np.integer)) else (frames,)
        if not frames:
            raise ValueError("frames=(); expected at least one frame count")
        self.frames = tuple(_positive_int("frames entry", t) for t in frames)
        self.canvas, self.digit_size = _positive_int("canvas", canvas), _positive_int("digit_size", digit_size)
        self.max_frames, self.repeats = _positive_int("max_frames", max_frames), _positive_int("repeats", repeats)
        speeds = tuple(speeds)
        if len(speeds) != len(SPEED_WORDS) or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool)
                                                      and v > 0 for v in speeds) or speeds[0] >= speeds[1]:
            raise ValueError(f"speeds={speeds}; expected {len(SPEED_WORDS)} increasing positive ints (px per frame "
                             f"for {SPEED_WORDS})")
        self.speeds = tuple(int(v) for v in speeds)
        if self.max_frames < max(self.frames):
            raise ValueError(f"max_frames={max_frames} is below the longest training clip max(frames)={max(self.frames)}")
        room = self.canvas - self.digit_size
        if room < self.speeds[1] * (self.max_frames - 1):
            raise ValueError(f"a fast digit ({self.speeds[1]} px/frame) moves {self.speeds[1] * (self.max_frames - 1)} px "
                             f"in max_frames={self.max_frames} frames but canvas - digit_size = {room}; enlarge the "
                             "canvas, shrink the digit or lower speeds / max_frames")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
            raise ValueError(f"seed={seed!r}; expected an int in [0, 2**32)")
        if cap_len < 5:
            raise ValueError(f"cap_len={cap_len}; the captions have 5 words, expected cap_len >= 5")
        if not isinstance(raw, (bool, np.bool_)):
            raise ValueError(f"raw={raw!r}; expected a bool")
        self.split, self.seed, self.raw = split, int(seed), bool(raw)
        self.images, self.labels = mnist.load_split(split)
        self.captions = WordCaptions(_WORDS, cap_dim=cap_dim, cap_len=cap_len, embed_seed=embed_seed)

    def __len__(self) -> int:
        return self.repeats * len(self.labels)

    def _index(self, index) -> int:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} out of range [0, {len(self)})")
        return index

    def motion(self, index: int) -> dict:
        """Record `index`'s {'frames' T, 'direction', 'speed' (indices), 'start' (y, x), 'step' (dy, dx)}."""
        rng = np.random.default_rng((self.seed, self._index(index)))
        t = self.frames[int(rng.integers(len(self.frames)))]
        direction, speed = int(rng.integers(len(DIRECTION_WORDS))), int(rng.integers(len(SPEED_WORDS)))
        dy, dx = DIRECTIONS[DIRECTION_WORDS[direction]]
        v = self.speeds[speed]
        room, travel = self.canvas - self.digit_size, v * (self.max_frames - 1)
        across = int(rng.integers(room + 1))  # the other axis: anywhere
        along = int(rng.integers(room - travel + 1))  # leaves `travel` px ahead of the digit
        along = along if (dy + dx) > 0 else along + travel  # moving left / up: start from the far side
        start = (along, across) if dy else (across, along)
        return {"frames": t, "direction": direction, "speed": speed, "start": start, "step": (dy * v, dx * v)}

    def frame_shapes(self) -> np.ndarray:
        return np.array([(self.motion(i)["frames"], self.canvas, self.canvas) for i in range(len(self))], np.int64)

    def null_caption(self) -> dict[str, np.ndarray]:
        return self.captions.null()

    def caption_words(self, index: int) -> list[str]:
        m = self.motion(index)
        return ["<bos>", f"digit_{self.label(index)}", "moves", DIRECTION_WORDS[m["direction"]],
                SPEED_WORDS[m["speed"]]]

    def caption_text(self, index: int) -> str:
        """Record `index`'s caption as text, the words after <bos>: 'digit_7 moves left fast'."""
        return " ".join(self.caption_words(index)[1:])

    def caption_encoder(self) -> WordCaptionEncoder:
        """The text encoder of `caption_text`: this source's word embeddings (`words.WordCaptionEncoder`)."""
        return WordCaptionEncoder(self.captions)

    def label(self, index: int) -> int:
        return int(self.labels[self._index(index) % len(self.labels)])

    def clip(self, index: int, num_frames: int | None = None) -> np.ndarray:
        """Record `index`'s frames `[T, canvas, canvas, 1]`; `num_frames` (<= max_frames) overrides its T."""
        m = self.motion(index)
        t = m["frames"] if num_frames is None else _positive_int("num_frames", num_frames)
        if t > self.max_frames:
            raise ValueError(f"num_frames={t} exceeds max_frames={self.max_frames} (the digit would leave the canvas)")
        digit = shrink(self.images[index % len(self.labels)], self.digit_size)
        return render(digit, t, m["start"], m["step"], self.canvas)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = self._index(index)
        m = self.motion(index)
        out = {"frames": self.clip(index), "label": np.int32(self.label(index)),
               "direction": np.int32(m["direction"]), "speed": np.int32(m["speed"])}
        if self.raw:
            return {**out, "caption": self.caption_text(index)}
        feats, mask = self.captions.encode(self.caption_words(index))
        return {**out, "cap_feats": feats, "cap_mask": mask}

    @staticmethod
    def save_media(path_stem, frames, *, scale: int = 2, frame_ms: int = 250) -> list[pathlib.Path]:
        """Writes `frames [n, T, H, W, 1]` in [-1, 1] as one animated GIF `<path_stem>.gif`: the n clips
        side by side (2-px grey gaps), `scale`x nearest upsampling, `frame_ms` per frame, looping."""
        from PIL import Image

        x = np.asarray(frames, np.float32)
        if x.ndim != 5 or x.shape[-1] != 1:
            raise ValueError(f"frames must be [n, T, H, W, 1], got shape {x.shape}")
        n, t, h, w, _ = x.shape
        px = np.uint8(np.clip((x[..., 0] + 1.0) * 127.5, 0, 255).round())
        gap = 2
        strip = np.full((t, h, n * w + (n - 1) * gap), 128, np.uint8)
        for i in range(n):
            strip[:, :, i * (w + gap):i * (w + gap) + w] = px[i]
        strip = strip.repeat(scale, 1).repeat(scale, 2)
        images = [Image.fromarray(f, mode="L") for f in strip]
        path = pathlib.Path(f"{path_stem}.gif")
        path.parent.mkdir(parents=True, exist_ok=True)
        images[0].save(path, save_all=True, append_images=images[1:], duration=frame_ms, loop=0, optimize=False,
                       disposal=1)
        return [path]

    def __repr__(self) -> str:
        return (f"MovingMnistSource(split={self.split!r}, n={len(self)}, frames={self.frames}, canvas={self.canvas}, "
                f"digit_size={self.digit_size}, speeds={self.speeds}, max_frames={self.max_frames}, raw={self.raw})")

