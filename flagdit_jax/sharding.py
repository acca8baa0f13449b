"""Logical axis names -> mesh axes: one rules table (MaxText style, DESIGN.md principle 5).

Every parameter and large activation in `flagdit_jax.models` carries logical names; the table
below maps them to the mesh axes `data`, `fsdp`, `tensor` (and `sequence` for long sequences).
A config may pass its own table; unnamed or unmapped axes are replicated.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "sequence", "tensor")

# (logical name, mesh axis or axes or None). Parameters: the model width is sharded over fsdp,
# head / MLP / modulation widths over tensor (Megatron-style column/row split).
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # parameters
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("heads_gate", "tensor"),
    ("qkv", "tensor"),
    ("mod", "tensor"),
    ("cond", "fsdp"),  # adaLN / embedder inputs: replicated they are a quarter of Flag-DiT under FSDP (paper_configs)
    ("cond_hidden", None),
    ("freq", None),
    ("vocab", None),
    ("caption", "fsdp"),
    ("patch", None),
    ("out_patch", None),
    ("norm", None),
    ("layers", None),  # the leading axis of scanned blocks' stacked parameters (scan_layers)
    # activations
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", "sequence"),
    ("activation_embed", None),
    ("activation_mlp", "tensor"),
    ("activation_heads", "tensor"),
    ("activation_kv", None),
    ("activation_mod", None),
)


def make_mesh(shape: Sequence[int], axes: Sequence[str] = MESH_AXES, devices=None) -> Mesh:
    """`jax.make_mesh` over `devices` (default: all) with a clear error when the shape does not fit."""
    devices = jax.devices() if devices is None else list(devices)
    n = 1
    for s in shape:
        n *= s
    if len(shape) != len(axes):
        raise ValueError(f"mesh shape {tuple(shape)} must have one entry per axis {tuple(axes)}")
    if n != len(devices):
        raise ValueError(
            f"mesh shape {tuple(shape)} needs {n} devices but {len(devices)} are available; "
            f"the product of the mesh shape must equal the device count"
        )
    # Auto axes: the compiler propagates shardings between the logical constraints.
    return jax.make_mesh(tuple(shape), tuple(axes), axis_types=(jax.sharding.AxisType.Auto,) * len(axes),
                         devices=devices)


def param_shardings(abstract_params, mesh: Mesh, rules=DEFAULT_RULES):
    """NamedShardings for a (boxed) parameter tree from `jax.eval_shape(model.init ...)`."""
    specs = nn.get_partition_spec(abstract_params)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, rules=DEFAULT_RULES, ndim: int = 2) -> NamedSharding:
    """Sharding of a batch-leading array `[B, ...]` (batch over the data-parallel axes)."""
    spec = nn.logical_to_mesh_axes(("activation_batch",) + (None,) * (ndim - 1), rules)
    return NamedSharding(mesh, spec)


def sequence_shards(mesh_shape: Sequence[int], rules=DEFAULT_RULES, axes: Sequence[str] = MESH_AXES) -> int:
    """How many ways a token sequence is split: the size of the mesh axes `activation_length` maps
    to under `rules` (1 = no sequence parallelism; `models.sequence_parallel`)."""
    spec = nn.logical_to_mesh_axes(("activation_length",), rules)[0]
    names = () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)
    sizes = dict(zip(axes, mesh_shape))
    n = 1
    for name in names:
        n *= sizes[name]
    return n


def check_sequence_length(length: int, mesh_shape: Sequence[int], rules=DEFAULT_RULES, *, what: str = "token length"
                          ) -> None:
    """ValueError unless `length` (pads included) divides evenly over the sequence-parallel mesh axes."""
    n = sequence_shards(mesh_shape, rules)
    if length % n:
        fit = [m for m in range(length, length + 4 * n) if m % n == 0][:2]
        raise ValueError(f"{what} ({length}) must be divisible by the sequence axis size {n} of mesh shape "
                         f"{tuple(mesh_shape)} (sequence parallelism splits the tokens evenly); e.g. pad to {fit}")
