"""Next-DiT (Lumina-Next): the class-conditional ImageNet model and the T2I model.

Differences from Flag-DiT (REFERENCE.md §5; LT `Next-DiT-ImageNet/models/models.py`,
LT `lumina_next_t2i/models/model.py`): 2-D RoPE over (row, col) with the interleaved frequency
layout (3-D with the frame axis for video), no [nextline], sandwich normalisation (RMSNorm before
and after each sub-layer), scale-only modulation with tanh gates, GQA. Attention (QK LayerNorm,
cross-attention with the shared query, per-head tanh gate) is the family's `layers.Attention`
unchanged.

Parameter names are ours and the same for both variants: `attention_norm1` / `ffn_norm1` (pre),
`attention_norm2` / `ffn_norm2` (post). The official ImageNet file calls its post-norms
`attention_norm` / `ffn_norm` and its pre-norms have no parameters; the converter renames.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from flagdit_jax.models import common
from flagdit_jax.models import layer_stack
from flagdit_jax.models import layers as L


@dataclasses.dataclass(frozen=True)
class NextDiTConfig(common.LuminaConfig):
    """The Lumina trunk fields (`common.LuminaConfig`, shared with Flag-DiT) plus the Next-DiT switches.

    pre_norm_affine: learnable pre-norms (T2I) or parameter-free ones (ImageNet Next-DiT).
    final_shift: the final adaLN has shift and scale (ImageNet) or scale only (T2I).
    rope_axes: 2 = (row, col) as the released code; 3 = (frame, row, col) for video / multi-view.
    """

    kind = "nextdit"

    pre_norm_affine: bool = True
    final_shift: bool = False
    rope_axes: int = 2

    def _check(self) -> None:
        super()._check()
        if self.rope_axes not in (2, 3):
            raise ValueError(f"rope_axes={self.rope_axes}; expected 2 (row, col) or 3 (frame, row, col)")
        if self.head_dim % (2 * self.rope_axes):
            raise ValueError(f"head_dim={self.head_dim} must be divisible by 2*rope_axes={2 * self.rope_axes} "
                             "for the interleaved multi-axis RoPE")


def time_aware_rope(t: jax.Array, scale_factor: float, watershed: float) -> tuple[jax.Array, jax.Array]:
    """Lumina-Next's code switch (LT `lumina_next_t2i/models/model.py: precompute_freqs_cis`).

    For each sample: t < watershed -> position interpolation by `scale_factor`; otherwise NTK
    theta * scale_factor. The reference decides once per call from t[0]; with one t per batch
    (every sampler step) this per-sample form is the same. Returns `(ntk [B], pi [B])`.
    """
    early = t < watershed
    s = jnp.asarray(scale_factor, jnp.float32)
    return jnp.where(early, 1.0, s), jnp.where(early, s, 1.0)


class NextDiTBlock(nn.Module):
    """Sandwich-norm block with scale-only modulation and tanh gates (REFERENCE.md §5):
    x += tanh(g_msa) * RMSNorm2(Attn(RMSNorm1(x) * (1 + s_msa))); same for the FFN."""

    cfg: NextDiTConfig
    # Static per-call settings (no parameters), fields rather than call arguments so that they stay
    # Python values under `nn.remat`: InferenceOptions.style_groups, the self-attention scale and
    # the context-drop grid (T, H/p, W/p, r) (None: no context drop).
    style_groups: int = 0
    scale: float | None = None
    kv_grid: tuple[int, int, int, int] | None = None

    @nn.compact
    def __call__(self, x, c, angles, mask, y=None, y_mask=None, *, kv_pred=None, y_region=None):
        """kv_pred: with `kv_grid`, a traced bool: pool keys/values while True (None: always)."""
        cfg = self.cfg
        kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        scale_msa, gate_msa, scale_mlp, gate_mlp = L.AdaLNModulation(cfg.dim, 4, name="adaLN_modulation", **kw)(c)
        pre = dict(eps=cfg.norm_eps, use_scale=cfg.pre_norm_affine, **kw)
        if y is not None:
            y = L.RMSNorm(cfg.norm_eps, name="attention_y_norm", **kw)(y)
        a = L.Attention(cfg, self.style_groups, name="attention")(
            L.modulate(L.RMSNorm(name="attention_norm1", **pre)(x), None, scale_msa), angles, mask, y, y_mask,
            scale=self.scale, kv_pool=None if self.kv_grid is None else (self.kv_grid, kv_pred), y_region=y_region)
        x = x + jnp.tanh(gate_msa)[:, None] * L.RMSNorm(cfg.norm_eps, name="attention_norm2", **kw)(a)
        f = L.SwiGLU(cfg.ffn_hidden, name="feed_forward", **kw)(
            L.modulate(L.RMSNorm(name="ffn_norm1", **pre)(x), None, scale_mlp))
        x = x + jnp.tanh(gate_mlp)[:, None] * L.RMSNorm(cfg.norm_eps, name="ffn_norm2", **kw)(f)
        return L.constrain(x, ("activation_batch", "activation_length", "activation_embed"))


class NextDiT(nn.Module):
    """Next-DiT over a packed token sequence.

    `__call__(packed, t, y=None, cap_feats=None, cap_mask=None, *, options=None, train=False,
    force_drop=None, regions=None)` returns the velocity sequence `[B, L, p*p*C]`; unpack it with `tokens.unpack`.

    Args:
      packed: `tokens.Packed` (`tokens.pack_for(cfg, frames)`; no [nextline] unless the config asks).
      t: `[B]` times in [0, 1] (t=0 noise, t=1 data).
      y: `[B]` int class labels (ImageNet variant; id num_classes = null class).
      cap_feats, cap_mask: `[B, S, cap_feat_dim]` caption features and `[B, S]` mask (T2I).
      options: `common.InferenceOptions`, every field: fixed RoPE scaling (ntk_factor, pi_factor: the
        ImageNet `forward_with_cfg(ntk_factor=, rope_scaling_factor=)`), Lumina-Next's extrapolation
        RoPE (scale_factor with the watershed switch of the released code, or the paper's
        frequency-/time-aware forms), proportional attention (base_seqlen), context drop and
        style sharing (style_groups, REFERENCE.md §6). The
        watershed switch and time-aware context drop decide per call from the batch's t (context
        drop from t[0], through `lax.cond` so only one branch runs); samplers call with one t.
      train: enables label dropout (rng 'dropout'); force_drop: `[B]` bool, null label where True.
      regions: `common.RegionalCaptions` (T2I): per-region captions for every cross-attention
        (compositional generation); cap_feats / cap_mask then only give the pooled adaLN caption.
    """

    cfg: NextDiTConfig

    BLOCKS = "layers"  # the blocks' parameter name: layers_{i}, or layers when scanned (layer_stack)

    @nn.compact
    def __call__(self, packed, t, y=None, cap_feats=None, cap_mask=None, *, options=None, train=False,
                 force_drop=None, regions=None):
        cfg = self.cfg
        opts = common.resolve_options(options, tuple(f.name for f in dataclasses.fields(common.InferenceOptions)),
                                      "Next-DiT")
        common.check_inputs(cfg, packed, t, y, cap_feats, cap_mask, regions=regions, options=opts)
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        x, c, cap_feats = common.embed_inputs(self, cfg, packed, t, y, cap_feats, cap_mask, train, force_drop)

        ntk_factor, pi_factor, freq_factor = opts.ntk_factor, opts.pi_factor, None
        if opts.scale_factor != 1.0:  # s = 1 scales nothing under every rule
            if opts.rope_scaling == "watershed":
                ntk_t, pi_t = time_aware_rope(t, opts.scale_factor, opts.scale_watershed)
                ntk_factor, pi_factor = ntk_t * ntk_factor, pi_t * pi_factor
            elif opts.rope_scaling == "frequency_aware":
                d_star = cfg.head_dim * math.log(opts.rope_train_len / (2 * math.pi), cfg.rope_theta)
                freq_factor = L.scaled_rope_factor(cfg.head_dim, cfg.rope_axes, opts.scale_factor, d_star)
            else:  # time_aware
                d_star = (cfg.head_dim - 1) * t.astype(jnp.float32) + 1.0  # [B]
                freq_factor = L.scaled_rope_factor(cfg.head_dim, cfg.rope_axes, opts.scale_factor, d_star)
        # (row, col) positions of each token (pads repeat the last real one: masked anyway).
        positions = packed.positions[..., 3 - cfg.rope_axes:]
        angles = L.rope_angles(positions, cfg.head_dim, theta=cfg.rope_theta, ntk_factor=ntk_factor,
                               pi_factor=pi_factor, freq_factor=freq_factor)
        seq_len = packed.tokens.shape[1]
        scale = None if opts.base_seqlen is None else L.proportional_scale(seq_len, opts.base_seqlen, cfg.head_dim)
        mask = packed.mask if common.has_pads(packed) else None
        kv_grid = kv_pred = None
        if opts.context_drop != 1:
            if mask is not None or cfg.nextline or cfg.nextframe or len(set(packed.grid_sizes)) != 1:
                raise ValueError("context_drop needs one latent size per batch and no [PAD]/[nextline]/[nextframe] "
                                 f"tokens; got sizes {sorted(set(packed.shapes))}")
            grid = packed.grid_sizes[0] + (opts.context_drop,)
            if grid[1] % grid[3] or grid[2] % grid[3]:
                raise ValueError(f"context_drop={opts.context_drop} must divide the token grid {grid[1]}x{grid[2]}")
            until = opts.context_drop_until
            kv_grid, kv_pred = grid, None if until is None else t[0] < until
        y, y_mask, y_region = common.cross_attention_inputs(cap_feats, cap_mask, regions, dtype)
        x = L.constrain(x, ("activation_batch", "activation_length", "activation_embed"))
        # Every static setting is a block field and every traced one (kv_pred, the lax.cond predicate
        # of time-aware context drop) a per-call constant: both loop and scan forms take them all.
        x = layer_stack.apply_blocks(NextDiTBlock, (cfg, opts.style_groups, scale, kv_grid), x,
                                     (c, angles, mask, y, y_mask), dict(kv_pred=kv_pred, y_region=y_region),
                                     n_layers=cfg.n_layers, name=self.BLOCKS, remat=cfg.remat, scan=cfg.scan_layers,
                                     parent=self)
        out = L.FinalLayer(cfg.dim, cfg.patch_size**2 * cfg.out_channels, use_shift=cfg.final_shift,
                           name="final_layer", dtype=dtype, param_dtype=pdtype)(x, c)
        self.sow("intermediates", "out:final_layer", out)
        out = out.astype(jnp.float32)
        return L.drop_sigma_channels(out, cfg.patch_size, cfg.in_channels) if cfg.learn_sigma else out
