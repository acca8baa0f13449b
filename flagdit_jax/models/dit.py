"""DiT / SiT baseline (Peebles & Xie; SiT is the same network trained with flow matching).

Absolute 2-D sin-cos position embedding, LayerNorm (no affine, eps 1e-6), adaLN-Zero blocks with
a GELU(tanh) MLP and biased qkv: the reference the Lumina papers compare Flag-DiT against, kept
here so the ablations run on identical data, schedule and evaluator. Time is fed raw in [0, 1]
as SiT does.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from flagdit_jax.models import common
from flagdit_jax.models import layer_stack
from flagdit_jax.models import layers as L
from flagdit_jax.models import sequence_parallel


@dataclasses.dataclass(frozen=True)
class DiTConfig(common.ModelConfig):
    """DiT's constructor arguments: the family's base fields plus the MLP ratio and the latent side
    of its fixed position table. Class-conditional only, no [nextline] / [nextframe]."""

    kind = "dit"

    dim: int = 1152
    n_layers: int = 28
    n_heads: int = 16
    input_size: int = 32
    mlp_ratio: float = 4.0
    # Fixed by the architecture: not constructor arguments.
    nextline: bool = dataclasses.field(default=False, init=False)
    nextframe: bool = dataclasses.field(default=False, init=False)
    cap_feat_dim: int = dataclasses.field(default=0, init=False)

    def _check(self) -> None:
        if self.dim % 4:
            raise ValueError(f"dim={self.dim} must be divisible by 4 for the 2-D sin-cos embedding")
        if self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio={self.mlp_ratio} must be positive")


def sincos_2d(positions: jax.Array, dim: int) -> jax.Array:
    """DiT's fixed 2-D embedding `[B, L, dim]` from (row, col) positions `[B, L, 2]`.

    First half encodes the column, second half the row (DiT's `get_2d_sincos_pos_embed` meshgrid
    order), each [sin | cos] with omega = 1 / 10000^(k / (dim/4)).
    """
    quarter = dim // 4
    omega = 1.0 / 10000 ** (jnp.arange(quarter, dtype=jnp.float32) / quarter)

    def one(pos):
        a = pos.astype(jnp.float32)[..., None] * omega
        return jnp.concatenate([jnp.sin(a), jnp.cos(a)], -1)

    return jnp.concatenate([one(positions[..., 1]), one(positions[..., 0])], -1)


class DiTBlock(nn.Module):
    cfg: DiTConfig

    @nn.compact
    def __call__(self, x, c, mask):
        cfg = self.cfg
        kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        b, l, d = x.shape
        h, hd = cfg.n_heads, cfg.head_dim
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = L.AdaLNModulation(
            d, 6, name="adaLN_modulation", **kw)(c)
        y = L.modulate(L.LayerNorm(1e-6, use_affine=False, name="norm1", **kw)(x), shift_msa, scale_msa)
        qkv = L.Dense(3 * d, ("embed", "qkv"), use_bias=True, name="qkv", **kw)(y)
        q, k, v = qkv.reshape(b, l, 3, h, hd).transpose(2, 0, 3, 1, 4)
        a = sequence_parallel.attention(q, k, v, key_mask=mask, implementation=cfg.attention,
                                        method=cfg.sequence_parallel, strict=not self.is_initializing())
        a = L.Dense(d, ("heads", "embed"), use_bias=True, name="proj", **kw)(a.transpose(0, 2, 1, 3).reshape(b, l, d))
        x = x + gate_msa[:, None] * a
        y = L.modulate(L.LayerNorm(1e-6, use_affine=False, name="norm2", **kw)(x), shift_mlp, scale_mlp)
        hidden = int(d * cfg.mlp_ratio)
        y = nn.gelu(L.Dense(hidden, ("embed", "mlp"), use_bias=True, name="fc1", **kw)(y), approximate=True)
        y = L.Dense(d, ("mlp", "embed"), use_bias=True, name="fc2", **kw)(y)
        x = x + gate_mlp[:, None] * y
        return L.constrain(x, ("activation_batch", "activation_length", "activation_embed"))


class DiT(nn.Module):
    """DiT over a packed sequence (no [nextline]); the call of every backbone,
    `__call__(packed, t, y, *, options=None, train=False, force_drop=None) -> [B, L, p*p*C]`.

    An APE model: no inference option applies (a non-default `options` is refused).
    """

    cfg: DiTConfig

    BLOCKS = "blocks"  # the blocks' parameter name: blocks_{i}, or blocks when scanned (layer_stack)

    @nn.compact
    def __call__(self, packed, t, y=None, cap_feats=None, cap_mask=None, *, options=None, train=False,
                 force_drop=None):
        cfg = self.cfg
        common.resolve_options(options, (), "DiT")
        common.check_inputs(cfg, packed, t, y, cap_feats, cap_mask)
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        x = common.embed_tokens(self, packed, cfg.dim, {}, dtype, pdtype)
        x = x + sincos_2d(packed.positions[..., 1:], cfg.dim).astype(x.dtype)
        self.sow("intermediates", "out:embedded", x)
        c = L.TimestepEmbedder(cfg.dim, name="t_embedder", dtype=dtype, param_dtype=pdtype)(t)
        c = c + L.LabelEmbedder(cfg.num_classes, cfg.dim, cfg.class_dropout_prob, name="y_embedder",
                                param_dtype=pdtype)(y, train=train, force_drop=force_drop).astype(c.dtype)
        mask = packed.mask if common.has_pads(packed) else None
        x = layer_stack.apply_blocks(DiTBlock, (cfg,), x, (c, mask), {}, n_layers=cfg.n_layers, name=self.BLOCKS,
                                     remat=cfg.remat, scan=cfg.scan_layers, parent=self)
        out = L.FinalLayer(cfg.dim, cfg.patch_size**2 * cfg.out_channels, name="final_layer", dtype=dtype,
                           param_dtype=pdtype)(x, c).astype(jnp.float32)
        return L.drop_sigma_channels(out, cfg.patch_size, cfg.in_channels) if cfg.learn_sigma else out
