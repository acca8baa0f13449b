"""diffusers AutoencoderKL folders <-> our Flax params, both ways, without torch.

A diffusers model folder holds `config.json` and `diffusion_pytorch_model.safetensors` (or a
variant such as `diffusion_pytorch_model.fp16.safetensors`); a pipeline folder holds one under
`vae/`. Keys map by rule because kl.py names its modules as diffusers does (`.N` written `_N`):
conv weights `[out, in, kh, kw]` <-> kernels `[kh, kw, in, out]`, Linear weights `[out, in]` <->
kernels `[in, out]`, GroupNorm weights <-> `scale`. Older checkpoints' attention names (`query`,
`key`, `value`, `proj_attn`, some with 1x1-conv weights) are renamed on load as diffusers'
`ModelMixin._convert_deprecated_attention_blocks` does.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import tempfile
from typing import Any, Mapping

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from flagdit_jax.autoencoder.kl import AutoencoderKL, AutoencoderKLConfig, VAE, config_from_diffusers, config_to_diffusers
from flagdit_jax.convert.diffusers import _read_safetensors  # safetensors.numpy + bfloat16 via ml_dtypes
from flagdit_jax.convert.official import raise_mismatch

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
CONFIG_NAME = "config.json"
DIFFUSERS_VERSION = "0.42.1"  # written into config.json; the version the layout was checked against
_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias"}
_DEPRECATED = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _key(path: tuple[str, ...]) -> str:
    """Our param path -> diffusers key: ('encoder', 'down_blocks_0', 'resnets_1', 'conv1', 'kernel')
    -> 'encoder.down_blocks.0.resnets.1.conv1.weight'."""
    *mods, leaf = path
    parts = [re.sub(r"^(.+)_(\d+)$", r"\1.\2", m) for m in mods]
    return ".".join(parts + [_LEAF[leaf]])


def _to_theirs(leaf: str, w: np.ndarray) -> np.ndarray:
    if leaf == "kernel":
        return w.transpose(3, 2, 0, 1) if w.ndim == 4 else w.T
    return w


def _to_ours(leaf: str, w: np.ndarray) -> np.ndarray:
    if leaf == "kernel":
        return w.transpose(2, 3, 1, 0) if w.ndim == 4 else w.T
    return w


def abstract_params(cfg: AutoencoderKLConfig) -> dict:
    """Shapes of our params tree for `cfg` (nothing computed)."""
    x = jax.ShapeDtypeStruct((1, cfg.downsample, cfg.downsample, cfg.in_channels), jnp.float32)
    return jax.eval_shape(lambda x: AutoencoderKL(cfg).init(jax.random.key(0), x), x)["params"]


def init_params(cfg: AutoencoderKLConfig, seed: int = 0) -> dict:
    """Fresh params for `cfg` (a training start) with Flax's default initialisers: kernels lecun-normal
    (truncated at 2 sigma, variance 1/fan_in), biases 0, GroupNorm scales 1 and biases 0.

    Drawn with NumPy from the abstract tree: Flax's own `init` compiles one threefry draw per tensor,
    which took 25 s (jitted) or 18 s (eager) for a tiny VAE on 2 CPU cores.
    """
    rng = np.random.default_rng(seed)
    flat = flax.traverse_util.flatten_dict(abstract_params(cfg))
    out = {}
    for path, leaf in sorted(flat.items()):
        shape = tuple(leaf.shape)
        if path[-1] == "kernel":
            std = np.sqrt(1.0 / np.prod(shape[:-1])) / 0.87962566103423978  # truncnorm(-2, 2) has std 0.8796
            w = rng.standard_normal(shape)
            while np.any(bad := np.abs(w) > 2.0):
                w[bad] = rng.standard_normal(int(bad.sum()))
            out[path] = jnp.asarray(w * std, jnp.float32)
        else:
            out[path] = jnp.full(shape, 1.0 if path[-1] == "scale" else 0.0, jnp.float32)
    return flax.traverse_util.unflatten_dict(out)


def _expected(cfg: AutoencoderKLConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in flax.traverse_util.flatten_dict(abstract_params(cfg)).items()}


def _undeprecate(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Renames old attention keys (`...attentions.0.query.weight` -> `...attentions.0.to_q.weight`)
    and squeezes their 1x1-conv weights `[C, C, 1, 1]` to Linear `[C, C]`."""
    out = {}
    for k, v in sd.items():
        m = re.fullmatch(r"(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)", k)
        if m:
            k = f"{m[1]}.{_DEPRECATED[m[2]]}.{m[3]}"
            if v.ndim == 4 and v.shape[2:] == (1, 1):
                v = v[:, :, 0, 0]
        out[k] = v
    return out


def params_from_diffusers(state_dict: Mapping[str, Any], cfg: AutoencoderKLConfig, *, dtype=np.float32) -> dict:
    """diffusers AutoencoderKL state dict (numpy-convertible arrays) -> our params tree, cast to `dtype`.

    Raises:
      CheckpointMismatch (a ValueError): naming unexpected keys, missing keys and wrong shapes.
    """
    sd = _undeprecate({k: np.asarray(v) for k, v in state_dict.items()})
    expected = _expected(cfg)
    keys = {_key(p): p for p in expected}
    flat, wrong = {}, []
    for key, path in keys.items():
        if key in sd:
            theirs = _to_theirs(path[-1], np.empty(expected[path], np.uint8)).shape
            if sd[key].shape != theirs:
                wrong.append(f"{key}: {sd[key].shape} vs expected {theirs}")
            else:
                flat[path] = np.asarray(_to_ours(path[-1], sd[key]), dtype=dtype)
    raise_mismatch(
        f"AutoencoderKL checkpoint does not match the config (block_out_channels={list(cfg.block_out_channels)}, "
        f"layers_per_block={cfg.layers_per_block}, latent_channels={cfg.latent_channels}, "
        f"use_quant_conv={cfg.use_quant_conv}, use_post_quant_conv={cfg.use_post_quant_conv}, "
        f"mid_block_add_attention={cfg.mid_block_add_attention})",
        [("unexpected keys", sorted(set(sd) - set(keys))), ("missing keys", sorted(set(keys) - set(sd))),
         ("shape mismatches", wrong)])
    return flax.traverse_util.unflatten_dict(flat)


