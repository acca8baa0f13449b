"""Attention kernels behind one entry point, `dot_product_attention` (`[B, heads, length,
head_dim]` layout, grouped KV heads, key masks, any softmax scale); the `attention` field of a model
config picks the implementation.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn", "splash")


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    key_mask: jax.Array | None = None,
    scale: float | None = None,
    implementation: str = "xla",
) -> jax.Array:
    """Multi-head attention with grouped KV heads; the one entry point every backbone uses.

    Args:
      q: `[B, Hq, Lq, D]`; k, v: `[B, Hkv, Lk, D]` with Hq divisible by Hkv (query head h uses kv
        head h // (Hq/Hkv), as the reference's repeat-then-flatten does).
      key_mask: `[B, Lk]` bool, False keys are never attended (pads, caption padding).
      scale: softmax scale (default 1/sqrt(D)).
      implementation: 'xla' (einsum + float32 softmax; what CPU runs), 'cudnn' (flash attention
        through `jax.nn.dot_product_attention`, needs bf16/fp16 on GPU), 'splash' (TPU Pallas
        splash kernel).

    Returns:
      `[B, Hq, Lq, D]`.
    """
    b, hq, lq, d = q.shape
    hkv = k.shape[1]
    if hq % hkv:
        raise ValueError(f"query heads {hq} must be a multiple of kv heads {hkv}")
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    if implementation == "xla":
        # The g query heads sharing a kv head are stacked along the query length, so every
        # matmul is a plain 4-D batched GEMM (5-D einsums run ~2x slower on XLA:CPU).
        qg = q.reshape(b, hkv, (hq // hkv) * lq, d)
        out = _xla_attention(qg, k, v, key_mask, float(scale))
        return out.reshape(b, hq, lq, d)
    if implementation == "cudnn":
        mask = None if key_mask is None else key_mask[:, None, None, :]
        out = jax.nn.dot_product_attention(
            q.swapaxes(1, 2), k.swapaxes(1, 2), v.swapaxes(1, 2), mask=mask, scale=scale, implementation="cudnn"
        )
        return out.swapaxes(1, 2)
    if implementation == "splash":
        return _splash_attention(q, k, v, key_mask=key_mask, scale=scale)
    raise ValueError(f"unknown attention implementation {implementation!r}; expected one of {ATTENTION_IMPLEMENTATIONS}")


def _attention_probs(q, k, key_mask, scale):
    logits = jnp.einsum("bkqd,bksd->bkqs", q, k, preferred_element_type=jnp.float32) * scale
    if key_mask is not None:
        logits = jnp.where(key_mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(logits, axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _xla_attention(q, k, v, key_mask, scale):
    """softmax(q k^T * scale) v on `[B, K, Lq, D]` x `[B, K, Lk, D]`, softmax in float32."""
    return jnp.einsum("bkqs,bksd->bkqd", _attention_probs(q, k, key_mask, scale).astype(v.dtype), v)


def _xla_attention_fwd(q, k, v, key_mask, scale):
    probs = _attention_probs(q, k, key_mask, scale)
    out = jnp.einsum("bkqs,bksd->bkqd", probs.astype(v.dtype), v)
    return out, (q, k, v, key_mask, probs, out)


def _xla_attention_bwd(scale, res, d_out):
    # Hand-written backward (flash-attention form: dS = P * (dP - rowsum(dO * O))): on XLA:CPU it
    # is ~1.6x faster than autodiff of the softmax (experiments/bench/step_time.py).
    q, k, v, key_mask, probs, out = res
    d_out_f = d_out.astype(jnp.float32)
    dv = jnp.einsum("bkqs,bkqd->bksd", probs.astype(v.dtype), d_out).astype(v.dtype)
    dp = jnp.einsum("bkqd,bksd->bkqs", d_out, v, preferred_element_type=jnp.float32)
    delta = jnp.sum(d_out_f * out.astype(jnp.float32), axis=-1, keepdims=True)
    ds = (probs * (dp - delta) * scale).astype(q.dtype)
    dq = jnp.einsum("bkqs,bksd->bkqd", ds, k).astype(q.dtype)
    dk = jnp.einsum("bkqs,bkqd->bksd", ds, q).astype(k.dtype)
    return dq, dk, dv, None


_xla_attention.defvjp(_xla_attention_fwd, _xla_attention_bwd)


def _splash_attention(q, k, v, *, key_mask, scale):
    """TPU Pallas splash attention; the key mask becomes segment ids (queries all in segment 1,
    valid keys 1, masked keys 0). Only runs on TPU: not exercised by the CPU test suite."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    b, hq, lq, _ = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    k = jnp.repeat(k, hq // hkv, axis=1)
    v = jnp.repeat(v, hq // hkv, axis=1)
    kernel = sk.make_splash_mha(sm.MultiHeadMask([sm.FullMask((lq, lk))] * hq), head_shards=1, q_seq_shards=1)
    if key_mask is None:
        key_mask = jnp.ones((b, lk), bool)
    seg = sk.SegmentIds(q=jnp.ones((b, lq), jnp.int32), kv=key_mask.astype(jnp.int32))
    return jax.vmap(lambda q_, k_, v_, s_: kernel(q_ * scale, k_, v_, segment_ids=s_))(q, k, v, seg)
