"""Does a generated clip follow its caption? Direction, speed and digit, read off the pixels.

For the embedded text-to-video data (`data/moving_mnist.py`: one digit sliding in a straight line),
each clip `[T, H, W, 1]` in [-1, 1] (background -1) is read by a centroid tracker:
  * centroid: the ink-weighted centroid of every frame (ink = brightness above -0.8, so that the
    dim antialiased strokes of a shrunk digit count);
  * direction: the sign of the dominant axis of the first -> last frame displacement (left / right
    / up / down); a clip with an empty frame or no displacement has none (-1, never correct);
  * speed: |displacement| / (T - 1) in px per frame, 'fast' above the midpoint of the two
    captioned speeds;
  * digit: a `digit_size` square around each frame's centroid, resampled to 32x32 with the centroid
    where MNIST puts it (the embedded MNIST framing: the source shrinks those 32x32 images to
    `digit_size`) and read by the project's MNIST classifier; per frame and by majority vote.
The same reading of real clips of the same records gives the floor a perfect generator would reach.

`run(config, workdir)` (`flagdit eval` for data.name 'moving_mnist') does this at every length in
`config.eval.frames`: the trained frame counts and longer ones (duration extrapolation). A latent-space
run (`configs/t2v/mnist.py:latent`: data.name 'encoded' from encode.source 'moving_mnist') samples
latent frames, decodes each through the run's VAE and is read the same way; the real clips, motions
and captions come from the raw source the cache was encoded from (record i of both is the same clip).
"""

from __future__ import annotations

import json
import pathlib
import time

import numpy as np

from flagdit_jax.data.moving_mnist import DIRECTION_WORDS, DIRECTIONS, SPEED_WORDS

NO_DIRECTION = -1
INK_FLOOR = -0.8  # pixels darker than this (background -1 and faint noise) carry no ink
MIN_INK = 2.0  # a frame with less ink than this (in units of full-brightness pixels / 1.8) is empty


def _check_clips(clips) -> np.ndarray:
    x = np.asarray(clips, np.float32)
    if x.ndim != 5 or x.shape[-1] != 1 or x.shape[1] < 2:
        raise ValueError(f"clips must be grayscale [N, T >= 2, H, W, 1], got shape {np.shape(clips)}")
    return x


