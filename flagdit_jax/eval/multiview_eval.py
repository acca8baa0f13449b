"""`flagdit eval` for the text-to-multi-view run (`configs/t2mv/solids.py`): does each generated view
show the captioned solid in the captioned colour, and do the views of one sample agree?

The reader is independent of the generator: nearest template (squared L2 in pixel space) among the
renderer's own images of every (solid, colour) at every grid azimuth (15 degrees), at the run's
size and elevation. Per view it gives a solid, a colour and an azimuth. Per sample:

* consistent: every view reads as the same (solid, colour); `consistent_solid`: the same solid;
* identity: the captioned solid on >= 80% of the views; `caption`: solid and colour both;
* solid / colour accuracy over all views;
* pose step: consecutive views of a correctly read solid turn by 360/T degrees (modulo the
  solid's symmetry about the vertical axis: 90 degrees for cube / pyramid / octahedron, 180 for the
  prism, 360 for the L block), and the most common step found.

Scored at every view count of the eval split (trained 4 views and more), beside the same reading of
the real renders of the same records (the floor: ~1 by construction, the templates include them)
and of real views shuffled across records (what a sample with unrelated views scores).
"""

from __future__ import annotations

import collections
import pathlib
import time

import numpy as np

from flagdit_jax.data import multiview as mv

SYMMETRY = {"cube": 90, "pyramid": 90, "octahedron": 90, "prism": 180, "lblock": 360}
IDENTITY_SHARE = 0.8


def templates(size: int, elevation: float) -> dict[str, np.ndarray]:
    """Every (solid, colour, grid azimuth) render: {'images' [K, size, size, 3], 'solid' [K],
    'colour' [K], 'azimuth' [K]} (ids index `mv.SOLID_NAMES` / `mv.COLOURS`)."""
    azimuths = list(range(0, 360, mv.AZIMUTH_STEP))
    images, solid, colour, az = [], [], [], []
    for i, s in enumerate(mv.SOLID_NAMES):
        for j, c in enumerate(mv.COLOURS):
            images.append(mv.render(s, c, azimuths, elevation, size))
            solid += [i] * len(azimuths)
            colour += [j] * len(azimuths)
            az += azimuths
    return {"images": np.concatenate(images), "solid": np.array(solid), "colour": np.array(colour),
            "azimuth": np.array(az)}


def classify(views: np.ndarray, tmpl: dict) -> dict[str, np.ndarray]:
    """Nearest template of each view `[N, H, W, 3]` in [-1, 1]: {'solid', 'colour', 'azimuth',
    'distance' (mean squared error per pixel value)}, each [N]."""
    views = np.asarray(views, np.float32)
    ref = tmpl["images"].reshape(len(tmpl["images"]), -1)
    if views.ndim != 4 or views.shape[1:] != tmpl["images"].shape[1:]:
        raise ValueError(f"views must be [N, {', '.join(map(str, tmpl['images'].shape[1:]))}] like the templates, "
                         f"got {views.shape}")
    x = views.reshape(len(views), -1)
    d = np.maximum((x ** 2).sum(1)[:, None] - 2 * x @ ref.T + (ref ** 2).sum(1)[None], 0.0)  # >= 0 despite rounding
    k = d.argmin(1)
    return {"solid": tmpl["solid"][k], "colour": tmpl["colour"][k], "azimuth": tmpl["azimuth"][k],
            "distance": d[np.arange(len(k)), k] / x.shape[1]}


