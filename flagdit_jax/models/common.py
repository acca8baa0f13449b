"""What every backbone of the family shares, beyond the layer library (DESIGN.md principle 8).

* `ModelConfig`: the base config of Flag-DiT, Next-DiT and DiT (their siblings' common fields,
  validated once in one `__post_init__`; each subclass adds its own checks in `_check`), and
  `LuminaConfig`, the Lumina trunk fields that Flag-DiT and Next-DiT share (DiT has none of them).
  Each concrete config names its `kind`; `models.registry.MODEL_KINDS` maps a kind to its
  (config, module) pair for `build`, checkpoints and converters.
* `InferenceOptions`: the inference-time options of a forward pass (RoPE scaling, proportional
  attention, context drop, style sharing) as one frozen, hashable value, the `options=` of every
  model call.
* `RegionalCaptions`: per-region captions for compositional generation (the `regions=` of a T2I
  model call, `applications/compositional.py`).
* The shared front and checks: token embedding with the learnable special tokens, the adaLN
  condition, and the input validation every model runs first.

`layers.py` holds the config-free building blocks (attention, final layer, ...); this module holds
what needs to know a config.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import ClassVar

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from flagdit_jax import tokens as tok
from flagdit_jax.models import layers as L
from flagdit_jax.models.sequence_parallel import METHODS as SEQUENCE_PARALLEL

DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Fields every backbone has. Exactly one of `num_classes` (class-conditional) and
    `cap_feat_dim` (text-conditional) is > 0. Concrete subclasses set the class attribute `kind`
    and add their checks in `_check` (called once, from `__post_init__`)."""

    kind: ClassVar[str] = ""
    # False for a model whose only condition is its inputs (the joint model: another modality).
    conditioned: ClassVar[bool] = True

    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    patch_size: int = 2
    in_channels: int = 4
    learn_sigma: bool = True
    # Class-conditional (ImageNet) when num_classes > 0; T2I when cap_feat_dim > 0.
    num_classes: int = 1000
    class_dropout_prob: float = 0.1
    cap_feat_dim: int = 0
    # Token layout: [nextline] after each row, [nextframe] after each frame (tokens.pack).
    nextline: bool = False
    nextframe: bool = False
    dtype: str = "float32"
    param_dtype: str = "float32"
    # attention.dot_product_attention's implementation; 'auto' picks it per call from backend, dtype
    # and lengths (attention.resolve_implementation): long sequences get the memory-linear path.
    attention: str = "auto"
    # Activation rematerialisation of each block: 'none', 'full' (save nothing) or 'dots'
    # (save matmul outputs without batch dims), see layers.remat_block.
    remat: str = "none"
    # nn.scan over the blocks (one compiled block, params stacked on a leading `layers` axis);
    # `registry.scan_params` / `unscan_params` convert between the two layouts.
    scan_layers: bool = False
    # Self-attention over a `sequence`-sharded mesh axis: 'ulysses' (all-to-all head exchange) or
    # 'ring' (keys/values passed round the ring); a no-op when the mesh has no sequence axis > 1.
    sequence_parallel: str = "ulysses"

    def __post_init__(self):
        for name in ("dim", "n_layers", "n_heads", "patch_size", "in_channels"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.dim % self.n_heads:
            raise ValueError(f"n_heads={self.n_heads} must divide dim={self.dim}")
        if self.num_classes < 0 or self.cap_feat_dim < 0 or (
                self.conditioned and (self.num_classes > 0) == (self.cap_feat_dim > 0)):
            raise ValueError(
                f"exactly one of num_classes={self.num_classes} (class-conditional) and "
                f"cap_feat_dim={self.cap_feat_dim} (text-conditional) must be > 0"
            )
        if not 0.0 <= self.class_dropout_prob < 1.0:
            raise ValueError(f"class_dropout_prob={self.class_dropout_prob} must be in [0, 1)")
        if self.attention not in L.ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"attention={self.attention!r}; expected one of {L.ATTENTION_IMPLEMENTATIONS}")
        if isinstance(self.remat, bool):  # older configs: remat=True/False
            object.__setattr__(self, "remat", "full" if self.remat else "none")
        if self.remat not in L.REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r}; expected one of {tuple(L.REMAT_POLICIES)}")
        if self.sequence_parallel not in SEQUENCE_PARALLEL:
            raise ValueError(f"sequence_parallel={self.sequence_parallel!r}; expected one of {SEQUENCE_PARALLEL}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"{name}={getattr(self, name)!r}; expected one of {DTYPES}")
        self._check()

    def _check(self) -> None:
        """Subclass-specific validation (raise ValueError naming the field)."""

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    @property
    def text_conditional(self) -> bool:
        return self.cap_feat_dim > 0


@dataclasses.dataclass(frozen=True)
class LuminaConfig(ModelConfig):
    """The Lumina trunk (names follow the official `DiT_Llama` / `NextDiT` constructors): GQA,
    SwiGLU width, RMSNorm eps, QK-norm, RoPE base. Not a model kind itself."""

    n_kv_heads: int | None = None
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    qk_norm: bool = True
    rope_theta: float = 10000.0

    def _check(self) -> None:
        if self.multiple_of <= 0:
            raise ValueError(f"multiple_of must be positive, got {self.multiple_of}")
        if self.n_kv_heads is not None and (self.n_kv_heads <= 0 or self.n_heads % self.n_kv_heads):
            raise ValueError(f"n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")

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


# ------------------------------------------------------------------------------------------------
# inference-time options
# ------------------------------------------------------------------------------------------------

ROPE_SCALINGS = ("watershed", "frequency_aware", "time_aware")


@dataclasses.dataclass(frozen=True)
class InferenceOptions:
    """Inference-time options of one forward pass (REFERENCE.md §4, §6), frozen and hashable: pass
    it as `options=` to a model call, and as a static argument of `jax.jit` (equal options share
    one compiled program). The defaults change nothing.

    ntk_factor, pi_factor: fixed RoPE scaling, theta * ntk and positions / pi (the official
      `forward_with_cfg(ntk_factor=, rope_scaling_factor=)`). Flag-DiT and Next-DiT.
    base_seqlen: proportional attention, self-attention scale sqrt(log_base(L) / head_dim).
      Flag-DiT and Next-DiT.
    scale_factor: Next-DiT's extrapolation ratio s = sqrt(H*W) / S_train; 1 = no scaling.
    scale_watershed: with rope_scaling='watershed' (the released code's switch, LT
      `lumina_next_t2i/models/model.py: precompute_freqs_cis`): position interpolation by s while
      t < watershed, NTK theta * s after. Default 1.0 = the official `forward_with_cfg` default.
    rope_scaling: 'watershed', or the paper's continuous 'frequency_aware' / 'time_aware' forms
      (`layers.scaled_rope_factor`) with the same s.
    rope_train_len: tokens per side at the training resolution (frequency-aware only; > 2*pi).
    context_drop: r > 1 average-pools self-attention keys/values over r x r patches (Lumina-Next's
      Context Drop). Next-DiT only; needs one latent size per batch and no [PAD].
    context_drop_until: time-aware context drop: pool only while t < this (None: at every t).
    style_groups: style-consistent batches (REFERENCE.md §6, `applications/style.py`): g >= 1
      splits the batch into g equal consecutive groups (g = 2 for a pipeline's [cond; uncond] CFG
      batch); in self-attention every image of a group also attends to the keys/values of the
      group's first image (its reference), whose own output is unchanged. 0 = off (no extra work).
      Flag-DiT and Next-DiT; needs one latent size per batch (no [PAD]) and no context drop.
    """

    ntk_factor: float = 1.0
    pi_factor: float = 1.0
    base_seqlen: int | None = None
    scale_factor: float = 1.0
    scale_watershed: float = 1.0
    rope_scaling: str = "watershed"
    rope_train_len: int | None = None
    context_drop: int = 1
    context_drop_until: float | None = None
    style_groups: int = 0

    def __post_init__(self):
        for name in ("ntk_factor", "pi_factor", "scale_factor"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not v > 0:
                raise ValueError(f"{name}={v!r} must be a positive number")
            object.__setattr__(self, name, float(v))  # 2 and 2.0 are one option (one hash, one compile)
        for name, lo in (("base_seqlen", 2), ("rope_train_len", 1), ("context_drop", 1), ("style_groups", 0)):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < lo):
                raise ValueError(f"{name}={v!r} must be an integer >= {lo}")
        if self.context_drop is None:
            raise ValueError("context_drop=None; use 1 for no context drop")
        if self.style_groups is None:
            raise ValueError("style_groups=None; use 0 for no style sharing")
        if self.style_groups and self.context_drop != 1:
            raise ValueError(f"style_groups={self.style_groups} cannot be combined with context_drop="
                             f"{self.context_drop} (the shared keys/values would be pooled)")
        for name in ("scale_watershed", "context_drop_until"):
            v = getattr(self, name)
            if v is None and name == "context_drop_until":
                continue
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0.0 <= v <= 1.0:
                raise ValueError(f"{name}={v!r} must be a time in [0, 1]")
            object.__setattr__(self, name, float(v))
        if self.rope_scaling not in ROPE_SCALINGS:
            raise ValueError(f"rope_scaling={self.rope_scaling!r}; expected one of {ROPE_SCALINGS}")
        if self.rope_scaling == "frequency_aware" and (self.rope_train_len is None
                                                       or self.rope_train_len <= 2 * math.pi):
            raise ValueError(f"rope_scaling='frequency_aware' needs rope_train_len > 2*pi tokens per side, "
                             f"got {self.rope_train_len!r}")

    def replace(self, **changes) -> "InferenceOptions":
        return dataclasses.replace(self, **changes)

    def check_supported(self, supported: tuple[str, ...], model: str) -> None:
        """Raise a ValueError naming every option set away from its default that `model` lacks."""
        bad = [f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self)
               if f.name not in supported and getattr(self, f.name) != f.default]
        if bad:
            raise ValueError(f"{model} does not support the inference option(s) {', '.join(bad)}; "
                             f"it supports {', '.join(supported) or 'none'}")


def resolve_options(options: InferenceOptions | None, supported: tuple[str, ...], model: str) -> InferenceOptions:
    """`options` (None = defaults) checked against what `model` supports."""
    if options is None:
        return InferenceOptions()
    if not isinstance(options, InferenceOptions):
        raise ValueError(f"options must be a models.common.InferenceOptions (or None), got {type(options).__name__}")
    options.check_supported(supported, model)
    return options


# ------------------------------------------------------------------------------------------------
# regional captions (compositional generation)
# ------------------------------------------------------------------------------------------------


@flax.struct.dataclass
class RegionalCaptions:
    """K captions per image, each confined to a region of the image tokens (REFERENCE.md §6,
    LT `lumina_next_compositional_generation/models/model.py`). Passed as `regions=` to a T2I
    model call, it replaces `cap_feats` / `cap_mask` in every cross-attention (which then still
    feed the pooled-caption adaLN embedding: the global caption); token l of image b gets
    sum_k [region[b, k, l]] * CrossAttn(q_l, caption k), zero where no region covers it.

    Attributes:
      feats: `[B, K, S, cap_feat_dim]` caption features.
      mask: `[B, K, S]` bool caption masks (an all-False caption contributes nothing).
      region: `[B, K, L]` bool, token l is in region k (L = the packed sequence length).
    """

    feats: jax.Array
    mask: jax.Array
    region: jax.Array


