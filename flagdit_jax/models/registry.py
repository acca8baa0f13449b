"""The model family's one table (`MODEL_KINDS`: kind -> (config class, module class)), size
presets, `build(name_or_config)` and config (de)serialisation for checkpoints and converters, and
`params_for(params, cfg)`: a parameter tree in the config's block layout (per layer or scanned,
`scan_params` / `unscan_params` from `layer_stack`).

Sizes are REFERENCE.md §2 (from the official constructors). `python -m flagdit_jax.models.registry`
prints the table with parameter counts from `jax.eval_shape` (no memory is allocated).
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from flagdit_jax import tokens as tok
from flagdit_jax.models.common import ModelConfig
from flagdit_jax.models.dit import DiT, DiTConfig
from flagdit_jax.models.flag_dit import FlagDiT, FlagDiTConfig
from flagdit_jax.models.joint import JointConfig, JointDiT
from flagdit_jax.models.layer_stack import scan_params, unscan_params  # noqa: F401 (re-export)
from flagdit_jax.models import layer_stack
from flagdit_jax.models.next_dit import NextDiT, NextDiTConfig

# kind -> (config class, module class): what build, checkpoints and converters look up.
MODEL_KINDS: dict[str, tuple[type[ModelConfig], type[nn.Module]]] = {
    cls.kind: (cls, module) for cls, module in ((FlagDiTConfig, FlagDiT), (NextDiTConfig, NextDiT), (DiTConfig, DiT),
                                                (JointConfig, JointDiT))
}


def config_class(kind: str) -> type[ModelConfig]:
    """The config class of a model kind ('flagdit', 'nextdit', 'dit', 'joint')."""
    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown model kind {kind!r}; expected one of {sorted(MODEL_KINDS)}")
    return MODEL_KINDS[kind][0]


def kind_of(cfg) -> str:
    """The kind of a model config; refuses anything that is not exactly a config class of the table."""
    kind = getattr(type(cfg), "kind", None)
    if kind not in MODEL_KINDS or MODEL_KINDS[kind][0] is not type(cfg):
        raise ValueError(f"expected a model config of a kind in {sorted(MODEL_KINDS)}, got {type(cfg).__name__}")
    return kind


def config_to_dict(cfg: ModelConfig) -> dict:
    """`{"kind": ..., "config": {constructor fields}}` (JSON-ready; the checkpoint's model.json)."""
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.init}
    return {"kind": kind_of(cfg), "config": fields}


def config_from_dict(d: dict) -> ModelConfig:
    """Inverse of `config_to_dict`; a ValueError names an unknown kind or field."""
    if not isinstance(d, dict) or "config" not in d:
        raise ValueError(f"expected {{'kind': ..., 'config': {{...}}}}, got {d!r:.200}")
    cls = config_class(d.get("kind"))
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(d["config"]) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; known: {sorted(known)}")
    return cls(**d["config"])

_IMAGENET = dict(num_classes=1000, class_dropout_prob=0.1, qk_norm=True)
_T2I = dict(num_classes=0, nextline=True, qk_norm=True)
# Next-DiT ImageNet: parameter-free pre-norms, final adaLN with shift (LT Next-DiT-ImageNet/models/models.py).
_NEXT_IMAGENET = dict(_IMAGENET, pre_norm_affine=False, final_shift=True)
# Lumina-Next T2I: learnable pre-norms, scale-only final adaLN, Gemma-2B features (y_dim 2048), [PAD].
_NEXT_T2I = dict(num_classes=0, qk_norm=True, pre_norm_affine=True, final_shift=False, cap_feat_dim=2048)

PRESETS: dict[str, ModelConfig] = {
    # Flag-DiT ImageNet (LT Flag-DiT-ImageNet/models/model.py: DiT_Llama_*_patch2).
    "flagdit-600m": FlagDiTConfig(dim=1536, n_layers=16, n_heads=32, **_IMAGENET),
    "flagdit-3b": FlagDiTConfig(dim=3072, n_layers=32, n_heads=32, **_IMAGENET),
    "flagdit-7b": FlagDiTConfig(dim=4096, n_layers=32, n_heads=32, **_IMAGENET),
    # Lumina-T2I "5B": the 3B trunk with cross-attention to LLaMA-2-7B features (y_dim 4096).
    "lumina-t2i-5b": FlagDiTConfig(dim=3072, n_layers=32, n_heads=32, cap_feat_dim=4096, **_T2I),
    # Next-DiT ImageNet (LT Next-DiT-ImageNet/models/models.py: DiT_Llama_*_patch2).
    "nextdit-600m": NextDiTConfig(dim=1536, n_layers=16, n_heads=32, **_NEXT_IMAGENET),
    "nextdit-2b": NextDiTConfig(dim=2304, n_layers=24, n_heads=32, **_NEXT_IMAGENET),
    "nextdit-3b": NextDiTConfig(dim=3072, n_layers=32, n_heads=32, **_NEXT_IMAGENET),
    "nextdit-7b": NextDiTConfig(dim=4096, n_layers=32, n_heads=32, **_NEXT_IMAGENET),
    # Lumina-Next-T2I 2B (LT lumina_next_t2i/models/model.py: NextDiT_2B_GQA_patch2; the released SFT
    # checkpoint uses 8 kv heads) and its full-MHA sibling NextDiT_2B_patch2.
    "lumina-next-2b": NextDiTConfig(dim=2304, n_layers=24, n_heads=32, n_kv_heads=8, **_NEXT_T2I),
    "lumina-next-2b-mha": NextDiTConfig(dim=2304, n_layers=24, n_heads=32, **_NEXT_T2I),
    # DiT baseline for the ablations.
    "dit-xl-2": DiTConfig(dim=1152, n_layers=28, n_heads=16, patch_size=2, input_size=32),
    # Benchmark size (issue: bench-small, width 384, 12 layers, 6 heads).
    "flagdit-bench-small": FlagDiTConfig(dim=384, n_layers=12, n_heads=6, **_IMAGENET),
    # Tiny sizes for tests and the embedded default.
    "flagdit-tiny": FlagDiTConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, **_IMAGENET),
    "lumina-t2i-tiny": FlagDiTConfig(dim=64, n_layers=2, n_heads=4, cap_feat_dim=32, **_T2I),
    "nextdit-tiny": NextDiTConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, **_NEXT_IMAGENET),
    "lumina-next-tiny": NextDiTConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, **dict(_NEXT_T2I, cap_feat_dim=32)),
    "dit-tiny": DiTConfig(dim=64, n_layers=2, n_heads=4, patch_size=2, input_size=16),
    # The joint image + text-token model (models/joint.py), Flag-DiT trunk with [nextline].
    "joint-tiny": JointConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, text_dim=16, text_len=2),
}

