"""The stack of identical blocks of every backbone, applied either as a Python loop (one parameter
subtree per block, `layers_{i}`, the official checkpoints' layout) or as one `nn.scan` (one compiled
block, parameters stacked under `layers` with a leading logical axis 'layers'; `ModelConfig.scan_layers`),
and the pure converters between the two parameter layouts.

The scanned form follows MaxText (`MaxText/layers/decoders.py`: `nn.scan` over the remat'd decoder
layer, `variable_axes={'params': 0}`, `split_rngs={'params': True, 'dropout': True}`,
`metadata_params={nn.PARTITION_NAME: 'layers'}`, `prevent_cse=False` for the remat inside the scan).
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flagdit_jax.models import layers as L

LAYERS_AXIS = "layers"  # the logical name of the stacked axis (sharding.DEFAULT_RULES maps it to None)
_META = {nn.PARTITION_NAME: LAYERS_AXIS}


def apply_blocks(block_cls, fields: tuple, x, args: tuple, kwargs: Mapping[str, Any], *, n_layers: int, name: str,
                 remat: str, scan: bool, parent: nn.Module):
    """Apply `n_layers` blocks `block_cls(*fields)(x, *args, **kwargs) -> x` in sequence; call from
    inside `parent`'s compact method.

    Loop (`scan=False`): submodules `{name}_{i}`; scan (`scan=True`): one submodule `name` whose
    parameters carry a leading axis of size n_layers. Every block gets the same `args` / `kwargs`
    (the per-call constants: condition, RoPE angles, masks, captions) and the same static `fields`.
    `remat` is a `layers.REMAT_POLICIES` name, applied to each block. Either way the output of
    block i is sown as `intermediates['out:{name}_{i}']` when that collection is mutable (the scan
    then returns the stacked outputs; it does not keep them otherwise).

    x: `[B, L, D]` -> `[B, L, D]`.
    """
    collect = parent.is_mutable_collection("intermediates")
    if not scan:
        block = L.remat_block(block_cls, remat)
        for i in range(n_layers):
            x = block(*fields, name=f"{name}_{i}")(x, *args, **kwargs)
            parent.sow("intermediates", f"out:{name}_{i}", x)
        return x
    # Inside a scan the remat's CSE barrier is not needed (the loop already prevents it) and costs speed.
    block_cls = block_cls if remat == "none" else nn.remat(block_cls, policy=L.REMAT_POLICIES[remat],
                                                           prevent_cse=False)

    def body(block, carry, args, kwargs):
        out = block(carry, *args, **kwargs)
        return out, (out if collect else None)

    scanned = nn.scan(body, variable_axes={"params": 0, "intermediates": 0},
                      split_rngs={"params": True, "dropout": True}, in_axes=(nn.broadcast, nn.broadcast),
                      length=n_layers, metadata_params=_META)
    x, outs = scanned(block_cls(*fields, name=name), x, tuple(args), dict(kwargs))
    if collect:
        for i in range(n_layers):
            parent.sow("intermediates", f"out:{name}_{i}", outs[i])
    return x


# ------------------------------------------------------------------------------------------------
# parameter layouts
# ------------------------------------------------------------------------------------------------


def _is_box(x) -> bool:
    return isinstance(x, nn.meta.AxisMetadata)


def _named(sharding, spec):
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec))


def _stack(xs):
    if all(isinstance(x, jax.ShapeDtypeStruct) for x in xs):
        # A NamedSharding gains a replicated leading axis (the 'layers' rule, sharding.DEFAULT_RULES).
        sh = xs[0].sharding
        sh = _named(sh, (None, *sh.spec)) if isinstance(sh, jax.sharding.NamedSharding) else None
        return jax.ShapeDtypeStruct((len(xs), *xs[0].shape), xs[0].dtype, sharding=sh)
    if all(isinstance(x, np.ndarray) for x in xs):
        return np.stack(xs)
    return jnp.stack(xs)


def _unstack(x, n: int) -> list:
    if isinstance(x, jax.ShapeDtypeStruct):
        sh = x.sharding
        sh = _named(sh, tuple(sh.spec)[1:]) if isinstance(sh, jax.sharding.NamedSharding) else None
        return [jax.ShapeDtypeStruct(x.shape[1:], x.dtype, sharding=sh)] * n
    return [x[i] for i in range(n)]


def _check_top(params, what: str) -> dict:
    if not isinstance(params, Mapping):
        raise ValueError(f"{what}: expected a parameter dict (the 'params' collection), got {type(params).__name__}")
    return dict(params)


def block_layout(params: Mapping, name: str = "layers") -> str | None:
    """'scanned' (a `name` subtree), 'layers' (`{name}_0`, ...) or None (no blocks) of a param tree."""
    params = _check_top(params, "block_layout")
    if name in params:
        return "scanned"
    return "layers" if f"{name}_0" in params else None


def scan_params(params: Mapping, n_layers: int, name: str = "layers") -> dict:
    """Per-layer params `{name}_0 .. {name}_{n-1}` -> one stacked subtree `name` (leading axis n).

    Pure over the pytree: numpy leaves stay numpy, jax arrays are stacked with jnp,
    `ShapeDtypeStruct`s get the leading dimension (and a NamedSharding a replicated leading axis;
    `unscan_params` drops it), and boxed leaves (`nn.Partitioned`) gain the
    logical axis 'layers' in front, as `nn.scan(metadata_params=...)` writes them. Other entries are
    kept as they are.

    Raises:
      ValueError: a layer is missing, there are more than n_layers, the tree is already scanned,
        or the layers' structures or shapes differ.
    """
    params = _check_top(params, "scan_params")
    if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers <= 0:
        raise ValueError(f"n_layers={n_layers!r} must be a positive int")
    if name in params:
        raise ValueError(f"scan_params: the tree already has a stacked {name!r} subtree (it is scanned)")
    keys = [f"{name}_{i}" for i in range(n_layers)]
    missing = [k for k in keys if k not in params]
    if missing:
        raise ValueError(f"scan_params: missing {missing[:3]} for n_layers={n_layers}; the tree has "
                         f"{sorted(k for k in params if k.startswith(name + '_'))[:5]}")
    if f"{name}_{n_layers}" in params:
        raise ValueError(f"scan_params: the tree has {name}_{n_layers}, more layers than n_layers={n_layers}")
    layers = [params[k] for k in keys]
    first = jax.tree.structure(layers[0], is_leaf=_is_box)
    for k, layer in zip(keys, layers):
        if jax.tree.structure(layer, is_leaf=_is_box) != first:
            raise ValueError(f"scan_params: {k} has another parameter structure than {keys[0]}")

    def stack(*leaves):
        values = [x.unbox() if _is_box(x) else x for x in leaves]
        shapes = {tuple(np.shape(v)) for v in values}
        if len(shapes) != 1:
            raise ValueError(f"scan_params: the layers' shapes of one parameter differ: {sorted(shapes)}")
        v = _stack(values)
        return leaves[0].replace_boxed(v).add_axis(0, _META) if _is_box(leaves[0]) else v

    out = {k: v for k, v in params.items() if k not in keys}
    out[name] = jax.tree.map(stack, *layers, is_leaf=_is_box)
    return out


def unscan_params(params: Mapping, name: str = "layers") -> dict:
    """Inverse of `scan_params`: the stacked subtree `name` -> `{name}_0 .. {name}_{n-1}` (n from
    its leading dimension); boxed leaves lose their leading 'layers' axis name.

    Raises:
      ValueError: no `name` subtree, or its leaves disagree on the number of layers.
    """
    params = _check_top(params, "unscan_params")
    if name not in params:
        raise ValueError(f"unscan_params: no stacked {name!r} subtree; the tree has {sorted(params)[:8]}")
    stacked = params[name]
    leaves = jax.tree.leaves(stacked, is_leaf=_is_box)
    counts = {np.shape(x.unbox() if _is_box(x) else x)[0] if np.ndim(x.unbox() if _is_box(x) else x) else None
              for x in leaves}
    if len(counts) != 1 or None in counts:
        raise ValueError(f"unscan_params: the leaves of {name!r} must share one leading layer axis, got {counts}")
    n = counts.pop()

    def split(x):
        if _is_box(x):
            box = x.remove_axis(0, _META) if x.names and x.names[0] == LAYERS_AXIS else x
            return [box.replace_boxed(v) for v in _unstack(x.unbox(), n)]
        return _unstack(x, n)

    parts = jax.tree.map(split, stacked, is_leaf=_is_box)
    treedef = jax.tree.structure(stacked, is_leaf=_is_box)
    per_leaf = treedef.flatten_up_to(parts)
    out = {k: v for k, v in params.items() if k != name}
    for i in range(n):
        out[f"{name}_{i}"] = treedef.unflatten([p[i] for p in per_leaf])
    return out


def to_layout(params: Mapping, *, scan: bool, n_layers: int, name: str = "layers") -> dict:
    """`params` in the scanned (`scan=True`) or per-layer layout, whichever it is given in (a no-op
    when it is already there)."""
    layout = block_layout(params, name)
    if scan and layout == "layers":
        return scan_params(params, n_layers, name)
    if not scan and layout == "scanned":
        return unscan_params(params, name)
    return dict(params)
