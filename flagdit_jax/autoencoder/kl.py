"""diffusers' `AutoencoderKL` (the SD / SDXL / SD3 / Flux VAE) in Flax linen, NHWC.

Followed: diffusers `models/autoencoders/autoencoder_kl.py` (AutoencoderKL), `vae.py` (Encoder,
Decoder, DiagonalGaussianDistribution), `unets/unet_2d_blocks.py` (DownEncoderBlock2D,
UpDecoderBlock2D, UNetMidBlock2D), `resnet.py` (ResnetBlock2D), `attention_processor.py`
(the mid-block's single-head self-attention), `downsampling.py` (pad right/bottom by 1, then a
stride-2 3x3 conv) and `upsampling.py` (nearest x2, then a 3x3 conv).

Submodules carry diffusers' names with `.N` written `_N` (`encoder/down_blocks_0/resnets_1/norm1`
is `encoder.down_blocks.0.resnets.1.norm1`), so `convert.py` maps keys by rule, not by table.
Every GroupNorm uses eps 1e-6 (diffusers hard-codes it in the VAE) and the two-pass variance
(`use_fast_variance=False`), which is what torch computes.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

DOWN_BLOCK = "DownEncoderBlock2D"
UP_BLOCK = "UpDecoderBlock2D"
_EPS = 1e-6  # diffusers Encoder/Decoder: resnet_eps=1e-6 and GroupNorm(eps=1e-6) everywhere
LOGVAR_RANGE = (-30.0, 20.0)  # diffusers DiagonalGaussianDistribution clamps logvar to this


@dataclasses.dataclass(frozen=True)
class AutoencoderKLConfig:
    """The fields of diffusers' `AutoencoderKL.__init__` that this port supports.

    `down_block_types` / `up_block_types` must be all `DownEncoderBlock2D` / `UpDecoderBlock2D`
    (every AutoencoderKL checkpoint published uses these); their count is len(block_out_channels).
    `sample_size`, `force_upcast`, `latents_mean` / `latents_std` do not change the network and are
    kept so a config round-trips through config.json.
    """

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self):
        object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
        for name in ("latents_mean", "latents_std"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))
        positive = {k: getattr(self, k) for k in ("in_channels", "out_channels", "layers_per_block", "latent_channels",
                                                   "norm_num_groups")}
        bad = {k: v for k, v in positive.items() if isinstance(v, bool) or not isinstance(v, int) or v <= 0}
        if bad:
            raise ValueError(f"AutoencoderKL config fields {bad} must be positive ints")
        if not self.block_out_channels or any(c <= 0 for c in self.block_out_channels):
            raise ValueError(f"block_out_channels={self.block_out_channels} must be a non-empty tuple of positive ints")
        odd = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if odd:
            raise ValueError(f"block_out_channels {odd} are not divisible by norm_num_groups={self.norm_num_groups} "
                             "(GroupNorm needs whole groups)")
        if self.act_fn != "silu":
            raise ValueError(f"act_fn={self.act_fn!r}; only 'silu' is supported (every published AutoencoderKL)")
        if not (isinstance(self.scaling_factor, (int, float)) and self.scaling_factor > 0):
            raise ValueError(f"scaling_factor={self.scaling_factor!r} must be a positive number")

    @property
    def downsample(self) -> int:
        """Spatial factor image -> latent: one stride-2 conv per block but the last."""
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def shift(self) -> float:
        """`shift_factor` with None read as 0 (SD / SDXL have none)."""
        return 0.0 if self.shift_factor is None else float(self.shift_factor)


class ResnetBlock2D(nn.Module):
    """diffusers `ResnetBlock2D` without time embedding: x + conv2(act(norm2(conv1(act(norm1(x)))))),
    with a 1x1 `conv_shortcut` on x when the channel count changes. [B, H, W, C] -> [B, H, W, out]."""

    out_channels: int
    groups: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        norm = lambda name: nn.GroupNorm(self.groups, epsilon=_EPS, use_fast_variance=False, dtype=self.dtype, name=name)
        conv = lambda c, k, name: nn.Conv(c, (k, k), padding=k // 2, dtype=self.dtype, name=name)
        h = conv(self.out_channels, 3, "conv1")(nn.silu(norm("norm1")(x)))
        h = conv(self.out_channels, 3, "conv2")(nn.silu(norm("norm2")(h)))  # dropout 0 in every VAE
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, "conv_shortcut")(x)
        return x + h  # output_scale_factor = 1


class Attention(nn.Module):
    """The mid-block self-attention (diffusers `Attention(..., residual_connection=True,
    _from_deprecated_attn_block=True)`, heads = channels // attention_head_dim = 1): GroupNorm,
    one-head attention over the H*W positions with scale 1/sqrt(C), output projection, residual."""

    groups: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        y = nn.GroupNorm(self.groups, epsilon=_EPS, use_fast_variance=False, dtype=self.dtype, name="group_norm")(x)
        y = y.reshape(b, h * w, 1, c)  # [B, T, N=1, H=C]
        q, k, v = (nn.Dense(c, dtype=self.dtype, name=n)(y) for n in ("to_q", "to_k", "to_v"))
        y = jax.nn.dot_product_attention(q, k, v)  # softmax in fp32 (upcast_softmax=True)
        y = nn.Dense(c, dtype=self.dtype, name="to_out_0")(y.reshape(b, h * w, c))
        return x + y.reshape(b, h, w, c)


class MidBlock(nn.Module):
    """diffusers `UNetMidBlock2D` (num_layers=1): resnet, [attention], resnet."""

    groups: int
    add_attention: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        x = ResnetBlock2D(c, self.groups, self.dtype, name="resnets_0")(x)
        if self.add_attention:
            x = Attention(self.groups, self.dtype, name="attentions_0")(x)
        return ResnetBlock2D(c, self.groups, self.dtype, name="resnets_1")(x)


class Downsample2D(nn.Module):
    """diffusers `Downsample2D(use_conv=True, padding=0)`: zero-pad right and bottom by one, then a
    3x3 stride-2 VALID conv. [B, H, W, C] -> [B, H//2, W//2, C]."""

    channels: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return nn.Conv(self.channels, (3, 3), strides=(2, 2), padding="VALID", dtype=self.dtype, name="conv")(x)


class Upsample2D(nn.Module):
    """diffusers `Upsample2D(use_conv=True)`: nearest-neighbour x2, then a 3x3 conv."""

    channels: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return nn.Conv(self.channels, (3, 3), padding=1, dtype=self.dtype, name="conv")(x)


class UpDownBlock(nn.Module):
    """`DownEncoderBlock2D` (resnets then a Downsample2D) or `UpDecoderBlock2D` (resnets then an
    Upsample2D); the resampler is left out of the last block, as diffusers."""

    out_channels: int
    num_layers: int
    groups: int
    resample: str | None  # 'down', 'up' or None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        for i in range(self.num_layers):
            x = ResnetBlock2D(self.out_channels, self.groups, self.dtype, name=f"resnets_{i}")(x)
        if self.resample == "down":
            x = Downsample2D(self.out_channels, self.dtype, name="downsamplers_0")(x)
        elif self.resample == "up":
            x = Upsample2D(self.out_channels, self.dtype, name="upsamplers_0")(x)
        return x


def _norm_act_conv(x, groups, channels, dtype):
    x = nn.GroupNorm(groups, epsilon=_EPS, use_fast_variance=False, dtype=dtype, name="conv_norm_out")(x)
    return nn.Conv(channels, (3, 3), padding=1, dtype=dtype, name="conv_out")(nn.silu(x))


class Encoder(nn.Module):
    """diffusers `Encoder(double_z=True)`: [B, H, W, C_in] -> moments [B, H/f, W/f, 2*latent]."""

    config: AutoencoderKLConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c, chans = self.config, self.config.block_out_channels
        x = nn.Conv(chans[0], (3, 3), padding=1, dtype=self.dtype, name="conv_in")(x)
        for i, ch in enumerate(chans):
            last = i == len(chans) - 1
            x = UpDownBlock(ch, c.layers_per_block, c.norm_num_groups, None if last else "down", self.dtype,
                            name=f"down_blocks_{i}")(x)
        x = MidBlock(c.norm_num_groups, c.mid_block_add_attention, self.dtype, name="mid_block")(x)
        return _norm_act_conv(x, c.norm_num_groups, 2 * c.latent_channels, self.dtype)


class Decoder(nn.Module):
    """diffusers `Decoder(norm_type='group')`: [B, h, w, latent] -> [B, h*f, w*f, C_out]; each up
    block has layers_per_block + 1 resnets."""

    config: AutoencoderKLConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z):
        c, chans = self.config, tuple(reversed(self.config.block_out_channels))
        x = nn.Conv(chans[0], (3, 3), padding=1, dtype=self.dtype, name="conv_in")(z)
        x = MidBlock(c.norm_num_groups, c.mid_block_add_attention, self.dtype, name="mid_block")(x)
        for i, ch in enumerate(chans):
            last = i == len(chans) - 1
            x = UpDownBlock(ch, c.layers_per_block + 1, c.norm_num_groups, None if last else "up", self.dtype,
                            name=f"up_blocks_{i}")(x)
        return _norm_act_conv(x, c.norm_num_groups, c.out_channels, self.dtype)


class AutoencoderKL(nn.Module):
    """diffusers `AutoencoderKL` in NHWC. `__call__` (used by `init`) encodes then decodes the mean.

    Methods for `apply(..., method=...)`:
      * `encode(x [B, H, W, C_in]) -> (mean, logvar)` each `[B, H/f, W/f, latent]`, logvar clamped
        to [-30, 20] as diffusers' DiagonalGaussianDistribution;
      * `decode(z [B, h, w, latent]) -> [B, h*f, w*f, C_out]` of UNSCALED latents (no clipping).
    """

    config: AutoencoderKLConfig
    dtype: Any = jnp.float32

    def setup(self):
        c = self.config
        self.encoder = Encoder(c, self.dtype)
        self.decoder = Decoder(c, self.dtype)
        if c.use_quant_conv:
            self.quant_conv = nn.Conv(2 * c.latent_channels, (1, 1), dtype=self.dtype)
        if c.use_post_quant_conv:
            self.post_quant_conv = nn.Conv(c.latent_channels, (1, 1), dtype=self.dtype)

    def encode(self, x):
        moments = self.encoder(x)
        if self.config.use_quant_conv:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)  # torch.chunk(dim=1): mean first
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)

    def decode(self, z):
        if self.config.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(self, x):
        return self.decode(self.encode(x)[0])


