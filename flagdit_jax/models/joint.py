"""The joint model: UniDiffuser's idea (REFERENCE.md §8) on the Flag-DiT trunk, in flow-matching form.

Two modalities share one token sequence: S text tokens (continuous vectors, e.g. caption-embedding
tokens) followed by the packed image tokens ([nextline] / [nextframe] / [PAD] as any Flag-DiT).
Each modality has its own time, t_text and t_image, and one network predicts both velocities:

    (v_image [B, L, p*p*C], v_text [B, S, text_dim]) = JointDiT(packed image x_t, t_image, text x_t, t_text)

so every marginal, conditional and joint distribution is sampled from the same weights by the choice
of the two times (`sample_joint.py`): a modality held clean is at t = 1, a marginalised one is pure
noise at t = 0 (the Lumina convention; UniDiffuser's t = 0 / t = T).

How the times reach the tokens: UniDiffuser's U-ViT puts the times in as tokens; here, as in
Flag-DiT, they go through adaLN, per modality. The condition of modality k is
c_k = t_emb(t_k) + e_k + W [t_emb(t_text); t_emb(t_image)] (e_k a learned modality embedding, W
mixes both times so every token sees both) + P(text) (the text tokens flattened, normed and projected:
Lumina-T2I's pooled-caption adaLN path; times t_text with `text_pool_gate`), and every block modulates
each token with the c of its own modality (`layers.modulate` with per-token shift / scale / gate). Each
modality has its own input projection and final layer. 1-D RoPE over the joint flat index: text at 0..S-1, image tokens at
S + their Flag-DiT index, so the text-image offset does not depend on the image size.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from flagdit_jax import tokens as tok
from flagdit_jax.models import common
from flagdit_jax.models import layer_stack
from flagdit_jax.models import layers as L

MODALITIES = ("text", "image")  # the order of the tokens in the sequence and of the conditions


@dataclasses.dataclass(frozen=True)
class JointConfig(common.LuminaConfig):
    """The Flag-DiT trunk plus the text modality's token width and count. No class or caption
    condition: the other modality is the condition."""

    kind = "joint"
    conditioned = False

    num_classes: int = 0
    learn_sigma: bool = False
    nextline: bool = True
    text_dim: int = 16
    text_len: int = 2
    # Scale the pooled text's adaLN term by t_text, so pure-noise text (t_text = 0: the image's marginal)
    # puts nothing into the image's modulation, and a half-noised text half of it. False: the first runs'
    # form (an ungated pooled path, whose pure-noise text reads as a random condition).
    text_pool_gate: bool = False

    def _check(self) -> None:
        super()._check()
        if self.num_classes or self.cap_feat_dim:
            raise ValueError(f"the joint model takes no class or caption condition (num_classes={self.num_classes}, "
                             f"cap_feat_dim={self.cap_feat_dim}); its condition is the other modality")
        if self.learn_sigma:
            raise ValueError("learn_sigma=True: the joint model predicts velocities only")
        if self.text_dim <= 0 or self.text_len <= 0:
            raise ValueError(f"text_dim={self.text_dim} and text_len={self.text_len} must be positive")


class JointBlock(nn.Module):
    """The Flag-DiT block (pre-norm adaLN, linear gates) with per-token modulation:
    `x [B, L, D]`, `c [B, K, a]` (one condition per modality), `segment [L]` (each token's modality)
    -> `[B, L, D]`."""

    cfg: JointConfig
    scale: float | None = None  # proportional attention's scale (static), None = 1/sqrt(head_dim)

    @nn.compact
    def __call__(self, x, c, segment, angles, mask):
        cfg = self.cfg
        kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        b, k, a = c.shape
        mods = L.AdaLNModulation(cfg.dim, 6, name="adaLN_modulation", **kw)(c.reshape(b * k, a))
        # [B*K, D] per modality -> [B, L, D] per token: token l takes its modality segment[l]'s row.
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            jnp.take(m.reshape(b, k, -1), segment, axis=1) for m in mods)
        h = L.Attention(cfg, name="attention")(
            L.modulate(L.RMSNorm(cfg.norm_eps, name="attention_norm", **kw)(x), shift_msa, scale_msa), angles, mask,
            scale=self.scale)
        x = x + gate_msa * h
        f = L.SwiGLU(cfg.ffn_hidden, name="feed_forward", **kw)(
            L.modulate(L.RMSNorm(cfg.norm_eps, name="ffn_norm", **kw)(x), shift_mlp, scale_mlp))
        x = x + gate_mlp * f
        return L.constrain(x, ("activation_batch", "activation_length", "activation_embed"))


class JointDiT(nn.Module):
    """`__call__(packed, t, text, t_text, *, options=None) -> (v_image [B, L, p*p*C], v_text [B, S, text_dim])`.

    Args:
      packed: `tokens.Packed` image tokens `[B, L, p*p*C]` at time t (`tokens.pack_for(cfg, frames)`).
      t: `[B]` image times in [0, 1] (0 noise, 1 data).
      text: `[B, S, text_dim]` text tokens at time t_text.
      t_text: `[B]` text times.
      options: `common.InferenceOptions` (RoPE ntk / pi scaling, proportional attention).
    """

    cfg: JointConfig

    OPTIONS = ("ntk_factor", "pi_factor", "base_seqlen")
    BLOCKS = "layers"

    @nn.compact
    def __call__(self, packed, t, text, t_text, *, options=None, train=False):
        cfg = self.cfg
        opts = common.resolve_options(options, self.OPTIONS, "the joint model")
        check_inputs(cfg, packed, t, text, t_text)
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        kw = dict(dtype=dtype, param_dtype=pdtype)
        b, s = text.shape[:2]

        special = {tok.PAD: "pad_token"}
        if cfg.nextline:
            special[tok.NEXTLINE] = "eol_token"
        if cfg.nextframe:
            special[tok.NEXTFRAME] = "eof_token"
        x_image = common.embed_tokens(self, packed, cfg.dim, special, dtype, pdtype)
        x_text = L.Dense(cfg.dim, ("text", "embed"), use_bias=True, name="text_embedder", **kw)(text)
        x = jnp.concatenate([x_text.astype(x_image.dtype), x_image], axis=1)

        # c_k = t_emb(t_k) + e_k + W [t_emb(t_text); t_emb(t_image)], in MODALITIES order.
        t_emb = L.TimestepEmbedder(cfg.cond_dim, name="t_embedder", **kw)
        e = jnp.stack([t_emb(t_text), t_emb(t)], axis=1)  # [B, K, a]
        self.sow("intermediates", "out:t_embedder", e)
        modality = self.param("modality_embedding", nn.with_logical_partitioning(L.normal_002, (None, "cond")),
                              (len(MODALITIES), cfg.cond_dim), pdtype)
        both = L.Dense(cfg.cond_dim, ("cond_hidden", "cond"), use_bias=True, name="time_mixer", **kw)(
            e.reshape(b, -1))
        # The text as a whole into adaLN, as Lumina-T2I's pooled caption: the S tokens flattened (slot order
        # kept) -> LayerNorm -> Linear. Without it, the digit of text -> image reached the image only through
        # attention and 3,000 steps left text -> image at 29% digit accuracy (image -> text: 98%).
        pooled = L.LayerNorm(1e-5, name="text_pool_norm", param_dtype=pdtype)(text.reshape(b, -1).astype(jnp.float32))
        pooled = L.Dense(cfg.cond_dim, ("caption", "cond"), use_bias=True, name="text_pool", kernel_init=L.normal_002,
                         **kw)(pooled)
        if cfg.text_pool_gate:
            pooled = pooled * t_text.astype(pooled.dtype)[:, None]
        c = e + modality.astype(e.dtype)[None] + (both + pooled.astype(e.dtype))[:, None]

        positions = jnp.concatenate([jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s)), s + packed.index], 1)
        angles = L.rope_angles(positions, cfg.head_dim, theta=cfg.rope_theta, ntk_factor=opts.ntk_factor,
                               pi_factor=opts.pi_factor)
        seq_len = x.shape[1]
        scale = None if opts.base_seqlen is None else L.proportional_scale(seq_len, opts.base_seqlen, cfg.head_dim)
        mask = jnp.concatenate([jnp.ones((b, s), bool), packed.mask], 1) if common.has_pads(packed) else None
        segment = jnp.concatenate([jnp.zeros((s,), jnp.int32), jnp.ones((packed.tokens.shape[1],), jnp.int32)])
        x = L.constrain(x, ("activation_batch", "activation_length", "activation_embed"))
        x = layer_stack.apply_blocks(JointBlock, (cfg, scale), x, (c, segment, angles, mask), {}, n_layers=cfg.n_layers,
                                     name=self.BLOCKS, remat=cfg.remat, scan=cfg.scan_layers, parent=self)
        v_text = L.FinalLayer(cfg.dim, cfg.text_dim, name="text_final_layer", **kw)(x[:, :s], c[:, 0])
        v_image = L.FinalLayer(cfg.dim, cfg.patch_size**2 * cfg.in_channels, name="final_layer", **kw)(
            x[:, s:], c[:, 1])
        return v_image.astype(jnp.float32), v_text.astype(jnp.float32)


def check_inputs(cfg: JointConfig, packed, t, text, t_text) -> None:
    """Raise a ValueError naming the bad input before any compute."""
    common.check_packed(cfg, packed)
    b = packed.tokens.shape[0]
    for name, v in (("t", t), ("t_text", t_text)):
        if v is None or jnp.shape(v) != (b,):
            raise ValueError(f"{name} must have shape [B]=({b},), got {None if v is None else jnp.shape(v)}")
    if text is None or text.ndim != 3 or text.shape[0] != b or text.shape[2] != cfg.text_dim:
        raise ValueError(f"text must be [B={b}, S, text_dim={cfg.text_dim}], got {None if text is None else text.shape}")
    if text.shape[1] != cfg.text_len:
        raise ValueError(f"text has {text.shape[1]} tokens; the model was built for text_len={cfg.text_len}")
