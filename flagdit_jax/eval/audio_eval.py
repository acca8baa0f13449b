"""Does a generated spectrogram sound like its caption? Pitch, sweep and beats, read off the bins.

A spectrogram `[F, W]` in [-1, 1] (`data/sounds.py`: row = frequency bin of 31.25 Hz, column = 16 ms
frame, value = log magnitude over 60 dB) is read analytically, without any learned model:
  * envelope: each frame's loudest bin; a frame sounds when that is above `ACTIVE` (-30 dB,
    halfway between the -60 dB floor and full scale);
  * onsets: the number of runs of sounding frames (beats are separated by silence; tones, chirps and
    chords are one run);
  * sweep: the least-squares slope of the loudest bin over the sounding frames, times their span,
    in bins (a chirp sweeps ~19 bins, a tone ~0);
  * pitches: the peaks of the mean log spectrum over the sounding frames (local maxima within
    `PEAK_DROP` of the strongest, at least `MIN_SEPARATION` bins apart), each named by the nearest
    named pitch within `PITCH_TOLERANCE` bins.
`read` turns these into one sound class (beats if >= 2 onsets, else chirp if the sweep is large,
else chord if two peaks, else tone); a sample follows its caption when the class read equals the
caption's. The same reading of real spectrograms is the floor a perfect generator would reach.
"""

from __future__ import annotations

import json
import pathlib
import time

import numpy as np

from flagdit_jax.data import sounds

ACTIVE = 0.0            # normalised log magnitude (-30 dB)
PEAK_DROP = 0.35        # a second pitch is within 21 dB of the strongest
MIN_SEPARATION = 4      # bins between two pitches of a chord (the named ones are 8 apart)
PITCH_TOLERANCE = 3     # bins (+-94 Hz) around a named pitch
CHIRP_SWEEP = 8.0       # bins swept over the sound
_PITCH_BINS = {name: hz / (sounds.audio.SAMPLE_RATE / sounds.audio.N_FFT) for name, hz in sounds.PITCHES.items()}
_COUNT_NAMES = {v: k for k, v in sounds.NUMBERS.items()}


def features(spec) -> dict:
    """`spec [F, W]` in [-1, 1] -> 'onsets' (int), 'sweep' (bins, + = rising), 'peaks' (bins of the
    pitches, strongest first), 'active' (sounding frames)."""
    x = np.asarray(spec, np.float64)
    if x.ndim != 2 or min(x.shape) < 2:
        raise ValueError(f"spec must be a [F, W] spectrogram, got shape {x.shape}")
    env = x.max(0)
    active = env > ACTIVE
    onsets = int(active[0]) + int((active[1:] & ~active[:-1]).sum())
    frames = np.flatnonzero(active)
    sweep, peaks = 0.0, []
    if len(frames) >= 2:
        loudest = x[:, frames].argmax(0).astype(np.float64)
        slope = np.polyfit(frames.astype(np.float64), loudest, 1)[0]
        sweep = float(slope * (frames[-1] - frames[0]))
    if len(frames):
        profile = x[:, frames].mean(1)
        top = profile.max()
        padded = np.concatenate([[-np.inf], profile, [-np.inf]])
        local = np.flatnonzero((padded[1:-1] >= padded[:-2]) & (padded[1:-1] > padded[2:]) & (profile >= top - PEAK_DROP))
        for b in sorted(local, key=lambda b: -profile[b]):
            if all(abs(b - p) >= MIN_SEPARATION for p in peaks):
                peaks.append(int(b))
    return {"onsets": onsets, "sweep": sweep, "peaks": peaks, "active": int(active.sum())}


def pitch_name(bin_: float) -> str | None:
    """The named pitch within PITCH_TOLERANCE bins of `bin_`, else None."""
    name, b = min(_PITCH_BINS.items(), key=lambda kv: abs(kv[1] - bin_))
    return name if abs(b - bin_) <= PITCH_TOLERANCE else None


def read(spec) -> tuple | None:
    """The sound class (an element of `sounds.CLASSES`) a spectrogram `[F, W]` sounds like, or None."""
    f = features(spec)
    if f["onsets"] == 0:
        return None
    if f["onsets"] >= 2:
        name = _COUNT_NAMES.get(f["onsets"])
        return ("beats", name) if name else None
    if abs(f["sweep"]) >= CHIRP_SWEEP:
        return ("chirp", "rising" if f["sweep"] > 0 else "falling")
    names = [pitch_name(b) for b in f["peaks"][:2]]
    if len(names) == 2:
        order = list(sounds.PITCHES)
        pair = tuple(sorted(names, key=order.index)) if None not in names else None
        return ("chord", pair) if pair in [c[1] for c in sounds.CLASSES if c[0] == "chord"] else None
    return ("tone", names[0]) if names and names[0] else None


