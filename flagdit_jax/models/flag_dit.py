"""Flag-DiT (Lumina-T2X): the class-conditional ImageNet model and the T2I model.

Follows REFERENCE.md §1 and the official files LT `Flag-DiT-ImageNet/models/model.py`
(class-conditional) and LT `lumina_t2i/models/model.py` (T2I: zero-init gated cross-attention,
pooled-caption adaLN, [nextline]/[PAD] tokens). Parameter names mirror the official keys so that
`flagdit_jax.convert.official` is a table, not a puzzle.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flagdit_jax import tokens as tok
from flagdit_jax.models import layers as L


@dataclasses.dataclass(frozen=True)
class FlagDiTConfig:
    """Constructor arguments of a Flag-DiT (names follow the official `DiT_Llama`)."""

    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int | None = None
    patch_size: int = 2
    in_channels: int = 4
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    qk_norm: bool = True
    learn_sigma: bool = True
    # Class-conditional (ImageNet) when num_classes > 0; T2I when cap_feat_dim > 0.
    num_classes: int = 1000
    class_dropout_prob: float = 0.1
    cap_feat_dim: int = 0
    # Token layout: the T2I model has [nextline] and [PAD]; [nextframe] is for video/multi-view.
    nextline: bool = False
    nextframe: bool = False
    rope_theta: float = 10000.0
    dtype: str = "float32"
    param_dtype: str = "float32"
    attention: str = "xla"
    # Activation rematerialisation of each block: 'none', 'full' (save nothing) or 'dots'
    # (save matmul outputs without batch dims), see layers.remat_block.
    remat: str = "none"

    def __post_init__(self):
        for name in ("dim", "n_layers", "n_heads", "patch_size", "in_channels", "multiple_of"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.dim % self.n_heads:
            raise ValueError(f"n_heads={self.n_heads} must divide dim={self.dim}")
        if self.n_kv_heads is not None and (self.n_kv_heads <= 0 or self.n_heads % self.n_kv_heads):
            raise ValueError(f"n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}")
        if (self.dim // self.n_heads) % 2:
            raise ValueError(f"head_dim={self.dim // self.n_heads} must be even for RoPE")
        if (self.num_classes > 0) == (self.cap_feat_dim > 0):
            raise ValueError(
                f"exactly one of num_classes={self.num_classes} (class-conditional) and "
                f"cap_feat_dim={self.cap_feat_dim} (text-conditional) must be > 0"
            )
        if self.attention not in L.ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"attention={self.attention!r}; expected one of {L.ATTENTION_IMPLEMENTATIONS}")
        if isinstance(self.remat, bool):  # older configs: remat=True/False
            object.__setattr__(self, "remat", "full" if self.remat else "none")
        if self.remat not in L.REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r}; expected one of {tuple(L.REMAT_POLICIES)}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in ("float32", "bfloat16", "float16"):
                raise ValueError(f"{name}={getattr(self, name)!r}; expected float32, bfloat16 or float16")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def cond_dim(self) -> int:
        """adaLN conditioning width a = min(dim, 1024)."""
        return min(self.dim, 1024)

    @property
    def ffn_hidden(self) -> int:
        return L.swiglu_hidden(self.dim, self.multiple_of, self.ffn_dim_multiplier)

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    @property
    def text_conditional(self) -> bool:
        return self.cap_feat_dim > 0


class Attention(nn.Module):
    """Self-attention with full-width QK LayerNorm and RoPE; optional zero-init gated
    cross-attention to text that shares the (normed, rotated) query and is added per head,
    scaled by tanh(gate), before the shared output projection (REFERENCE.md §1)."""

    cfg: FlagDiTConfig

    @nn.compact
    def __call__(self, x, angles, mask, y=None, y_mask=None, *, scale=None, kv_pool=None):
        """kv_pool: None, or `(grid, pred)` for context drop: grid = (T, H/p, W/p, r) static, pred a
        traced bool (pool while True; None = always). See `pool_keys_values`."""
        cfg = self.cfg
        b, l, _ = x.shape
        h, hkv, hd = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        xq = L.Dense(h * hd, ("embed", "heads"), name="wq", **kw)(x)
        xk = L.Dense(hkv * hd, ("embed", "kv_heads"), name="wk", **kw)(x)
        xv = L.Dense(hkv * hd, ("embed", "kv_heads"), name="wv", **kw)(x)
        if cfg.qk_norm:
            xq = L.LayerNorm(1e-5, name="q_norm", **kw)(xq)
            xk = L.LayerNorm(1e-5, name="k_norm", **kw)(xk)

        def heads(z, n):  # [B, L, n*hd] -> [B, n, L, hd]
            return z.reshape(b, -1, n, hd).transpose(0, 2, 1, 3)

        q = L.apply_rope(heads(xq, h), angles)
        k = L.apply_rope(heads(xk, hkv), angles)
        v = heads(xv, hkv)
        q = L.constrain(q, ("activation_batch", "activation_heads", "activation_length", "activation_kv"))
        full = lambda: L.dot_product_attention(q, k, v, key_mask=mask, scale=scale, implementation=cfg.attention)
        if kv_pool is None:
            out = full()
        else:
            grid, pred = kv_pool
            pooled = lambda: L.dot_product_attention(q, pool_keys_values(k, grid), pool_keys_values(v, grid),
                                                     scale=scale, implementation=cfg.attention)
            out = pooled() if pred is None else jax.lax.cond(pred, pooled, full)
        if y is not None:
            yk = L.Dense(hkv * hd, ("caption", "kv_heads"), name="wk_y", **kw)(y)
            if cfg.qk_norm:
                yk = L.LayerNorm(1e-5, name="ky_norm", **kw)(yk)
            yv = L.Dense(hkv * hd, ("caption", "kv_heads"), name="wv_y", **kw)(y)
            out_y = L.dot_product_attention(
                q, heads(yk, hkv), heads(yv, hkv), key_mask=y_mask, implementation=cfg.attention
            )
            gate = self.param("gate", nn.with_logical_partitioning(L.zeros, ("heads_gate",)), (h,), kw["param_dtype"])
            out = out + jnp.tanh(gate.astype(out.dtype))[None, :, None, None] * out_y
        out = out.transpose(0, 2, 1, 3).reshape(b, l, h * hd)
        return L.Dense(cfg.dim, ("heads", "embed"), name="wo", **kw)(out)


def pool_keys_values(z: jax.Array, grid: tuple[int, int, int, int]) -> jax.Array:
    """Context drop (Lumina-Next, REFERENCE.md §4): average-pool keys or values over r x r patches.

    `z [B, H, T*h*w, hd]` laid out frame by frame, row by row (no [nextline] / [PAD]) ->
    `[B, H, T*(h/r)*(w/r), hd]`. Queries keep every token; keys are pooled after RoPE, so each
    merged key carries the mean of its r*r rotated keys.
    """
    t, h, w, r = grid
    b, n, l, d = z.shape
    if l != t * h * w or h % r or w % r:
        raise ValueError(f"context drop needs a full {t}x{h}x{w} token grid divisible by r={r}, got length {l}")
    z = z.reshape(b, n, t, h // r, r, w // r, r, d).mean(axis=(4, 6), dtype=jnp.float32).astype(z.dtype)
    return z.reshape(b, n, -1, d)


class FlagDiTBlock(nn.Module):
    """Pre-norm adaLN block with linear gates (REFERENCE.md §1):
    h = x + g_msa * Attn(mod(RMSNorm(x))); out = h + g_mlp * FFN(mod(RMSNorm(h)))."""

    cfg: FlagDiTConfig

    @nn.compact
    def __call__(self, x, c, angles, mask, y=None, y_mask=None, *, scale=None):
        cfg = self.cfg
        kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = L.AdaLNModulation(
            cfg.dim, 6, name="adaLN_modulation", **kw
        )(c)
        if y is not None:
            y = L.RMSNorm(cfg.norm_eps, name="attention_y_norm", **kw)(y)
        a = Attention(cfg, name="attention")(
            L.modulate(L.RMSNorm(cfg.norm_eps, name="attention_norm", **kw)(x), shift_msa, scale_msa),
            angles, mask, y, y_mask, scale=scale,
        )
        x = x + gate_msa[:, None] * a
        f = L.SwiGLU(cfg.ffn_hidden, name="feed_forward", **kw)(
            L.modulate(L.RMSNorm(cfg.norm_eps, name="ffn_norm", **kw)(x), shift_mlp, scale_mlp)
        )
        x = x + gate_mlp[:, None] * f
        return L.constrain(x, ("activation_batch", "activation_length", "activation_embed"))


class FinalLayer(nn.Module):
    """LayerNorm(no affine, eps 1e-6) -> adaLN (shift, scale) -> Linear(d -> p*p*out), zero-init."""

    dim: int
    out_features: int
    use_shift: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, c):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if self.use_shift:
            shift, scale = L.AdaLNModulation(self.dim, 2, name="adaLN_modulation", **kw)(c)
        else:
            shift, (scale,) = None, L.AdaLNModulation(self.dim, 1, name="adaLN_modulation", **kw)(c)
        x = L.modulate(L.LayerNorm(1e-6, use_affine=False, name="norm_final", **kw)(x), shift, scale)
        return L.Dense(self.out_features, ("embed", "out_patch"), use_bias=True, kernel_init=L.zeros,
                       name="linear", **kw)(x)


def embed_tokens(module: nn.Module, packed: tok.Packed, dim: int, special: dict[int, str], dtype, param_dtype):
    """x_embedder on patch vectors, then learnable embeddings at special tokens (`special` maps
    a token kind to its parameter name, e.g. {NEXTLINE: 'eol_token', PAD: 'pad_token'})."""
    x = L.Dense(dim, ("patch", "embed"), use_bias=True, name="x_embedder", dtype=dtype, param_dtype=param_dtype)(
        packed.tokens
    )
    for kind, name in special.items():
        emb = module.param(name, nn.with_logical_partitioning(L.normal_002, ("embed",)), (dim,), param_dtype)
        x = jnp.where((packed.kind == kind)[..., None], emb.astype(x.dtype), x)
    module.sow("intermediates", "out:x_embedder", x)
    return x


def embed_inputs(module: nn.Module, cfg, packed, t, y, cap_feats, cap_mask, train, force_drop):
    """Shared front of Flag-DiT and Next-DiT: token embedding (learnable [nextline] / [nextframe] /
    [PAD] where the config has them; [PAD] for text models) and the adaLN condition
    c = t_emb + (label or pooled-caption embedding). Returns `(x [B, L, d], c [B, a], cap_feats)`."""
    dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    special = {}
    if cfg.nextline:
        special[tok.NEXTLINE] = "eol_token"
    if cfg.nextframe:
        special[tok.NEXTFRAME] = "eof_token"
    if cfg.text_conditional:
        special[tok.PAD] = "pad_token"
    x = embed_tokens(module, packed, cfg.dim, special, dtype, pdtype)

    c = L.TimestepEmbedder(cfg.cond_dim, name="t_embedder", dtype=dtype, param_dtype=pdtype)(t)
    module.sow("intermediates", "out:t_embedder", c)
    if cfg.text_conditional:
        cond = L.CaptionEmbedder(cfg.cond_dim, name="cap_embedder", dtype=dtype, param_dtype=pdtype)(
            cap_feats, cap_mask)
        module.sow("intermediates", "out:cap_embedder", cond)
        cap_feats = cap_feats.astype(dtype)
    else:
        cond = L.LabelEmbedder(cfg.num_classes, cfg.cond_dim, cfg.class_dropout_prob, name="y_embedder",
                               param_dtype=pdtype)(y, train=train, force_drop=force_drop)
        module.sow("intermediates", "out:y_embedder", cond)
    return x, c + cond.astype(c.dtype), cap_feats


def drop_sigma_channels(out: jax.Array, patch_size: int, in_channels: int) -> jax.Array:
    """`[B, L, p*p*2C] -> [B, L, p*p*C]`: keep the predicted channels, drop learn_sigma's unused half.

    The output patch order is (ph, pw, C_out) (REFERENCE.md §1), so the cut is per patch pixel.
    """
    b, l, _ = out.shape
    return out.reshape(b, l, patch_size * patch_size, -1)[..., :in_channels].reshape(b, l, -1)


class FlagDiT(nn.Module):
    """Flag-DiT over a packed token sequence.

    `__call__(packed, t, y=None, cap_feats=None, cap_mask=None, *, ntk_factor, pi_factor,
    base_seqlen, train, force_drop)` returns the velocity sequence `[B, L, p*p*C]` (C input
    channels; unpack it with `tokens.unpack`).

    Args:
      packed: `tokens.Packed` with tokens `[B, L, p*p*C]`; its layout must match the config's
        nextline/nextframe flags.
      t: `[B]` times in [0, 1] (t=0 noise, t=1 data).
      y: `[B]` int class labels (class-conditional; id num_classes = null class).
      cap_feats, cap_mask: `[B, S, cap_feat_dim]` caption features and `[B, S]` mask (T2I).
      ntk_factor, pi_factor: RoPE theta scaling and position interpolation (REFERENCE.md §4).
      base_seqlen: if set, proportional attention with this base length for self-attention.
      train: enables label dropout (rng 'dropout').
    """

    cfg: FlagDiTConfig

    @nn.compact
    def __call__(self, packed, t, y=None, cap_feats=None, cap_mask=None, *, ntk_factor=1.0, pi_factor=1.0,
                 base_seqlen=None, train=False, force_drop=None):
        cfg = self.cfg
        check_inputs(cfg, packed, t, y, cap_feats, cap_mask)
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        x, c, cap_feats = embed_inputs(self, cfg, packed, t, y, cap_feats, cap_mask, train, force_drop)

        # 1-D RoPE over the flat token index, [nextline]/[PAD] included (REFERENCE.md §1).
        angles = L.rope_angles(packed.index, cfg.head_dim, theta=cfg.rope_theta, ntk_factor=ntk_factor,
                               pi_factor=pi_factor)
        seq_len = packed.tokens.shape[1]
        scale = None if base_seqlen is None else L.proportional_scale(seq_len, base_seqlen, cfg.head_dim)
        # Pads are masked as keys (the T2I reference's key mask); with no pads, no mask at all.
        mask = packed.mask if has_pads(packed) else None
        block = L.remat_block(FlagDiTBlock, cfg.remat)
        x = L.constrain(x, ("activation_batch", "activation_length", "activation_embed"))
        for i in range(cfg.n_layers):
            x = block(cfg, name=f"layers_{i}")(x, c, angles, mask, cap_feats, cap_mask, scale=scale)
            self.sow("intermediates", f"out:layers_{i}", x)
        out = FinalLayer(cfg.dim, cfg.patch_size**2 * cfg.out_channels, name="final_layer", dtype=dtype,
                         param_dtype=pdtype)(x, c)
        self.sow("intermediates", "out:final_layer", out)
        out = out.astype(jnp.float32)
        return drop_sigma_channels(out, cfg.patch_size, cfg.in_channels) if cfg.learn_sigma else out


def has_pads(packed: tok.Packed) -> bool:
    """Static: does any sample in the batch carry [PAD] tokens? (`tokens.Packed.has_pads`)"""
    return packed.has_pads


def check_inputs(cfg, packed, t, y, cap_feats, cap_mask) -> None:
    """Raise a ValueError naming the bad input before any compute."""
    p, c = cfg.patch_size, cfg.in_channels
    if packed.patch_size != p or packed.tokens.shape[-1] != p * p * c:
        raise ValueError(
            f"packed tokens have patch_size={packed.patch_size} and width {packed.tokens.shape[-1]}; "
            f"the model expects patch_size={p} and width p*p*C={p * p * c}"
        )
    if packed.nextline != cfg.nextline or packed.nextframe != cfg.nextframe:
        raise ValueError(
            f"packed layout nextline={packed.nextline}, nextframe={packed.nextframe} does not match the "
            f"model's nextline={cfg.nextline}, nextframe={cfg.nextframe}"
        )
    b = packed.tokens.shape[0]
    if t.shape != (b,):
        raise ValueError(f"t must have shape [B]=({b},), got {t.shape}")
    if cfg.text_conditional:
        if cap_feats is None or cap_mask is None:
            raise ValueError("a text-conditional model needs cap_feats [B, S, cap_feat_dim] and cap_mask [B, S]")
        if cap_feats.ndim != 3 or cap_feats.shape[0] != b or cap_feats.shape[-1] != cfg.cap_feat_dim:
            raise ValueError(f"cap_feats must be [B={b}, S, {cfg.cap_feat_dim}], got {cap_feats.shape}")
        if cap_mask.shape != cap_feats.shape[:2]:
            raise ValueError(f"cap_mask must be [B, S]={cap_feats.shape[:2]}, got {cap_mask.shape}")
    else:
        if y is None or y.shape != (b,):
            raise ValueError(f"a class-conditional model needs labels y of shape ({b},), got "
                             f"{None if y is None else y.shape}")
