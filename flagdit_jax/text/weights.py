"""transformers-format checkpoint folders -> config dict and Flax params, without torch.

A folder holds `config.json` and either `model.safetensors` or a sharded checkpoint
(`model.safetensors.index.json` whose `weight_map` names the shard of every tensor), as written by
`PreTrainedModel.save_pretrained(..., safe_serialization=True)`.

Tensors are read with safetensors' numpy backend. numpy has no bfloat16, so BF16 tensors (the
storage dtype of the released Gemma/LLaMA checkpoints) are read through safetensors' flax backend
on the CPU device and come back as `ml_dtypes.bfloat16` numpy arrays.

Flax leaf paths map to transformers keys by one rule (`hf_key`): `layers_3` <-> `layers.3`, leaf
`kernel` <-> `weight` (transposed: torch Linear is [out, in]), `embedding`/`scale` <-> `weight`.
So each module here names its submodules as the transformers module does, and `load_params` can
check every expected tensor (missing key, wrong shape) against the Flax init shapes.
"""

from __future__ import annotations

import json
import pathlib
import re
from typing import Any, Callable, Iterable, Mapping

import flax.traverse_util
import jax
import ml_dtypes
import numpy as np
from safetensors import safe_open

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def as_dtype(dtype: Any) -> np.dtype:
    """'float32' | 'bfloat16' | 'float16' (or the numpy / jax dtype) -> numpy dtype."""
    if isinstance(dtype, str):
        if dtype in DTYPES:
            return np.dtype(DTYPES[dtype])
    else:
        try:
            dt = np.dtype(dtype)
        except TypeError:
            dt = None
        if dt in [np.dtype(d) for d in DTYPES.values()]:
            return dt
    raise ValueError(f"dtype={dtype!r}; expected one of {sorted(DTYPES)}")


def read_config(path: str | pathlib.Path) -> dict:
    """`path/config.json` as a dict (clear ValueError if the folder or the file is missing)."""
    folder = pathlib.Path(path)
    if not folder.is_dir():
        raise ValueError(f"text encoder path {str(folder)!r} is not a directory (expected a transformers "
                         f"checkpoint folder with {CONFIG_NAME}, {WEIGHTS_NAME} and tokenizer.json)")
    file = folder / CONFIG_NAME
    if not file.is_file():
        raise ValueError(f"{str(file)!r} is missing: a transformers checkpoint folder needs {CONFIG_NAME}")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{str(file)!r} is not valid JSON: {e}") from e


def weight_files(path: str | pathlib.Path) -> dict[str, pathlib.Path]:
    """tensor name -> the safetensors file holding it (one file, or the shards of the index)."""
    folder = pathlib.Path(path)
    single, index = folder / WEIGHTS_NAME, folder / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{str(index)!r} is not a safetensors index (needs a 'weight_map'): {e!r}") from e
        files = {name: folder / shard for name, shard in weight_map.items()}
        absent = sorted({str(f) for f in files.values() if not f.is_file()})
        if absent:
            raise ValueError(f"{str(index)!r} names shards that are missing: {absent}")
        return files
    if single.is_file():
        with safe_open(single, framework="numpy") as f:
            return {name: single for name in f.keys()}
    raise ValueError(f"no weights in {str(folder)!r}: expected {WEIGHTS_NAME} or {INDEX_NAME} "
                     "(save with save_pretrained(..., safe_serialization=True))")


def read_tensors(files: Mapping[str, pathlib.Path], names: Iterable[str]) -> dict[str, np.ndarray]:
    """Read `names` from their files as numpy arrays (BF16 as ml_dtypes.bfloat16), one open per file."""
    by_file: dict[pathlib.Path, list[str]] = {}
    for name in names:
        by_file.setdefault(files[name], []).append(name)
    out = {}
    for file, group in by_file.items():
        with safe_open(file, framework="numpy") as f:
            bf16 = [n for n in group if f.get_slice(n).get_dtype() == "BF16"]
            out.update({n: f.get_tensor(n) for n in group if n not in bf16})
        if bf16:
            with jax.default_device(jax.devices("cpu")[0]), safe_open(file, framework="flax") as f:
                out.update({n: np.asarray(f.get_tensor(n)) for n in bf16})
    return out


def hf_key(flax_path: tuple[str, ...]) -> tuple[str, bool]:
    """Flax param path -> (transformers key, transpose?)."""
    *mods, leaf = flax_path
    mods = [re.sub(r"^(.*)_(\d+)$", r"\1.\2", m) for m in mods]
    transpose = leaf == "kernel"
    leaf = "weight" if leaf in ("kernel", "embedding", "scale") else leaf
    return ".".join(mods + [leaf]), transpose


def load_params(path: str | pathlib.Path, abstract: Any, *, dtype: Any = "float32",
                prefixes: tuple[str, ...] = ("", "model.")) -> Any:
    """Read the tensors the Flax tree `abstract` (e.g. `jax.eval_shape(module.init, ...)["params"]`)
    needs from the checkpoint at `path` and return them as a params tree of `dtype` on the default
    device. Keys may carry one of `prefixes` (a `*ForCausalLM` save has `model.`); unused tensors
    (lm_head, pooler, skipped layers, buffers) are ignored. Missing or mis-shaped tensors raise a
    ValueError naming them."""
    dt = as_dtype(dtype)
    files = weight_files(path)
    flat = flax.traverse_util.flatten_dict(abstract)
    wanted = {p: hf_key(p) for p in flat}
    first = next(iter(wanted.values()))[0]
    prefix = next((p for p in prefixes if p + first in files), None)
    if prefix is None:
        raise ValueError(f"checkpoint in {str(path)!r} has no tensor {first!r} (tried prefixes {list(prefixes)}); "
                         f"is it the model its config.json says? First keys: {sorted(files)[:5]}")
    missing = sorted(prefix + k for k, _ in wanted.values() if prefix + k not in files)
    if missing:
        raise ValueError(f"checkpoint in {str(path)!r} lacks {len(missing)} tensors: {missing[:8]}")
    out, bad = {}, []
    # One file at a time, so host memory holds one shard in its stored dtype, not the whole model.
    for file in dict.fromkeys(files[prefix + k] for k, _ in wanted.values()):
        group = {p: kt for p, kt in wanted.items() if files[prefix + kt[0]] == file}
        arrays = read_tensors(files, [prefix + k for k, _ in group.values()])
        for p, (k, transpose) in group.items():
            a = arrays.pop(prefix + k)
            a = a.T if transpose else a
            if a.shape != tuple(flat[p].shape):
                bad.append(f"{prefix + k}: {a.shape} in the checkpoint, {tuple(flat[p].shape)} from config.json")
                continue
            out[p] = jax.device_put(np.array(a, dtype=dt, order="C"))
    if bad:
        raise ValueError(f"checkpoint in {str(path)!r} does not fit its config: " + "; ".join(bad[:8]))
    return flax.traverse_util.unflatten_dict(out)


def abstract_params(module, *args: Any) -> Any:
    """The params tree of `module.init(key, *args)` as shapes only (nothing allocated)."""
    init: Callable = lambda: module.init(jax.random.key(0), *args)["params"]
    return jax.eval_shape(init)