def params_to_diffusers(params: Mapping[str, Any], cfg: AutoencoderKLConfig) -> dict[str, np.ndarray]:
    """Our params tree -> a diffusers AutoencoderKL state dict of contiguous float32 numpy arrays.

    Raises:
      CheckpointMismatch: if the tree's paths or shapes do not match `cfg`.
    """
    flat = {k: np.asarray(v) for k, v in flax.traverse_util.flatten_dict(dict(params)).items()}
    expected = _expected(cfg)
    wrong = [f"{'/'.join(p)}: {flat[p].shape} vs expected {s}" for p, s in expected.items()
             if p in flat and flat[p].shape != s]
    raise_mismatch("params do not match the AutoencoderKL config",
                   [("unexpected parameters", sorted("/".join(p) for p in set(flat) - set(expected))),
                    ("missing parameters", sorted("/".join(p) for p in set(expected) - set(flat))),
                    ("shape mismatches", wrong)])
    return {_key(p): np.ascontiguousarray(_to_theirs(p[-1], flat[p]), dtype=np.float32) for p in expected}


# ------------------------------------------------------------------------------------------------
# folders
# ------------------------------------------------------------------------------------------------

def _model_root(path: pathlib.Path) -> pathlib.Path:
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory: expected a diffusers AutoencoderKL folder "
                                f"({CONFIG_NAME} + {WEIGHTS_NAME}) or a pipeline folder with vae/")
    if not (path / CONFIG_NAME).exists() and (path / "vae" / CONFIG_NAME).exists():
        return path / "vae"
    if not (path / CONFIG_NAME).exists():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {path} (nor in {path / 'vae'}): expected a diffusers "
                                f"AutoencoderKL folder ({CONFIG_NAME} + {WEIGHTS_NAME})")
    return path


def read_folder(path: str | os.PathLike, *, variant: str | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """`(state_dict, config)` of a diffusers AutoencoderKL folder (or a pipeline folder's `vae/`).

    `variant` picks `diffusion_pytorch_model.<variant>.safetensors` (e.g. 'fp16'), as diffusers'
    `from_pretrained(variant=...)`. Sharded weights (`.index.json`) are read too. No torch.

    Raises:
      FileNotFoundError: naming the folder, what it lacks and the weight files it has.
    """
    root = _model_root(pathlib.Path(path))
    config = json.loads((root / CONFIG_NAME).read_text())
    name = WEIGHTS_NAME if variant is None else WEIGHTS_NAME.replace(".safetensors", f".{variant}.safetensors")
    weights, index = root / name, root / (name + ".index.json")
    if weights.exists():
        return _read_safetensors(weights), config
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return {k: v for s in shards for k, v in _read_safetensors(root / s).items()}, config
    found = sorted(p.name for p in root.iterdir() if p.name != CONFIG_NAME)
    variants = sorted({m[1] for f in found if (m := re.fullmatch(r"diffusion_pytorch_model\.(\w+)\.safetensors", f))})
    hint = f"; pass variant= one of {variants}" if variants and variant is None else ""
    if any(f.endswith(".bin") for f in found):
        hint += " (.bin weights need torch: re-save them with safe_serialization=True)"
    raise FileNotFoundError(f"no {name} (or its .index.json) in {root}; found {found}{hint}")


def load_vae(path: str | os.PathLike, *, variant: str | None = None, dtype: Any = jnp.float32) -> VAE:
    """A `VAE` from a diffusers AutoencoderKL folder (SD, SDXL, SD3 and Flux VAEs, or ours from
    `save_folder`). Weights are kept in float32 whatever the file's dtype; `dtype` is the compute
    dtype (e.g. jnp.bfloat16).

    Raises:
      FileNotFoundError: for a missing folder, config or weights file.
      ValueError: for a config this port does not support, or weights that do not match it.
    """
    state_dict, config = read_folder(path, variant=variant)
    try:
        cfg = config_from_diffusers(config)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: {e}") from e
    return VAE(params_from_diffusers(state_dict, cfg), cfg, dtype=dtype)


def save_folder(path: str | os.PathLike, params: Mapping[str, Any], cfg: AutoencoderKLConfig) -> pathlib.Path:
    """Writes `params` as a diffusers AutoencoderKL folder (config.json + diffusion_pytorch_model.safetensors
    under diffusers' key names) that `load_vae` and `diffusers.AutoencoderKL.from_pretrained` read.

    Atomic: the folder is written beside `path` and renamed into place, so `path` is either the old
    folder or the complete new one. Returns `path` as a Path.
    """
    from safetensors.numpy import save_file

    sd = params_to_diffusers(params, cfg)  # checks the tree first: nothing is written for bad params
    dest = pathlib.Path(path).absolute()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        save_file(sd, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        config = {**config_to_diffusers(cfg), "_diffusers_version": DIFFUSERS_VERSION}
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        old = None
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old.{os.getpid()}")
            dest.rename(old)
        tmp.rename(dest)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest
