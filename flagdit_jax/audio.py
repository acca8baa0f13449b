"""Waveforms <-> magnitude spectrograms: STFT, its least-squares inverse, Griffin-Lim, WAV files.

Written here on numpy (FFT) and scipy.signal (window, WAV via scipy.io) because the environment has
no audio library (no librosa, torchaudio or soundfile) and the job is small: a Hann-window STFT with
a fixed framing that gives exactly `len(wave) // hop` frames, so a clip of W frames is W * hop
samples and back. Magnitudes are in amplitude units: a sinusoid of amplitude A centred on a bin
reads A there (the window's sum, halved, is divided out). The text-to-audio data (`data/sounds.py`)
keeps the lowest `n_bins` bins (a linear, band-limited spectrogram; Lumina-T2Speech's mel
spectrogram would need a mel inversion on top, which this small setting does not need) and maps
log magnitude to [-1, 1] with `normalise` / `denormalise`.
"""

from __future__ import annotations

import pathlib

import numpy as np
import scipy.io.wavfile
import scipy.signal

SAMPLE_RATE = 8000
N_FFT = 256
HOP = 128
N_BINS = 32  # 0 .. 968.75 Hz at 31.25 Hz per bin
DB_RANGE = (-60.0, 0.0)  # log magnitude (dB re amplitude 1) mapped to [-1, 1]


def _check_framing(n_fft: int, hop: int) -> None:
    if n_fft <= 0 or hop <= 0 or hop > n_fft or (n_fft - hop) % 2:
        raise ValueError(f"need 0 < hop={hop} <= n_fft={n_fft} with n_fft - hop even (symmetric padding)")


def _window(n_fft: int) -> np.ndarray:
    return scipy.signal.get_window("hann", n_fft).astype(np.float64)  # periodic Hann


def stft(wave, *, n_fft: int = N_FFT, hop: int = HOP) -> np.ndarray:
    """`wave [N]` (N a multiple of hop) -> complex `[n_fft // 2 + 1, N // hop]`, amplitude-scaled.

    Frame i covers samples [i*hop - (n_fft-hop)/2, i*hop + (n_fft+hop)/2) (zeros outside the clip), so
    it is centred on the i-th hop-long stretch of the clip."""
    _check_framing(n_fft, hop)
    x = np.asarray(wave, np.float64)
    if x.ndim != 1 or len(x) == 0 or len(x) % hop:
        raise ValueError(f"wave must be 1-D with a length that is a positive multiple of hop={hop}, got {x.shape}")
    pad = (n_fft - hop) // 2
    xp = np.pad(x, (pad, pad))
    n_frames = len(x) // hop
    idx = np.arange(n_frames)[:, None] * hop + np.arange(n_fft)[None, :]
    w = _window(n_fft)
    return (np.fft.rfft(xp[idx] * w, axis=1) * (2.0 / w.sum())).T


def istft(spec, *, n_fft: int = N_FFT, hop: int = HOP) -> np.ndarray:
    """Least-squares inverse of `stft` (Griffin & Lim 1984, eq. 6): complex `[n_fft//2+1, W]` -> wave `[W*hop]`.

    Exact for any spectrogram that is an STFT; otherwise the wave whose STFT is nearest to it."""
    _check_framing(n_fft, hop)
    s = np.asarray(spec)
    if s.ndim != 2 or s.shape[0] != n_fft // 2 + 1:
        raise ValueError(f"spec must be [{n_fft // 2 + 1}, frames] for n_fft={n_fft}, got {s.shape}")
    w = _window(n_fft)
    frames = np.fft.irfft(s.T / (2.0 / w.sum()), n=n_fft, axis=1) * w
    n_frames = s.shape[1]
    pad = (n_fft - hop) // 2
    total = n_frames * hop + 2 * pad
    out, norm = np.zeros(total), np.zeros(total)
    for i in range(n_frames):
        out[i * hop:i * hop + n_fft] += frames[i]
        norm[i * hop:i * hop + n_fft] += w ** 2
    return (out / np.maximum(norm, 1e-8))[pad:total - pad]


def spectrogram(wave, *, n_bins: int = N_BINS, n_fft: int = N_FFT, hop: int = HOP) -> np.ndarray:
    """`wave [N]` -> magnitude `[n_bins, N // hop]` (amplitude units; the lowest `n_bins` bins)."""
    if not 0 < n_bins <= n_fft // 2 + 1:
        raise ValueError(f"n_bins={n_bins} must be in 1..{n_fft // 2 + 1} for n_fft={n_fft}")
    return np.abs(stft(wave, n_fft=n_fft, hop=hop))[:n_bins]