def sample_posterior(mean: jax.Array, logvar: jax.Array, rng: jax.Array) -> jax.Array:
    """z = mean + exp(logvar / 2) * eps with eps = `jax.random.normal(rng, mean.shape)` (diffusers
    `DiagonalGaussianDistribution.sample`); shapes `[B, h, w, C]`."""
    return mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)


def kl_divergence(mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """KL(N(mean, exp(logvar)) || N(0, 1)) summed over [h, w, C] per example: `[B]` (diffusers
    `DiagonalGaussianDistribution.kl()`)."""
    return 0.5 * jnp.sum(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3))


# Every field of diffusers' AutoencoderKL.__init__ (0.42); `down/up_block_types` are checked, not stored.
DIFFUSERS_FIELDS = tuple(f.name for f in dataclasses.fields(AutoencoderKLConfig)) + ("down_block_types",
                                                                                     "up_block_types")


def config_from_diffusers(config: Mapping[str, Any]) -> AutoencoderKLConfig:
    """A diffusers AutoencoderKL config.json (as a dict) -> `AutoencoderKLConfig`.

    Missing fields take diffusers' defaults; keys starting with `_` (`_class_name`,
    `_diffusers_version`, ...) are metadata.

    Raises:
      ValueError: for another `_class_name`, an unknown field, or block types other than
        DownEncoderBlock2D / UpDecoderBlock2D (one per entry of block_out_channels).
    """
    cls = config.get("_class_name", "AutoencoderKL")
    if cls != "AutoencoderKL":
        raise ValueError(f"config _class_name={cls!r}; expected 'AutoencoderKL'")
    unknown = sorted(k for k in config if not k.startswith("_") and k not in DIFFUSERS_FIELDS)
    if unknown:
        raise ValueError(f"unknown AutoencoderKL config field(s) {unknown}; expected a subset of {sorted(DIFFUSERS_FIELDS)}")
    kw = {k: v for k, v in config.items() if not k.startswith("_") and k not in ("down_block_types", "up_block_types")}
    for k in ("block_out_channels", "latents_mean", "latents_std"):
        if isinstance(kw.get(k), list):
            kw[k] = tuple(kw[k])
    cfg = AutoencoderKLConfig(**kw)
    n = len(cfg.block_out_channels)
    for key, want in (("down_block_types", DOWN_BLOCK), ("up_block_types", UP_BLOCK)):
        types = tuple(config.get(key, (want,)))
        if types != (want,) * n:
            raise ValueError(f"{key}={list(types)}; expected {n} x {want!r} (one per block_out_channels entry)")
    return cfg


