"""Sequence-parallel self-attention over the `sequence` mesh axis (issue #12, item 2).

Every activation `[B, L, ...]` of the backbones is sharded on its length over the mesh axis that
the logical name `activation_length` maps to (`sharding.DEFAULT_RULES`: `sequence`). Everything
but self-attention is token-wise, so only attention needs communication. `attention` below runs
it under `jax.shard_map` with one of two schemes (the model config's `sequence_parallel`):

* 'ulysses' (DeepSpeed-Ulysses): an all-to-all over `sequence` turns length-sharded q/k/v into
  head-sharded full-length ones, the normal `dot_product_attention` (the config's implementation,
  so long sequences get its memory-linear path) runs locally, and an all-to-all turns the output
  back. Needs the query heads per tensor shard divisible by the sequence axis size n; kv heads
  (GQA) are repeated locally until they divide too.
* 'ring' (Ring Attention, Liu et al. 2023): each device keeps its query chunk while the key/value
  chunks (with their key-mask chunk) travel round the ring by `lax.ppermute` in a `lax.scan`; each
  step's (out, logsumexp) is merged by the online-softmax rule. Any head count; n - 1 permutes of
  k/v per layer. The per-chunk kernel is the memory-linear `attention.blockwise_attention` (with
  its logsumexp) unless the config's implementation is, or resolves to, 'xla' for one chunk.

Batch stays sharded over `data` x `fsdp` and heads over `tensor` (the same logical rules), so
sequence parallelism composes with FSDP and tensor parallelism by the mesh shape alone.

How to enable it: give the mesh a `sequence` axis > 1 (`config.mesh.shape = (data, fsdp,
sequence, tensor)`, e.g. `(1, 2, 2, 2)`) and pick the scheme with `config.model.sequence_parallel`
('ulysses', the default, or 'ring'). The token length (pads included: `config.data.buckets`) must
be divisible by the sequence axis size (`sharding.check_sequence_length`). The mesh is read from
the context (`jax.set_mesh`, as `train` runs its step; a custom loop or sampler must do the same)
and the axes from the current `nn.logical_axis_rules` (default `sharding.DEFAULT_RULES`). With no
mesh, or a sequence axis of size 1, `attention` is exactly `dot_product_attention`. Ulysses moves
q, k, v and the output once per layer (all-to-all) and keeps the local kernel's speed; ring moves
only k/v, n - 1 times, and fits any head count: prefer ulysses when the heads allow it.

Only the plain self-attention goes sequence-parallel; style sharing, context drop's pooled keys
and the cross-attention to the caption (short, replicated keys) are left to XLA's partitioner.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from flagdit_jax.models.attention import dot_product_attention

METHODS = ("ulysses", "ring")

# Logical names of an attention operand `[B, heads, L, head_dim]` (as in layers.Attention).
_QKV_AXES = ("activation_batch", "activation_heads", "activation_length", "activation_kv")


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    key_mask: jax.Array | None = None,
    scale: float | None = None,
    implementation: str = "xla",
    method: str = "ulysses",
    strict: bool = True,
) -> jax.Array:
    """Self-attention, sequence-parallel when the context mesh shards the length; else exactly
    `attention.dot_product_attention`.

    Args:
      q: `[B, Hq, L, D]`; k, v: `[B, Hkv, L, D]` (Hq a multiple of Hkv, GQA).
      key_mask: `[B, L]` bool, False = masked key (pads); each chunk travels with its k/v.
      scale: softmax scale (default 1/sqrt(D)).
      implementation: `dot_product_attention`'s implementation (the local kernel of 'ulysses').
      method: 'ulysses' or 'ring'.
      strict: raise when the length does not divide over the sequence axis; False runs the plain
        path instead (what `init` uses: parameters do not depend on the length, and init traces a
        few example tokens).

    Returns:
      `[B, Hq, L, D]`.
    """
    if method not in METHODS:
        raise ValueError(f"sequence_parallel={method!r}; expected one of {METHODS}")
    mesh = jax.sharding.get_abstract_mesh()
    plan = None if mesh.empty else _plan(dict(mesh.shape), _rules(), q.shape[0], q.shape[1], k.shape[1])
    b, hq, length, d = q.shape
    if plan is None or (length % plan[1] and not strict):  # not sharded; or init: any example length
        return dot_product_attention(q, k, v, key_mask=key_mask, scale=scale, implementation=implementation)
    axis, n, qspec, kvspec, mspec = plan
    if length % n:
        raise ValueError(f"sequence parallelism: token length {length} must be divisible by the '{axis}' mesh axis "
                         f"size {n} (pad the sequence, e.g. config.data.buckets, or change config.mesh.shape)")
    _check_heads(method, hq, dict(mesh.shape), plan)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    if k.shape[1] != hq and kvspec[1] != qspec[1]:
        # kv heads do not split over the tensor axis the query heads use: give every query head its
        # own kv head (repeat = the reference's GQA mapping, query head h -> kv head h // (Hq/Hkv)).
        k, v = (jnp.repeat(z, hq // k.shape[1], axis=1) for z in (k, v))
        kvspec = qspec
    local = _ulysses_local if method == "ulysses" else _ring_local
    has_mask = key_mask is not None

    def body(q, k, v, *mask):
        return local(q, k, v, mask[0] if has_mask else None, axis=axis, n=n, scale=scale,
                     implementation=implementation)

    in_specs = (qspec, kvspec, kvspec) + ((mspec,) if has_mask else ())
    args = (q, k, v) + ((key_mask,) if has_mask else ())
    # check_vma=False: the local kernels are not typed by varying manual axes (a scan-based kernel
    # whose carries start from constants, Pallas / cuDNN calls), as MaxText's shard_map-wrapped
    # splash attention; the parity tests check values and gradients, replicated axes included.
    return jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=qspec, check_vma=False)(*args)


def check_mesh(cfg, mesh_shape, rules=None) -> None:
    """ValueError before any compile when `cfg` (a model config: n_heads, kv_heads,
    sequence_parallel) cannot run sequence-parallel on a mesh of `mesh_shape` (`sharding.MESH_AXES`
    order): 'ulysses' needs the query heads per tensor shard divisible by the sequence axis size."""
    from flagdit_jax import sharding

    sizes = dict(zip(sharding.MESH_AXES, mesh_shape))
    rules = sharding.DEFAULT_RULES if rules is None else rules
    kv_heads = getattr(cfg, "kv_heads", cfg.n_heads)
    plan = _plan(sizes, rules, 0, cfg.n_heads, kv_heads)
    if plan is not None:
        _check_heads(cfg.sequence_parallel, cfg.n_heads, sizes, plan)


def _rules():
    from flagdit_jax import sharding  # the default table outside a rules context

    return nn.get_logical_axis_rules() or sharding.DEFAULT_RULES


def _size(sizes, axes) -> int:
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else axes
    return math.prod(sizes[a] for a in axes)


def _plan(sizes: dict, rules, b: int, hq: int, hkv: int):
    """(axis, n, q spec, kv spec, mask spec) when `rules` shard the length over a mesh axis of size
    n > 1 (`sizes`: mesh axis -> size), else None. Batch / head axes that do not divide the arrays
    are replicated."""
    batch, heads, length, _ = nn.logical_to_mesh_axes(_QKV_AXES, rules)
    if length is None or _size(sizes, length) == 1:
        return None
    if not isinstance(length, str):
        named = tuple(a for a in length if sizes[a] > 1)
        if len(named) != 1:
            raise ValueError(f"sequence parallelism shards the length over one mesh axis; the rules map "
                             f"activation_length to {length} (sizes {[sizes[a] for a in length]})")
        length = named[0]
    if length in (heads if isinstance(heads, tuple) else (heads,)):
        raise ValueError(f"the rules map both activation_length and activation_heads to '{length}'")
    batch = batch if b % _size(sizes, batch) == 0 else None
    heads = heads if hq % _size(sizes, heads) == 0 else None
    kv_heads = heads if hkv % _size(sizes, heads) == 0 else None
    return length, sizes[length], P(batch, heads, length, None), P(batch, kv_heads, length, None), P(batch, length)


def _check_heads(method, hq, sizes, plan) -> None:
    axis, n, qspec = plan[:3]
    t = _size(sizes, qspec[1])
    if method == "ulysses" and (hq // t) % n:
        raise ValueError(
            f"sequence_parallel='ulysses' needs the query heads per tensor shard (n_heads={hq} / {t} = {hq // t}) "
            f"divisible by the '{axis}' mesh axis size {n}; use model.sequence_parallel='ring' or a mesh whose "
            f"sequence axis divides {hq // t}")


# ----------------------------------------------------------------------------------------------
# Per-device bodies (inside shard_map): q `[b, hq, L/n, D]`, k/v `[b, hkv, L/n, D]`, mask `[b, L/n]`
# ----------------------------------------------------------------------------------------------


def _ulysses_local(q, k, v, mask, *, axis, n, scale, implementation):
    """All-to-all: heads split n ways, length gathered; attention; and back."""
    hq, hkv = q.shape[1], k.shape[1]
    # GQA with fewer local kv heads than n (or not dividing it): repeat kv heads by the smallest
    # factor r that makes them divide n and still divide the query heads (r = hq / hkv always does).
    r = next(r for r in range(1, hq // hkv + 1) if (hq // hkv) % r == 0 and (hkv * r) % n == 0)
    if r > 1:
        k, v = jnp.repeat(k, r, axis=1), jnp.repeat(v, r, axis=1)
    to_heads = lambda z: lax.all_to_all(z, axis, split_axis=1, concat_axis=2, tiled=True)
    mask = None if mask is None else lax.all_gather(mask, axis, axis=1, tiled=True)
    out = dot_product_attention(to_heads(q), to_heads(k), to_heads(v), key_mask=mask, scale=scale,
                                implementation=implementation)
    return lax.all_to_all(out, axis, split_axis=2, concat_axis=1, tiled=True)


def _ring_local(q, k, v, mask, *, axis, n, scale, implementation):
    """Local queries against the k/v chunk of every device, the chunks passed round the ring.

    Each step sends the chunk it holds to the next device (`ppermute` i -> i+1) while it attends to
    it (the two are independent, so an async collective-permute can overlap the compute), then
    merges the chunk's (out, logsumexp): n chunks, n - 1 permutes. No causal mask, so the order of
    the chunks does not matter. The per-chunk kernel is `_chunk_kernel`'s; either way the backward
    keeps O(L/n * D) per chunk, not the chunk's `[Lq, Lk/n]` probabilities.
    """
    kernel = _chunk_kernel(implementation, q, k, scale)
    perm = [(i, (i + 1) % n) for i in range(n)]
    send = lambda kv: tuple(lax.ppermute(z, axis, perm) for z in kv)
    kv = (k, v) if mask is None else (k, v, mask)
    received = send(kv)
    out, lse = kernel(q, *kv)

    def step(carry, _):
        out, lse, kv = carry
        received = send(kv)
        out, lse = merge(out, lse, *kernel(q, *kv))
        return (out, lse, received), None

    (out, lse, kv), _ = lax.scan(step, (out, lse, received), None, length=n - 2)
    out, _ = merge(out, lse, *kernel(q, *kv))
    return out.astype(q.dtype)


def _chunk_kernel(implementation, q, k, scale):
    """The ring's per-chunk `(q, k, v[, mask]) -> (out, lse)`, chosen at trace time: the plain
    `chunk_attention`, rematerialised (`jax.checkpoint`: its backward recomputes the chunk's scores),
    when the config's implementation is or resolves to 'xla' for a chunk; otherwise
    `attention.blockwise_attention(return_lse=True)` (memory-linear tiles with their own backward;
    cuDNN / splash return no logsumexp, so long chunks on GPU / TPU use it too)."""
    from flagdit_jax.models import attention

    lq, lk, d = q.shape[2], k.shape[2], q.shape[3]
    if implementation == "auto":
        implementation = attention.resolve_implementation(q_len=lq, k_len=lk, head_dim=d, dtype=q.dtype)
    if implementation == "xla":
        return jax.checkpoint(functools.partial(chunk_attention, scale=scale))

    def blockwise(q, k, v, mask=None):
        out, lse = attention.blockwise_attention(q, k, v, key_mask=mask, scale=scale, return_lse=True)
        return out.astype(jnp.float32), lse  # merged in float32, as chunk_attention's

    return blockwise


def chunk_attention(q, k, v, key_mask=None, *, scale):
    """Attention of q against one key chunk with its logsumexp: the ring's per-chunk kernel.

    q `[b, Hq, Lq, D]`, k/v `[b, Hkv, Lk, D]`, key_mask `[b, Lk]` -> (out `[b, Hq, Lq, D]` float32,
    lse `[b, Hq, Lq]` float32). The full-chunk form of the 'xla' implementation (same float32
    softmax, same all-masked-row mean), plain jnp differentiated by autodiff; long chunks use
    `attention.blockwise_attention` instead (`_chunk_kernel`). Masked logits are float32 min, not
    -inf, so a chunk with no valid key gets weight ~0 in `merge` instead of NaN.
    """
    b, hq, lq, d = q.shape
    hkv = k.shape[1]
    qg = q.reshape(b, hkv, (hq // hkv) * lq, d)  # the g query heads of a kv head stacked on length
    logits = jnp.einsum("bkqd,bksd->bkqs", qg, k, preferred_element_type=jnp.float32) * scale
    if key_mask is not None:
        logits = jnp.where(key_mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
    m = lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    p = jnp.exp(logits - m)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    out = jnp.einsum("bkqs,bksd->bkqd", p.astype(v.dtype), v, preferred_element_type=jnp.float32) / denom
    lse = (m + jnp.log(denom))[..., 0]
    return out.reshape(b, hq, lq, d), lse.reshape(b, hq, lq)


def merge(out_a, lse_a, out_b, lse_b):
    """Online-softmax merge of two partial attentions over disjoint key sets: weights
    exp(lse_x - lse), renormalised by their sum (= 1 exactly in real arithmetic) so that rows whose
    keys are all masked still average like `dot_product_attention` does."""
    lse = jnp.logaddexp(lse_a, lse_b)
    wa, wb = jnp.exp(lse_a - lse)[..., None], jnp.exp(lse_b - lse)[..., None]
    return (wa * out_a + wb * out_b) / (wa + wb), lse
