"""Compositional generation: one prompt per box (REFERENCE.md §6).

Follows LT `lumina_next_compositional_generation/models/model.py` and `demo.py`: K region captions,
a negative caption, and a global caption (the region prompts joined with spaces). Self-attention is
unchanged; in every cross-attention the cond image's queries attend each region caption with mask
= caption mask AND region mask and the K outputs are summed (`models.layers._regional_cross_attention`);
the uncond half attends its negative caption over the whole image. The pooled adaLN caption is the
global caption for the cond half, and, as in the official code (one `global_cap_feats` for the
whole CFG batch), for the uncond half too (`uncond_pooled='negative'` uses the negative caption).

Regions are arbitrary boxes (the official code only splits the image into an equal h x w grid, and
its region index (h+1)(w+1)-1 collides on 2-D grids; `grid_boxes` indexes h * w_split + w).
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np

from flagdit_jax import applications as apps
from flagdit_jax import pipeline as pl
from flagdit_jax import tokens as tok
from flagdit_jax.models.common import RegionalCaptions

UNITS = ("latent", "pixel")


def grid_boxes(h_split: int, w_split: int, height: int, width: int) -> list[tuple[int, int, int, int]]:
    """The official equal grid as boxes (top, left, bottom, right) over a `height` x `width` canvas,
    box k = h * w_split + w (row-major; the official (h+1)(w+1)-1 collides, REFERENCE.md §6)."""
    for name, v in (("h_split", h_split), ("w_split", w_split), ("height", height), ("width", width)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name}={v!r} must be a positive integer")
    hs, ws = height // h_split, width // w_split
    return [(i * hs, j * ws, (i + 1) * hs if i < h_split - 1 else height, (j + 1) * ws if j < w_split - 1 else width)
            for i in range(h_split) for j in range(w_split)]


def region_masks(cfg, latent_height: int, latent_width: int, boxes, *, units: str = "latent",
                 downsample: int = 1) -> np.ndarray:
    """Boxes -> token masks `[K, L]` bool over the packed sequence of one `latent_height` x
    `latent_width` latent (`tokens.pack_for(cfg, ...)`, L including [nextline] / [nextframe]).

    A box is (top, left, bottom, right), half-open, in latent pixels (`units='latent'`) or image
    pixels (`'pixel'`, divided by the VAE `downsample`). A patch token is in a box when its centre
    is, so boxes that do not overlap never share a token and boxes tiling the canvas cover every
    patch once. A [nextline] token belongs to the boxes of the last patch of its row, a [nextframe]
    token to those of its frame's bottom-left patch (so a box over the whole canvas covers every
    token and equals plain cross-attention).
    """
    if units not in UNITS:
        raise ValueError(f"units={units!r}; expected one of {UNITS}")
    if isinstance(downsample, bool) or not isinstance(downsample, (int, np.integer)) or downsample < 1:
        raise ValueError(f"downsample={downsample!r} must be a positive integer")
    b = np.asarray(boxes, np.float64)
    if b.ndim != 2 or b.shape[1] != 4 or len(b) == 0:
        raise ValueError(f"boxes must be a non-empty list of (top, left, bottom, right), got shape {b.shape}")
    if units == "pixel":
        b = b / downsample
    if np.any(b[:, 2] <= b[:, 0]) or np.any(b[:, 3] <= b[:, 1]):
        raise ValueError(f"every box needs bottom > top and right > left, got {np.asarray(boxes).tolist()}")
    layout = tok.pack_for(cfg, jnp.zeros((1, 1, latent_height, latent_width, cfg.in_channels)))
    p = cfg.patch_size
    pos = np.asarray(layout.positions[0])  # [L, 3] (frame, row, col) in patches
    row = np.minimum(pos[:, 1], latent_height // p - 1)  # [nextframe] sits at row H/p
    col = np.minimum(pos[:, 2], latent_width // p - 1)   # [nextline] sits at column W/p
    cy, cx = (row + 0.5) * p, (col + 0.5) * p
    inside = ((b[:, None, 0] <= cy) & (cy < b[:, None, 2]) & (b[:, None, 1] <= cx) & (cx < b[:, None, 3]))
    return inside & (np.asarray(layout.kind[0]) != tok.PAD)


def regional_inputs(cfg, latent_height: int, latent_width: int, region_embeds, global_embeds, negative_embeds,
                    boxes, *, units: str = "latent", downsample: int = 1, batch: int = 1,
                    uncond_pooled: str = "global"):
    """The model inputs `(cond, uncond)` of one compositional CFG batch (leaves `[batch, ...]`).

    region_embeds: (feats [K, S, D], mask [K, S]); global_embeds, negative_embeds: (feats [1, S', D],
    mask [1, S']). cond = {cap_feats: global, cap_mask, regions: K captions in their boxes};
    uncond = {cap_feats: global (official) or negative (`uncond_pooled='negative'`), regions: the
    negative caption over every token in slot 0 and K-1 empty slots}. Captions are padded to one S.
    """
    if uncond_pooled not in ("global", "negative"):
        raise ValueError(f"uncond_pooled={uncond_pooled!r}; expected 'global' or 'negative'")
    rf, rm = np.asarray(region_embeds[0], np.float32), np.asarray(region_embeds[1], bool)
    gf, gm = np.asarray(global_embeds[0], np.float32), np.asarray(global_embeds[1], bool)
    nf, nm = np.asarray(negative_embeds[0], np.float32), np.asarray(negative_embeds[1], bool)
    if rf.ndim != 3 or rm.shape != rf.shape[:2]:
        raise ValueError(f"region captions must be (feats [K, S, D], mask [K, S]), got {rf.shape}, {rm.shape}")
    for name, f, m in (("global", gf, gm), ("negative", nf, nm)):
        if f.ndim != 3 or f.shape[0] != 1 or m.shape != f.shape[:2] or f.shape[2] != rf.shape[2]:
            raise ValueError(f"{name} caption must be (feats [1, S, {rf.shape[2]}], mask [1, S]), got {f.shape}, "
                             f"{m.shape}")
    region = region_masks(cfg, latent_height, latent_width, boxes, units=units, downsample=downsample)
    k = rf.shape[0]
    if region.shape[0] != k:
        raise ValueError(f"{region.shape[0]} boxes for {k} region captions")
    f, m = pl._pad_captions([rf, gf, nf], [rm, gm, nm])
    rf, gf, nf = f[:k], f[k:k + 1], f[k + 1:]
    rm, gm, nm = m[:k], m[k:k + 1], m[k + 1:]
    # The uncond half: the negative caption over the whole image, then K-1 empty slots (no valid
    # token: they add nothing), so both halves have K slots and concatenate into one batch.
    uf = np.concatenate([nf, np.zeros_like(rf[1:])])
    um = np.concatenate([nm, np.zeros_like(rm[1:])])
    ur = np.zeros_like(region)
    ur[0] = True
    tile = lambda a: jnp.asarray(np.repeat(a[None], batch, 0))
    cond = dict(cap_feats=tile(gf[0]), cap_mask=tile(gm[0]), regions=RegionalCaptions(tile(rf), tile(rm), tile(region)))
    pooled_f, pooled_m = (gf[0], gm[0]) if uncond_pooled == "global" else (nf[0], nm[0])
    uncond = dict(cap_feats=tile(pooled_f), cap_mask=tile(pooled_m), regions=RegionalCaptions(tile(uf), tile(um),
                                                                                             tile(ur)))
    return cond, uncond


def compositional(pipe, prompts: Sequence[str] | None, boxes, height: int | None = None, width: int | None = None,
                  *, units: str = "pixel", negative_prompt: str = "", region_embeds=None, global_embeds=None,
                  negative_embeds=None, num_images: int = 1, num_inference_steps: int | None = None,
                  guidance_scale: float = 4.0, seed=None, latents=None, output_type: str = "latent",
                  method: str | None = None, shift: float | None = None, grid: str = "lumina",
                  cfg_channels: int | str | None = "official", uncond_pooled: str = "global", **option_kw):
    """Sample `num_images` images where prompt k describes box k.

    Args:
      pipe: a T2I `LuminaNextPipeline` / `FlagDiTPipeline`.
      prompts: K prompts, encoded with the pipeline's text encoder together with the global caption
        ' '.join(prompts) and `negative_prompt`; or None with `region_embeds` = (feats [K, S, D],
        mask [K, S]), `negative_embeds` (the encoding of '', [1, S', D]) and `global_embeds` (the
        encoding of the joined prompts; default: the K captions' valid tokens concatenated, exact
        only for a per-word encoder).
      boxes: K boxes (top, left, bottom, right) in image pixels (`units='pixel'`) or latent pixels
        (`'latent'`), e.g. `grid_boxes(2, 2, height, width)`.
      uncond_pooled: the uncond half's pooled caption: 'global' (official) or 'negative'.
      option_kw: the pipeline's `inference_options` keywords. The rest as the pipeline call.
    Returns: as the pipeline call, for `num_images` images.
    """
    apps.check_pipeline(pipe)
    height = height or pipe.train_image_size
    width = width or pipe.train_image_size
    if prompts is not None:
        prompts = list(prompts)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}")
        f, m = apps.encode(pipe, prompts + [" ".join(prompts), negative_prompt])
        region_embeds, global_embeds, negative_embeds = (f[:-2], m[:-2]), (f[-2:-1], m[-2:-1]), (f[-1:], m[-1:])
    elif region_embeds is None or negative_embeds is None:
        raise ValueError("give prompts, or region_embeds with negative_embeds (and optionally global_embeds)")
    elif global_embeds is None:
        rf, rm = np.asarray(region_embeds[0], np.float32), np.asarray(region_embeds[1], bool)
        tokens = np.concatenate([rf[k][rm[k]] for k in range(len(rf))])
        global_embeds = (tokens[None], np.ones((1, len(tokens)), bool))
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
        raise ValueError(f"num_images={num_images!r} must be a positive integer")
    pipe._check(height, width, output_type)
    d = pipe.downsample
    cond, uncond = regional_inputs(pipe.cfg, height // d, width // d, region_embeds, global_embeds, negative_embeds,
                                   boxes, units=units, downsample=d, batch=num_images, uncond_pooled=uncond_pooled)
    options = pipe.inference_options(height, width, **option_kw)
    return pipe._run(cond, uncond, num_images, height, width, guidance_scale=guidance_scale, seed=seed,
                     latents=latents, output_type=output_type, grid=grid,
                     cfg_channels=apps.guidance_channels(pipe, cfg_channels), options=options,
                     **apps.sampler_settings(pipe, num_inference_steps, method, shift))


def run_compositional(pipe, prompts: Sequence[str], boxes, out, *, height: int | None = None,
                      width: int | None = None, seed: int = 0, num_images: int = 2, **kw):
    """Write a PNG grid to `out`: row 1 the compositional samples, row 2 the plain pipeline samples
    of the global caption ' '.join(prompts) from the same noise. `kw` as `compositional`."""
    comp = compositional(pipe, prompts, boxes, height, width, seed=seed, num_images=num_images, **kw)
    plain_kw = {k: kw[k] for k in ("num_inference_steps", "guidance_scale", "method", "shift", "grid")
                if k in kw}
    plain = pipe([" ".join(prompts)] * num_images, height, width, seed=seed, output_type="latent",
                 cfg_channels=apps.guidance_channels(pipe, kw.get("cfg_channels", "official")), **plain_kw)
    return apps.save_grid(out, [list(apps.to_images(pipe, comp)), list(apps.to_images(pipe, plain))])