def score(specs, classes) -> dict:
    """Share of `specs [N, F, W]` whose reading equals the requested `classes` (N sound classes):
    'match' overall, per kind ('tone', 'chirp', 'beats', 'chord'), per class; 'unreadable' share."""
    specs = np.asarray(specs)
    classes = list(classes)
    if specs.ndim != 3 or len(specs) != len(classes):
        raise ValueError(f"need specs [N, F, W] and N classes; got {specs.shape} and {len(classes)}")
    bad = [c for c in classes if c not in sounds.CLASSES]
    if bad:
        raise ValueError(f"unknown sound classes {bad[:3]}; expected elements of sounds.CLASSES")
    got = [read(s) for s in specs]
    ok = np.array([g == c for g, c in zip(got, classes)])
    kinds = sorted({c[0] for c in classes})
    by_kind = {k: float(ok[[c[0] == k for c in classes]].mean()) for k in kinds}
    by_class = {_name(c): float(ok[[x == c for x in classes]].mean()) for c in sounds.CLASSES if c in classes}
    return {"n": len(classes), "match": float(ok.mean()), "by_kind": by_kind, "by_class": by_class,
            "unreadable": float(np.mean([g is None for g in got]))}


def _name(cls) -> str:
    return " ".join(sounds.caption_words(cls)[1:])


def run(config, workdir) -> dict:
    """Caption following of a text-to-audio run: `config.eval.per_class` samples of every sound class
    at each trained width and at `config.eval.long_widths` (duration extrapolation), read by `read`,
    against the same reading of real spectrograms; writes eval_<step>.json, eval_<step>_<W>.png
    strips (one sample per class) and a WAV per sound kind at the first trained width."""
    from flagdit_jax import sample, train

    workdir = pathlib.Path(workdir)
    t0 = time.time()
    params, s, step = sample.load_params(config, workdir, use_ema=config.sample.use_ema)
    src = train.make_source(config, "eval")
    if not isinstance(src, sounds.SoundSource):
        raise ValueError(f"audio_eval needs config.data.name='sounds', got {config.data.name!r}")
    ec = config.eval
    per_class = int(ec.get("per_class", 8))
    long_widths = tuple(int(w) for w in ec.get("long_widths", ()))
    classes = [c for c in sounds.CLASSES for _ in range(per_class)]
    cond = s.task.collate([src.condition(c) for c in classes])
    report = dict(step=step, per_class=per_class, trained_widths=list(src.widths), long_widths=list(long_widths),
                  sampler=dict(config.sample), generated={}, real_floor={})
    written = []
    for w in (*src.widths, *long_widths):
        frames = sample.generate(config, params, s, cond, seed=config.seed + 1 + w, shape=(1, src.n_bins, w),
                                 batch=min(int(ec.get("batch") or len(classes)), len(classes)))
        specs = frames[:, 0, :, :, 0]
        report["generated"][str(w)] = score(specs, classes)
        # The floor: real sounds of every class synthesised at this width (eval records), read the same way.
        real_idx = [i for ci in range(len(sounds.CLASSES)) for i in range(ci, len(src), len(sounds.CLASSES))[:per_class]]
        report["real_floor"][str(w)] = score(np.stack([src.render(i, w) for i in real_idx]),
                                             [src.layout(i)[0] for i in real_idx])
        firsts = specs[::per_class]  # one sample per class, in CLASSES order
        written.append(sounds.save_png(workdir / f"eval_{step}_{w}.png", firsts))
        if w == src.widths[0]:
            for kind in ("tone", "chirp", "beats", "chord"):
                k = next(i for i, c in enumerate(sounds.CLASSES) if c[0] == kind)
                path = workdir / f"eval_{step}_{w}_{_name(sounds.CLASSES[k]).replace(' ', '_')}.wav"
                written.append(sounds.audio.write_wav(path, src.to_wave(specs[k * per_class])))
    report["eval_seconds"] = round(time.time() - t0, 1)
    out = workdir / f"eval_{step}.json"
    out.write_text(json.dumps(report, indent=1))
    print(f"step {step}: {per_class} samples x {len(sounds.CLASSES)} classes per width "
          f"({config.sample.method} x{config.sample.num_steps}, cfg {config.sample.cfg_scale}); "
          f"{report['eval_seconds']:.0f} s")
    for w, g in report["generated"].items():
        tag = "trained" if int(w) in src.widths else "longer"
        kinds = "  ".join(f"{k} {v:.2f}" for k, v in g["by_kind"].items())
        print(f"  W={w:>3} ({tag}): match {g['match']:.3f}  [{kinds}]   real floor {report['real_floor'][w]['match']:.3f}")
    print(f"wrote {out} and {len(written)} files")
    return report

