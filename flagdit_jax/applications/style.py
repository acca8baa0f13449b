"""Style-consistent batches: shared self-attention with the batch's first image (REFERENCE.md §6).

The paper inserts StyleAligned-like attention sharing before RoPE [UNVERIFIED detail: no code is
released]. Our reading (`models.layers.Attention._shared_self_attention`): in every self-attention
layer each image's queries attend to its own keys plus the reference's (pre-RoPE) keys, rotated at
their positions in that image, with the reference's values; the reference (prompt 0) attends only
to itself, so its sample is the one it would be alone. With classifier-free guidance the batch is
[cond; uncond] and each half shares with its own reference (`InferenceOptions(style_groups=2)`).
The softmax scale is the pipeline's (proportional attention keeps the length of one image).
"""

from __future__ import annotations

from flagdit_jax import applications as apps


def style_aligned(pipe, prompt=None, height: int | None = None, width: int | None = None, *, prompt_embeds=None,
                  negative_prompt=None, negative_prompt_embeds=None, num_inference_steps: int | None = None,
                  guidance_scale: float = 4.0, seed=None, latents=None, output_type: str = "latent",
                  method: str | None = None, shift: float | None = None, grid: str = "lumina",
                  cfg_channels: int | str | None = "official", share: bool = True, **option_kw):
    """Sample a batch whose images share the first image's style.

    Args:
      pipe: a T2I `LuminaNextPipeline` / `FlagDiTPipeline`.
      prompt: B prompts (the first is the reference), or `prompt_embeds` = (feats [B, S, D],
        mask [B, S]) with `negative_prompt_embeds` (the encoding of '', [1 or B, S', D]).
      share: False samples the same batch without sharing (the plain pipeline call).
      option_kw: the pipeline's `inference_options` keywords (e.g. proportional_attn=False).
      The rest as the pipeline call; None = the pipeline's official default.
    Returns:
      latents `[B, h, w, C]` ('latent'), images `[B, H, W, 3]` in [0, 1] ('np') or PIL images.
    """
    apps.check_pipeline(pipe)
    cond, uncond = apps.caption_batches(pipe, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds)
    batch = cond["cap_feats"].shape[0]
    if share and batch < 2:
        raise ValueError(f"style sharing needs at least 2 prompts (a reference and one more), got {batch}")
    height = height or pipe.train_image_size
    width = width or pipe.train_image_size
    options = pipe.inference_options(height, width, **option_kw).replace(style_groups=2 if share else 0)
    return pipe._run(cond, uncond, batch, height, width, guidance_scale=guidance_scale, seed=seed, latents=latents,
                     output_type=output_type, grid=grid, cfg_channels=apps.guidance_channels(pipe, cfg_channels),
                     options=options, **apps.sampler_settings(pipe, num_inference_steps, method, shift))


def run_style(pipe, prompts, out, *, seed: int = 0, height: int | None = None, width: int | None = None,
              **kw):
    """Write a PNG grid to `out`: row 1 the style-shared batch (first prompt = reference), row 2 the
    same prompts and noise sampled independently. `kw` as `style_aligned`. Returns the path."""
    shared = style_aligned(pipe, prompts, height, width, seed=seed, share=True, **kw)
    alone = style_aligned(pipe, prompts, height, width, seed=seed, share=False, **kw)
    return apps.save_grid(out, [list(apps.to_images(pipe, shared)), list(apps.to_images(pipe, alone))])
