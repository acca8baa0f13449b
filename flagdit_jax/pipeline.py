"""Inference pipelines with a diffusers-style call: `LuminaNextPipeline` (Next-DiT T2I) and
`FlagDiTPipeline` (Flag-DiT, class-conditional or Lumina-T2I).

A pipeline holds a model, its params, a VAE and (for text) a text encoder, and samples the flow
ODE from t=0 (noise) to t=1 (data) with classifier-free guidance on the doubled batch, as the
official `forward_with_cfg`. The whole sampler (every model call, CFG and the solver loop) is one
jitted function; it is compiled once per (batch, latent size, caption length, static options) and
reused across calls (`jax.jit`'s cache keyed on shapes and static arguments).

The VAE and text encoder are interfaces (concrete ones arrive with the T2I issue):
  * text_encoder(prompts: list[str]) -> (features [B, S, D] float, mask [B, S] bool)
  * vae.decode(latents [B, h, w, C]) -> images [B, h*f, w*f, 3] in [-1, 1], with attributes
    `scaling_factor`, `shift_factor` and `downsample` (f); latents are divided by the scaling
    factor and shifted before decoding, as diffusers.

Inference options (REFERENCE.md §4, §6): time shifting (`shift`), the time grid ('lumina' = shifted
uniform grid of the official code, 'diffusers' = FlowMatchEulerDiscreteScheduler's, 'sigmoid'),
proportional attention, NTK RoPE (Flag-DiT T2I) or Lumina-Next's time-aware RoPE switch
(`scaling_watershed`), CFG on the first 3 latent channels (the reference) or all of them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flagdit_jax import tokens as tok
from flagdit_jax.flow import samplers, timesteps
from flagdit_jax.models.next_dit import NextDiTConfig

GRIDS = ("lumina", "diffusers", "sigmoid")
OUTPUT_TYPES = ("pil", "np", "latent")


class TextEncoder(Protocol):
    def __call__(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]: ...


class VAE(Protocol):
    scaling_factor: float
    shift_factor: float
    downsample: int

    def decode(self, latents: jax.Array) -> jax.Array: ...


def make_grid(kind: str, num_steps: int, shift: float) -> jax.Array:
    """`[num_steps + 1]` times from 0 to 1 for the named grid (see module docstring)."""
    if kind == "lumina":
        return timesteps.time_grid(num_steps, shift)
    if kind == "diffusers":
        return timesteps.diffusers_grid(num_steps, shift)
    if kind == "sigmoid":
        return timesteps.sigmoid_grid(num_steps, shift=shift)
    raise ValueError(f"grid={kind!r}; expected one of {GRIDS}")


def _pad_captions(feats: Sequence[np.ndarray], masks: Sequence[np.ndarray]):
    """Right-pad caption batches to one length S (zeros, mask False) and concatenate."""
    s = max(f.shape[1] for f in feats)
    out_f, out_m = [], []
    for f, m in zip(feats, masks):
        pad = s - f.shape[1]
        out_f.append(np.pad(np.asarray(f, np.float32), ((0, 0), (0, pad), (0, 0))))
        out_m.append(np.pad(np.asarray(m, bool), ((0, 0), (0, pad))))
    return np.concatenate(out_f), np.concatenate(out_m)


@dataclasses.dataclass
class _FlowPipeline:
    """Shared machinery: latent layout, the jitted guided sampler, decoding."""

    model: Any  # a Flax module built by models.registry
    params: Any
    vae: VAE | None = None
    text_encoder: TextEncoder | None = None
    train_image_size: int = 1024  # pixels; the resolution the model was trained at
    vae_downsample: int = 8  # used when no VAE is given (output_type='latent')

    def __post_init__(self):
        self._jitted = jax.jit(self._sample, static_argnames=("shape", "method", "opts"))

    # -- hooks -------------------------------------------------------------------------------
    def _model_kwargs(self, height: int, width: int, opts: dict) -> dict:
        raise NotImplementedError

    def encode_prompt(self, prompt, negative_prompt=None):
        """-> (cond, uncond) dicts of cap_feats [B, S, D] and cap_mask [B, S]; the negative default is ''."""
        if self.text_encoder is None:
            raise ValueError("encoding prompts needs a text_encoder")
        prompts = _as_list(prompt, "prompt")
        neg = [""] * len(prompts) if negative_prompt is None else _as_list(negative_prompt, "negative_prompt")
        if len(neg) == 1 and len(prompts) > 1:
            neg = neg * len(prompts)
        if len(neg) != len(prompts):
            raise ValueError(f"{len(neg)} negative prompts for {len(prompts)} prompts")
        fc, mc = self.text_encoder(prompts)
        fu, mu = self.text_encoder(neg)
        f, m = _pad_captions([fc, fu], [mc, mu])
        b = len(prompts)
        return (dict(cap_feats=jnp.asarray(f[:b]), cap_mask=jnp.asarray(m[:b])),
                dict(cap_feats=jnp.asarray(f[b:]), cap_mask=jnp.asarray(m[b:])))

    # -- core --------------------------------------------------------------------------------
    @property
    def cfg(self):
        return self.model.cfg

    @property
    def downsample(self) -> int:
        return self.vae.downsample if self.vae is not None else self.vae_downsample

    def _layout(self, batch: int, h: int, w: int) -> tok.Packed:
        c = self.cfg
        return tok.pack(jnp.zeros((batch, 1, h, w, c.in_channels)), c.patch_size, nextline=c.nextline,
                        nextframe=c.nextframe)

    def _sample(self, params, x0, cond, uncond, grid, guidance_scale, *, shape, method, opts):
        """x0 [B, L, p*p, C] noise tokens -> x1 at t=1. cond/uncond: dicts of model inputs;
        shape = (2B, h, w) of the doubled CFG batch."""
        layout = self._layout(*shape)
        model_kw = dict(opts)
        cfg_channels = model_kw.pop("cfg_channels")

        def model_fn(x, t, c):
            out = self.model.apply({"params": params}, layout.replace(tokens=x.reshape(x.shape[:2] + (-1,))), t,
                                   **c, **model_kw)
            return out.reshape(x.shape)

        v = samplers.guided_velocity_fn(model_fn, cond, uncond, guidance_scale, channels=cfg_channels)
        return samplers.sample_ode(v, x0, method=method, t_grid=grid)

    def _check(self, height, width, num_inference_steps, output_type):
        f = self.downsample * self.cfg.patch_size
        if height % f or width % f or height <= 0 or width <= 0:
            raise ValueError(f"height={height} and width={width} must be positive multiples of "
                             f"{f} (VAE downsample {self.downsample} x patch {self.cfg.patch_size})")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps={num_inference_steps} must be >= 1")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r}; expected one of {OUTPUT_TYPES}")
        if output_type != "latent" and self.vae is None:
            raise ValueError(f"output_type={output_type!r} needs a VAE; pass vae= or use output_type='latent'")

    def _run(self, cond, uncond, batch, height, width, *, num_inference_steps, guidance_scale, seed, latents,
             output_type, method, shift, grid, cfg_channels, extra_opts):
        self._check(height, width, num_inference_steps, output_type)
        c = self.cfg
        h, w = height // self.downsample, width // self.downsample
        if latents is None:
            key = seed if isinstance(seed, jax.Array) else jax.random.key(0 if seed is None else seed)
            latents = jax.random.normal(key, (batch, h, w, c.in_channels))
        latents = jnp.asarray(latents, jnp.float32)
        if latents.shape != (batch, h, w, c.in_channels):
            raise ValueError(f"latents shape {latents.shape}; expected [B, h, w, C]={(batch, h, w, c.in_channels)}")
        packed = tok.pack(latents[:, None], c.patch_size, nextline=c.nextline, nextframe=c.nextframe)
        x0 = packed.tokens.reshape(packed.tokens.shape[:2] + (c.patch_size ** 2, c.in_channels))
        opts = dict(self._model_kwargs(height, width, extra_opts), cfg_channels=cfg_channels)
        x1 = self._jitted(self.params, x0, cond, uncond, make_grid(grid, num_inference_steps, shift),
                          jnp.asarray(guidance_scale, jnp.float32), shape=(2 * batch, h, w), method=method,
                          opts=_Frozen(opts))
        out = tok.unpack(x1.reshape(x1.shape[:2] + (-1,)), packed)[:, 0]  # [B, h, w, C]
        if output_type == "latent":
            return out
        images = self.vae.decode(out / self.vae.scaling_factor + getattr(self.vae, "shift_factor", 0.0))
        images = np.clip((np.asarray(images, np.float32) + 1.0) / 2.0, 0.0, 1.0)
        if output_type == "np":
            return images
        from PIL import Image

        return [Image.fromarray(np.uint8(np.round(im * 255))) for im in images]


class _Frozen(dict):
    """A hashable dict for jit's static arguments (model options)."""

    def __hash__(self):
        return hash(tuple(sorted(self.items())))