def _full(mag, n_fft: int) -> np.ndarray:
    """Band-limited magnitude `[F, W]` -> all `n_fft//2+1` bins (the missing top bins are silent)."""
    m = np.asarray(mag, np.float64)
    if m.ndim != 2 or not 0 < m.shape[0] <= n_fft // 2 + 1 or m.shape[1] == 0:
        raise ValueError(f"mag must be [F <= {n_fft // 2 + 1}, frames > 0], got {m.shape}")
    if (m < 0).any() or not np.isfinite(m).all():
        raise ValueError("mag must be finite and non-negative")
    return np.pad(m, ((0, n_fft // 2 + 1 - m.shape[0]), (0, 0)))


def spectral_convergence(mag, wave, *, n_fft: int = N_FFT, hop: int = HOP) -> float:
    """|| mag - |STFT(wave)| ||_F / || mag ||_F over all bins (0 when `wave` has exactly magnitude `mag`)."""
    target = _full(mag, n_fft)
    got = np.abs(stft(wave, n_fft=n_fft, hop=hop))
    if got.shape != target.shape:
        raise ValueError(f"wave gives a {got.shape} STFT but mag is {target.shape} (after padding the bins)")
    return float(np.linalg.norm(target - got) / max(np.linalg.norm(target), 1e-12))


def griffin_lim(mag, n_iter: int = 64, *, n_fft: int = N_FFT, hop: int = HOP, momentum: float = 0.99,
                seed: int = 0) -> np.ndarray:
    """A wave `[W * hop]` whose STFT magnitude approximates `mag [F, W]` (the lowest F bins; the rest
    silent): Griffin-Lim from random phases, with the fast variant's momentum (Perraudin et al. 2013;
    momentum 0 is the original algorithm)."""
    if n_iter < 0:
        raise ValueError(f"n_iter={n_iter} must be >= 0")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum={momentum} must be in [0, 1)")
    target = _full(mag, n_fft)
    rng = np.random.default_rng(seed)
    phase = np.exp(2j * np.pi * rng.random(target.shape))
    prev = np.zeros_like(phase)
    wave = istft(target * phase, n_fft=n_fft, hop=hop)
    for _ in range(n_iter):
        rebuilt = stft(wave, n_fft=n_fft, hop=hop)
        accel = rebuilt - (momentum / (1.0 + momentum)) * prev if momentum else rebuilt
        prev = rebuilt
        phase = accel / np.maximum(np.abs(accel), 1e-12)
        wave = istft(target * phase, n_fft=n_fft, hop=hop)
    return wave


def normalise(mag, db_range=DB_RANGE) -> np.ndarray:
    """Magnitude (amplitude units) -> log magnitude mapped linearly from `db_range` dB to [-1, 1] (clipped)."""
    lo, hi = db_range
    if not lo < hi:
        raise ValueError(f"db_range={db_range} must be (low, high) with low < high")
    db = 20.0 * np.log10(np.maximum(np.asarray(mag, np.float64), 10.0 ** (lo / 20.0)))
    return np.clip(2.0 * (db - lo) / (hi - lo) - 1.0, -1.0, 1.0).astype(np.float32)


def denormalise(x, db_range=DB_RANGE) -> np.ndarray:
    """Inverse of `normalise`: values in [-1, 1] -> magnitude; the floor (-1) is silence (0)."""
    lo, hi = db_range
    x = np.clip(np.asarray(x, np.float64), -1.0, 1.0)
    mag = 10.0 ** ((lo + (x + 1.0) * (hi - lo) / 2.0) / 20.0)
    return np.where(x <= -1.0, 0.0, mag)


def write_wav(path, wave, sample_rate: int = SAMPLE_RATE) -> pathlib.Path:
    """`wave [N]` (floats; peak-normalised to 0.9 if louder) -> 16-bit mono PCM WAV at `sample_rate`."""
    x = np.asarray(wave, np.float64)
    if x.ndim != 1 or len(x) == 0 or not np.isfinite(x).all():
        raise ValueError(f"wave must be a non-empty finite 1-D array, got shape {x.shape}")
    if sample_rate <= 0:
        raise ValueError(f"sample_rate={sample_rate} must be positive")
    peak = np.abs(x).max()
    if peak > 0.9:
        x = x * (0.9 / peak)
    path = pathlib.Path(path)
    scipy.io.wavfile.write(path, int(sample_rate), np.round(x * 32767).astype(np.int16))
    return path