def config_to_diffusers(cfg: AutoencoderKLConfig) -> dict[str, Any]:
    """`AutoencoderKLConfig` -> the dict diffusers' `AutoencoderKL(**kw)` / config.json takes."""
    n = len(cfg.block_out_channels)
    d = dataclasses.asdict(cfg)
    for k in ("block_out_channels", "latents_mean", "latents_std"):
        d[k] = None if d[k] is None else list(d[k])
    return {"_class_name": "AutoencoderKL", **d, "down_block_types": [DOWN_BLOCK] * n,
            "up_block_types": [UP_BLOCK] * n}


# Module-level jits keyed on the (hashable, compared by value) module: every VAE of one config and
# dtype shares the compiled programs, one per input shape.
@functools.partial(jax.jit, static_argnums=0)
def _posterior(model: AutoencoderKL, params, x):
    return model.apply({"params": params}, x, method=AutoencoderKL.encode)


@functools.partial(jax.jit, static_argnums=0)
def _encode(model: AutoencoderKL, params, x, rng, shift, scale):
    mean, logvar = model.apply({"params": params}, x, method=AutoencoderKL.encode)
    z = mean if rng is None else sample_posterior(mean, logvar, rng)  # None: a static (leafless) argument
    return (z - shift) * scale


@functools.partial(jax.jit, static_argnums=0)
def _decode(model: AutoencoderKL, params, z):
    return model.apply({"params": params}, z, method=AutoencoderKL.decode)


