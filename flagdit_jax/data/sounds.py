"""Text-to-audio spectrograms made by code (Lumina-T2Speech's setting in miniature: a spectrogram is a
one-frame, one-channel image, no VAE).

Each record is a short sound synthesised from its caption at 8 kHz -- a steady tone at a named pitch
("a low tone"), a rising or falling chirp, two / three / four beats, or a two-note chord -- turned
into a band-limited log-magnitude spectrogram (`flagdit_jax.audio`: 32 bins of 31.25 Hz, hop 16 ms)
in [-1, 1]: frames `[1, 32, W, 1]`, H = frequency (row 0 = 0 Hz), W = time. Durations vary in one
run (`widths`, e.g. 24 and 32 frames = 0.38 s and 0.51 s); the number of beats is spread over the
whole clip, and a chirp sweeps the whole clip, so a longer clip asks the same sound stretched.

Record i: sound class `i % len(CLASSES)`, width `widths[(i // len(CLASSES)) % len(widths)]`, and its
own random variations (amplitude, phase, onset and release, +-10 Hz pitch jitter, beat pitch and
timing, chirp end points) from a generator seeded by (split, i): deterministic per record, a
distribution over records. Captions are fixed random word embeddings (`data/words.py`).
"""

from __future__ import annotations

import pathlib
import zlib

import numpy as np

from flagdit_jax import audio
from flagdit_jax.data.words import WordCaptions

PITCHES = {"low": 250.0, "mid": 500.0, "high": 750.0}  # Hz: bins 8, 16, 24
NUMBERS = {"two": 2, "three": 3, "four": 4}
# (kind, parameter): tones at a pitch, chirps up / down, beats by count, chords by their two pitches.
CLASSES = (
    *[("tone", p) for p in PITCHES],
    ("chirp", "rising"), ("chirp", "falling"),
    *[("beats", n) for n in NUMBERS],
    ("chord", ("low", "mid")), ("chord", ("low", "high")), ("chord", ("mid", "high")),
)
_WORDS = ("a", "tone", "chirp", "beats", "chord", *PITCHES, "rising", "falling", *NUMBERS)
CHIRP_RANGE = (200.0, 800.0)  # Hz, end points before jitter
BEAT_PITCH = (300.0, 700.0)   # Hz, each clip's beats at one pitch drawn from this range (not named)
_SPLIT_SEEDS = {"train": 0, "eval": 1}


def caption_words(cls: tuple) -> list[str]:
    """The caption of a sound class, e.g. ('tone', 'low') -> ['<bos>', 'a', 'low', 'tone']."""
    kind, arg = cls
    if kind == "tone":
        return ["<bos>", "a", arg, "tone"]
    if kind == "chirp":
        return ["<bos>", "a", arg, "chirp"]
    if kind == "beats":
        return ["<bos>", arg, "beats"]
    if kind == "chord":
        return ["<bos>", "a", arg[0], arg[1], "chord"]
    raise ValueError(f"unknown sound class {cls!r}; expected one of {CLASSES}")