def score(frames: np.ndarray, solid: np.ndarray, colour: np.ndarray, tmpl: dict) -> dict:
    """Metrics of samples `frames` [n, T, H, W, 3] captioned (`solid` [n], `colour` [n]) (see module doc)."""
    frames = np.asarray(frames)
    if frames.ndim != 5:
        raise ValueError(f"frames must be [n, T, H, W, 3], got shape {frames.shape}")
    n, t = frames.shape[:2]
    solid, colour = np.asarray(solid), np.asarray(colour)
    if solid.shape != (n,) or colour.shape != (n,):
        raise ValueError(f"solid {solid.shape} and colour {colour.shape} must both be [{n}] (one per sample)")
    p = {k: v.reshape(n, t) for k, v in classify(frames.reshape(n * t, *frames.shape[2:]), tmpl).items()}
    same_solid = (p["solid"] == p["solid"][:, :1]).all(1)
    same_both = same_solid & (p["colour"] == p["colour"][:, :1]).all(1)
    solid_ok, colour_ok = p["solid"] == solid[:, None], p["colour"] == colour[:, None]
    # pose step: consecutive views (cyclic: the last view turns back to the first) of a correctly read solid
    step, sym = 360 // t, np.array([SYMMETRY[mv.SOLID_NAMES[s]] for s in solid])[:, None]
    turn = (np.roll(p["azimuth"], -1, axis=1) - p["azimuth"]) % 360
    pair_ok = solid_ok & np.roll(solid_ok, -1, axis=1)
    hits = (turn % sym) == (step % sym)
    asym = pair_ok & (sym == 360)  # the L block alone shows its full turn
    common = collections.Counter(turn[asym].tolist()).most_common(3)
    return {"n": int(n), "views": int(t),
            "consistent": float(same_both.mean()), "consistent_solid": float(same_solid.mean()),
            "identity": float((solid_ok.mean(1) >= IDENTITY_SHARE).mean()),
            "caption": float(((solid_ok & colour_ok).mean(1) >= IDENTITY_SHARE).mean()),
            "solid_accuracy": float(solid_ok.mean()), "colour_accuracy": float(colour_ok.mean()),
            "pose_step": float(hits[pair_ok].mean()) if pair_ok.any() else float("nan"),
            "lblock_turns": [[int(a), int(c)] for a, c in common],  # most common view-to-view turns (degrees, count)
            "template_mse": float(p["distance"].mean())}


def run(config, workdir: str | pathlib.Path) -> dict:
    """Sample the eval split's captions at each of its view counts from the run's EMA params, score them
    (and the real renders), write `eval_<step>.json`, a PNG strip and a GIF per view count; returns the report."""
    from flagdit_jax import sample, train
    from flagdit_jax.eval import mnist_eval

    workdir = pathlib.Path(workdir)
    t0 = time.time()
    params, s, step = sample.load_params(config, workdir, use_ema=config.sample.use_ema)
    source = train.make_source(config, "eval")
    if not isinstance(source, mv.MultiViewSource):
        raise ValueError(f"multiview_eval needs config.data.name='multiview', got {config.data.name!r}")
    tmpl = templates(source.size, source.elevation)
    n = int(config.eval.num_samples)
    shapes = source.frame_shapes()
    rng = np.random.default_rng(config.seed)
    rep = {"step": step, "sampler": dict(config.sample), "by_views": {}}
    for shape in sorted({tuple(x) for x in shapes.tolist()}):
        rows = np.flatnonzero((shapes == shape).all(1))[:n]
        if len(rows) < n:
            raise ValueError(f"the eval split has {len(rows)} records of {shape[0]} views; config.eval.num_samples={n} "
                             "needs more (raise data.options.eval_records)")
        recs = [source[int(r)] for r in rows]
        solid, colour = np.array([r["label"] for r in recs]), np.array([r["colour"] for r in recs])
        cond = s.task.collate(recs)
        t1 = time.time()
        frames = sample.generate(config, params, s, cond, seed=config.seed + 1, shape=shape,
                                 batch=config.eval.get("batch") or None)
        real = np.stack([r["frames"] for r in recs])
        # unrelated views: view k of each sample taken from another record (a random permutation per view)
        shuffled = np.stack([real[rng.permutation(len(real)), k] for k in range(shape[0])], 1)
        t = shape[0]
        rep["by_views"][str(t)] = {
            "generated": score(frames, solid, colour, tmpl), "real_floor": score(real, solid, colour, tmpl),
            "shuffled_views": score(shuffled, solid, colour, tmpl), "sample_seconds": round(time.time() - t1, 1)}
        strip = frames[:8].transpose(0, 2, 1, 3, 4).reshape(min(8, len(frames)), shape[1], t * shape[2], 3)
        sample.save_grid(workdir / f"eval_{step}_{t}views.png", strip, rows=len(strip))  # one sample per row
        source.save_media(workdir / f"eval_{step}_{t}views", frames[:8])
    rep["eval_seconds"] = round(time.time() - t0, 1)
    out = mnist_eval.write_report(workdir / f"eval_{step}.json", rep)
    sc = config.sample
    print(f"step {step}: {n} samples per view count ({sc.method} x{sc.num_steps}, cfg {sc.cfg_scale}); "
          f"{rep['eval_seconds']:.0f} s")
    for t, r in rep["by_views"].items():
        for name in ("generated", "real_floor", "shuffled_views"):
            m = r[name]
            print(f"  {t} views {name:<15} consistent {m['consistent']:.3f} (solid {m['consistent_solid']:.3f})  "
                  f"identity {m['identity']:.3f}  caption {m['caption']:.3f}  solid acc {m['solid_accuracy']:.3f}  "
                  f"colour acc {m['colour_accuracy']:.3f}  pose step {m['pose_step']:.3f}")
    print(f"wrote {out}")
    return rep