class VAE:
    """A loaded AutoencoderKL for pipelines and latent caches (the `pipeline.VAE` protocol).

    Attributes: `config`, `params`, `scaling_factor`, `shift_factor` (0.0 when the config has
    none), `downsample` (f), `latent_channels`. `encode` returns SCALED latents
    (z - shift_factor) * scaling_factor, as diffusers users (and the official Lumina training
    scripts) feed the DiT; `decode` takes UNSCALED latents, as the pipeline calls it:
    `vae.decode(latents / vae.scaling_factor + vae.shift_factor)`. Each entry point is jitted and
    compiled once per input shape.
    """

    def __init__(self, params, config: AutoencoderKLConfig, *, dtype: Any = jnp.float32):
        if not isinstance(config, AutoencoderKLConfig):
            raise ValueError(f"config must be an AutoencoderKLConfig, got {type(config).__name__}")
        self.config, self.params = config, params
        self.model = AutoencoderKL(config, dtype=dtype)
        self.scaling_factor = float(config.scaling_factor)
        self.shift_factor = config.shift
        self.downsample = config.downsample
        self.latent_channels = config.latent_channels

    def _check(self, x, channels: int, step: int, what: str) -> jax.Array:
        shape = tuple(getattr(x, "shape", ()))
        if len(shape) != 4 or shape[-1] != channels or shape[0] == 0 or shape[1] % step or shape[2] % step or 0 in shape:
            raise ValueError(f"{what} shape {shape}; expected [B, H, W, {channels}] with H and W positive multiples "
                             f"of {step}")
        return jnp.asarray(x, jnp.float32)

    def posterior(self, images) -> tuple[jax.Array, jax.Array]:
        """images `[B, H, W, in_channels]` in [-1, 1] -> (mean, logvar) of the unscaled latent, each
        `[B, H/f, W/f, latent_channels]` float32."""
        return _posterior(self.model, self.params, self._check(images, self.config.in_channels, self.downsample, "images"))

    def encode(self, images, *, sample: bool = False, rng: jax.Array | None = None) -> jax.Array:
        """images `[B, H, W, in_channels]` in [-1, 1] -> scaled latents `[B, H/f, W/f, latent]`:
        (z - shift_factor) * scaling_factor with z the posterior mean, or with `sample=True` a draw
        `sample_posterior(mean, logvar, rng)` (the official Lumina training encodes with a sample)."""
        if sample and rng is None:
            raise ValueError("encode(sample=True) needs rng= (a jax.random key)")
        if not sample and rng is not None:
            raise ValueError("rng= is only used with sample=True (the posterior mean needs no randomness)")
        x = self._check(images, self.config.in_channels, self.downsample, "images")
        return _encode(self.model, self.params, x, rng if sample else None, self.shift_factor, self.scaling_factor)

    def decode(self, latents) -> jax.Array:
        """UNSCALED latents `[B, h, w, latent_channels]` -> images `[B, h*f, w*f, out_channels]`,
        nominally in [-1, 1] (not clipped, as diffusers)."""
        return _decode(self.model, self.params, self._check(latents, self.latent_channels, 1, "latents"))