def _envelope(n: int, start: int, stop: int, fade: int) -> np.ndarray:
    """0 outside [start, stop), raised-cosine fades of `fade` samples at both ends."""
    env = np.zeros(n)
    env[start:stop] = 1.0
    f = min(fade, (stop - start) // 2)
    if f > 0:
        ramp = 0.5 - 0.5 * np.cos(np.pi * (np.arange(f) + 0.5) / f)
        env[start:start + f] *= ramp
        env[stop - f:stop] *= ramp[::-1]
    return env


def synthesise(cls: tuple, width: int, rng: np.random.Generator, *, sample_rate: int = audio.SAMPLE_RATE,
               hop: int = audio.HOP) -> np.ndarray:
    """The wave `[width * hop]` of one sound of class `cls` with random variations drawn from `rng`."""
    if cls not in CLASSES:
        raise ValueError(f"unknown sound class {cls!r}; expected one of {CLASSES}")
    if width < 8:
        raise ValueError(f"width={width} frames is too short for a sound (need >= 8)")
    n = width * hop
    t = np.arange(n) / sample_rate
    kind, arg = cls
    fade = int(0.01 * sample_rate)  # 10 ms: no click, no broadband onset
    jitter = lambda: rng.uniform(-10.0, 10.0)  # noqa: E731 - Hz, a third of a bin

    if kind in ("tone", "chord", "chirp"):
        start = int(rng.uniform(0.0, 0.08) * n)
        stop = n - int(rng.uniform(0.0, 0.08) * n)
        env = _envelope(n, start, stop, fade)
        if kind == "chirp":
            lo, hi = CHIRP_RANGE[0] + 2 * jitter(), CHIRP_RANGE[1] + 2 * jitter()
            f0, f1 = (lo, hi) if arg == "rising" else (hi, lo)
            # Linear sweep over the sounding part: instantaneous frequency f0 -> f1, phase its integral.
            frac = np.clip((np.arange(n) - start) / max(stop - start, 1), 0.0, 1.0)
            freq = f0 + (f1 - f0) * frac
            phase = 2 * np.pi * np.cumsum(freq) / sample_rate + rng.uniform(0, 2 * np.pi)
            return rng.uniform(0.4, 0.8) * env * np.sin(phase)
        names = (arg,) if kind == "tone" else arg
        amp = (0.4, 0.8) if kind == "tone" else (0.3, 0.5)
        wave = sum(rng.uniform(*amp) * np.sin(2 * np.pi * (PITCHES[p] + jitter()) * t + rng.uniform(0, 2 * np.pi))
                   for p in names)
        return env * wave
    # Beats: `count` bursts evenly spread over the clip, each ~35% of its slot, all at one pitch.
    count = NUMBERS[arg]
    slot = n / count
    freq = rng.uniform(*BEAT_PITCH)
    wave = np.zeros(n)
    carrier = np.sin(2 * np.pi * freq * t + rng.uniform(0, 2 * np.pi))
    for k in range(count):
        start = int((k + rng.uniform(0.1, 0.25)) * slot)
        stop = start + int(rng.uniform(0.3, 0.4) * slot)
        wave += rng.uniform(0.4, 0.8) * _envelope(n, start, min(stop, n), fade) * carrier
    return wave


def save_png(path, specs) -> pathlib.Path:
    """Spectrograms `[n, F, W]` in [-1, 1] side by side (low frequencies at the bottom, 4x enlarged,
    white gaps) as one grey PNG."""
    from PIL import Image

    specs = np.asarray(specs, np.float32)
    if specs.ndim != 3 or len(specs) == 0:
        raise ValueError(f"specs must be [n >= 1, F, W], got shape {specs.shape}")
    gap = np.ones((specs.shape[1], 1), np.float32)
    strip = np.concatenate([p for s in specs[:, ::-1] for p in (s, gap)][:-1], axis=1)
    img = Image.fromarray(np.uint8(np.clip((strip + 1) * 127.5, 0, 255)))
    img.resize((img.width * 4, img.height * 4), Image.NEAREST).save(path)
    return pathlib.Path(path)


class SoundSource:
    """`source[i]` -> {'frames' [1, n_bins, W, 1] float32 in [-1, 1], 'cap_feats' [cap_len, cap_dim],
    'cap_mask' [cap_len] bool, 'label' int32 (index in CLASSES)}; `frame_shapes()` -> [N, 3];
    `null_caption()`; `save_media(stem, frames)` -> WAVs (Griffin-Lim) and a spectrogram PNG."""

    def __init__(self, split: str = "train", *, size: int | None = None, widths=(24, 32), cap_dim: int = 32,
                 cap_len: int = 6, embed_seed: int = 0, n_bins: int = audio.N_BINS, griffin_lim_iters: int = 64):
        if split not in _SPLIT_SEEDS:
            raise ValueError(f"split={split!r}; expected one of {sorted(_SPLIT_SEEDS)}")
        widths = tuple(int(w) for w in widths)
        if not widths or any(w < 8 for w in widths):
            raise ValueError(f"widths must be time-frame counts >= 8, got {widths}")
        size = (4096 if split == "train" else 512) if size is None else int(size)
        if size < 1:
            raise ValueError(f"size={size} must be positive")
        if cap_len < 5:
            raise ValueError(f"cap_len={cap_len} must be >= 5 (the longest caption)")
        if not 0 < n_bins <= audio.N_FFT // 2 + 1:
            raise ValueError(f"n_bins={n_bins} must be in 1..{audio.N_FFT // 2 + 1}")
        self.split, self.size, self.widths, self.n_bins = split, size, widths, int(n_bins)
        self.griffin_lim_iters = int(griffin_lim_iters)
        self.captions = WordCaptions(_WORDS, cap_dim=cap_dim, cap_len=cap_len, embed_seed=embed_seed)

    def __len__(self) -> int:
        return self.size

    def layout(self, index: int) -> tuple[tuple, int]:
        """(sound class, width in frames) of record `index`."""
        return CLASSES[index % len(CLASSES)], self.widths[(index // len(CLASSES)) % len(self.widths)]

    def frame_shapes(self) -> np.ndarray:
        return np.array([(1, self.n_bins, self.layout(i)[1]) for i in range(len(self))], np.int64)

    def null_caption(self) -> dict[str, np.ndarray]:
        return self.captions.null()

    def wave(self, index: int, width: int | None = None) -> np.ndarray:
        """The synthesised wave of record `index` (at its own width, or `width` frames)."""
        cls, w = self.layout(index)
        seed = zlib.crc32(f"{self.split}/{index}".encode())
        return synthesise(cls, width or w, np.random.default_rng(seed))

    def render(self, index: int, width: int | None = None) -> np.ndarray:
        """Record `index`'s normalised spectrogram `[n_bins, W]` in [-1, 1] (optionally at another width)."""
        return audio.normalise(audio.spectrogram(self.wave(index, width), n_bins=self.n_bins))

    def condition(self, cls: tuple) -> dict[str, np.ndarray]:
        """The caption element {'cap_feats', 'cap_mask'} of a sound class (for `task.collate`)."""
        feats, mask = self.captions.encode(caption_words(cls))
        return {"cap_feats": feats, "cap_mask": mask}

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} out of range for {len(self)} records")
        cls = self.layout(index)[0]
        frames = self.render(index)[None, :, :, None]
        return {"frames": frames, **self.condition(cls), "label": np.int32(CLASSES.index(cls))}

    def to_wave(self, spec) -> np.ndarray:
        """A normalised spectrogram `[n_bins, W]` -> a wave `[W * hop]` by Griffin-Lim on its magnitude."""
        return audio.griffin_lim(audio.denormalise(spec), self.griffin_lim_iters)

    def save_media(self, stem, frames) -> list[pathlib.Path]:
        """`frames [n, 1, n_bins, W, 1]` in [-1, 1] -> `{stem}_{i}.wav` per sample and `{stem}_spec.png`
        (the spectrograms side by side, low frequencies at the bottom, 4x enlarged)."""
        x = np.asarray(frames, np.float32)
        if x.ndim != 5 or x.shape[1] != 1 or x.shape[2] != self.n_bins or x.shape[4] != 1:
            raise ValueError(f"frames must be [n, 1, {self.n_bins}, W, 1] spectrograms, got {x.shape}")
        stem = pathlib.Path(stem)
        paths = [audio.write_wav(f"{stem}_{i}.wav", self.to_wave(x[i, 0, :, :, 0])) for i in range(len(x))]
        png = save_png(stem.with_name(stem.name + "_spec.png"), x[:, 0, :, :, 0])
        return paths + [png]

    def __repr__(self) -> str:
        return f"SoundSource(split={self.split!r}, n={len(self)}, widths={self.widths}, classes={len(CLASSES)})"
