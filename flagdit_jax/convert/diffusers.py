"""diffusers `LuminaNextDiT2DModel` checkpoints <-> our Next-DiT T2I config and Flax params.

Lumina-Next weights are also published in diffusers' layout, and users may want to hand ours to
diffusers pipelines; this module translates both ways without torch.

Conventions, checked by tests/test_diffusers.py: the diffusers transformer takes the same time as
ours (t=0 noise, t=1 data; `LuminaText2ImgPipeline` feeds it 1 - sigma and negates the velocity for
its scheduler) and returns all `2C` learned-sigma channels as `[B, 2C, H, W]`, while ours keeps
the first `C`. Its RoPE table from `get_2d_rotary_pos_embed_lumina(hd, 384, 384, linear_factor,
ntk_factor)` is our `InferenceOptions(pi_factor=linear_factor, ntk_factor=ntk_factor)`, and
`cross_attention_kwargs={"base_sequence_length": n}` is our `InferenceOptions(base_seqlen=n)`.

diffusers stores the shared query twice (the cross-attention's `attn2.to_q` / `attn2.norm_q`
copy the self-attention's); our model has one query, so the copies must be equal.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import struct
from typing import Any, Mapping

import flax.linen as nn
import flax.traverse_util
import numpy as np

from flagdit_jax.convert.official import _first, _patch_embed, _patch_unembed, raise_mismatch
from flagdit_jax.models import registry
from flagdit_jax.models.next_dit import NextDiTConfig

KIND = "nextdit"  # the model kind (models.registry.MODEL_KINDS) that diffusers' layout describes
CLASS_NAME = "LuminaNextDiT2DModel"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
# `LuminaNextDiT2DModel.__init__` defaults, for config.json files that leave a field out. Two do not
# change the network: sample_size only sets the pipeline's default resolution (hence its
# base_sequence_length and RoPE scaling factor); scaling_factor is stored and never read.
DIFFUSERS_DEFAULTS = dict(
    sample_size=128, patch_size=2, in_channels=4, hidden_size=2304, num_layers=32, num_attention_heads=32,
    num_kv_heads=None, multiple_of=256, ffn_dim_multiplier=None, norm_eps=1e-5, learn_sigma=True, qk_norm=True,
    cross_attention_dim=2048, scaling_factor=1.0,
)
# Transform kinds of the table: copy, torch Linear weight <-> kernel, patch embedding.
_SAME, _LINEAR, _PATCH = "same", "linear", "patch"


def config_from_diffusers(config: Mapping[str, Any], **overrides) -> NextDiTConfig:
    """diffusers `LuminaNextDiT2DModel` config (config.json as a dict) -> `NextDiTConfig`.

    The result is the Lumina-Next T2I variant: learnable pre-norms, scale-only final adaLN, no
    class labels, no [nextline]. `overrides` set any config field (e.g. dtype).

    Raises:
      ValueError: for another `_class_name` or a field this converter does not know.
    """
    cls = config.get("_class_name", CLASS_NAME)
    if cls != CLASS_NAME:
        raise ValueError(f"config _class_name={cls!r}; expected {CLASS_NAME!r}")
    unknown = sorted(k for k in config if not k.startswith("_") and k not in DIFFUSERS_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown {CLASS_NAME} config field(s) {unknown}; expected a subset of "
                         f"{sorted(DIFFUSERS_DEFAULTS)}")
    c = {**DIFFUSERS_DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}
    kv = c["num_kv_heads"]
    kw = dict(
        dim=c["hidden_size"], n_layers=c["num_layers"], n_heads=c["num_attention_heads"],
        n_kv_heads=None if kv is None or kv == c["num_attention_heads"] else kv,
        patch_size=c["patch_size"], in_channels=c["in_channels"], multiple_of=c["multiple_of"],
        ffn_dim_multiplier=c["ffn_dim_multiplier"], norm_eps=c["norm_eps"], qk_norm=bool(c["qk_norm"]),
        learn_sigma=bool(c["learn_sigma"]), num_classes=0, cap_feat_dim=c["cross_attention_dim"],
        nextline=False, pre_norm_affine=True, final_shift=False,
    )
    kw.update(overrides)
    return registry.config_class(KIND)(**kw)


def _require_next_dit(cfg) -> None:
    if registry.kind_of(cfg) != KIND:
        raise ValueError(f"{CLASS_NAME} is a Next-DiT; got a {type(cfg).__name__} (kind {cfg.kind!r})")


def _table(cfg: NextDiTConfig) -> list[tuple[str, str, str]]:
    """(diffusers key, our path, transform kind) for every tensor of our model, each once."""
    rows = [
        ("pad_token", "pad_token", _SAME),
        ("patch_embedder.proj.weight", "x_embedder/kernel", _PATCH),
        ("patch_embedder.proj.bias", "x_embedder/bias", _SAME),
        ("norm_out.linear_1.weight", "final_layer/adaLN_modulation/linear/kernel", _LINEAR),
        ("norm_out.linear_1.bias", "final_layer/adaLN_modulation/linear/bias", _SAME),
        ("norm_out.linear_2.weight", "final_layer/linear/kernel", _LINEAR),
        ("norm_out.linear_2.bias", "final_layer/linear/bias", _SAME),
    ]
    for ours, theirs in (("mlp_0", "linear_1"), ("mlp_2", "linear_2")):
        rows += [(f"time_caption_embed.timestep_embedder.{theirs}.weight", f"t_embedder/{ours}/kernel", _LINEAR),
                 (f"time_caption_embed.timestep_embedder.{theirs}.bias", f"t_embedder/{ours}/bias", _SAME)]
    rows += [
        ("time_caption_embed.caption_embedder.0.weight", "cap_embedder/norm/scale", _SAME),
        ("time_caption_embed.caption_embedder.0.bias", "cap_embedder/norm/bias", _SAME),
        ("time_caption_embed.caption_embedder.1.weight", "cap_embedder/linear/kernel", _LINEAR),
        ("time_caption_embed.caption_embedder.1.bias", "cap_embedder/linear/bias", _SAME),
    ]
    for i in range(cfg.n_layers):
        d, o = f"layers.{i}.", f"layers_{i}/"
        rows += [
            (d + "gate", o + "attention/gate", _SAME),
            (d + "attn1.to_q.weight", o + "attention/wq/kernel", _LINEAR),
            (d + "attn1.to_k.weight", o + "attention/wk/kernel", _LINEAR),
            (d + "attn1.to_v.weight", o + "attention/wv/kernel", _LINEAR),
            (d + "attn2.to_k.weight", o + "attention/wk_y/kernel", _LINEAR),
            (d + "attn2.to_v.weight", o + "attention/wv_y/kernel", _LINEAR),
            (d + "attn2.to_out.0.weight", o + "attention/wo/kernel", _LINEAR),
            (d + "feed_forward.linear_1.weight", o + "feed_forward/w1/kernel", _LINEAR),
            (d + "feed_forward.linear_2.weight", o + "feed_forward/w2/kernel", _LINEAR),
            (d + "feed_forward.linear_3.weight", o + "feed_forward/w3/kernel", _LINEAR),
            (d + "norm1.linear.weight", o + "adaLN_modulation/linear/kernel", _LINEAR),
            (d + "norm1.linear.bias", o + "adaLN_modulation/linear/bias", _SAME),
            (d + "norm1.norm.weight", o + "attention_norm1/scale", _SAME),
            (d + "norm2.weight", o + "attention_norm2/scale", _SAME),
            (d + "ffn_norm1.weight", o + "ffn_norm1/scale", _SAME),
            (d + "ffn_norm2.weight", o + "ffn_norm2/scale", _SAME),
            (d + "norm1_context.weight", o + "attention_y_norm/scale", _SAME),
        ]
        if cfg.qk_norm:
            for theirs, ours in (("attn1.norm_q", "q_norm"), ("attn1.norm_k", "k_norm"), ("attn2.norm_k", "ky_norm")):
                rows += [(d + theirs + ".weight", o + f"attention/{ours}/scale", _SAME),
                         (d + theirs + ".bias", o + f"attention/{ours}/bias", _SAME)]
    return rows


def _copies(cfg: NextDiTConfig) -> list[tuple[str, str]]:
    """(diffusers key, the key it duplicates): the cross-attention's copy of the shared query."""
    out = []
    for i in range(cfg.n_layers):
        d = f"layers.{i}."
        out.append((d + "attn2.to_q.weight", d + "attn1.to_q.weight"))
        if cfg.qk_norm:
            out += [(d + "attn2.norm_q.weight", d + "attn1.norm_q.weight"),
                    (d + "attn2.norm_q.bias", d + "attn1.norm_q.bias")]
    return out


