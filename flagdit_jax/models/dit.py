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

from flagdit_jax.models import layers as L
from flagdit_jax.models.flag_dit import FinalLayer, check_inputs, drop_sigma_channels, embed_tokens, has_pads


@dataclasses.dataclass(frozen=True)
class DiTConfig:
    dim: int = 1152
    n_layers: int = 28
    n_heads: int = 16
    patch_size: int = 2
    in_channels: int = 4
    input_size: int = 32
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    class_dropout_prob: float = 0.1
    learn_sigma: bool = True
    dtype: str = "float32"
    param_dtype: str = "float32"
    attention: str = "xla"
    # Activation rematerialisation of each block: 'none', 'full' (save nothing) or 'dots'
    # (save matmul outputs without batch dims), see layers.remat_block.
    remat: str = "none"
    # Fixed by the architecture; present so tokens/model checks treat every backbone alike.
    nextline: bool = dataclasses.field(default=False, init=False)
    nextframe: bool = dataclasses.field(default=False, init=False)
    cap_feat_dim: int = dataclasses.field(default=0, init=False)

    def __post_init__(self):
        for name in ("dim", "n_layers", "n_heads", "patch_size", "in_channels", "num_classes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.dim % self.n_heads:
            raise ValueError(f"n_heads={self.n_heads} must divide dim={self.dim}")
        if self.dim % 4:
            raise ValueError(f"dim={self.dim} must be divisible by 4 for the 2-D sin-cos embedding")
        if self.attention not in L.ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"attention={self.attention!r}; expected one of {L.ATTENTION_IMPLEMENTATIONS}")
        if isinstance(self.remat, bool):  # older configs: remat=True/False
            object.__setattr__(self, "remat", "full" if self.remat else "none")
        if self.remat not in L.REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r}; expected one of {tuple(L.REMAT_POLICIES)}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    text_conditional = False


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
        a = L.dot_product_attention(q, k, v, key_mask=mask, implementation=cfg.attention)
        a = L.Dense(d, ("heads", "embed"), use_bias=True, name="proj", **kw)(a.transpose(0, 2, 1, 3).reshape(b, l, d))
        x = x + gate_msa[:, None] * a
        y = L.modulate(L.LayerNorm(1e-6, use_affine=False, name="norm2", **kw)(x), shift_mlp, scale_mlp)
        hidden = int(d * cfg.mlp_ratio)
        y = nn.gelu(L.Dense(hidden, ("embed", "mlp"), use_bias=True, name="fc1", **kw)(y), approximate=True)
        y = L.Dense(d, ("mlp", "embed"), use_bias=True, name="fc2", **kw)(y)
        x = x + gate_mlp[:, None] * y
        return L.constrain(x, ("activation_batch", "activation_length", "activation_embed"))


class DiT(nn.Module):
    """DiT over a packed sequence (no [nextline]); same call signature as `FlagDiT`.

    Returns `[B, L, p*p*C]` velocities. RoPE options are accepted and ignored (APE model).
    """

    cfg: DiTConfig

    @nn.compact
    def __call__(self, packed, t, y=None, cap_feats=None, cap_mask=None, *, ntk_factor=1.0, pi_factor=1.0,
                 base_seqlen=None, train=False, force_drop=None):
        cfg = self.cfg
        check_inputs(cfg, packed, t, y, cap_feats, cap_mask)
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        x = embed_tokens(self, packed, cfg.dim, {}, dtype, pdtype)
        x = x + sincos_2d(packed.positions[..., 1:], cfg.dim).astype(x.dtype)
        self.sow("intermediates", "out:embedded", x)
        c = L.TimestepEmbedder(cfg.dim, name="t_embedder", dtype=dtype, param_dtype=pdtype)(t)
        c = c + L.LabelEmbedder(cfg.num_classes, cfg.dim, cfg.class_dropout_prob, name="y_embedder",
                                param_dtype=pdtype)(y, train=train, force_drop=force_drop).astype(c.dtype)
        mask = packed.mask if has_pads(packed) else None
        block = L.remat_block(DiTBlock, cfg.remat)
        for i in range(cfg.n_layers):
            x = block(cfg, name=f"blocks_{i}")(x, c, mask)
            self.sow("intermediates", f"out:blocks_{i}", x)
        out = FinalLayer(cfg.dim, cfg.patch_size**2 * cfg.out_channels, name="final_layer", dtype=dtype,
                         param_dtype=pdtype)(x, c).astype(jnp.float32)
        return drop_sigma_channels(out, cfg.patch_size, cfg.in_channels) if cfg.learn_sigma else out