# Parameter counts of the paper-size presets (REFERENCE.md §2), for the registry test.
REFERENCE_PARAMS = {
    "flagdit-600m": 0.61e9,
    "flagdit-3b": 4.24e9,
    "flagdit-7b": 7.29e9,
    "lumina-t2i-5b": 5.05e9,
    "dit-xl-2": 675e6,
    "nextdit-600m": 0.56e9,
    "nextdit-2b": 1.76e9,
    "nextdit-3b": 4.04e9,
    "nextdit-7b": 7.03e9,
    "lumina-next-2b": 1.63e9,
    "lumina-next-2b-mha": 1.99e9,
}


def get_config(name: str, **overrides) -> ModelConfig:
    """Preset config by name, with field overrides (e.g. `dtype='bfloat16'`)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)


def build(name_or_config: str | ModelConfig, **overrides) -> nn.Module:
    """The Flax module for a preset name or a config (its kind's module in `MODEL_KINDS`)."""
    cfg = get_config(name_or_config, **overrides) if isinstance(name_or_config, str) else (
        dataclasses.replace(name_or_config, **overrides) if overrides else name_or_config)
    return MODEL_KINDS[kind_of(cfg)][1](cfg)


def block_name(cfg: ModelConfig) -> str:
    """The parameter name of a config's blocks: 'layers' (Flag-DiT, Next-DiT) or 'blocks' (DiT);
    `{name}_{i}` per layer, `{name}` stacked when `cfg.scan_layers`."""
    return MODEL_KINDS[kind_of(cfg)][1].BLOCKS


def params_for(params, cfg: ModelConfig) -> dict:
    """`params` (the 'params' collection, boxed or not, either block layout) in the layout of `cfg`:
    stacked when `cfg.scan_layers`, per layer otherwise (`layer_stack.scan_params` /
    `unscan_params`). The one place converters and loaders normalise a tree to a config."""
    return layer_stack.to_layout(params, scan=cfg.scan_layers, n_layers=cfg.n_layers, name=block_name(cfg))


def example_inputs(cfg: ModelConfig, batch: int = 1, size: int = 8, cap_len: int = 4):
    """Small dummy inputs `(packed, t, kwargs)` of the right kinds for `init` / `eval_shape`."""
    packed = tok.pack_for(cfg, jnp.zeros((batch, 1, size, size, cfg.in_channels)))
    t = jnp.zeros((batch,))
    if isinstance(cfg, JointConfig):
        kw = dict(text=jnp.zeros((batch, cfg.text_len, cfg.text_dim)), t_text=t)
    elif cfg.text_conditional:
        kw = dict(cap_feats=jnp.zeros((batch, cap_len, cfg.cap_feat_dim)), cap_mask=jnp.ones((batch, cap_len), bool))
    else:
        kw = dict(y=jnp.zeros((batch,), jnp.int32))
    return packed, t, kw


def abstract_params(cfg: ModelConfig):
    """Parameter shapes (boxed with logical axes) without allocating them."""
    model = build(cfg)
    packed, t, kw = example_inputs(cfg)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), packed, t, **kw))["params"]


def count_params(cfg: ModelConfig) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nn.unbox(abstract_params(cfg))))


def preset_table() -> str:
    rows = [f"{'name':<22}{'width':>7}{'depth':>7}{'heads':>7}{'kv':>5}{'params':>16}"]
    for name, cfg in PRESETS.items():
        kv = getattr(cfg, "kv_heads", cfg.n_heads)
        rows.append(f"{name:<22}{cfg.dim:>7}{cfg.n_layers:>7}{cfg.n_heads:>7}{kv:>5}{count_params(cfg):>16,}")
    return "\n".join(rows)


if __name__ == "__main__":
    print(preset_table())
