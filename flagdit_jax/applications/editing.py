"""High-resolution editing / img2img (REFERENCE.md §6).

Follows LT `lumina_next_t2i_mini/sample_img2img.py` with its `transport.py: ODE(strength=)`: build
the shifted time grid of N points, drop the first floor(N * (1 - strength)) of them (strength 0.6
there), start at lambda = the first kept time with z = (1 - lambda) * eps + lambda * x1 (x1 the
source latent, at the requested size), and solve the guided ODE from lambda to 1 with the new
prompt. lambda = 1 (nothing left to solve) returns the source latent; lambda = 0 is plain sampling.

Channel-wise normalisation [UNVERIFIED: the paper only says latents are normalised channel-wise
against colour / style drift; no code]. Our reading, `normalize='source'`: each output channel of
each image is standardised over its spatial positions and given the source latent's per-channel
mean and standard deviation, out_c = (out_c - mean(out_c)) / std(out_c) * std(x1_c) + mean(x1_c).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from flagdit_jax import applications as apps
from flagdit_jax import pipeline as pl

NORMALIZE = ("none", "source")


def edit_grid(num_inference_steps: int, shift: float, *, strength: float | None = None,
              start_time: float | None = None, grid: str = "lumina") -> jax.Array:
    """The time grid of an edit: its first point is lambda, its last 1.

    strength: the official cut, drop the first floor(N * (1 - strength)) of the N points of the
      named grid (`pipeline.make_grid`; N = its number of points). 1 keeps the whole grid; the
      default (neither given) is the official 0.6.
    start_time: instead, start at exactly lambda = start_time, followed by the grid's points
      above it (lambda = 0: the whole grid).
    A one-point grid [1.0] means no step (the edit returns the source latent).
    """
    if strength is not None and start_time is not None:
        raise ValueError(f"give at most one of strength={strength!r} and start_time={start_time!r}")
    if strength is None and start_time is None:
        strength = 0.6  # LT lumina_next_t2i_mini/sample_img2img.py default
    full = np.asarray(pl.make_grid(grid, num_inference_steps, shift), np.float64)
    if strength is not None:
        if isinstance(strength, bool) or not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength={strength!r} must be in [0, 1]")
        kept = full[int(len(full) * (1.0 - strength)):]
    else:
        if isinstance(start_time, bool) or not 0.0 <= start_time <= 1.0:
            raise ValueError(f"start_time={start_time!r} must be a time in [0, 1]")
        kept = np.concatenate([[start_time], full[full > start_time]])
    if len(kept) == 0:  # strength 0: nothing kept, start at the data end
        kept = full[-1:]
    return jnp.asarray(kept, jnp.float32)


def resize_latents(x: jax.Array, height: int, width: int) -> jax.Array:
    """`[B, h, w, C]` -> `[B, height, width, C]`, bicubic (antialiased when shrinking)."""
    x = jnp.asarray(x, jnp.float32)
    if x.shape[1:3] == (height, width):
        return x
    return jax.image.resize(x, (x.shape[0], height, width, x.shape[3]), method="bicubic")


def channel_normalize(out: jax.Array, source: jax.Array, eps: float = 1e-6) -> jax.Array:
    """Give each channel of `out [B, h, w, C]` the per-image, per-channel mean and std of `source`
    (same shape); see the module docstring."""
    mo, so = out.mean(axis=(1, 2), keepdims=True), out.std(axis=(1, 2), keepdims=True)
    ms, ss = source.mean(axis=(1, 2), keepdims=True), source.std(axis=(1, 2), keepdims=True)
    return (out - mo) / (so + eps) * ss + ms


def source_latents(pipe, height: int, width: int, *, latents=None, images=None) -> jax.Array:
    """The source latent x1 `[B, height/f, width/f, C]`: `images` `[B, H, W, c]` in [-1, 1] resized to
    `height` x `width` (bicubic, as the official PIL resize) and encoded by `pipe.vae.encode` (which
    returns scaled latents), or `latents` `[B, h, w, C]` resized in latent space."""
    if (latents is None) == (images is None):
        raise ValueError("give exactly one of latents= and images=")
    d = pipe.downsample
    if images is not None:
        if pipe.vae is None or not hasattr(pipe.vae, "encode"):
            raise ValueError("encoding images needs a VAE with encode(images) -> scaled latents; or pass latents=")
        images = jnp.asarray(images, jnp.float32)
        if images.ndim != 4:
            raise ValueError(f"images must be [B, H, W, c] in [-1, 1], got shape {images.shape}")
        images = jnp.clip(jax.image.resize(images, (images.shape[0], height, width, images.shape[3]),
                                           method="bicubic"), -1, 1)
        latents = pipe.vae.encode(images)
    latents = jnp.asarray(latents, jnp.float32)
    if latents.ndim != 4 or latents.shape[-1] != pipe.cfg.in_channels:
        raise ValueError(f"source latents must be [B, h, w, C={pipe.cfg.in_channels}], got shape {latents.shape}")
    return resize_latents(latents, height // d, width // d)


def edit(pipe, prompt=None, height: int | None = None, width: int | None = None, *, source=None,
         source_images=None, strength: float | None = None, start_time: float | None = None, prompt_embeds=None,
         negative_prompt=None, negative_prompt_embeds=None, num_inference_steps: int | None = None,
         guidance_scale: float = 4.0, seed=None, noise=None, output_type: str = "latent",
         method: str | None = None, shift: float | None = None, grid: str = "lumina",
         cfg_channels: int | str | None = "official", normalize: str = "none", **option_kw):
    """Edit source latents (or images) with a new prompt, possibly at a larger size.

    Args:
      pipe: a T2I `LuminaNextPipeline` / `FlagDiTPipeline`.
      prompt / prompt_embeds (+ negative_*): the new caption(s), one per source image.
      height, width: output pixels (default: the source's); a larger size upsamples the source.
      source: source latents `[B, h, w, C]` (scaled, as the pipeline samples them); or
        source_images `[B, H, W, c]` in [-1, 1] with a VAE that has `encode` (`autoencoder.kl.VAE`).
      strength / start_time: where the ODE starts (`edit_grid`; default: official strength 0.6).
      noise: eps `[B, h, w, C]` (default: drawn from `seed`).
      normalize: 'none' or 'source' (`channel_normalize` against the source latent).
      option_kw: the pipeline's `inference_options` keywords. The rest as the pipeline call.
    Returns: as the pipeline call.
    """
    apps.check_pipeline(pipe)
    if normalize not in NORMALIZE:
        raise ValueError(f"normalize={normalize!r}; expected one of {NORMALIZE}")
    d = pipe.downsample
    if height is None or width is None:
        ref = source if source is not None else source_images
        if ref is None:
            raise ValueError("give source= latents or source_images=")
        f = d if source is not None else 1
        height, width = height or ref.shape[1] * f, width or ref.shape[2] * f
    pipe._check(height, width, output_type)
    cond, uncond = apps.caption_batches(pipe, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds)
    batch = cond["cap_feats"].shape[0]
    x1 = source_latents(pipe, height, width, latents=source, images=source_images)
    if x1.shape[0] != batch:
        raise ValueError(f"{x1.shape[0]} source images for {batch} prompts")
    s = apps.sampler_settings(pipe, num_inference_steps, method, shift)
    t_grid = edit_grid(s["num_inference_steps"], s["shift"], strength=strength, start_time=start_time, grid=grid)
    if noise is None:
        key = seed if isinstance(seed, jax.Array) else jax.random.key(0 if seed is None else seed)
        noise = jax.random.normal(key, x1.shape)
    noise = jnp.asarray(noise, jnp.float32)
    if noise.shape != x1.shape:
        raise ValueError(f"noise shape {noise.shape}; expected {x1.shape}")
    lam = t_grid[0]
    z = (1.0 - lam) * noise + lam * x1
    if len(t_grid) < 2:  # lambda = 1: nothing to solve
        out = z
    else:
        options = pipe.inference_options(height, width, **option_kw)
        out = pipe._run(cond, uncond, batch, height, width, guidance_scale=guidance_scale, seed=None, latents=z,
                        output_type="latent", grid=grid, cfg_channels=apps.guidance_channels(pipe, cfg_channels),
                        options=options, t_grid=t_grid, **s)
    if normalize == "source":
        out = channel_normalize(out, x1)
    return pipe._output(out, output_type)


def run_edit(pipe, prompt: str, out, *, source=None, source_images=None, strengths=(0.4, 0.6, 0.8),
             height: int | None = None, width: int | None = None, seed: int = 0, **kw):
    """Write a PNG grid to `out`: the source, then its edits at each strength (one row per source
    image; `kw` as `edit`, e.g. normalize='source'). Returns the path."""
    ref = source if source is not None else source_images
    if ref is None:
        raise ValueError("give source= latents or source_images=")
    n = ref.shape[0]
    prompts = [prompt] * n
    cols = [np.clip(np.asarray(source_images, np.float32), -1, 1) if source is None else apps.to_images(pipe, source)]
    for s in strengths:
        cols.append(apps.to_images(pipe, edit(pipe, prompts, height, width, source=source, source_images=source_images,
                                              strength=s, seed=seed, **kw)))
    return apps.save_grid(out, [[c[i] for c in cols] for i in range(n)])
