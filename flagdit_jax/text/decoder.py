"""LLaMA and Gemma(-1) decoders in Flax linen, as frozen text encoders.

One module covers both (transformers `models/llama/modeling_llama.py`, `models/gemma/modeling_gemma.py`;
the Lumina-T2I text encoder is LLaMA-2-7B, Lumina-Next's is Gemma-2B, REFERENCE.md §1):
pre-norm blocks x + Attn(RMSNorm(x)), x + MLP(RMSNorm(x)); rotary embeddings in the half-split
layout of transformers (`rotate_half`, position ids 0..S-1, computed in fp32); grouped-query
attention (kv heads <= heads); causal attention with a key padding mask. Gemma differs in four places:
  * RMSNorm multiplies by (1 + w) in fp32, then casts (LLaMA casts, then multiplies by w);
  * token embeddings are scaled by sqrt(hidden_size), cast to the params' dtype first;
  * the MLP gate is GELU-tanh (Gemma configs saying "gelu" mean it: transformers maps it too);
  * head_dim is set explicitly (256 for Gemma-2B with 8 heads of a 2048 model).

Written here rather than taken from Google DeepMind's `gemma` package: that package (v3.x) covers
Gemma 2/3 only (no Gemma-1 2B, no LLaMA), loads Orbax checkpoints rather than transformers
safetensors, and pulls in kauldron/etils/sentencepiece; a 150-line module that maps 1:1 onto the
transformers key names is smaller than the glue it would need.

Submodules are named as transformers names them so `text.weights.load_params` maps keys by rule.
Only the first `depth` layers are built: Lumina-Next reads `hidden_states[-2]`, so the last layer
and the final norm of Gemma-2B are never computed nor loaded.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

FAMILIES = ("llama", "gemma")
# transformers' ACT2FN names -> jax; "gelu" is exact erf GELU except in Gemma configs (see below).
ACTIVATIONS = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
}
# transformers config-class defaults for fields a config.json may leave out (LlamaConfig / GemmaConfig).
_DEFAULTS = {
    "llama": dict(rms_norm_eps=1e-6, hidden_act="silu", head_dim=None),
    "gemma": dict(rms_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh", head_dim=256),
}
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    family: str  # 'llama' | 'gemma'
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    hidden_act: str
    attention_bias: bool = False
    mlp_bias: bool = False

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"family={self.family!r}; expected one of {FAMILIES}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act={self.hidden_act!r} is not supported; expected one of {sorted(ACTIVATIONS)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_attention_heads={self.num_heads} must be a multiple of "
                             f"num_key_value_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even (rotary embedding)")

    @classmethod
    def from_hf(cls, config: dict) -> "DecoderConfig":
        """transformers `LlamaConfig` / `GemmaConfig` dict (config.json) -> DecoderConfig."""
        family = config.get("model_type")
        if family not in FAMILIES:
            raise ValueError(f"model_type={family!r}; the decoder supports {FAMILIES}")
        missing = [k for k in _REQUIRED if k not in config]
        if missing:
            raise ValueError(f"{family} config.json lacks {missing}")
        c = {**_DEFAULTS[family], **{k: v for k, v in config.items() if v is not None}}
        # Old config.json files: rope_theta / rope_scaling at top level; transformers 5 writes rope_parameters.
        rope = dict(config.get("rope_parameters") or {})
        theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
        scaling = config.get("rope_scaling") or {}
        rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
        if rope_type != "default":
            raise ValueError(f"rope type {rope_type!r} is not supported (only the default rotary embedding)")
        act = c.get("hidden_activation") or c["hidden_act"]  # transformers 4.x Gemma configs: hidden_activation
        if family == "gemma" and act == "gelu":
            act = "gelu_pytorch_tanh"  # legacy Gemma value meant the tanh approximation (GemmaConfig does the same)
        heads = c["num_attention_heads"]
        return cls(family=family, vocab_size=c["vocab_size"], hidden_size=c["hidden_size"],
                   intermediate_size=c["intermediate_size"], num_layers=c["num_hidden_layers"], num_heads=heads,
                   num_kv_heads=c.get("num_key_value_heads", heads), head_dim=c["head_dim"] or c["hidden_size"] // heads,
                   rms_norm_eps=float(c["rms_norm_eps"]), rope_theta=float(theta), hidden_act=act,
                   attention_bias=bool(c.get("attention_bias", False)), mlp_bias=bool(c.get("mlp_bias", False)))


class RMSNorm(nn.Module):
    """LLaMA: w * cast(norm(x)); Gemma: cast(norm(x) * (1 + w)); the normalisation in fp32 for both."""

    eps: float
    gemma: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.zeros if self.gemma else nn.initializers.ones
        w = self.param("weight", init, (x.shape[-1],), self.dtype)
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        if self.gemma:
            return (y * (1.0 + w.astype(jnp.float32))).astype(x.dtype)
        return (w * y.astype(x.dtype)).astype(x.dtype)


def rotary(positions: int, head_dim: int, theta: float, dtype) -> tuple[jax.Array, jax.Array]:
    """cos, sin [S, head_dim] of transformers' default rotary embedding (fp32, then cast to dtype)."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    freqs = jnp.arange(positions, dtype=jnp.float32)[:, None] * jnp.asarray(inv_freq, jnp.float32)[None]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rotary(x, cos, sin):
    """x [B, S, H, hd] rotated in the half-split layout (transformers `rotate_half`)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[None, :, None] + rotated * sin[None, :, None]


class Attention(nn.Module):
    cfg: DecoderConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, cos, sin, mask):
        c = self.cfg
        b, s, _ = x.shape
        dense = functools.partial(nn.Dense, use_bias=c.attention_bias, dtype=self.dtype, param_dtype=self.dtype)
        q = dense(c.num_heads * c.head_dim, name="q_proj")(x).reshape(b, s, c.num_heads, c.head_dim)
        k = dense(c.num_kv_heads * c.head_dim, name="k_proj")(x).reshape(b, s, c.num_kv_heads, c.head_dim)
        v = dense(c.num_kv_heads * c.head_dim, name="v_proj")(x).reshape(b, s, c.num_kv_heads, c.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        # GQA handled by dot_product_attention (kv head j serves query heads j*g..(j+1)*g-1, as repeat_kv);
        # causal AND key-padding mask; softmax in fp32.
        o = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None, None, :], is_causal=True,
                                         scale=c.head_dim ** -0.5)
        return dense(c.hidden_size, name="o_proj")(o.reshape(b, s, c.num_heads * c.head_dim))


class MLP(nn.Module):
    cfg: DecoderConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        dense = functools.partial(nn.Dense, use_bias=c.mlp_bias, dtype=self.dtype, param_dtype=self.dtype)
        gate = ACTIVATIONS[c.hidden_act](dense(c.intermediate_size, name="gate_proj")(x))
        return dense(c.hidden_size, name="down_proj")(gate * dense(c.intermediate_size, name="up_proj")(x))


class DecoderLayer(nn.Module):
    cfg: DecoderConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, cos, sin, mask):
        norm = functools.partial(RMSNorm, self.cfg.rms_norm_eps, self.cfg.family == "gemma", self.dtype)
        x = x + Attention(self.cfg, self.dtype, name="self_attn")(norm(name="input_layernorm")(x), cos, sin, mask)
        return x + MLP(self.cfg, self.dtype, name="mlp")(norm(name="post_attention_layernorm")(x))


class Decoder(nn.Module):
    """ids [B, S] int, mask [B, S] bool (True = real token, right padding) -> hidden [B, S, hidden_size].

    Returns transformers' `hidden_states[depth]`: the embeddings for depth 0, the output of layer
    `depth` otherwise, passed through the final norm when `final_norm` (then depth must be
    num_layers: `last_hidden_state`). Params and compute in `dtype` (norms, RoPE tables, softmax in fp32).
    """

    cfg: DecoderConfig
    depth: int
    final_norm: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, ids, mask):
        c = self.cfg
        if not 0 <= self.depth <= c.num_layers or (self.final_norm and self.depth != c.num_layers):
            raise ValueError(f"depth={self.depth}, final_norm={self.final_norm} for a {c.num_layers}-layer decoder")
        x = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype, param_dtype=self.dtype, name="embed_tokens")(ids)
        if c.family == "gemma":
            x = x * jnp.asarray(c.hidden_size ** 0.5, self.dtype)  # GemmaTextScaledWordEmbedding
        cos, sin = rotary(ids.shape[1], c.head_dim, c.rope_theta, self.dtype)
        for i in range(self.depth):
            x = DecoderLayer(c, self.dtype, name=f"layers_{i}")(x, cos, sin, mask)
        if self.final_norm:
            x = RMSNorm(c.rms_norm_eps, c.family == "gemma", self.dtype, name="norm")(x)
        return x
