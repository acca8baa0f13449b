"""Flag-DiT (Lumina-T2X): the class-conditional ImageNet model and the T2I model.

Follows REFERENCE.md §1 and the official files LT `Flag-DiT-ImageNet/models/model.py`
(class-conditional) and LT `lumina_t2i/models/model.py` (T2I: zero-init gated cross-attention,
pooled-caption adaLN, [nextline]/[PAD] tokens). Parameter names mirror the official keys so that
`flagdit_jax.convert.official` is a table, not a puzzle. The attention, final layer and embedding
front are the family's shared parts (`layers.py`, `common.py`).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from flagdit_jax.models import common
from flagdit_jax.models import layer_stack
from flagdit_jax.models import layers as L


@dataclasses.dataclass(frozen=True)
class FlagDiTConfig(common.LuminaConfig):
    """Constructor arguments of a Flag-DiT (names follow the official `DiT_Llama`): the Lumina
    trunk fields of `common.LuminaConfig`, nothing more."""

    kind = "flagdit"


class FlagDiTBlock(nn.Module):
    """Pre-norm adaLN block with linear gates (REFERENCE.md §1):
    h = x + g_msa * Attn(mod(RMSNorm(x))); out = h + g_mlp * FFN(mod(RMSNorm(h)))."""

    cfg: FlagDiTConfig
    # Static per-call settings (no parameters), fields rather than call arguments so that they stay
    # Python values under `nn.remat`: InferenceOptions.style_groups and the self-attention scale.
    style_groups: int = 0
    scale: float | None = None

    @nn.compact
    def __call__(self, x, c, angles, mask, y=None, y_mask=None, *, y_region=None):
        cfg = self.cfg
        kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = L.AdaLNModulation(
            cfg.dim, 6, name="adaLN_modulation", **kw
        )(c)
        if y is not None:
            y = L.RMSNorm(cfg.norm_eps, name="attention_y_norm", **kw)(y)
        a = L.Attention(cfg, self.style_groups, name="attention")(
            L.modulate(L.RMSNorm(cfg.norm_eps, name="attention_norm", **kw)(x), shift_msa, scale_msa),
            angles, mask, y, y_mask, scale=self.scale, y_region=y_region,
        )
        x = x + gate_msa[:, None] * a
        f = L.SwiGLU(cfg.ffn_hidden, name="feed_forward", **kw)(
            L.modulate(L.RMSNorm(cfg.norm_eps, name="ffn_norm", **kw)(x), shift_mlp, scale_mlp)
        )
        x = x + gate_mlp[:, None] * f
        return L.constrain(x, ("activation_batch", "activation_length", "activation_embed"))


class FlagDiT(nn.Module):
    """Flag-DiT over a packed token sequence.

    `__call__(packed, t, y=None, cap_feats=None, cap_mask=None, *, options=None, train=False,
    force_drop=None, regions=None)` returns the velocity sequence `[B, L, p*p*C]` (C input channels; unpack it
    with `tokens.unpack`).

    Args:
      packed: `tokens.Packed` with tokens `[B, L, p*p*C]` (`tokens.pack_for(cfg, frames)`).
      t: `[B]` times in [0, 1] (t=0 noise, t=1 data).
      y: `[B]` int class labels (class-conditional; id num_classes = null class).
      cap_feats, cap_mask: `[B, S, cap_feat_dim]` caption features and `[B, S]` mask (T2I).
      options: `common.InferenceOptions`; Flag-DiT uses ntk_factor, pi_factor (RoPE theta scaling
        and position interpolation), base_seqlen (proportional attention), REFERENCE.md §4, and
        style_groups (shared self-attention, §6).
      train: enables label dropout (rng 'dropout'); force_drop: `[B]` bool, null label where True.
      regions: `common.RegionalCaptions` (T2I): per-region captions for every cross-attention
        (compositional generation); cap_feats / cap_mask then only give the pooled adaLN caption.
    """

    cfg: FlagDiTConfig

    OPTIONS = ("ntk_factor", "pi_factor", "base_seqlen", "style_groups")
    BLOCKS = "layers"  # the blocks' parameter name: layers_{i}, or layers when scanned (layer_stack)

    @nn.compact
    def __call__(self, packed, t, y=None, cap_feats=None, cap_mask=None, *, options=None, train=False,
                 force_drop=None, regions=None):
        cfg = self.cfg
        opts = common.resolve_options(options, self.OPTIONS, "Flag-DiT")
        common.check_inputs(cfg, packed, t, y, cap_feats, cap_mask, regions=regions, options=opts)
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        x, c, cap_feats = common.embed_inputs(self, cfg, packed, t, y, cap_feats, cap_mask, train, force_drop)

        # 1-D RoPE over the flat token index, [nextline]/[PAD] included (REFERENCE.md §1).
        angles = L.rope_angles(packed.index, cfg.head_dim, theta=cfg.rope_theta, ntk_factor=opts.ntk_factor,
                               pi_factor=opts.pi_factor)
        seq_len = packed.tokens.shape[1]
        scale = None if opts.base_seqlen is None else L.proportional_scale(seq_len, opts.base_seqlen, cfg.head_dim)
        # Pads are masked as keys (the T2I reference's key mask); with no pads, no mask at all.
        mask = packed.mask if common.has_pads(packed) else None
        y, y_mask, y_region = common.cross_attention_inputs(cap_feats, cap_mask, regions, dtype)
        x = L.constrain(x, ("activation_batch", "activation_length", "activation_embed"))
        x = layer_stack.apply_blocks(FlagDiTBlock, (cfg, opts.style_groups, scale), x, (c, angles, mask, y, y_mask),
                                     dict(y_region=y_region), n_layers=cfg.n_layers, name=self.BLOCKS,
                                     remat=cfg.remat, scan=cfg.scan_layers, parent=self)
        out = L.FinalLayer(cfg.dim, cfg.patch_size**2 * cfg.out_channels, name="final_layer", dtype=dtype,
                           param_dtype=pdtype)(x, c)
        self.sow("intermediates", "out:final_layer", out)
        out = out.astype(jnp.float32)
        return L.drop_sigma_channels(out, cfg.patch_size, cfg.in_channels) if cfg.learn_sigma else out
