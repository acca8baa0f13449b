"""Resolution extrapolation through the pipelines, each technique on and off (REFERENCE.md §4, §6).

Lumina-T2I (Flag-DiT) extrapolates with NTK theta scaling by the token-count ratio, proportional
attention and time shifting (LT `lumina_t2i/demo.py`); Lumina-Next (Next-DiT) with its time-aware
RoPE switch (watershed 0.3), proportional attention and shift 4 (LT `lumina_next_t2i/demo.py`), or
the paper's frequency-/time-aware forms. `variants` names each technique alone and the official
combination; `extrapolate` samples them, `run_extrapolation` writes a grid, and `score_table` is
the loop of `experiments/extrapolation.py` (sample, shrink to the training size, score) for a
trained T2I model, with the same JSON layout ({name: {metric: value, 'seconds': s}}).
"""

from __future__ import annotations

import math
import time
from typing import Callable

import jax
import numpy as np

from flagdit_jax import applications as apps
from flagdit_jax.models.common import InferenceOptions as Opts

TRAIN = "train size (official options)"


def variants(pipe, height: int, width: int) -> dict[str, tuple[Opts, float]]:
    """name -> (model options, time shift) for sampling at `height` x `width` pixels.

    The ratios are the official ones: token-count ratio k = tokens / tokens at the training size
    (Lumina-T2I's NTK factor), side ratio s = sqrt(k) (Lumina-Next's scale_factor); Flag-DiT's 1-D
    RoPE runs over the flat token index, so its PI divides positions by k, Next-DiT's 2-D RoPE by s.
    Proportional attention uses the pipeline's base length. 'official' is the pipeline's own
    choice at this size with its default shift.
    """
    apps.check_pipeline(pipe)
    cfg = pipe.cfg
    f = pipe.downsample * cfg.patch_size
    g = pipe.train_tokens_per_side
    k = (height // f) * (width // f) / (g * g)
    s = math.sqrt(k)
    official = pipe.inference_options(height, width)
    base = official.base_seqlen
    shift = apps.SAMPLING_DEFAULTS[cfg.kind]["shift"]
    rope = k if cfg.kind == "flagdit" else s
    out = {
        "plain": (Opts(), 1.0),
        "time shift": (Opts(), shift),
        "proportional attention": (Opts(base_seqlen=base), 1.0),
        "NTK": (Opts(ntk_factor=rope), 1.0),
        "PI": (Opts(pi_factor=rope), 1.0),
    }
    if cfg.kind == "nextdit":
        out["time-aware switch (code, watershed 0.3)"] = (Opts(scale_factor=s, scale_watershed=0.3), 1.0)
        out["paper time-aware"] = (Opts(rope_scaling="time_aware", scale_factor=s), 1.0)
        if g > 2 * math.pi:  # the frequency-aware form needs a training length > 2 pi per side
            out["paper frequency-aware"] = (Opts(rope_scaling="frequency_aware", scale_factor=s, rope_train_len=g),
                                            1.0)
    out["official"] = (official, shift)
    return out


def extrapolate(pipe, prompt=None, sizes=None, *, names=None, prompt_embeds=None, negative_prompt=None,
                negative_prompt_embeds=None, num_inference_steps: int | None = None, guidance_scale: float = 4.0,
                seed=0, method: str | None = None, grid: str = "lumina", cfg_channels: int | str | None = "official",
                include_train: bool = True):
    """Sample the same prompts (and noise per size) at the training size and at each of `sizes`
    ((height, width) pixels; default: 2x the training area, (S, 2S)) with every `variants` entry.

    Returns `{name: latents [B, h, w, C]}`: `TRAIN` at the training size (unless not
    `include_train`), then '<H>x<W>, <variant>'. `names` restricts the variants (by variant name).
    """
    apps.check_pipeline(pipe)
    cond, uncond = apps.caption_batches(pipe, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds)
    batch = cond["cap_feats"].shape[0]
    side = pipe.train_image_size
    sizes = [(side, 2 * side)] if sizes is None else [tuple(int(v) for v in hw) for hw in sizes]
    steps = apps.sampler_settings(pipe, num_inference_steps, method)
    run = dict(guidance_scale=guidance_scale, seed=seed, latents=None, output_type="latent", grid=grid,
               cfg_channels=apps.guidance_channels(pipe, cfg_channels),
               num_inference_steps=steps["num_inference_steps"], method=steps["method"])
    out = {}
    if include_train:
        out[TRAIN] = pipe._run(cond, uncond, batch, side, side, options=pipe.inference_options(side, side),
                               shift=steps["shift"], **run)
    for h, w in sizes:
        table = variants(pipe, h, w)
        unknown = sorted(set(names or ()) - set(table))
        if unknown:
            raise ValueError(f"unknown variant(s) {unknown}; known: {sorted(table)}")
        for name, (opts, shift) in table.items():
            if names is None or name in names:
                out[f"{h}x{w}, {name}"] = pipe._run(cond, uncond, batch, h, w, options=opts, shift=shift, **run)
    return out


def run_extrapolation(pipe, prompts, out, *, sizes=None, seed: int = 0, **kw):
    """Write a PNG grid to `out`: one row per entry of `extrapolate` (training size first), one
    column per prompt. Returns `(path, names)` (the row names, top to bottom)."""
    samples = extrapolate(pipe, prompts, sizes, seed=seed, **kw)
    path = apps.save_grid(out, [list(apps.to_images(pipe, x)) for x in samples.values()])
    return path, list(samples)


def shrink(images: np.ndarray, height: int, width: int) -> np.ndarray:
    """`[N, H, W, C]` -> `[N, height, width, C]`: the mean over f x f blocks when the factors are
    integers (as `experiments/extrapolation.py`), else an antialiased linear resize."""
    images = np.asarray(images, np.float32)
    n, h, w, c = images.shape
    if h % height == 0 and w % width == 0:
        return images.reshape(n, height, h // height, width, w // width, c).mean((2, 4))
    return np.asarray(jax.image.resize(images, (n, height, width, c), method="linear", antialias=True))


def score_table(pipe, cond: dict, uncond: dict, score_fn: Callable[[np.ndarray], dict], *, sizes=None,
                names=None, batch: int = 125, seed: int = 0, num_inference_steps: int | None = None,
                method: str | None = None, guidance_scale: float = 4.0, cfg_channels: int | str | None = "official",
                log: Callable[[str], None] | None = print) -> dict:
    """Score every extrapolation variant like `experiments/extrapolation.py`.

    cond, uncond: `{cap_feats [N, S, D], cap_mask [N, S]}` for N samples (e.g. the captions of N
    eval records and the null caption); sampled `batch` at a time (seed folded with the offset),
    turned into images (`applications.to_images`), shrunk to the training size and passed to
    `score_fn(images [N, S, S, c] in [-1, 1]) -> {metric: float}` (e.g. `mnist_scorer`).
    Returns `{name: {metric: value, ..., 'seconds': s}}`.
    """
    apps.check_pipeline(pipe)
    n = len(cond["cap_feats"])
    side = pipe.train_image_size
    steps = apps.sampler_settings(pipe, num_inference_steps, method)
    sizes = [(side, 2 * side)] if sizes is None else [tuple(int(v) for v in hw) for hw in sizes]
    jobs = {TRAIN: (side, side, pipe.inference_options(side, side), steps["shift"])}
    for h, w in sizes:
        for name, (opts, shift) in variants(pipe, h, w).items():
            if names is None or name in names:
                jobs[f"{h}x{w}, {name}"] = (h, w, opts, shift)
    run = dict(latents=None, output_type="latent", grid="lumina", guidance_scale=guidance_scale,
               cfg_channels=apps.guidance_channels(pipe, cfg_channels),
               num_inference_steps=steps["num_inference_steps"], method=steps["method"])
    results = {}
    for name, (h, w, opts, shift) in jobs.items():
        t0 = time.time()
        parts = []
        for i in range(0, n, batch):
            take = lambda d: {k: np.asarray(v)[i:i + batch] for k, v in d.items()}
            c, u = take(cond), take(uncond)
            m = len(c["cap_feats"])
            key = jax.random.fold_in(jax.random.key(seed), i)
            lat = pipe._run(c, u, m, h, w, options=opts, shift=shift, seed=key, **run)
            parts.append(shrink(apps.to_images(pipe, lat), side, side))
        scores = {k: float(v) for k, v in score_fn(np.concatenate(parts)).items()}
        results[name] = dict(scores, seconds=round(time.time() - t0, 1))
        if log is not None:
            shown = "   ".join(f"{k} {v:.3f}" for k, v in scores.items())
            log(f"{name:<56} {shown}   ({time.time() - t0:.0f} s)")
    return results


def mnist_scorer(workdir, labels) -> Callable[[np.ndarray], dict]:
    """`score_fn` for the embedded-MNIST models: accuracy of the run's classifier on the intended
    digits `labels` [N] and FID against the held-out digits (`eval.mnist_eval.evaluate`)."""
    from flagdit_jax.eval import mnist_eval

    def score(images):
        r = mnist_eval.evaluate(workdir, images, labels)
        return dict(accuracy=r["accuracy"], fid=r["fid"])

    return score