def _as_list(x, what) -> list:
    if isinstance(x, str):
        return [x]
    if isinstance(x, (list, tuple)) and all(isinstance(p, str) for p in x):
        return list(x)
    raise ValueError(f"{what} must be a string or a list of strings, got {type(x).__name__}")


@dataclasses.dataclass
class LuminaNextPipeline(_FlowPipeline):
    """Lumina-Next T2I (Next-DiT). Defaults follow the official demo (LT `lumina_next_t2i/demo.py`):
    midpoint, 30 steps, shift 4, guidance 4, time-aware RoPE watershed 0.3 when extrapolating,
    proportional attention. diffusers' `LuminaText2ImgPipeline` is `method='euler',
    grid='diffusers', scaling_watershed=1.0`."""

    def __post_init__(self):
        if not isinstance(self.model.cfg, NextDiTConfig) or not self.model.cfg.text_conditional:
            raise ValueError("LuminaNextPipeline needs a text-conditional Next-DiT (e.g. preset 'lumina-next-2b')")
        super().__post_init__()

    def _model_kwargs(self, height, width, opts):
        kw = {}
        if opts["proportional_attn"]:
            kw["base_seqlen"] = (self.train_image_size // (self.downsample * self.cfg.patch_size)) ** 2
        # Lumina-Next: s = sqrt(W*H)/S, PI before the watershed, NTK after (REFERENCE.md §4); or the
        # paper's continuous frequency-/time-aware forms with the same s.
        kw["scale_factor"] = math.sqrt(width * height / self.train_image_size ** 2)
        if opts["rope_scaling"] == "watershed":
            kw["scale_watershed"] = float(opts["scaling_watershed"])
        else:
            kw["rope_scaling"] = opts["rope_scaling"]
            kw["rope_train_len"] = self.train_image_size // (self.downsample * self.cfg.patch_size)
        if opts["context_drop"] != 1:
            kw["context_drop"] = int(opts["context_drop"])
            kw["context_drop_until"] = opts["context_drop_until"]
        return kw

    def __call__(self, prompt: str | list[str] | None = None, height: int | None = None, width: int | None = None,
                 num_inference_steps: int = 30, guidance_scale: float = 4.0,
                 negative_prompt: str | list[str] | None = None, seed: int | jax.Array | None = None,
                 latents: jax.Array | None = None, output_type: str = "pil", *, prompt_embeds=None,
                 negative_prompt_embeds=None, method: str = "midpoint", shift: float = 4.0, grid: str = "lumina",
                 scaling_watershed: float = 0.3, proportional_attn: bool = True, cfg_channels: int | None = 3,
                 rope_scaling: str = "watershed", context_drop: int = 1, context_drop_until: float | None = None):
        """Generate images for `prompt` (or precomputed `prompt_embeds=(feats, mask)` pairs).

        Returns a list of PIL images, a `[B, H, W, 3]` array in [0, 1] ('np'), or latents
        `[B, h, w, C]` ('latent'). `latents` (channels-last `[B, h, w, C]`) replaces the noise
        drawn from `seed`. `rope_scaling` 'frequency_aware' / 'time_aware' replaces the watershed
        switch by the paper's forms; `context_drop=r` pools keys/values r x r (while
        t < `context_drop_until` when given).
        """
        height = height or self.train_image_size
        width = width or self.train_image_size
        if prompt_embeds is not None:
            if negative_prompt_embeds is None:
                raise ValueError("prompt_embeds needs negative_prompt_embeds (the encoding of '' by default)")
            f, m = _pad_captions([prompt_embeds[0], negative_prompt_embeds[0]],
                                 [prompt_embeds[1], negative_prompt_embeds[1]])
            b = prompt_embeds[0].shape[0]
            cond = dict(cap_feats=jnp.asarray(f[:b]), cap_mask=jnp.asarray(m[:b]))
            uncond = dict(cap_feats=jnp.asarray(f[b:]), cap_mask=jnp.asarray(m[b:]))
        elif prompt is not None:
            cond, uncond = self.encode_prompt(prompt, negative_prompt)
        else:
            raise ValueError("give prompt or prompt_embeds")
        batch = cond["cap_feats"].shape[0]
        return self._run(cond, uncond, batch, height, width, num_inference_steps=num_inference_steps,
                         guidance_scale=guidance_scale, seed=seed, latents=latents, output_type=output_type,
                         method=method, shift=shift, grid=grid, cfg_channels=cfg_channels,
                         extra_opts=dict(proportional_attn=proportional_attn, scaling_watershed=scaling_watershed,
                                         rope_scaling=rope_scaling, context_drop=context_drop,
                                         context_drop_until=context_drop_until))


@dataclasses.dataclass
class FlagDiTPipeline(_FlowPipeline):
    """Flag-DiT: class-conditional (`class_labels`, null class = num_classes) or Lumina-T2I
    (`prompt`). T2I defaults follow LT `lumina_t2i/demo.py`: euler, 30 steps, shift 4, guidance 4,
    NTK theta scaling by the token-count ratio and proportional attention with [nextline] in the
    base length. Class-conditional defaults: dopri5-free fixed steps, all options off."""

    def _model_kwargs(self, height, width, opts):
        kw = {}
        if not self.cfg.text_conditional:
            return kw
        g = self.train_image_size // (self.downsample * self.cfg.patch_size)  # patches per side at train size
        if opts["proportional_attn"]:
            kw["base_seqlen"] = g * g + 2 * g  # LT lumina_t2i/demo.py
        if opts["ntk_scaling"]:
            f = self.downsample * self.cfg.patch_size
            kw["ntk_factor"] = (width // f) * (height // f) / (g * g)
        return kw

    def __call__(self, prompt: str | list[str] | None = None, height: int | None = None, width: int | None = None,
                 num_inference_steps: int = 30, guidance_scale: float = 4.0,
                 negative_prompt: str | list[str] | None = None, seed: int | jax.Array | None = None,
                 latents: jax.Array | None = None, output_type: str = "pil", *, class_labels=None,
                 method: str = "euler", shift: float = 4.0, grid: str = "lumina", proportional_attn: bool = True,
                 ntk_scaling: bool = True, cfg_channels: int | None = 3):
        """Text (`prompt`) or class (`class_labels` [B] ints) conditional generation; see LuminaNextPipeline."""
        height = height or self.train_image_size
        width = width or self.train_image_size
        if self.cfg.text_conditional:
            if prompt is None:
                raise ValueError("a text-conditional Flag-DiT needs prompt=")
            cond, uncond = self.encode_prompt(prompt, negative_prompt)
            batch = cond["cap_feats"].shape[0]
        else:
            if class_labels is None:
                raise ValueError("a class-conditional Flag-DiT needs class_labels=")
            labels = np.atleast_1d(np.asarray(class_labels))
            if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or \
                    labels.max() >= self.cfg.num_classes:
                raise ValueError(f"class_labels must be ints in [0, {self.cfg.num_classes}), got {class_labels!r}")
            batch = len(labels)
            cond = dict(y=jnp.asarray(labels, jnp.int32))
            uncond = dict(y=jnp.full((batch,), self.cfg.num_classes, jnp.int32))
        return self._run(cond, uncond, batch, height, width, num_inference_steps=num_inference_steps,
                         guidance_scale=guidance_scale, seed=seed, latents=latents, output_type=output_type,
                         method=method, shift=shift, grid=grid, cfg_channels=cfg_channels,
                         extra_opts=dict(proportional_attn=proportional_attn, ntk_scaling=ntk_scaling))