def check_regions(cfg: "ModelConfig", regions, batch: int, seq_len: int) -> None:
    """Raise a ValueError naming a malformed `regions` (`RegionalCaptions`) before any compute."""
    if not isinstance(regions, RegionalCaptions):
        raise ValueError(f"regions must be a models.common.RegionalCaptions, got {type(regions).__name__}")
    if not cfg.text_conditional:
        raise ValueError("regions (regional captions) need a text-conditional model (cap_feat_dim > 0)")
    f, m, r = regions.feats, regions.mask, regions.region
    if f.ndim != 4 or f.shape[0] != batch or f.shape[-1] != cfg.cap_feat_dim:
        raise ValueError(f"regions.feats must be [B={batch}, K, S, {cfg.cap_feat_dim}], got {f.shape}")
    if m.shape != f.shape[:3]:
        raise ValueError(f"regions.mask must be [B, K, S]={f.shape[:3]}, got {m.shape}")
    if r.shape != (batch, f.shape[1], seq_len):
        raise ValueError(f"regions.region must be [B, K, L]={(batch, f.shape[1], seq_len)}, got {r.shape}")


# ------------------------------------------------------------------------------------------------
# the shared front: embeddings and input checks
# ------------------------------------------------------------------------------------------------


def embed_tokens(module: nn.Module, packed: tok.Packed, dim: int, special: dict[int, str], dtype, param_dtype):
    """x_embedder on patch vectors `[B, L, p*p*C] -> [B, L, dim]`, then learnable embeddings at
    special tokens (`special` maps a token kind to its parameter name, e.g.
    {NEXTLINE: 'eol_token', PAD: 'pad_token'})."""
    x = L.Dense(dim, ("patch", "embed"), use_bias=True, name="x_embedder", dtype=dtype, param_dtype=param_dtype)(
        packed.tokens
    )
    for kind, name in special.items():
        emb = module.param(name, nn.with_logical_partitioning(L.normal_002, ("embed",)), (dim,), param_dtype)
        x = jnp.where((packed.kind == kind)[..., None], emb.astype(x.dtype), x)
    module.sow("intermediates", "out:x_embedder", x)
    return x


def embed_inputs(module: nn.Module, cfg: LuminaConfig, packed, t, y, cap_feats, cap_mask, train, force_drop):
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


def has_pads(packed: tok.Packed) -> bool:
    """Static: may any sample in the batch carry [PAD] tokens? (`tokens.Packed.has_pads`: always
    True for host-packed training batches, whose per-sample sizes are not static)"""
    return packed.has_pads


def cross_attention_inputs(cap_feats, cap_mask, regions, dtype):
    """`(y, y_mask, y_region)` for the blocks' cross-attention: the caption, or the regional
    captions when `regions` is given (`y_region` None otherwise)."""
    if regions is None:
        return cap_feats, cap_mask, None
    return regions.feats.astype(dtype), regions.mask.astype(bool), regions.region.astype(bool)


def check_packed(cfg: ModelConfig, packed) -> None:
    """Raise a ValueError if the packed tokens' patch size, width or layout do not fit the model."""
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


def check_inputs(cfg: ModelConfig, packed, t, y, cap_feats, cap_mask, *, regions=None,
                 options: InferenceOptions | None = None) -> None:
    """Raise a ValueError naming the bad input before any compute."""
    check_packed(cfg, packed)
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
    if regions is not None:
        check_regions(cfg, regions, b, packed.tokens.shape[1])
    if options is not None and options.style_groups:
        if b % options.style_groups:
            raise ValueError(f"style_groups={options.style_groups} must divide the batch size {b}")
        if has_pads(packed):
            raise ValueError("style_groups needs one latent size per batch (no [PAD] tokens); got sizes "
                             f"{None if packed.shapes is None else sorted(set(packed.shapes))}")
