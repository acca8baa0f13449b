"""Latent frames <-> one packed token sequence (DESIGN.md principle 1).

Frames `[T, H, W, C]` (image: T=1; video: T frames; multi-view: T views) are cut into p x p
patches (patch vector order (ph, pw, C), channels fastest), laid out row by row with an optional
[nextline] token after every patch row and an optional [nextframe] token after every frame, and
right-padded with [PAD] tokens to a common length. The special tokens carry no data here: the
model replaces them by its learnable embeddings (`kind` says which is which).

The official T2I code appends its `eol_token` after every row, the last one included
(LT `lumina_t2i/models/model.py: patchify_and_embed`); [nextframe] follows the same rule per frame
(no video code is released, REFERENCE.md §1).
"""

from __future__ import annotations

from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

# Token kinds.
PATCH, NEXTLINE, NEXTFRAME, PAD = 0, 1, 2, 3


@flax.struct.dataclass
class Packed:
    """A batch of frames packed into one token sequence.

    Attributes:
      tokens: `[B, L, p*p*C]` patch vectors (zeros at special tokens).
      kind: `[B, L]` int32, one of PATCH / NEXTLINE / NEXTFRAME / PAD.
      positions: `[B, L, 3]` int32 (frame, row, col) in patch units. [nextline] sits at column
        W/p of its row, [nextframe] at row H/p, column 0 of its frame; [PAD] repeats the last
        real token's position.
      mask: `[B, L]` bool, True for every non-[PAD] token.
      shapes: per-sample latent sizes `((T, H, W), ...)` (static), or None for a host-packed
        training batch (`as_packed`), which cannot be unpacked.
      patch_size, nextline, nextframe: the layout (static).
      batched: True when the input was one `[B, T, H, W, C]` array (unpack returns an array).
    """

    tokens: jax.Array
    kind: jax.Array
    positions: jax.Array
    mask: jax.Array
    shapes: tuple[tuple[int, int, int], ...] | None = flax.struct.field(pytree_node=False)
    patch_size: int = flax.struct.field(pytree_node=False, default=2)
    nextline: bool = flax.struct.field(pytree_node=False, default=True)
    nextframe: bool = flax.struct.field(pytree_node=False, default=False)
    batched: bool = flax.struct.field(pytree_node=False, default=True)

    @property
    def index(self) -> jax.Array:
        """`[B, L]` flat token index (the 1-D RoPE position of Flag-DiT; pads continue counting)."""
        b, l = self.kind.shape
        return jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))

    @property
    def has_pads(self) -> bool:
        """Static: may a sample carry [PAD] tokens? Always True for a training batch packed on the
        host (`shapes=None`: its per-sample sizes vary from batch to batch and stay out of the
        compiled step, so one compile serves a whole token-length bucket)."""
        if self.shapes is None:
            return True
        length = self.kind.shape[1]
        return any(seq_len(s, self.patch_size, self.nextline, self.nextframe) != length for s in self.shapes)

    @property
    def grid_sizes(self) -> tuple[tuple[int, int, int], ...]:
        """Per-sample (T, H/p, W/p)."""
        p = self.patch_size
        return tuple((t, h // p, w // p) for t, h, w in self.shapes)


def seq_len(shape: tuple[int, int, int], patch_size: int, nextline: bool, nextframe: bool) -> int:
    """Number of real (non-pad) tokens for frames of latent size (T, H, W)."""
    t, h, w = shape
    hp, wp = h // patch_size, w // patch_size
    return t * (hp * (wp + int(nextline)) + int(nextframe))


def _check_shape(shape: Sequence[int], patch_size: int, what: str) -> None:
    if len(shape) != 4:
        raise ValueError(f"{what} must have rank 4 [T, H, W, C] per sample, got shape {tuple(shape)}")
    t, h, w, c = shape
    if min(t, h, w, c) <= 0:
        raise ValueError(f"{what} has an empty dimension: shape {tuple(shape)}")
    if h % patch_size or w % patch_size:
        raise ValueError(
            f"{what}: latent height and width {(h, w)} must be divisible by patch_size={patch_size}"
        )


def _layout(t: int, hp: int, wp: int, nextline: bool, nextframe: bool):
    """Static per-sample kind [n] and positions [n, 3] (numpy)."""
    f, r, c = np.meshgrid(np.arange(t), np.arange(hp), np.arange(wp + int(nextline)), indexing="ij")
    kind = np.where(c == wp, NEXTLINE, PATCH)
    pos = np.stack([f, r, c], -1).reshape(t, -1, 3)
    kind = kind.reshape(t, -1)
    if nextframe:
        eof_pos = np.stack([np.arange(t), np.full(t, hp), np.zeros(t, int)], -1)[:, None]
        pos = np.concatenate([pos, eof_pos], 1)
        kind = np.concatenate([kind, np.full((t, 1), NEXTFRAME)], 1)
    return kind.reshape(-1).astype(np.int32), pos.reshape(-1, 3).astype(np.int32)


def _patchify(x, patch_size: int, nextline: bool, nextframe: bool, xp=jnp):
    """[..., T, H, W, C] -> [..., n, p*p*C] with zero vectors at special tokens (xp: jnp or np)."""
    *lead, t, h, w, c = x.shape
    p = patch_size
    hp, wp = h // p, w // p
    x = x.reshape(*lead, t, hp, p, wp, p, c)
    x = xp.moveaxis(x, -4, -3)  # [..., T, hp, wp, p, p, C]
    x = x.reshape(*lead, t, hp, wp, p * p * c)
    if nextline:
        x = xp.concatenate([x, xp.zeros((*lead, t, hp, 1, p * p * c), x.dtype)], axis=-2)
    x = x.reshape(*lead, t, -1, p * p * c)
    if nextframe:
        x = xp.concatenate([x, xp.zeros((*lead, t, 1, p * p * c), x.dtype)], axis=-2)
    return x.reshape(*lead, -1, p * p * c)


def pack(
    frames: jax.Array | Sequence[jax.Array],
    patch_size: int = 2,
    *,
    nextline: bool = True,
    nextframe: bool = False,
    pad_to: int | None = None,
) -> Packed:
    """Patchify latent frames into one padded token sequence.

    Args:
      frames: one array `[B, T, H, W, C]` (all samples the same size), or a list of `[T, H, W, C]`
        arrays of different sizes and aspect ratios (same C).
      patch_size: p; H and W must be divisible by it.
      nextline / nextframe: insert [nextline] after each patch row / [nextframe] after each frame.
      pad_to: pad every sample to this length (default: the longest sample).

    Returns:
      `Packed` with tokens `[B, L, p*p*C]`.
    """
    if patch_size <= 0:
        raise ValueError(f"patch_size must be a positive integer, got {patch_size}")
    batched = not isinstance(frames, (list, tuple))
    if batched:
        if getattr(frames, "ndim", None) != 5:
            raise ValueError(
                f"frames must be a [B, T, H, W, C] array or a list of [T, H, W, C] arrays, "
                f"got shape {getattr(frames, 'shape', type(frames))}"
            )
        _check_shape(frames.shape[1:], patch_size, "frames")
        samples = None
        shapes = (tuple(frames.shape[1:4]),) * frames.shape[0]
        channels = frames.shape[-1]
    else:
        if not frames:
            raise ValueError("frames is an empty list; expected at least one [T, H, W, C] array")
        for i, f in enumerate(frames):
            _check_shape(getattr(f, "shape", ()), patch_size, f"frames[{i}]")
        channels = {f.shape[-1] for f in frames}
        if len(channels) != 1:
            raise ValueError(f"all frames must have the same channel count, got {sorted(channels)}")
        channels = channels.pop()
        samples = frames
        shapes = tuple(tuple(f.shape[:3]) for f in frames)

    lens = [seq_len(s, patch_size, nextline, nextframe) for s in shapes]
    length = max(lens) if pad_to is None else pad_to
    if length < max(lens):
        raise ValueError(f"pad_to={pad_to} is shorter than the longest sample ({max(lens)} tokens)")

    kinds, positions = [], []
    for (t, h, w), n in zip(shapes, lens):
        kind, pos = _layout(t, h // patch_size, w // patch_size, nextline, nextframe)
        kinds.append(np.pad(kind, (0, length - n), constant_values=PAD))
        positions.append(np.concatenate([pos, np.repeat(pos[-1:], length - n, 0)], 0))
    kind = jnp.asarray(np.stack(kinds))
    positions = jnp.asarray(np.stack(positions))

    if batched:
        tokens = _patchify(jnp.asarray(frames), patch_size, nextline, nextframe)
        tokens = jnp.pad(tokens, ((0, 0), (0, length - lens[0]), (0, 0)))
    else:
        tokens = jnp.stack(
            [
                jnp.pad(_patchify(jnp.asarray(f), patch_size, nextline, nextframe), ((0, length - n), (0, 0)))
                for f, n in zip(samples, lens)
            ]
        )
    return Packed(
        tokens=tokens,
        kind=kind,
        positions=positions,
        mask=kind != PAD,
        shapes=shapes,
        patch_size=patch_size,
        nextline=nextline,
        nextframe=nextframe,
        batched=batched,
    )


def layout_of(cfg) -> tuple[int, bool, bool]:
    """(patch_size, nextline, nextframe) a model config asks for; configs without the token flags
    (DiT) have neither. The argument order of `seq_len`'s last three parameters."""
    return cfg.patch_size, getattr(cfg, "nextline", False), getattr(cfg, "nextframe", False)


def pack_for(cfg, frames: jax.Array | Sequence[jax.Array], *, pad_to: int | None = None) -> Packed:
    """`pack` with the layout a model config asks for (patch size, [nextline], [nextframe]).

    The one packing entry point of train, sample, pipelines and experiments, so that no caller can
    drop a layout flag. `cfg` is any model config (`patch_size`; `nextline` / `nextframe` default
    to False where a config has no such field, e.g. DiT).
    """
    p, nl, nf = layout_of(cfg)
    return pack(frames, p, nextline=nl, nextframe=nf, pad_to=pad_to)


def pack_host(frames: Sequence[np.ndarray], cfg, pad_to: int) -> dict[str, np.ndarray]:
    """NumPy packing on the host (data workers) for training batches of mixed sizes.

    Args:
      frames: list of `[T, H, W, C]` arrays (sizes and frame counts may differ).
      cfg: a model config (its patch size and [nextline] / [nextframe] layout, as `pack_for`).
      pad_to: the token-length bucket L every sample is padded to with [PAD].
    Returns:
      `{'tokens': [B, L, p*p*C] float32, 'kind': [B, L] int32, 'positions': [B, L, 3] int32}`,
      the arrays of `pack_for(cfg, frames, pad_to=L)`; `as_packed` turns them into a `Packed`.
    """
    p, nl, nf = layout_of(cfg)
    tokens, kinds, positions = [], [], []
    for i, f in enumerate(frames):
        f = np.asarray(f, np.float32)
        _check_shape(f.shape, p, f"frames[{i}]")
        n = seq_len(f.shape[:3], p, nl, nf)
        if n > pad_to:
            raise ValueError(f"frames[{i}] of latent size {f.shape[:3]} needs {n} tokens, more than the bucket "
                             f"length {pad_to}")
        kind, pos = _layout(f.shape[0], f.shape[1] // p, f.shape[2] // p, nl, nf)
        tokens.append(np.pad(_patchify(f, p, nl, nf, xp=np), ((0, pad_to - n), (0, 0))))
        kinds.append(np.pad(kind, (0, pad_to - n), constant_values=PAD))
        positions.append(np.concatenate([pos, np.repeat(pos[-1:], pad_to - n, 0)], 0))
    return {"tokens": np.stack(tokens), "kind": np.stack(kinds), "positions": np.stack(positions)}


def as_packed(arrays: dict, cfg) -> Packed:
    """`pack_host` arrays (numpy or global jax.Arrays) -> a `Packed` whose static part is only the
    layout (`shapes=None`), so every batch of one token-length bucket reuses one compiled step."""
    p, nl, nf = layout_of(cfg)
    return Packed(tokens=arrays["tokens"], kind=arrays["kind"], positions=arrays["positions"],
                  mask=arrays["kind"] != PAD, shapes=None, patch_size=p, nextline=nl, nextframe=nf, batched=False)


def _unpatchify(seq: jax.Array, shape, patch_size, nextline, nextframe) -> jax.Array:
    """[..., L, p*p*C] (first seq_len tokens real) -> [..., T, H, W, C]."""
    t, h, w = shape
    p = patch_size
    hp, wp = h // p, w // p
    *lead, _, d = seq.shape
    c = d // (p * p)
    n = seq_len(shape, p, nextline, nextframe)
    x = seq[..., :n, :].reshape(*lead, t, -1, d)
    x = x[..., : hp * (wp + int(nextline)), :].reshape(*lead, t, hp, wp + int(nextline), d)
    x = x[..., :wp, :].reshape(*lead, t, hp, wp, p, p, c)
    x = jnp.moveaxis(x, -3, -4)  # [..., T, hp, p, wp, p, C]
    return x.reshape(*lead, t, h, w, c)


def unpack(seq: jax.Array, packed: Packed) -> jax.Array | list[jax.Array]:
    """Exact inverse of `pack` for any per-patch width.

    Args:
      seq: `[B, L, p*p*C']` (C' may differ from the packed C, e.g. a model's output channels).
      packed: the layout from `pack`.

    Returns:
      `[B, T, H, W, C']` if `pack` was given one array, else a list of `[T, H, W, C']`.
    """
    p = packed.patch_size
    if packed.shapes is None:
        raise ValueError("this Packed came from as_packed (a host-packed training batch) and carries no per-sample "
                         "sizes; pack with pack / pack_for to unpack")
    if seq.ndim != 3 or seq.shape[:2] != packed.kind.shape or seq.shape[-1] % (p * p):
        raise ValueError(
            f"seq must be [B, L, p*p*C] with [B, L]={packed.kind.shape} and p={p}, got {seq.shape}"
        )
    if packed.batched:
        return _unpatchify(seq, packed.shapes[0], p, packed.nextline, packed.nextframe)
    return [
        _unpatchify(seq[i], s, p, packed.nextline, packed.nextframe) for i, s in enumerate(packed.shapes)
    ]
