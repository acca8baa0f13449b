"""The layer library shared by every backbone (DESIGN.md principle 2).

Formulas follow REFERENCE.md §1 (Flag-DiT) with the official file named where it matters.
Every parameter carries logical axis names (`nn.with_logical_partitioning`); `flagdit_jax.sharding`
maps them to mesh axes. Attention runs in `[B, heads, length, head_dim]`.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flagdit_jax.models.attention import ATTENTION_IMPLEMENTATIONS, dot_product_attention  # noqa: F401 (re-export)
from flagdit_jax.models import sequence_parallel

Dtype = Any
Initializer = Callable[..., jax.Array]

xavier_uniform = nn.initializers.xavier_uniform()
zeros = nn.initializers.zeros_init()
ones = nn.initializers.ones_init()
normal_002 = nn.initializers.normal(stddev=0.02)


REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def remat_block(block_cls, policy: str):
    """The block class, rematerialised under a named `jax.checkpoint` policy ('none' = as is;
    the model configs validate the name)."""
    return block_cls if policy == "none" else nn.remat(block_cls, policy=REMAT_POLICIES[policy])


def constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
    """Logical sharding constraint on an activation (a no-op outside a rules context)."""
    return nn.with_logical_constraint(x, axes)


class Dense(nn.Module):
    """Linear layer `[..., in] -> [..., out]` with logically partitioned parameters.

    Kernel is `[in, out]` (the transpose of torch's `weight`).
    """

    features: int
    axes: tuple[str, str]
    use_bias: bool = False
    kernel_init: Initializer = xavier_uniform
    bias_init: Initializer = zeros
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(self.kernel_init, self.axes),
            (x.shape[-1], self.features),
            self.param_dtype,
        )
        # A 2-D matmul: XLA:CPU runs the weight gradient of a [B, L, D] x [D, F] dot (contracting
        # B and L) about 2x slower than the same GEMM on [B*L, D] (experiments/bench/step_time.py).
        lead = x.shape[:-1]
        y = jnp.dot(x.reshape(-1, x.shape[-1]).astype(self.dtype), kernel.astype(self.dtype), precision=self.precision)
        y = y.reshape(*lead, self.features)
        if self.use_bias:
            bias = self.param(
                "bias", nn.with_logical_partitioning(self.bias_init, (self.axes[1],)), (self.features,), self.param_dtype
            )
            y = y + bias.astype(self.dtype)
        return y


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * w, normalised in float32 (LT `components.py: RMSNorm`).

    `use_scale=False` gives the parameter-free variant (ImageNet Next-DiT pre-norm).
    """

    eps: float = 1e-5
    use_scale: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        y = (xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)).astype(x.dtype)
        if self.use_scale:
            w = self.param("scale", nn.with_logical_partitioning(ones, ("norm",)), (x.shape[-1],), self.param_dtype)
            y = y * w.astype(x.dtype)
        return y.astype(self.dtype)


class LayerNorm(nn.Module):
    """LayerNorm over the last axis, statistics in float32.

    Used for QK-norm (over the full projected width, before RoPE: REFERENCE.md §1), the pooled
    caption, and the final layer (no affine, eps 1e-6).
    """

    eps: float = 1e-5
    use_affine: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        if self.use_affine:
            d = x.shape[-1]
            w = self.param("scale", nn.with_logical_partitioning(ones, ("norm",)), (d,), self.param_dtype)
            b = self.param("bias", nn.with_logical_partitioning(zeros, ("norm",)), (d,), self.param_dtype)
            y = y * w.astype(jnp.float32) + b.astype(jnp.float32)
        return y.astype(self.dtype)


def modulate(x: jax.Array, shift: jax.Array | None, scale: jax.Array) -> jax.Array:
    """adaLN: x * (1 + scale) + shift, with `[B, D]` modulation broadcast over length, or per-token
    `[B, L, D]` modulation (the joint model: each modality's tokens carry their own time)."""
    if scale.ndim == 2:
        scale, shift = scale[:, None, :], (None if shift is None else shift[:, None, :])
    y = x * (1 + scale)
    return y if shift is None else y + shift


# ----------------------------------------------------------------------------------------------
# Rotary position embedding
# ----------------------------------------------------------------------------------------------


