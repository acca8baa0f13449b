"""Training-free applications of the text-to-image models (REFERENCE.md §6).

Each lives in its own module and works on a `pipeline.LuminaNextPipeline` (Next-DiT) or a
text-conditional `pipeline.FlagDiTPipeline` (Lumina-T2I), from prompts or from caption features:

* `style`: style-consistent batches (self-attention shared with the batch's first image).
* `compositional`: one prompt per box, each prompt's cross-attention confined to its box.
* `editing`: high-resolution editing / img2img (start the ODE part-way, at the source latent).
* `extrapolation`: sampling past the training resolution with each technique on and off, and the
  scoring loop of `experiments/extrapolation.py` for a trained model.

This module holds what they share: captions from prompts or features, the pipelines' official
sampling defaults, latents -> images, and a PNG grid writer.
"""

from __future__ import annotations

import pathlib
from typing import Sequence

import numpy as np

from flagdit_jax import pipeline as pl

# The official T2I sampling defaults of each pipeline (pipeline.py: LuminaNextPipeline, FlagDiTPipeline).
SAMPLING_DEFAULTS = {
    "nextdit": dict(method="midpoint", shift=4.0, num_inference_steps=30),
    "flagdit": dict(method="euler", shift=4.0, num_inference_steps=30),
}


def check_pipeline(pipe) -> None:
    """A ValueError unless `pipe` is a text-to-image pipeline (these applications need captions)."""
    if not isinstance(pipe, (pl.LuminaNextPipeline, pl.FlagDiTPipeline)) or not pipe.cfg.text_conditional:
        raise ValueError(f"expected a text-to-image LuminaNextPipeline or FlagDiTPipeline, got {type(pipe).__name__}"
                         + ("" if not hasattr(pipe, "cfg") else f" of a {type(pipe.cfg).__name__}"))


def sampler_settings(pipe, num_inference_steps=None, method=None, shift=None) -> dict:
    """`num_inference_steps`, `method`, `shift` with None replaced by the pipeline's official default."""
    d = SAMPLING_DEFAULTS[pipe.cfg.kind]
    return dict(num_inference_steps=d["num_inference_steps"] if num_inference_steps is None else num_inference_steps,
                method=d["method"] if method is None else method, shift=d["shift"] if shift is None else shift)


def guidance_channels(pipe, cfg_channels):
    """The pipeline's `cfg_channels`: 'official' = the reference's CFG on the first 3 latent
    channels (REFERENCE.md §4) when there are more than 3, else on all of them (None)."""
    if cfg_channels == "official":
        return 3 if pipe.cfg.in_channels > 3 else None
    return cfg_channels


def caption_batches(pipe, prompt=None, negative_prompt=None, prompt_embeds=None, negative_prompt_embeds=None):
    """`(cond, uncond)` dicts of `cap_feats [B, S, D]`, `cap_mask [B, S]` (one common S), from
    prompts (the pipeline's text encoder; negative default '') or from `prompt_embeds` =
    (feats, mask) with `negative_prompt_embeds` (required with features: the encoding of '')."""
    if prompt_embeds is not None:
        if negative_prompt_embeds is None:
            raise ValueError("prompt_embeds needs negative_prompt_embeds (the encoding of '' by default)")
        feats, mask = np.asarray(prompt_embeds[0], np.float32), np.asarray(prompt_embeds[1], bool)
        nf, nm = np.asarray(negative_prompt_embeds[0], np.float32), np.asarray(negative_prompt_embeds[1], bool)
        if feats.ndim != 3 or mask.shape != feats.shape[:2]:
            raise ValueError(f"prompt_embeds must be (feats [B, S, D], mask [B, S]), got {feats.shape}, {mask.shape}")
        if nf.shape[0] == 1 and feats.shape[0] > 1:
            nf, nm = np.repeat(nf, feats.shape[0], 0), np.repeat(nm, feats.shape[0], 0)
        if nf.shape[0] != feats.shape[0] or nf.shape[2:] != feats.shape[2:] or nm.shape != nf.shape[:2]:
            raise ValueError(f"negative_prompt_embeds {nf.shape}, {nm.shape} do not match prompt_embeds {feats.shape}")
        f, m = pl._pad_captions([feats, nf], [mask, nm])
        b = feats.shape[0]
        return dict(cap_feats=f[:b], cap_mask=m[:b]), dict(cap_feats=f[b:], cap_mask=m[b:])
    if prompt is None:
        raise ValueError("give prompt or prompt_embeds")
    return pipe.encode_prompt(prompt, negative_prompt)


def encode(pipe, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """The pipeline's text encoder on `prompts` -> (feats [N, S, D], mask [N, S])."""
    if pipe.text_encoder is None:
        raise ValueError("encoding prompts needs the pipeline's text_encoder (or pass caption features)")
    f, m = pipe.text_encoder(list(prompts))
    return np.asarray(f, np.float32), np.asarray(m, bool)


def to_images(pipe, latents) -> np.ndarray:
    """Latents `[B, h, w, C]` -> images `[B, H, W, c]` in [-1, 1]: decoded by the pipeline's VAE, or,
    without one, the latents themselves (the embedded-MNIST models sample pixels; first 3 channels)."""
    if pipe.vae is not None:
        return pipe._output(latents, "np") * 2.0 - 1.0
    x = np.clip(np.asarray(latents, np.float32), -1.0, 1.0)
    return x if x.shape[-1] in (1, 3) else x[..., :3]


def save_grid(path, rows: Sequence[Sequence[np.ndarray]], *, gap: int = 2) -> pathlib.Path:
    """Write a PNG grid: `rows` of images `[H, W, C]` in [-1, 1] (C = 1 or 3; sizes may differ: each
    cell is as large as the largest image, images top-left, the rest grey). Returns the path."""
    from PIL import Image

    cells = [[np.asarray(im, np.float32) for im in row] for row in rows]
    if not cells or not all(cells):
        raise ValueError("save_grid needs at least one non-empty row of images")
    shapes = [im.shape for row in cells for im in row]
    if any(len(s) != 3 or s[-1] not in (1, 3) for s in shapes):
        raise ValueError(f"grid images must be [H, W, 1 or 3], got shapes {sorted(set(shapes))}")
    ch = max(s[-1] for s in shapes)
    hh, ww = max(s[0] for s in shapes) + gap, max(s[1] for s in shapes) + gap
    ncol = max(len(r) for r in cells)
    grid = np.zeros((len(cells) * hh, ncol * ww, ch), np.float32)
    for i, row in enumerate(cells):
        for j, im in enumerate(row):
            grid[i * hh: i * hh + im.shape[0], j * ww: j * ww + im.shape[1]] = np.broadcast_to(
                im, im.shape[:2] + (ch,))
    grid = np.uint8(np.round(np.clip((grid + 1.0) * 127.5, 0, 255)))
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid[..., 0] if ch == 1 else grid).save(path)
    return path
