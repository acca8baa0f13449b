"""Attention kernels behind one entry point, `dot_product_attention` (`[B, heads, length,
head_dim]` layout, grouped KV heads, key masks, any softmax scale); the `attention` field of a model
config picks the implementation ('auto' resolves it from backend, dtype and shapes).

'blockwise' is the memory-linear path (FlashAttention-2 in plain JAX, written here because the
maintained fused kernels (cuDNN, Pallas GPU/TPU, tokamax) do not run on XLA:CPU; algorithm of Dao 2023, arXiv 2307.08691,
Alg. 1-2): online softmax over key blocks for each query block, and its own backward that
recomputes the scores block by block from q, k and the saved per-row logsumexp, so forward and
backward hold O(L * block) scores instead of O(L^2).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "blockwise", "cudnn", "splash")

# Default tiles of `blockwise_attention`: 512 x 512 was the fastest of 512/1024/2048 x 512/1024 for
# fwd+bwd on XLA:CPU at 2K-16K tokens (head_dim 16 and 64; 16K: 1.35x faster than 1024 x 512;
# `python experiments/bench/long_attention.py --tiles`).
BLOCK_Q = 512
BLOCK_K = 512
# 'auto' keeps the full-score 'xla' path while Lq * Lk (per head) is at most this. XLA:CPU: the
# blockwise fwd+bwd already takes 0.4-0.7x the time of 'xla' at 1K tokens and 0.3-0.8x at 2K-8K
# (and its memory is linear), so the CPU switch is at 1024^2; on GPU a scan of small tiles is slow,
# so fp32 keeps 'xla' up to 4096^2 scores (64 MiB per head).
XLA_MAX_SCORES = {"cpu": 1024 * 1024, "gpu": 4096 * 4096}
# logsumexp of a row with no valid key: finite, so combining chunks (exp(lse_i - lse)) never
# computes inf - inf; exp(MASKED_LSE - anything real) is exactly 0.
MASKED_LSE = float(np.float32(-1e30))


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
      scale: softmax scale (default 1/sqrt(D)); a Python number (proportional attention's is).
      implementation: 'auto' (`resolve_implementation`: picked from backend, dtype and lengths),
        'xla' (einsum + float32 softmax, full score matrix), 'blockwise' (`blockwise_attention`,
        memory-linear), 'cudnn' (flash attention through `jax.nn.dot_product_attention`, bf16/fp16
        on GPU only), 'splash' (TPU Pallas splash kernel, TPU only).

    Returns:
      `[B, Hq, Lq, D]`. Rows whose keys are all masked: 'xla' gives the mean of v over all keys
      (today's behaviour, kept), 'blockwise' and 'cudnn' give 0.
    """
    b, hq, lq, d = q.shape
    hkv = k.shape[1]
    if hq % hkv:
        raise ValueError(f"query heads {hq} must be a multiple of kv heads {hkv}")
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    if implementation == "auto":
        implementation = resolve_implementation(q_len=lq, k_len=k.shape[2], head_dim=d, dtype=q.dtype)
    if implementation == "xla":
        # The g query heads sharing a kv head are stacked along the query length, so every
        # matmul is a plain 4-D batched GEMM (5-D einsums run ~2x slower on XLA:CPU).
        qg = q.reshape(b, hkv, (hq // hkv) * lq, d)
        out = _xla_attention(qg, k, v, key_mask, float(scale))
        return out.reshape(b, hq, lq, d)
    if implementation == "blockwise":
        return blockwise_attention(q, k, v, key_mask=key_mask, scale=scale)
    if implementation == "cudnn":
        return _cudnn_attention(q, k, v, key_mask=key_mask, scale=scale)
    if implementation == "splash":
        return _splash_attention(q, k, v, key_mask=key_mask, scale=scale)
    raise ValueError(f"unknown attention implementation {implementation!r}; expected one of {ATTENTION_IMPLEMENTATIONS}")


def resolve_implementation(
    *, q_len: int, k_len: int, head_dim: int, dtype, backend: str | None = None
) -> str:
    """The implementation 'auto' stands for, chosen statically (at trace time) from shapes and backend.

    - TPU: 'splash' when both lengths are multiples of 128 (the splash kernel's block granularity),
      else 'blockwise'.
    - GPU, bf16/fp16 inputs with head_dim <= 128 and divisible by 8 (cuDNN flash attention's
      requirements, jax `cudnn/fused_attention_stablehlo.check_is_flash_attention`): 'cudnn'.
    - Otherwise (CPU, fp32 on GPU, unsupported head dims): 'xla' while q_len * k_len <=
      `XLA_MAX_SCORES[backend]` (short sequences, the test suite and golden parity keep the
      full-score path), else 'blockwise'.

    Args:
      q_len, k_len: query and key lengths per head; head_dim: D; dtype: the query's dtype;
      backend: 'cpu' / 'gpu' / 'tpu' (default `jax.default_backend()`).
    """
    backend = jax.default_backend() if backend is None else backend
    if backend == "tpu":
        return "splash" if q_len % 128 == 0 and k_len % 128 == 0 else "blockwise"
    if (backend in ("gpu", "cuda") and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
            and head_dim <= 128 and head_dim % 8 == 0):
        return "cudnn"
    limit = XLA_MAX_SCORES["gpu" if backend in ("gpu", "cuda", "rocm") else "cpu"]
    return "xla" if q_len * k_len <= limit else "blockwise"


# --- 'xla': full score matrix ------------------------------------------------------------------

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


# --- 'blockwise': memory-linear flash-form attention --------------------------------------------

def blockwise_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    key_mask: jax.Array | None = None,
    scale: float | None = None,
    block_q: int = BLOCK_Q,
    block_k: int = BLOCK_K,
    return_lse: bool = False,
):
    """Memory-linear attention (FlashAttention-2 form) with its own backward; works on any backend.

    Scores are computed one `[block_q, block_k]` tile at a time: the forward keeps a running row
    max, row sum and output per query block (online softmax) while it scans the key blocks; the
    backward recomputes each tile's probabilities from q, k and the saved logsumexp
    (P = exp(q k^T * scale - lse)) and uses dS = P * (dP - rowsum(dO * O) + dlse). Peak memory is
    O(B * Hkv * (Lq*g + Lk) * D + block_q * block_k) instead of O(Lq * Lk). Matmuls take the input
    dtype with float32 accumulation; softmax statistics are float32.

    Args:
      q: `[B, Hq, Lq, D]`; k, v: `[B, Hkv, Lk, D]`, Hq a multiple of Hkv (GQA: the g = Hq/Hkv query
        heads of a kv head are stacked along the query length; k/v are never repeated).
      key_mask: `[B, Lk]` bool or None; False keys get probability 0.
      scale: softmax scale, a Python number (default 1/sqrt(D)).
      block_q, block_k: tile sizes (positive ints); lengths that are not multiples are padded
        internally (padded keys masked, padded query rows dropped); a block longer than the
        sequence shrinks to it, so a short caption (cross-attention) is a single key block.
      return_lse: also return the per-row logsumexp of the scaled, masked scores.

    Returns:
      out `[B, Hq, Lq, D]` (q's dtype), or `(out, lse)` with lse `[B, Hq, Lq]` float32 when
      return_lse. Rows with no valid key: out = 0 and lse = `MASKED_LSE` (-1e30, finite).

    The lse output is differentiable: a cotangent for it adds P * dlse to dS. This is what ring /
    sequence-parallel attention needs to merge per-chunk results of the same queries against
    disjoint key chunks i: lse = logsumexp_i(lse_i), out = sum_i exp(lse_i - lse) * out_i, and
    jax.grad through that merge is exact.
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be [B, H, L, D], got shapes {q.shape}, {k.shape}, {v.shape}")
    b, hq, lq, d = q.shape
    _, hkv, lk, _ = k.shape
    if k.shape[0] != b or k.shape[3] != d or v.shape != k.shape:
        raise ValueError(f"k and v must be [B={b}, Hkv, Lk, D={d}] and equal, got {k.shape}, {v.shape}")
    if hq % hkv:
        raise ValueError(f"query heads {hq} must be a multiple of kv heads {hkv}")
    if key_mask is not None and key_mask.shape != (b, lk):
        raise ValueError(f"key_mask must be [B, Lk]=({b}, {lk}), got {key_mask.shape}")
    for name, blk in (("block_q", block_q), ("block_k", block_k)):
        if not isinstance(blk, (int, np.integer)) or blk <= 0:
            raise ValueError(f"{name} must be a positive int, got {blk!r}")
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)

    mq = (hq // hkv) * lq
    qg = q.reshape(b, hkv, mq, d)
    bq, bk = min(block_q, mq), min(block_k, lk)
    pq, pk = -mq % bq, -lk % bk
    if pq:
        qg = jnp.pad(qg, ((0, 0), (0, 0), (0, pq), (0, 0)))
    if pk:
        k = jnp.pad(k, ((0, 0), (0, 0), (0, pk), (0, 0)))
        v = jnp.pad(v, ((0, 0), (0, 0), (0, pk), (0, 0)))
        key_mask = jnp.ones((b, lk), bool) if key_mask is None else key_mask
        key_mask = jnp.pad(key_mask, ((0, 0), (0, pk)))
    out, lse = _flash(qg, k, v, key_mask, scale, bq, bk)
    out = out[:, :, :mq].reshape(b, hq, lq, d)
    if not return_lse:
        return out
    return out, lse[:, :, :mq].reshape(b, hq, lq)


def _tiles(x, n):
    """`[B, K, n*blk, ...]` -> `[n, B, K, blk, ...]` (the scanned axis first)."""
    return jnp.moveaxis(x.reshape(x.shape[0], x.shape[1], n, -1, *x.shape[3:]), 2, 0)


def _untile(x):
    """Inverse of `_tiles`."""
    x = jnp.moveaxis(x, 0, 2)
    return x.reshape(x.shape[0], x.shape[1], -1, *x.shape[4:])


def _masked_scores(qi, kj, mj, scale):
    """Scaled float32 scores of one tile `[B, K, bq, bk]`; masked keys -> MASKED_LSE."""
    s = jnp.einsum("bkqd,bksd->bkqs", qi, kj, preferred_element_type=jnp.float32) * scale
    return s if mj is None else jnp.where(mj[:, None, None, :], s, MASKED_LSE)


def _flash_forward(q, k, v, key_mask, scale, bq, bk):
    b, hkv, mq, d = q.shape
    nq, nk = mq // bq, k.shape[2] // bk
    kt, vt = _tiles(k, nk), _tiles(v, nk)
    mt = None if key_mask is None else jnp.moveaxis(key_mask.reshape(b, nk, bk), 1, 0)

    def query_block(qi):
        def key_block(carry, xs):
            m, l, acc = carry
            kj, vj, mj = xs
            s = _masked_scores(qi, kj, mj, scale)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            p = jnp.exp(s - m_new[..., None])
            if mj is not None:  # a row with no valid key so far has m_new = MASKED_LSE: exp(0) = 1
                p = jnp.where(mj[:, None, None, :], p, 0.0)
            alpha = jnp.exp(m - m_new)
            l = alpha * l + jnp.sum(p, axis=-1)
            acc = alpha[..., None] * acc + jnp.einsum("bkqs,bksd->bkqd", p.astype(vj.dtype), vj,
                                                      preferred_element_type=jnp.float32)
            return (m_new, l, acc), None

        init = (jnp.full((b, hkv, bq), MASKED_LSE, jnp.float32), jnp.zeros((b, hkv, bq), jnp.float32),
                jnp.zeros((b, hkv, bq, d), jnp.float32))
        (m, l, acc), _ = jax.lax.scan(key_block, init, (kt, vt, mt))
        valid = l > 0
        out = acc / jnp.where(valid, l, 1.0)[..., None]
        lse = jnp.where(valid, m + jnp.log(jnp.where(valid, l, 1.0)), MASKED_LSE)
        return out.astype(q.dtype), lse

    out, lse = jax.lax.map(query_block, _tiles(q, nq))
    return _untile(out), _untile(lse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _flash(q, k, v, key_mask, scale, bq, bk):
    """`(out [B, K, Mq, D], lse [B, K, Mq])` of padded, GQA-stacked inputs (Mq, Lk block multiples)."""
    return _flash_forward(q, k, v, key_mask, scale, bq, bk)


def _flash_fwd(q, k, v, key_mask, scale, bq, bk):
    out, lse = _flash_forward(q, k, v, key_mask, scale, bq, bk)
    return (out, lse), (q, k, v, key_mask, out, lse)


def _flash_bwd(scale, bq, bk, res, cts):
    # FlashAttention-2 backward (Dao 2023, Alg. 2): outer scan over key blocks accumulates dK_j,
    # dV_j over the query blocks; dQ is carried whole (O(L * D)) and updated tile by tile.
    q, k, v, key_mask, out, lse = res
    d_out, d_lse = cts
    b, hkv, mq, d = q.shape
    nq, nk = mq // bq, k.shape[2] // bk
    # dS = P * (dP - delta) with delta = rowsum(dO * O) - dlse (the lse cotangent adds P * dlse).
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1) - d_lse
    qt, dot_, lset, deltat = _tiles(q, nq), _tiles(d_out.astype(q.dtype), nq), _tiles(lse, nq), _tiles(delta, nq)
    mt = None if key_mask is None else jnp.moveaxis(key_mask.reshape(b, nk, bk), 1, 0)

    def key_block(dq, xs):
        kj, vj, mj = xs

        def query_block(carry, ys):
            dk, dv = carry
            qi, doi, lsei, deltai, dqi = ys
            s = _masked_scores(qi, kj, mj, scale)
            p = jnp.exp(s - lsei[..., None])
            if mj is not None:
                p = jnp.where(mj[:, None, None, :], p, 0.0)
            dv = dv + jnp.einsum("bkqs,bkqd->bksd", p.astype(vj.dtype), doi, preferred_element_type=jnp.float32)
            dp = jnp.einsum("bkqd,bksd->bkqs", doi, vj, preferred_element_type=jnp.float32)
            ds = (p * (dp - deltai[..., None]) * scale).astype(qi.dtype)
            dqi = dqi + jnp.einsum("bkqs,bksd->bkqd", ds, kj, preferred_element_type=jnp.float32)
            dk = dk + jnp.einsum("bkqs,bkqd->bksd", ds, qi, preferred_element_type=jnp.float32)
            return (dk, dv), dqi

        zeros = jnp.zeros((b, hkv, bk, d), jnp.float32)
        (dk, dv), dq = jax.lax.scan(query_block, (zeros, zeros), (qt, dot_, lset, deltat, dq))
        return dq, (dk, dv)

    dq0 = jnp.zeros((nq, b, hkv, bq, d), jnp.float32)
    dq, (dk, dv) = jax.lax.scan(key_block, dq0, (_tiles(k, nk), _tiles(v, nk), mt))
    return _untile(dq).astype(q.dtype), _untile(dk).astype(k.dtype), _untile(dv).astype(v.dtype), None


_flash.defvjp(_flash_fwd, _flash_bwd)


# --- 'cudnn' (GPU) and 'splash' (TPU): fused kernels, not exercised on CPU -----------------------

def _cudnn_attention(q, k, v, *, key_mask, scale, implementation="cudnn"):
    """cuDNN flash attention through `jax.nn.dot_product_attention` (bf16/fp16, head_dim <= 128 and
    divisible by 8; jax raises NotImplementedError otherwise). cuDNN takes a boolean mask only as a
    full `[B, 1, Lq, Lk]` bias (quadratic), so a key mask goes in as lengths instead: attention is
    invariant to the order of the keys, so each batch row's valid keys are moved to the front
    (a stable argsort, O(L) gather) and `key_value_seq_lengths` counts them. Rows with no valid
    key are set to 0. `implementation='xla'` runs the same path on CPU (the tests do); the cuDNN
    kernel itself needs a GPU and is untested here.
    """
    mq = q.shape[2]
    seq_lengths = None
    if key_mask is not None:
        order = jnp.argsort(~key_mask, axis=-1, stable=True)  # valid keys first, in order
        k = jnp.take_along_axis(k, order[:, None, :, None], axis=2)
        v = jnp.take_along_axis(v, order[:, None, :, None], axis=2)
        seq_lengths = jnp.sum(key_mask, axis=-1, dtype=jnp.int32)
    out = jax.nn.dot_product_attention(
        q.swapaxes(1, 2), k.swapaxes(1, 2), v.swapaxes(1, 2), scale=scale, implementation=implementation,
        query_seq_lengths=None if seq_lengths is None else jnp.full(seq_lengths.shape, mq, jnp.int32),
        key_value_seq_lengths=seq_lengths,
    ).swapaxes(1, 2)
    if key_mask is not None:
        out = jnp.where((seq_lengths > 0)[:, None, None, None], out, 0).astype(out.dtype)
    return out


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