def centroids(images) -> tuple[np.ndarray, np.ndarray]:
    """`images [N, H, W, 1]` in [-1, 1] -> ink-weighted centroids `(cy, cx)` `[N]` in pixels (nan when a frame
    holds less than `MIN_INK` of ink). A pixel's ink is its brightness above `INK_FLOOR`, so the dim
    antialiased strokes of a shrunk digit count and faint sampling noise does not."""
    x = np.asarray(images, np.float32)[..., 0]
    w = np.clip(x - INK_FLOOR, 0.0, None)
    mass = w.sum((1, 2))
    ys, xs = np.arange(x.shape[1], dtype=np.float64), np.arange(x.shape[2], dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        cy, cx = (w.sum(2) * ys).sum(1) / mass, (w.sum(1) * xs).sum(1) / mass
    empty = mass < MIN_INK
    cy[empty], cx[empty] = np.nan, np.nan
    return cy, cx


def track(clips) -> dict[str, np.ndarray]:
    """`clips [N, T, H, W, 1]` in [-1, 1] -> {'cy', 'cx' [N, T] ink centroids (px; nan on an empty frame),
    'dy', 'dx' [N] first -> last displacement, 'direction' [N] (index into DIRECTION_WORDS, -1: none),
    'speed_px' [N] |displacement| / (T - 1)}."""
    x = _check_clips(clips)
    n, t = x.shape[:2]
    cy, cx = (a.reshape(n, t) for a in centroids(x.reshape(n * t, *x.shape[2:])))
    dy, dx = cy[:, -1] - cy[:, 0], cx[:, -1] - cx[:, 0]
    direction = np.full(n, NO_DIRECTION, np.int64)
    for i in range(n):
        if not np.isfinite(cy[i]).all() or (dy[i] == 0 and dx[i] == 0):
            continue
        step = (0, int(np.sign(dx[i]))) if abs(dx[i]) >= abs(dy[i]) else (int(np.sign(dy[i])), 0)
        direction[i] = DIRECTION_WORDS.index(next(w for w, v in DIRECTIONS.items() if v == step))
    speed = np.hypot(dy, dx) / (t - 1)
    return {"cy": cy, "cx": cx, "dy": dy, "dx": dx, "direction": direction, "speed_px": speed}


def speed_class(speed_px, speeds) -> np.ndarray:
    """Speed index (0 slow, 1 fast) of measured px-per-frame speeds: fast above the midpoint of `speeds`."""
    lo, hi = speeds
    return (np.nan_to_num(np.asarray(speed_px, np.float64), nan=0.0) > (lo + hi) / 2.0).astype(np.int64)


def digit_crops(clips, cy, cx, digit_size: int, size: int = 32) -> np.ndarray:
    """`[N * T, size, size, 1]`: a `digit_size` square around each frame's centroid, resampled (bilinear,
    sub-pixel, background outside the frame) to `size` px with the centroid at pixel `size / 2`, where
    the embedded MNIST digits have theirs (MNIST centres the centre of mass); empty frames stay background."""
    from scipy import ndimage

    x = _check_clips(clips)[..., 0]
    n, t, h, w = x.shape
    out = np.full((n * t, size, size), -1.0, np.float32)
    offs = (np.arange(size) - size / 2.0) * (digit_size / size)  # output pixel -> input offset from the centroid
    for k, (img, y, c) in enumerate(zip(x.reshape(n * t, h, w), np.ravel(cy), np.ravel(cx))):
        if not (np.isfinite(y) and np.isfinite(c)):
            continue
        yy, xx = np.meshgrid(y + offs, c + offs, indexing="ij")
        out[k] = ndimage.map_coordinates(img, [yy, xx], order=1, mode="constant", cval=-1.0)
    return out[..., None]


def score(clips, labels, directions, speeds, *, digit_size: int, speeds_px, classifier_params=None,
          classify=None) -> dict:
    """Scores `clips [N, T, H, W, 1]` against the captioned `labels`, `directions` (DIRECTION_WORDS
    indices) and `speeds` (SPEED_WORDS indices), each `[N]`; `speeds_px` the source's (slow, fast).
    Digits are read by the project's MNIST classifier (`classifier_params`) or by `classify(crops
    [M, 32, 32, 1]) -> [M]` labels (exactly one of the two).

    Returns shares in [0, 1]: 'direction', 'speed', 'digit_frame' (per frame), 'digit' (majority vote
    of the frames), 'all' (direction, speed and majority digit), 'empty_frames'; 'per_direction';
    and the mean measured speed per captioned speed ('speed_px')."""
    from flagdit_jax.eval import classifier as clf

    if (classifier_params is None) == (classify is None):
        raise ValueError("score needs exactly one of classifier_params= (the MNIST classifier) or classify=")
    if classify is None:
        classify = lambda crops: clf.logits(classifier_params, crops).argmax(-1)  # noqa: E731
    x = _check_clips(clips)
    labels, directions, speeds = (np.asarray(a, np.int64) for a in (labels, directions, speeds))
    n, t = x.shape[:2]
    if not labels.shape == directions.shape == speeds.shape == (n,):
        raise ValueError(f"need labels, directions, speeds [N={n}]; got {labels.shape}, {directions.shape}, "
                         f"{speeds.shape}")
    tr = track(x)
    direction_ok = tr["direction"] == directions
    speed_ok = (speed_class(tr["speed_px"], speeds_px) == speeds) & (tr["direction"] != NO_DIRECTION)
    pred = np.asarray(classify(digit_crops(x, tr["cy"], tr["cx"], digit_size))).reshape(n, t)
    frame_ok = pred == labels[:, None]
    votes = np.stack([np.bincount(p, minlength=10) for p in pred])
    majority_ok = votes.argmax(1) == labels
    per_dir = {w: float(direction_ok[directions == k].mean()) for k, w in enumerate(DIRECTION_WORDS)
               if (directions == k).any()}
    speed_px = {}  # mean measured px / frame per captioned speed; None when no such clip was tracked
    for k, w in enumerate(SPEED_WORDS):
        v = tr["speed_px"][speeds == k]
        if len(v):
            speed_px[w] = float(np.nanmean(v)) if np.isfinite(v).any() else None
    return {"n": int(n), "frames": int(t), "direction": float(direction_ok.mean()), "speed": float(speed_ok.mean()),
            "digit_frame": float(frame_ok.mean()), "digit": float(majority_ok.mean()),
            "all": float((direction_ok & speed_ok & majority_ok).mean()),
            "empty_frames": float(np.isnan(tr["cy"]).mean()), "per_direction": per_dir, "speed_px": speed_px}


def save_strip(path: pathlib.Path, clips, rows: int = 8) -> None:
    """PNG: the first `rows` clips, one per row, frames left to right."""
    from flagdit_jax import sample

    x = _check_clips(clips)[:rows]
    n, t, h, w, c = x.shape
    sample.save_grid(path, x.reshape(n * t, h, w, c), rows=n)


def clip_sources(config, split: str = "eval"):
    """`(source, clips, vae)`: the run's own source (what conditions the samples: moving MNIST, or its
    'encoded' latent cache), the raw `MovingMnistSource` (real clips, motions, geometry) and the VAE
    that decodes latent frames (None in pixel space)."""
    from flagdit_jax import encoders, train
    from flagdit_jax.data.moving_mnist import MovingMnistSource

    source = train.make_source(config, split)
    if isinstance(source, MovingMnistSource):
        return source, source, None
    if config.data.name != "encoded" or not config.get("encode") or config.encode.get("source") != "moving_mnist":
        raise ValueError(f"video eval needs moving MNIST: config.data.name='moving_mnist', or 'encoded' with "
                         f"config.encode.source='moving_mnist'; got data.name={config.data.name!r}")
    clips = encoders.raw_source(config, split)
    if len(clips) != len(source) or not np.array_equal(clips.frame_shapes()[:, 0], source.frame_shapes()[:, 0]):
        raise ValueError(f"the {split} cache {source!r} does not match config.encode's source {clips!r} (record "
                         "count or frame counts differ): re-run `flagdit encode` with this config")
    return source, clips, encoders.load_vae(config)


def run(config, workdir: str | pathlib.Path) -> dict:
    """Caption following of a text-to-video run on moving MNIST at every length in `config.eval.frames`;
    writes `eval_<step>.json`, `eval_<step>_T<T>.png` strips and `.gif` clips; returns the report."""
    from flagdit_jax import sample
    from flagdit_jax.eval import classifier

    ec = config.eval
    lengths = tuple(int(t) for t in ec.get("frames", ()))
    cond_source, source, vae = clip_sources(config, "eval")
    down = 1 if vae is None else int(vae.downsample)
    if source.canvas % down:
        raise ValueError(f"canvas {source.canvas} px is not a multiple of the VAE's downsampling {down}")
    if not lengths or min(lengths) < 2 or max(lengths) > source.max_frames:
        raise ValueError(f"config.eval.frames={lengths}; expected clip lengths in [2, {source.max_frames}] "
                         f"(config.data.options.max_frames)")
    n = int(ec.num_samples)
    if not 0 < n <= len(source):
        raise ValueError(f"config.eval.num_samples={n}; expected 1..{len(source)} (the eval records)")
    workdir = pathlib.Path(workdir)
    t0 = time.time()
    params, s, step = sample.load_params(config, workdir, use_ema=config.sample.use_ema)
    clf_params, info = classifier.load_or_train(workdir, steps=ec.get("classifier_steps") or None)
    records = np.random.default_rng(config.seed).permutation(len(source))[:n]
    elements = [cond_source[int(i)] for i in records]
    cond = s.task.collate(elements)
    truth = {k: np.array([e[k] for e in elements]) for k in ("label", "direction", "speed")}
    common = dict(classifier_params=clf_params, digit_size=source.digit_size, speeds_px=source.speeds)
    trained = tuple(sorted(set(source.frames)))
    by_frames = {}
    for t in lengths:
        t1 = time.time()
        side = source.canvas // down
        clips = sample.decode(vae, sample.generate(config, params, s, cond, seed=config.seed + 1 + t,
                                                   shape=(t, side, side), batch=ec.batch))
        seconds = time.time() - t1
        real = np.stack([source.clip(int(i), t) for i in records])
        by_frames[str(t)] = {"generated": score(clips, truth["label"], truth["direction"], truth["speed"], **common),
                             "real_floor": score(real, truth["label"], truth["direction"], truth["speed"], **common),
                             "extrapolated": t > max(trained), "sample_seconds": round(seconds, 1)}
        if vae is not None:  # what the VAE alone keeps: the real clips encoded and decoded frame by frame
            z = np.asarray(vae.encode(real.reshape(-1, *real.shape[2:])), np.float32)
            recon = sample.decode(vae, z.reshape(*real.shape[:2], *z.shape[1:]))
            by_frames[str(t)]["vae_floor"] = score(recon, truth["label"], truth["direction"], truth["speed"], **common)
        stem = workdir / f"eval_{step}_T{t}"
        save_strip(stem.with_suffix(".png"), clips)
        source.save_media(stem, clips[:8])
        g, r = by_frames[str(t)]["generated"], by_frames[str(t)]["real_floor"]
        tag = " (extrapolated)" if t > max(trained) else ""
        v = by_frames[str(t)].get("vae_floor")
        through = f"   through the VAE: {v['direction']:.3f} / {v['speed']:.3f} / {v['digit']:.3f}" if v else ""
        print(f"  T={t}{tag}: direction {g['direction']:.3f}  speed {g['speed']:.3f}  digit {g['digit']:.3f} "
              f"(per frame {g['digit_frame']:.3f})  all {g['all']:.3f}   real clips: {r['direction']:.3f} / "
              f"{r['speed']:.3f} / {r['digit']:.3f} ({r['digit_frame']:.3f}) / {r['all']:.3f}{through}"
              f"   [{seconds:.0f} s]")
    rep = dict(step=step, n=n, trained_frames=list(trained), by_frames=by_frames,
               captions=[" ".join(source.caption_words(int(i))) for i in records[:8]],
               classifier_heldout_accuracy=info.get("heldout_accuracy"), sampler=dict(config.sample),
               space="pixels" if vae is None else f"latents ({config.vae.path}, decoded)",
               eval_seconds=round(time.time() - t0, 1))
    out = workdir / f"eval_{step}.json"
    out.write_text(json.dumps(rep, indent=1))
    print(f"step {step}: {n} captions x lengths {lengths} ({config.sample.method} x{config.sample.num_steps}, "
          f"cfg {config.sample.cfg_scale}); wrote {out}")
    return rep
