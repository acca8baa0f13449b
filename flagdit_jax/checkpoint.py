"""Orbax checkpoints of model parameters plus the model config (all checkpoint code lives here).

A converted or trained model is a directory: `params/` (Orbax StandardCheckpointer) and
`model.json` (the backbone kind and its config fields), so `load_params` can rebuild the model.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import flax.linen as nn
import jax
import orbax.checkpoint as ocp

from flagdit_jax.models import registry
from flagdit_jax.models.dit import DiTConfig
from flagdit_jax.models.flag_dit import FlagDiTConfig

_KINDS = {"flagdit": FlagDiTConfig, "dit": DiTConfig}


def config_to_dict(cfg) -> dict:
    kind = next(k for k, c in _KINDS.items() if isinstance(cfg, c))
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.init}
    return {"kind": kind, "config": fields}


def config_from_dict(d: dict):
    if d.get("kind") not in _KINDS:
        raise ValueError(f"model.json kind {d.get('kind')!r}; expected one of {sorted(_KINDS)}")
    return _KINDS[d["kind"]](**d["config"])


def save_params(directory: str | pathlib.Path, params, cfg, *, overwrite: bool = False) -> pathlib.Path:
    """Write `params` (a pytree of arrays) and `cfg` to `directory`; refuses to overwrite by default."""
    directory = pathlib.Path(directory).absolute()
    if directory.exists() and any(directory.iterdir()) and not overwrite:
        raise FileExistsError(f"{directory} exists and is not empty; pass overwrite=True (--overwrite) to replace it")
    directory.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(directory / "params", params, force=overwrite)
        ckptr.wait_until_finished()
    (directory / "model.json").write_text(json.dumps(config_to_dict(cfg), indent=1))
    return directory


def load_params(directory: str | pathlib.Path):
    """Returns `(params, cfg)` from a directory written by `save_params`."""
    directory = pathlib.Path(directory).absolute()
    meta = directory / "model.json"
    if not meta.exists():
        raise FileNotFoundError(f"{meta} not found: not a flagdit_jax parameter checkpoint")
    cfg = config_from_dict(json.loads(meta.read_text()))
    abstract = nn.unbox(registry.abstract_params(cfg))
    with ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore(directory / "params", jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                                                   abstract))
    return params, cfg