def rope_exponents(head_dim: int, n_axes: int = 1) -> jax.Array:
    """`[head_dim // 2]` exponents e_j with frequency theta^(-e_j) for channel pair j.

    Pair j (channels 2j, 2j+1) follows position axis `j % n_axes` with e_j =
    2 * n_axes * (j // n_axes) / head_dim. n_axes=1 is the LLaMA 1-D table of Flag-DiT
    (LT `precompute_freqs_cis`); n_axes=2 is Next-DiT's interleaved (row, col) layout,
    10000^(-4k/hd) for both axes (REFERENCE.md §5); n_axes=3 adds the frame axis.
    """
    if head_dim % 2 or (head_dim // 2) % n_axes:
        raise ValueError(
            f"head_dim={head_dim} must be even with head_dim/2 divisible by n_axes={n_axes} for RoPE"
        )
    j = jnp.arange(head_dim // 2)
    return (2 * n_axes * (j // n_axes)).astype(jnp.float32) / head_dim


def rope_frequencies(head_dim: int, n_axes: int = 1, theta: float | jax.Array = 10000.0) -> jax.Array:
    """Angular frequency `[head_dim // 2]` of each channel pair (see `rope_exponents`)."""
    return 1.0 / (jnp.asarray(theta, jnp.float32) ** rope_exponents(head_dim, n_axes))


def rope_angles(
    positions: jax.Array,
    head_dim: int,
    *,
    theta: float = 10000.0,
    ntk_factor: float | jax.Array = 1.0,
    pi_factor: float | jax.Array = 1.0,
    freq_factor: jax.Array | None = None,
) -> jax.Array:
    """Rotation angles `[B, L, head_dim // 2]` (float32).

    Args:
      positions: `[B, L]` (1-D) or `[B, L, n_axes]` token positions.
      theta: RoPE base.
      ntk_factor: NTK-aware scaling, theta' = theta * ntk_factor (the Lumina code's form,
        REFERENCE.md §4). A scalar or `[B]` (one factor per sample, e.g. Lumina-Next's time-aware
        switch); may be traced.
      pi_factor: position interpolation, positions / pi_factor; a scalar or `[B]`.
      freq_factor: optional per-pair frequency multiplier `[head_dim // 2]` or `[B, head_dim // 2]`
        (Lumina-Next's frequency-/time-aware scaling, `scaled_rope_factor`).
    """
    if positions.ndim == 2:
        positions = positions[..., None]
    if positions.ndim != 3:
        raise ValueError(f"positions must be [B, L] or [B, L, n_axes], got shape {positions.shape}")
    n_axes = positions.shape[-1]
    ntk = jnp.asarray(ntk_factor, jnp.float32).reshape(-1, 1, 1)  # [1 or B, 1, 1]
    pi = jnp.asarray(pi_factor, jnp.float32).reshape(-1, 1, 1)
    freqs = 1.0 / ((jnp.asarray(theta, jnp.float32) * ntk) ** rope_exponents(head_dim, n_axes))  # [1|B, 1, hd/2]
    if freq_factor is not None:
        freq_factor = jnp.asarray(freq_factor, jnp.float32)
        freqs = freqs * freq_factor.reshape((-1, 1, head_dim // 2))
    pos = positions.astype(jnp.float32) / pi
    axis_of_pair = jnp.arange(head_dim // 2) % n_axes
    return jnp.take(pos, axis_of_pair, axis=-1) * freqs  # [B, L, hd/2]


def scaled_rope_factor(head_dim: int, n_axes: int, scale: float | jax.Array, d_star: jax.Array) -> jax.Array:
    """Lumina-Next's frequency- and time-aware scaled RoPE, the paper's continuous form
    [UNVERIFIED: REFERENCE.md §4 gives it second-hand]; a per-pair frequency multiplier.

    NTK with base b' = b * s^(d/d*) multiplies pair j's frequency b^(-e_j) by s^(-e_j d / d*)
    (e_j = `rope_exponents`, d = head_dim); dimensions past d* would then be scaled more than
    position interpolation, so they take PI's 1/s instead ("the larger of this and PI"):
        factor_j = s ** -min(e_j * d / d*, 1).
    Frequency-aware: d* = d * log_b(L / 2pi), L the training length of an axis (the dimension whose
    wavelength is L gets exactly PI). Time-aware: d* = (d - 1) t + 1: PI at t=0 (noise) moving to
    plain NTK (b * s) at t=1 (data).

    Args:
      scale: s, the extrapolation ratio (side length / training side length).
      d_star: a scalar or `[B]`.
    Returns:
      `[head_dim // 2]` or `[B, head_dim // 2]` multipliers.
    """
    e = rope_exponents(head_dim, n_axes)
    d_star = jnp.asarray(d_star, jnp.float32)[..., None]
    return jnp.asarray(scale, jnp.float32) ** -jnp.minimum(e * head_dim / d_star, 1.0)


def apply_rope(x: jax.Array, angles: jax.Array) -> jax.Array:
    """Rotate consecutive channel pairs (2i, 2i+1) of `x [B, H, L, D]` by `angles [B, L, D/2]`.

    Computed in float32 (the reference disables autocast here) and cast back.
    """
    xf = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    cos = jnp.cos(angles)[:, None]
    sin = jnp.sin(angles)[:, None]
    x0, x1 = xf[..., 0], xf[..., 1]
    out = jnp.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


# ----------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------


def proportional_scale(seq_len: int, base_seqlen: int, head_dim: int) -> float:
    """Proportional attention: sqrt(log_{base}(L) / head_dim) (REFERENCE.md §4)."""
    if base_seqlen <= 1 or seq_len <= 0:
        raise ValueError(f"proportional attention needs base_seqlen > 1 and L > 0, got {base_seqlen}, {seq_len}")
    return math.sqrt(math.log(seq_len, base_seqlen) / head_dim)


# ----------------------------------------------------------------------------------------------
# Feed-forward and embedders
# ----------------------------------------------------------------------------------------------


def swiglu_hidden(dim: int, multiple_of: int = 256, ffn_dim_multiplier: float | None = None) -> int:
    """Reference hidden size: int(2*4d/3) (times the multiplier), rounded up to `multiple_of`."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


class SwiGLU(nn.Module):
    """w2(SiLU(w1 x) * w3 x), no biases (LT `FeedForward`)."""

    hidden: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h1 = Dense(self.hidden, ("embed", "mlp"), name="w1", **kw)(x)
        h3 = Dense(self.hidden, ("embed", "mlp"), name="w3", **kw)(x)
        h = constrain(nn.silu(h1) * h3, ("activation_batch", "activation_length", "activation_mlp"))
        return Dense(x.shape[-1], ("mlp", "embed"), name="w2", **kw)(h)


def timestep_sinusoid(t: jax.Array, dim: int = 256, max_period: float = 10000.0) -> jax.Array:
    """`[B] -> [B, dim]`: [cos | sin] of raw t (no x1000), GLIDE frequencies (REFERENCE.md §1)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """sinusoid(t, 256) -> Linear -> SiLU -> Linear, normal(0.02) init."""

    features: int
    frequency_dim: int = 256
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, t: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=True, kernel_init=normal_002)
        h = Dense(self.features, ("freq", "cond"), name="mlp_0", **kw)(timestep_sinusoid(t, self.frequency_dim))
        return Dense(self.features, ("cond_hidden", "cond"), name="mlp_2", **kw)(nn.silu(h))


class LabelEmbedder(nn.Module):
    """Class-label table with a null row (id = num_classes) for classifier-free guidance."""

    num_classes: int
    features: int
    dropout_prob: float = 0.1
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, labels: jax.Array, *, train: bool = False, force_drop: jax.Array | None = None) -> jax.Array:
        rows = self.num_classes + int(self.dropout_prob > 0)
        table = self.param(
            "embedding_table", nn.with_logical_partitioning(normal_002, ("vocab", "cond")), (rows, self.features),
            self.param_dtype,
        )
        if force_drop is not None:
            labels = jnp.where(force_drop, self.num_classes, labels)
        elif train and self.dropout_prob > 0:
            drop = jax.random.uniform(self.make_rng("dropout"), labels.shape) < self.dropout_prob
            labels = jnp.where(drop, self.num_classes, labels)
        return jnp.take(table, labels, axis=0)


class CaptionEmbedder(nn.Module):
    """Pooled caption: masked mean over valid tokens -> LayerNorm -> Linear (zero-init)."""

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, cap_feats: jax.Array, cap_mask: jax.Array) -> jax.Array:
        m = cap_mask.astype(jnp.float32)[..., None]
        pooled = (cap_feats.astype(jnp.float32) * m).sum(1) / m.sum(1)
        pooled = LayerNorm(1e-5, name="norm", param_dtype=self.param_dtype)(pooled)
        return Dense(
            self.features, ("caption", "cond"), use_bias=True, kernel_init=zeros, name="linear",
            dtype=self.dtype, param_dtype=self.param_dtype,
        )(pooled)


class AdaLNModulation(nn.Module):
    """SiLU -> Linear(cond -> n * dim), zero-init weight and bias; returns the n chunks."""

    dim: int
    n: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, c: jax.Array) -> Sequence[jax.Array]:
        mod = Dense(
            self.n * self.dim, ("cond", "mod"), use_bias=True, kernel_init=zeros, name="linear",
            dtype=self.dtype, param_dtype=self.param_dtype,
        )(nn.silu(c))
        # Gather the tensor-sharded modulation before the split: without this constraint the
        # batch-sharded model gives wrong results under SPMD (tests/test_sharding.py).
        mod = constrain(mod, ("activation_batch", "activation_mod"))
        return jnp.split(mod, self.n, axis=-1)


# ----------------------------------------------------------------------------------------------
# Blocks shared by the backbones (Flag-DiT, Next-DiT, DiT)
# ----------------------------------------------------------------------------------------------


def style_references(batch: int, groups: int):
    """Static `[batch]` index of each image's style reference: the first image of its group, the
    batch being `groups` equal consecutive groups (`InferenceOptions.style_groups`)."""
    if groups < 1 or batch % groups:
        raise ValueError(f"style_groups={groups} must divide the batch size {batch}")
    size = batch // groups
    return np.arange(batch) // size * size


class Attention(nn.Module):
    """Lumina attention: self-attention with full-width QK LayerNorm and RoPE; optional zero-init
    gated cross-attention to text that shares the (normed, rotated) query and is added per head,
    scaled by tanh(gate), before the shared output projection (REFERENCE.md §1; Next-DiT uses it
    unchanged, §5).

    `cfg` is a Lumina model config (`dim`, `n_heads`, `kv_heads`, `head_dim`, `qk_norm`, `dtype`,
    `param_dtype`, `attention`). `style_groups` > 0 turns on style sharing
    (`common.InferenceOptions.style_groups`); it adds no parameters.
    """

    cfg: Any
    style_groups: int = 0

    @nn.compact
    def __call__(self, x, angles, mask, y=None, y_mask=None, *, scale=None, kv_pool=None, y_region=None):
        """x `[B, L, dim]`, angles `[B, L, head_dim/2]`, mask `[B, L]` or None, y `[B, S, cap_dim]` and
        y_mask `[B, S]` (cross-attention) or None -> `[B, L, dim]`.

        scale: self-attention softmax scale (None = 1/sqrt(head_dim); proportional attention).
        kv_pool: None, or `(grid, pred)` for context drop: grid = (T, H/p, W/p, r) static, pred a
        traced bool (pool while True; None = always). See `pool_keys_values`.
        y_region: regional captions (compositional generation, `common.RegionalCaptions`): with it
        y is `[B, K, S, cap_dim]`, y_mask `[B, K, S]` and y_region `[B, K, L]` bool; see
        `_regional_cross_attention`.
        """
        cfg = self.cfg
        b, l, _ = x.shape
        h, hkv, hd = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        xq = Dense(h * hd, ("embed", "heads"), name="wq", **kw)(x)
        xk = Dense(hkv * hd, ("embed", "kv_heads"), name="wk", **kw)(x)
        xv = Dense(hkv * hd, ("embed", "kv_heads"), name="wv", **kw)(x)
        if cfg.qk_norm:
            xq = LayerNorm(1e-5, name="q_norm", **kw)(xq)
            xk = LayerNorm(1e-5, name="k_norm", **kw)(xk)

        def heads(z, n):  # [..., L, n*hd] -> [..., n, L, hd]
            z = z.reshape(*z.shape[:-1], n, hd)
            return jnp.swapaxes(z, -3, -2)

        q = apply_rope(heads(xq, h), angles)
        k_pre = heads(xk, hkv)
        k = apply_rope(k_pre, angles)
        v = heads(xv, hkv)
        q = constrain(q, ("activation_batch", "activation_heads", "activation_length", "activation_kv"))
        if self.style_groups:
            out = self._shared_self_attention(q, k, v, k_pre, angles, mask, scale)
        else:
            # Sequence-parallel when the context mesh shards the length (else dot_product_attention).
            full = lambda: sequence_parallel.attention(q, k, v, key_mask=mask, scale=scale,
                                                       implementation=cfg.attention, method=cfg.sequence_parallel,
                                                       strict=not self.is_initializing())
            if kv_pool is None:
                out = full()
            else:
                grid, pred = kv_pool
                pooled = lambda: dot_product_attention(q, pool_keys_values(k, grid), pool_keys_values(v, grid),
                                                       scale=scale, implementation=cfg.attention)
                out = pooled() if pred is None else jax.lax.cond(pred, pooled, full)
        if y is not None:
            yk = Dense(hkv * hd, ("caption", "kv_heads"), name="wk_y", **kw)(y)
            if cfg.qk_norm:
                yk = LayerNorm(1e-5, name="ky_norm", **kw)(yk)
            yv = Dense(hkv * hd, ("caption", "kv_heads"), name="wv_y", **kw)(y)
            if y_region is None:
                out_y = dot_product_attention(q, heads(yk, hkv), heads(yv, hkv), key_mask=y_mask,
                                              implementation=cfg.attention)
            else:
                out_y = _regional_cross_attention(q, heads(yk, hkv), heads(yv, hkv), y_mask, y_region,
                                                  cfg.attention)
            gate = self.param("gate", nn.with_logical_partitioning(zeros, ("heads_gate",)), (h,), kw["param_dtype"])
            out = out + jnp.tanh(gate.astype(out.dtype))[None, :, None, None] * out_y
        out = out.transpose(0, 2, 1, 3).reshape(b, l, h * hd)
        return Dense(cfg.dim, ("heads", "embed"), name="wo", **kw)(out)

    def _shared_self_attention(self, q, k, v, k_pre, angles, mask, scale):
        """Style sharing (REFERENCE.md §6, StyleAligned-like; no official code): image b attends to
        its own keys and to its group reference's keys/values; the reference keys are taken before
        RoPE and rotated at their positions in image b (one latent size per batch, so token j of
        the reference sits where token j of b does, under b's RoPE scaling). The reference's
        own copy of its keys is masked out, so its output is its plain self-attention."""
        b, l = q.shape[0], q.shape[2]
        ref = style_references(b, self.style_groups)
        own = jnp.ones((b, l), bool) if mask is None else mask
        k_ref = apply_rope(k_pre[ref], angles)
        ref_mask = own[ref] & jnp.asarray(ref != np.arange(b))[:, None]
        return dot_product_attention(q, jnp.concatenate([k, k_ref], axis=2), jnp.concatenate([v, v[ref]], axis=2),
                                     key_mask=jnp.concatenate([own, ref_mask], axis=1), scale=scale,
                                     implementation=self.cfg.attention)


def _regional_cross_attention(q, yk, yv, y_mask, y_region, implementation):
    """Compositional cross-attention (REFERENCE.md §6; LT `lumina_next_compositional_generation/
    models/model.py: Attention.forward`): each of K captions is attended by the image's queries with
    mask = caption mask AND region mask, and the K outputs are summed.

    q `[B, H, L, hd]`; yk, yv `[B, K, Hkv, S, hd]`; y_mask `[B, K, S]`; y_region `[B, K, L]` ->
    `[B, H, L, hd]`. The official code lets the fully masked rows (tokens outside region k) go NaN
    and zeroes them (`nan_to_num`); here region k's output is multiplied by its 0/1 region mask
    instead (the same result, no NaN), and a caption with no valid token contributes nothing.
    """
    b, n_k, hkv, s, hd = yk.shape
    h, l = q.shape[1], q.shape[2]
    qk = jnp.broadcast_to(q[:, None], (b, n_k, h, l, hd)).reshape(b * n_k, h, l, hd)
    out = dot_product_attention(qk, yk.reshape(b * n_k, hkv, s, hd), yv.reshape(b * n_k, hkv, s, hd),
                                key_mask=y_mask.reshape(b * n_k, s), implementation=implementation)
    weight = (y_region & jnp.any(y_mask, axis=-1, keepdims=True)).astype(out.dtype)  # [B, K, L]
    return jnp.sum(out.reshape(b, n_k, h, l, hd) * weight[:, :, None, :, None], axis=1)


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


class FinalLayer(nn.Module):
    """LayerNorm(no affine, eps 1e-6) -> adaLN (shift, scale; or scale only) -> Linear(d -> p*p*out),
    zero-init (REFERENCE.md §1, §5): `[B, L, d], [B, a] -> [B, L, out_features]`."""

    dim: int
    out_features: int
    use_shift: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, c):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if self.use_shift:
            shift, scale = AdaLNModulation(self.dim, 2, name="adaLN_modulation", **kw)(c)
        else:
            shift, (scale,) = None, AdaLNModulation(self.dim, 1, name="adaLN_modulation", **kw)(c)
        x = modulate(LayerNorm(1e-6, use_affine=False, name="norm_final", **kw)(x), shift, scale)
        return Dense(self.out_features, ("embed", "out_patch"), use_bias=True, kernel_init=zeros,
                     name="linear", **kw)(x)


def drop_sigma_channels(out: jax.Array, patch_size: int, in_channels: int) -> jax.Array:
    """`[B, L, p*p*2C] -> [B, L, p*p*C]`: keep the predicted channels, drop learn_sigma's unused half.

    The output patch order is (ph, pw, C_out) (REFERENCE.md §1), so the cut is per patch pixel.
    """
    b, l, _ = out.shape
    return out.reshape(b, l, patch_size * patch_size, -1)[..., :in_channels].reshape(b, l, -1)
