"""Inference pipelines with a diffusers-style call: `LuminaNextPipeline` (Next-DiT T2I) and
`FlagDiTPipeline` (Flag-DiT T2I, or any class-conditional model: Flag-DiT, Next-DiT, DiT ImageNet).

A pipeline holds a model, its params, a VAE and (for text) a text encoder, and samples the flow
ODE from t=0 (noise) to t=1 (data) with classifier-free guidance on the doubled batch, as the
official `forward_with_cfg`. The whole sampler (every model call, CFG and the solver loop) is one
jitted function; it is compiled once per (batch, latent size, caption length, solver, inference
options) and reused across calls (`jax.jit`'s cache keyed on shapes and static arguments; the
model options are one hashable `models.common.InferenceOptions`).

The VAE and text encoder are interfaces (concrete ones arrive with the T2I issue):
  * text_encoder(prompts: list[str]) -> (features [B, S, D] float, mask [B, S] bool)
  * vae.decode(latents [B, h, w, C]) -> images [B, h*f, w*f, 3] in [-1, 1], with attributes
    `scaling_factor`, `shift_factor` and `downsample` (f); latents are divided by the scaling
    factor and shifted before decoding, as diffusers.

Inference options (REFERENCE.md §4, §6): time shifting (`shift`), the time grid ('lumina' = shifted
uniform grid of the official code, 'diffusers' = FlowMatchEulerDiscreteScheduler's, 'sigmoid'),
proportional attention, NTK RoPE (Flag-DiT T2I) or Lumina-Next's time-aware RoPE switch
(`scaling_watershed`, applied only when extrapolating past the training resolution, as the
official code), CFG on the first 3 latent channels (the reference) or all of them.

Step counting: `num_inference_steps` means what it means in the source each grid reproduces. For
the official grids ('lumina', and 'sigmoid' alike) it counts grid points, N points = N-1 steps
(LT `*/transport/integrators.py: ode` integrates over `torch.linspace(t0, t1, num_steps)`; the
official demos' "30 steps" are 29 solver steps); for 'diffusers' it counts scheduler steps, as
`LuminaPipeline(num_inference_steps=N)` (N steps).
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
from flagdit_jax.models.common import InferenceOptions

GRIDS = ("lumina", "diffusers", "sigmoid")
OUTPUT_TYPES = ("pil", "np", "latent")
# Official ImageNet sampling (LT `Next-DiT-ImageNet/sample.py: parse_ode_args`, and the defaults of
# `Flag-DiT-ImageNet/transport/transport.py: Sampler.sample_ode`, which ships no sample.py):
# dopri5, atol 1e-6, rtol 1e-3, no time shift; cfg_scale 4.0 and 250 sampling steps (grid points,
# only the saved points of an adaptive solver).
IMAGENET_SAMPLING = dict(method="dopri5", atol=1e-6, rtol=1e-3, shift=1.0, guidance_scale=4.0, num_inference_steps=250)


class TextEncoder(Protocol):
    def __call__(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]: ...


class VAE(Protocol):
    scaling_factor: float
    shift_factor: float
    downsample: int

    def decode(self, latents: jax.Array) -> jax.Array: ...


def make_grid(kind: str, num_inference_steps: int, shift: float) -> jax.Array:
    """The time grid from 0 to 1 for the named grid; `num_inference_steps` counts grid points for
    'lumina' / 'sigmoid' (official: N points, N-1 steps) and steps for 'diffusers' (N + 1 points)."""
    if kind not in GRIDS:
        raise ValueError(f"grid={kind!r}; expected one of {GRIDS}")
    n, least = num_inference_steps, 1 if kind == "diffusers" else 2
    if isinstance(n, bool) or not isinstance(n, int) or n < least:
        raise ValueError(f"num_inference_steps={n!r} must be an integer >= {least} for grid={kind!r}"
                         + ("" if kind == "diffusers" else " (it counts grid points, as the official code)"))
    if kind == "lumina":
        return timesteps.time_grid(n - 1, shift)
    if kind == "diffusers":
        return timesteps.diffusers_grid(n, shift)
    return timesteps.sigmoid_grid(n - 1, shift=shift)


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
    # Pixels; the resolution the model was trained at: base of proportional attention and of the
    # RoPE extrapolation ratio. 1024 for Lumina-Next-T2I 2B (LT lumina_next_t2i/README.md) and Lumina-T2I.
    train_image_size: int = 1024
    vae_downsample: int = 8  # used when no VAE is given (output_type='latent')

    def __post_init__(self):
        if isinstance(self.train_image_size, bool) or not isinstance(self.train_image_size, int) or \
                self.train_image_size <= 0:
            raise ValueError(f"train_image_size={self.train_image_size!r} must be a positive integer (pixels)")
        self._jitted = jax.jit(self._sample, static_argnames=("shape", "method", "tolerances", "options",
                                                              "cfg_channels"))

    @classmethod
    def from_pretrained(cls, directory, **kwargs):
        """The pipeline stored in one folder (transformer/, vae/, text_encoder/ [, tokenizer/], see
        `flagdit_jax.pretrained`; a diffusers Lumina pipeline folder also loads)."""
        from flagdit_jax import pretrained

        comp = pretrained.load_components(directory)
        del comp["pipeline"]
        return cls(**{**comp, **kwargs})

    # -- hooks -------------------------------------------------------------------------------
    def inference_options(self, height: int, width: int, **opts) -> InferenceOptions:
        """The model options for an image of `height` x `width` pixels."""
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

    @property
    def train_tokens_per_side(self) -> int:
        """Patches per side at the training resolution."""
        return self.train_image_size // (self.downsample * self.cfg.patch_size)

    def _sample(self, params, x0, cond, uncond, grid, guidance_scale, *, shape, method, tolerances, options,
                cfg_channels):
        """x0 [B, L, p*p, C] noise tokens -> x1 at t=1. cond/uncond: dicts of model inputs;
        shape = (2B, h, w) of the doubled CFG batch; tolerances = (atol, rtol) of dopri5."""
        layout = tok.pack_for(self.cfg, jnp.zeros(shape[:1] + (1,) + shape[1:] + (self.cfg.in_channels,)))

        def model_fn(x, t, c):
            out = self.model.apply({"params": params}, layout.replace(tokens=x.reshape(x.shape[:2] + (-1,))), t,
                                   **c, options=options)
            return out.reshape(x.shape)

        v = samplers.guided_velocity_fn(model_fn, cond, uncond, guidance_scale, channels=cfg_channels)
        atol, rtol = tolerances
        return samplers.sample_ode(v, x0, method=method, t_grid=grid, atol=atol, rtol=rtol)

    def _check(self, height, width, output_type):
        f = self.downsample * self.cfg.patch_size
        if height % f or width % f or height <= 0 or width <= 0:
            raise ValueError(f"height={height} and width={width} must be positive multiples of "
                             f"{f} (VAE downsample {self.downsample} x patch {self.cfg.patch_size})")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r}; expected one of {OUTPUT_TYPES}")
        if output_type != "latent" and self.vae is None:
            raise ValueError(f"output_type={output_type!r} needs a VAE; pass vae= or use output_type='latent'")

    def _run(self, cond, uncond, batch, height, width, *, num_inference_steps, guidance_scale, seed, latents,
             output_type, method, shift, grid, cfg_channels, options, atol=1e-6, rtol=1e-3, t_grid=None):
        """The guided ODE from `latents` (or noise from `seed`) over `t_grid` (default: the named
        `grid` from 0 to 1; `applications.editing` starts later), decoded to `output_type`."""
        self._check(height, width, output_type)
        if cfg_channels == "official":  # the reference guides the first 3 latent channels; a 1-channel latent: all
            cfg_channels = 3 if self.cfg.in_channels > 3 else None
        if method not in samplers.ODE_METHODS:
            raise ValueError(f"method={method!r}; expected one of {samplers.ODE_METHODS}")
        if t_grid is None:
            t_grid = make_grid(grid, num_inference_steps, shift)
        c = self.cfg
        h, w = height // self.downsample, width // self.downsample
        if latents is None:
            key = seed if isinstance(seed, jax.Array) else jax.random.key(0 if seed is None else seed)
            latents = jax.random.normal(key, (batch, h, w, c.in_channels))
        latents = jnp.asarray(latents, jnp.float32)
        if latents.shape != (batch, h, w, c.in_channels):
            raise ValueError(f"latents shape {latents.shape}; expected [B, h, w, C]={(batch, h, w, c.in_channels)}")
        packed = tok.pack_for(c, latents[:, None])
        x0 = packed.tokens.reshape(packed.tokens.shape[:2] + (c.patch_size ** 2, c.in_channels))
        x1 = self._jitted(self.params, x0, cond, uncond, t_grid, jnp.asarray(guidance_scale, jnp.float32),
                          shape=(2 * batch, h, w), method=method, tolerances=(float(atol), float(rtol)),
                          options=options, cfg_channels=cfg_channels)
        out = tok.unpack(x1.reshape(x1.shape[:2] + (-1,)), packed)[:, 0]  # [B, h, w, C]
        return self._output(out, output_type)

    def _output(self, out, output_type):
        """Latents `[B, h, w, C]` -> `output_type` ('latent': as they are; 'np' / 'pil': VAE-decoded)."""
        if output_type == "latent":
            return out
        images = self.vae.decode(out / self.vae.scaling_factor + getattr(self.vae, "shift_factor", 0.0))
        images = np.clip((np.asarray(images, np.float32) + 1.0) / 2.0, 0.0, 1.0)
        if output_type == "np":
            return images
        from PIL import Image

        return [Image.fromarray(np.uint8(np.round((im[..., 0] if im.shape[-1] == 1 else im) * 255)))
                for im in images]


def _as_list(x, what) -> list:
    if isinstance(x, str):
        return [x]
    if isinstance(x, (list, tuple)) and all(isinstance(p, str) for p in x):
        return list(x)
    raise ValueError(f"{what} must be a string or a list of strings, got {type(x).__name__}")


@dataclasses.dataclass
class LuminaNextPipeline(_FlowPipeline):
    """Lumina-Next T2I (Next-DiT). Defaults follow the official demo (LT `lumina_next_t2i/demo.py`):
    midpoint, 30 steps (grid points), shift 4, guidance 4, proportional attention, and the
    time-aware RoPE switch (watershed 0.3) only when extrapolating past `train_image_size`.
    diffusers' `LuminaPipeline` is `method='euler', grid='diffusers', scaling_watershed=1.0,
    rope_scaling_always=True`."""

    def __post_init__(self):
        if self.model.cfg.kind != "nextdit" or not self.model.cfg.text_conditional:
            raise ValueError("LuminaNextPipeline needs a text-conditional Next-DiT (e.g. preset 'lumina-next-2b')")
        super().__post_init__()

    def inference_options(self, height: int, width: int, *, proportional_attn: bool = True,
                          scaling_watershed: float = 0.3, rope_scaling: str = "watershed",
                          rope_scaling_always: bool = False, context_drop: int = 1,
                          context_drop_until: float | None = None) -> InferenceOptions:
        """Next-DiT options for `height` x `width` pixels (LT `lumina_next_t2i/sample.py`, `demo.py`).

        s = sqrt(H*W) / S_train scales RoPE (PI before the watershed, NTK after; or the paper's
        forms) only when extrapolating, s > 1, as the official code: `demo.py` applies it to its
        "(Extrapolation)" resolutions, exactly those with more pixels than 1024^2 (1536^2, 2048x1024,
        1024x4096, ... but not 512x2048), and `sample.py` when the resolution class exceeds 1024;
        elsewhere both pass scale_factor = 1. `rope_scaling_always=True` scales at every size,
        s < 1 included, as diffusers' `LuminaPipeline`. Proportional attention's base length is the
        training token count (S_train/16)^2, at every size.
        """
        g = self.train_tokens_per_side
        s = math.sqrt(width * height) / self.train_image_size
        if s <= 1.0 and not rope_scaling_always:
            s = 1.0
        return InferenceOptions(
            base_seqlen=g * g if proportional_attn else None, scale_factor=s, scale_watershed=scaling_watershed,
            rope_scaling=rope_scaling, rope_train_len=g if rope_scaling == "frequency_aware" else None,
            context_drop=context_drop, context_drop_until=context_drop_until)

    def __call__(self, prompt: str | list[str] | None = None, height: int | None = None, width: int | None = None,
                 num_inference_steps: int = 30, guidance_scale: float = 4.0,
                 negative_prompt: str | list[str] | None = None, seed: int | jax.Array | None = None,
                 latents: jax.Array | None = None, output_type: str = "pil", *, prompt_embeds=None,
                 negative_prompt_embeds=None, method: str = "midpoint", shift: float = 4.0, grid: str = "lumina",
                 scaling_watershed: float = 0.3, rope_scaling_always: bool = False, proportional_attn: bool = True,
                 cfg_channels: int | None | str = "official", rope_scaling: str = "watershed", context_drop: int = 1,
                 context_drop_until: float | None = None):
        """Generate images for `prompt` (or precomputed `prompt_embeds=(feats, mask)` pairs).

        Returns a list of PIL images, a `[B, H, W, 3]` array in [0, 1] ('np'), or latents
        `[B, h, w, C]` ('latent'). `latents` (channels-last `[B, h, w, C]`) replaces the noise
        drawn from `seed`. `num_inference_steps` counts grid points for grid='lumina' (official:
        30 = 29 midpoint steps) and steps for grid='diffusers' (module docstring). RoPE scaling
        options: see `inference_options`; `rope_scaling` 'frequency_aware' / 'time_aware' replaces
        the watershed switch by the paper's forms; `context_drop=r` pools keys/values r x r (while
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
        options = self.inference_options(
            height, width, proportional_attn=proportional_attn, scaling_watershed=scaling_watershed,
            rope_scaling=rope_scaling, rope_scaling_always=rope_scaling_always, context_drop=context_drop,
            context_drop_until=context_drop_until)
        return self._run(cond, uncond, batch, height, width, num_inference_steps=num_inference_steps,
                         guidance_scale=guidance_scale, seed=seed, latents=latents, output_type=output_type,
                         method=method, shift=shift, grid=grid, cfg_channels=cfg_channels, options=options)


@dataclasses.dataclass
class FlagDiTPipeline(_FlowPipeline):
    """Lumina-T2I (a text-conditional Flag-DiT, `prompt`) or any class-conditional model (Flag-DiT,
    Next-DiT or DiT ImageNet, `class_labels`; null class = num_classes).

    T2I defaults follow LT `lumina_t2i/demo.py`: euler, 30 steps (grid points), shift 4, guidance
    4, NTK theta scaling by the token-count ratio and proportional attention with [nextline] in
    the base length. Class-conditional defaults follow the official ImageNet sampling
    (`IMAGENET_SAMPLING`: dopri5 with atol 1e-6 / rtol 1e-3, no time shift, guidance 4, no RoPE
    options); each can be overridden."""

    def __post_init__(self):
        if self.model.cfg.text_conditional and self.model.cfg.kind != "flagdit":
            raise ValueError(f"a text-conditional {type(self.model.cfg).__name__} is not Lumina-T2I; "
                             "use LuminaNextPipeline for Next-DiT")
        super().__post_init__()

    def inference_options(self, height: int, width: int, *, proportional_attn: bool = True,
                          ntk_scaling: bool = True) -> InferenceOptions:
        """Lumina-T2I options (LT `lumina_t2i/demo.py`); none for a class-conditional model."""
        if not self.cfg.text_conditional:
            return InferenceOptions()
        g = self.train_tokens_per_side
        f = self.downsample * self.cfg.patch_size
        return InferenceOptions(base_seqlen=g * g + 2 * g if proportional_attn else None,
                                ntk_factor=(width // f) * (height // f) / (g * g) if ntk_scaling else 1.0)

    def __call__(self, prompt: str | list[str] | None = None, height: int | None = None, width: int | None = None,
                 num_inference_steps: int | None = None, guidance_scale: float = 4.0,
                 negative_prompt: str | list[str] | None = None, seed: int | jax.Array | None = None,
                 latents: jax.Array | None = None, output_type: str = "pil", *, class_labels=None,
                 method: str | None = None, shift: float | None = None, grid: str = "lumina",
                 atol: float = IMAGENET_SAMPLING["atol"], rtol: float = IMAGENET_SAMPLING["rtol"],
                 proportional_attn: bool = True, ntk_scaling: bool = True, cfg_channels: int | None | str = "official"):
        """Text (`prompt`) or class (`class_labels` [B] ints) conditional generation.

        None means the model's official default: method 'euler' / 'dopri5', shift 4 / 1,
        num_inference_steps 30 / 250 (grid points; for dopri5 only the saved points) for T2I /
        class-conditional. atol, rtol: dopri5 tolerances. See LuminaNextPipeline for the rest.
        """
        height = height or self.train_image_size
        width = width or self.train_image_size
        text = self.cfg.text_conditional
        if text:
            if prompt is None:
                raise ValueError("a text-conditional Flag-DiT needs prompt=")
            cond, uncond = self.encode_prompt(prompt, negative_prompt)
            batch = cond["cap_feats"].shape[0]
        else:
            if class_labels is None:
                raise ValueError("a class-conditional model needs class_labels=")
            labels = np.atleast_1d(np.asarray(class_labels))
            if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or \
                    labels.max() >= self.cfg.num_classes:
                raise ValueError(f"class_labels must be ints in [0, {self.cfg.num_classes}), got {class_labels!r}")
            batch = len(labels)
            cond = dict(y=jnp.asarray(labels, jnp.int32))
            uncond = dict(y=jnp.full((batch,), self.cfg.num_classes, jnp.int32))
        defaults = dict(method="euler", shift=4.0, num_inference_steps=30) if text else IMAGENET_SAMPLING
        options = self.inference_options(height, width, proportional_attn=proportional_attn, ntk_scaling=ntk_scaling)
        return self._run(cond, uncond, batch, height, width,
                         num_inference_steps=defaults["num_inference_steps"] if num_inference_steps is None
                         else num_inference_steps,
                         guidance_scale=guidance_scale, seed=seed, latents=latents, output_type=output_type,
                         method=method or defaults["method"], shift=defaults["shift"] if shift is None else shift,
                         grid=grid, cfg_channels=cfg_channels, options=options, atol=atol, rtol=rtol)