def _to_ours(kind: str, cfg: NextDiTConfig, w: np.ndarray) -> np.ndarray:
    if kind == _LINEAR:
        return w.T
    if kind == _PATCH:
        return _patch_embed(cfg)(w)
    return w


def _to_theirs(kind: str, cfg: NextDiTConfig, k: np.ndarray) -> np.ndarray:
    """Inverse of `_to_ours`; the patch kernel [p*p*C, d] in (ph, pw, C) order -> [d, C*p*p] in (C, ph, pw)."""
    if kind == _LINEAR:
        return k.T
    if kind == _PATCH:
        return _patch_unembed(cfg)(k)
    return k


def _expected_shapes(cfg: NextDiTConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of the per-layer tree (the table's layout, whatever `cfg.scan_layers` says)."""
    tree = flax.traverse_util.flatten_dict(nn.unbox(registry.abstract_params(dataclasses.replace(cfg,
                                                                                                 scan_layers=False))))
    return {"/".join(k): tuple(v.shape) for k, v in tree.items()}


def params_from_diffusers(state_dict: Mapping[str, Any], cfg: NextDiTConfig, *, dtype=np.float32) -> dict:
    """diffusers `LuminaNextDiT2DModel` state dict (numpy-convertible arrays) -> our params tree.

    The tree is in `cfg`'s block layout (stacked under `layers` when `cfg.scan_layers`). Shapes, with
    d = hidden_size: `patch_embedder.proj.weight` `[d, C*p*p]` in (C, ph, pw) order
    becomes `x_embedder/kernel` `[p*p*C, d]` in (ph, pw, C) order; every Linear weight `[out, in]`
    becomes a kernel `[in, out]`; vectors are copied. Arrays are cast to `dtype`.

    Raises:
      CheckpointMismatch: naming the first unexpected keys, missing keys, wrong shapes, or a
        cross-attention query copy (`attn2.to_q`, `attn2.norm_q`) that differs from the
        self-attention's, which our shared-query model cannot represent.
    """
    _require_next_dit(cfg)
    table, copies = _table(cfg), _copies(cfg)
    expected = _expected_shapes(cfg)
    sd = {k: np.asarray(v, dtype=dtype) for k, v in state_dict.items()}
    known = {key for key, _, _ in table} | {key for key, _ in copies}
    unexpected = [k for k in sd if k not in known]
    missing = [k for k in sorted(known) if k not in sd]
    flat, wrong = {}, []
    for key, path, kind in table:
        if key not in sd:
            continue
        theirs = _to_theirs(kind, cfg, np.empty(expected[path])).shape
        if sd[key].shape != theirs:
            wrong.append(f"{key}: {sd[key].shape} vs expected {theirs}")
        else:
            flat[path] = _to_ours(kind, cfg, sd[key])
    differ = [
        f"{key} differs from {src} (max |diff| {np.max(np.abs(sd[key] - sd[src])):.3g})"
        if sd[key].shape == sd[src].shape else f"{key}: {sd[key].shape} vs expected {sd[src].shape} (as {src})"
        for key, src in copies
        if key in sd and src in sd and not np.array_equal(sd[key], sd[src])
    ]
    raise_mismatch(f"diffusers checkpoint does not match the config (dim={cfg.dim}, n_layers={cfg.n_layers}, "
                   f"n_heads={cfg.n_heads}, n_kv_heads={cfg.kv_heads}, qk_norm={cfg.qk_norm})",
                   [("unexpected keys", unexpected), ("missing keys", missing), ("shape mismatches", wrong),
                    ("the cross-attention query must copy the self-attention query (our model shares it)", differ)])
    if set(flat) != set(expected):  # the table must cover our tree exactly
        stale = sorted(set(flat) ^ set(expected))
        raise RuntimeError(f"diffusers key table out of date with the model: {_first(stale)}")
    return registry.params_for(flax.traverse_util.unflatten_dict({tuple(p.split("/")): v for p, v in flat.items()}),
                               cfg)


def params_to_diffusers(params: Mapping[str, Any], cfg: NextDiTConfig) -> dict[str, np.ndarray]:
    """Our params tree -> a diffusers `LuminaNextDiT2DModel` state dict of contiguous numpy arrays
    (the inverse of `params_from_diffusers`; the query is written to both attn1 and attn2).

    `params` may be in either block layout (per layer or scanned, `registry.params_for`).

    Raises:
      CheckpointMismatch: if the tree's paths or shapes do not match `cfg`.
    """
    _require_next_dit(cfg)
    params = registry.params_for(nn.unbox(dict(params)), dataclasses.replace(cfg, scan_layers=False))
    flat = {"/".join(k): np.asarray(v) for k, v in flax.traverse_util.flatten_dict(params).items()}
    expected = _expected_shapes(cfg)
    extra, missing = sorted(set(flat) - set(expected)), sorted(set(expected) - set(flat))
    wrong = [f"{p}: {flat[p].shape} vs expected {s}" for p, s in expected.items() if p in flat and flat[p].shape != s]
    raise_mismatch(f"params do not match the config (dim={cfg.dim}, n_layers={cfg.n_layers})",
                   [("unexpected parameters", extra), ("missing parameters", missing), ("shape mismatches", wrong)])
    sd = {key: np.ascontiguousarray(_to_theirs(kind, cfg, flat[path])) for key, path, kind in _table(cfg)}
    for key, src in _copies(cfg):
        sd[key] = sd[src].copy()
    return sd


def config_to_diffusers(cfg: NextDiTConfig, *, sample_size: int = 128) -> dict[str, Any]:
    """`NextDiTConfig` -> `LuminaNextDiT2DModel` constructor arguments (the inverse of
    `config_from_diffusers`). `sample_size` is the pipeline's default latent size (diffusers only).

    Raises:
      ValueError: for a config diffusers cannot express (class-conditional, [nextline],
        parameter-free pre-norms, a final shift, or 3-axis RoPE).
    """
    _require_next_dit(cfg)
    bad = {k: getattr(cfg, k) for k, ok in (("num_classes", 0), ("nextline", False), ("nextframe", False),
                                            ("pre_norm_affine", True), ("final_shift", False), ("rope_axes", 2))
           if getattr(cfg, k) != ok}
    if bad or not cfg.text_conditional:
        raise ValueError(f"{CLASS_NAME} is the Lumina-Next T2I model; config fields {bad} (cap_feat_dim="
                         f"{cfg.cap_feat_dim}) expected num_classes=0, cap_feat_dim>0, nextline=False, "
                         "nextframe=False, pre_norm_affine=True, final_shift=False, rope_axes=2")
    return dict(
        sample_size=sample_size, patch_size=cfg.patch_size, in_channels=cfg.in_channels, hidden_size=cfg.dim,
        num_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_kv_heads=cfg.kv_heads,
        multiple_of=cfg.multiple_of, ffn_dim_multiplier=cfg.ffn_dim_multiplier, norm_eps=cfg.norm_eps,
        learn_sigma=cfg.learn_sigma, qk_norm=cfg.qk_norm, cross_attention_dim=cfg.cap_feat_dim, scaling_factor=1.0,
    )


# ------------------------------------------------------------------------------------------------
# diffusers model folders
# ------------------------------------------------------------------------------------------------

def _read_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
    """safetensors.numpy, plus bfloat16 (which it cannot read) through ml_dtypes."""
    from safetensors.numpy import load_file

    try:
        return dict(load_file(str(path)))
    except TypeError:  # "data type 'bfloat16' not understood"
        pass
    import ml_dtypes

    dtypes = {"BF16": ml_dtypes.bfloat16, "F16": np.float16, "F32": np.float32, "F64": np.float64}
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    out = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if info["dtype"] not in dtypes:
            raise ValueError(f"{path}: tensor {key} has dtype {info['dtype']}; expected one of {sorted(dtypes)}")
        start, end = info["data_offsets"]
        out[key] = np.frombuffer(raw[8 + n + start:8 + n + end], dtype=dtypes[info["dtype"]]).reshape(info["shape"])
    return out


def read_diffusers_folder(path: str | pathlib.Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """`(state_dict, config)` from a diffusers model folder: `config.json` plus
    `diffusion_pytorch_model.safetensors` (or its sharded `.index.json`). A pipeline folder is
    accepted too (its `transformer/` subfolder is read). No torch needed.
    """
    root = pathlib.Path(path)
    if not (root / "config.json").exists() and (root / "transformer" / "config.json").exists():
        root = root / "transformer"
    cfg_file, weights, index = root / "config.json", root / WEIGHTS_NAME, root / (WEIGHTS_NAME + ".index.json")
    if not cfg_file.exists():
        raise FileNotFoundError(f"{cfg_file} not found: expected a diffusers model folder "
                                f"(config.json + {WEIGHTS_NAME})")
    config = json.loads(cfg_file.read_text())
    if weights.exists():
        state_dict = _read_safetensors(weights)
    elif index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state_dict = {k: v for shard in shards for k, v in _read_safetensors(root / shard).items()}
    else:
        found = sorted(p.name for p in root.iterdir())
        raise FileNotFoundError(f"no {WEIGHTS_NAME} (or its .index.json) in {root}; found {found} "
                                "(.bin weights need torch: re-save with safe_serialization=True)")
    return state_dict, config


def load_diffusers(path: str | pathlib.Path, **overrides) -> tuple[dict, NextDiTConfig]:
    """`(params, cfg)` from a diffusers `LuminaNextDiT2DModel` folder (see `read_diffusers_folder`);
    `overrides` set config fields."""
    state_dict, config = read_diffusers_folder(path)
    cfg = config_from_diffusers(config, **overrides)
    return params_from_diffusers(state_dict, cfg), cfg
