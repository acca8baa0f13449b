"""Mixed sizes and durations in training: token-length buckets over one deterministic grain stream.

Samples may differ in height, width and frame count. Every record is assigned, by its latent size
(T, H, W) and the model's token layout, to the smallest token-length bucket that holds it; every
global batch is drawn from one bucket and packed on the host to that bucket's length with [PAD]
(`tokens.pack_host`). Shapes are therefore static per bucket: one compile per bucket, not per
batch. The official T2I trainers instead pad each batch to its own longest sample (LT
`lumina_t2i/train.py`), which would recompile at every new length under `jax.jit`.

The order is a pure function of (seed, epoch): each epoch, every bucket's records are shuffled and
cut into full global batches (the remainder is dropped, a different one each epoch), and the
batches of all buckets are shuffled together. The grain `MapDataset` element k is global batch k,
so the iterator's state is one integer (like `pipeline.make_iterator`) and resumes bit-exactly for
any worker count. Process p reads only its contiguous block p of each global batch, which is where
`jax.make_array_from_process_local_data` puts it.
"""

from __future__ import annotations

from typing import Callable, Sequence

import grain
import numpy as np

from flagdit_jax import tokens as tok


def crop_size_list(num_patches: int, patch_size: int, max_ratio: float = 4.0) -> list[tuple[int, int]]:
    """The official aspect-ratio crop list: every (width, height) = (wp, hp) * patch_size with
    wp * hp <= num_patches on the frontier and max(wp, hp) / min(wp, hp) <= max_ratio
    (LT `lumina_t2i/imgproc.py: generate_crop_size_list`; the T2I trainers call it with
    `(round((image_size / 16) ** 2), 16)`: 16 px = the SDXL VAE's 8x times patch 2)."""
    if num_patches <= 0 or patch_size <= 0 or max_ratio < 1.0:
        raise ValueError(f"crop_size_list(num_patches={num_patches}, patch_size={patch_size}, max_ratio={max_ratio}): "
                         "expected positive sizes and max_ratio >= 1")
    out, wp, hp = [], num_patches, 1
    while wp > 0:
        if max(wp, hp) / min(wp, hp) <= max_ratio:
            out.append((wp * patch_size, hp * patch_size))
        if (hp + 1) * wp <= num_patches:
            hp += 1
        else:
            wp -= 1
    return out


def crop_buckets(image_size: int, cfg, *, vae_factor: int = 8, frames: Sequence[int] = (1,)) -> tuple[int, ...]:
    """One bucket per frame count holding every official crop of `image_size` (pixels) in latent
    space: e.g. 256 px, SDXL VAE (8x), patch 2 with [nextline] -> (288,), the official T2I
    `max_seq_len` for 256 px (REFERENCE.md: 288 / 1088 / 4224 for 256 / 512 / 1024)."""
    crops = crop_size_list(round((image_size / 16) ** 2), 16)
    return tuple(sorted({max(tok.seq_len((t, h // vae_factor, w // vae_factor), *tok.layout_of(cfg))
                             for w, h in crops) for t in frames}))


def frames_of(element: dict) -> np.ndarray:
    """A source element's latent frames `[T, H, W, C]` ('frames', or an image 'image' [H, W, C])."""
    if "frames" in element:
        f = np.asarray(element["frames"])
        if f.ndim != 4:
            raise ValueError(f"element 'frames' must be [T, H, W, C], got shape {f.shape}")
        return f
    if "image" in element:
        return np.asarray(element["image"])[None]
    raise ValueError(f"a training element needs 'frames' [T, H, W, C] or 'image' [H, W, C]; got keys {sorted(element)}")


def record_shapes(source) -> np.ndarray:
    """`[N, 3]` latent sizes (T, H, W) of every record: `source.frame_shapes()` when the source
    knows them without reading (mixed-size sources must), else record 0's size for all."""
    if hasattr(source, "frame_shapes"):
        shapes = np.asarray(source.frame_shapes(), np.int64)
        if shapes.shape != (len(source), 3):
            raise ValueError(f"{source!r}.frame_shapes() must be [N={len(source)}, 3] (T, H, W), got {shapes.shape}")
        return shapes
    return np.tile(np.asarray(frames_of(source[0]).shape[:3], np.int64), (len(source), 1))


def assign_buckets(shapes: np.ndarray, cfg, buckets: Sequence[int] | None, length_multiple: int = 1
                   ) -> tuple[np.ndarray, tuple[int, ...]]:
    """Bucket index of every record and the sorted bucket lengths.

    `buckets` None or empty: one bucket per distinct token length in the data, each rounded up to a
    multiple of `length_multiple` (sequence parallelism splits a sequence evenly over its devices;
    the extra tokens are [PAD]). Given buckets must already be multiples of it.
    """
    if length_multiple < 1:
        raise ValueError(f"length_multiple={length_multiple} must be >= 1")
    if buckets and any(int(b) % length_multiple for b in buckets):
        raise ValueError(f"bucket lengths {tuple(buckets)} must be multiples of {length_multiple} (the sequence "
                         "axis size: sequence parallelism splits each sequence evenly)")
    for t, h, w in {tuple(s) for s in shapes.tolist()}:
        if h % cfg.patch_size or w % cfg.patch_size:
            raise ValueError(f"a record of latent size (T, H, W)=({t}, {h}, {w}) is not divisible by the model's "
                             f"patch_size={cfg.patch_size}")
    lengths = np.array([tok.seq_len(tuple(s), *tok.layout_of(cfg)) for s in shapes.tolist()])
    m = length_multiple
    bl = tuple(sorted({-(-int(n) // m) * m for n in lengths})) if not buckets else tuple(sorted({int(b) for b in buckets}))
    if min(bl) <= 0:
        raise ValueError(f"bucket lengths must be positive, got {bl}")
    idx = np.searchsorted(np.asarray(bl), lengths)  # smallest bucket >= length
    if (idx == len(bl)).any():
        bad = int(np.flatnonzero(idx == len(bl))[0])
        raise ValueError(f"record {bad} of latent size {tuple(shapes[bad].tolist())} needs {lengths[bad]} tokens, more than "
                         f"the largest bucket {bl[-1]}; add a bucket >= {lengths[bad]} to config.data.buckets")
    return idx, bl


def batches_per_bucket(bucket_of: np.ndarray, num_buckets: int, global_batch: int) -> np.ndarray:
    """`[num_buckets]` full global batches per epoch (each bucket drops its own remainder)."""
    return np.bincount(bucket_of, minlength=num_buckets) // global_batch


def epoch_batches(bucket_of: np.ndarray, num_buckets: int, global_batch: int, seed: int, epoch: int,
                  shuffle: bool = True) -> np.ndarray:
    """`[num_batches, global_batch]` record indices of one epoch, each row from one bucket."""
    rng = np.random.default_rng((seed, epoch))
    rows = []
    for b in range(num_buckets):
        idx = np.flatnonzero(bucket_of == b)
        if shuffle:
            idx = rng.permutation(idx)
        k = len(idx) // global_batch
        rows.append(idx[: k * global_batch].reshape(k, global_batch))
    rows = np.concatenate(rows)
    return rows[rng.permutation(len(rows))] if shuffle else rows


class _ReadBatch(grain.transforms.MapWithIndex):
    """Global batch k -> this process's block, read, augmented, packed and collated.

    A class (not a closure) so that `mp_prefetch` workers can pickle it.
    """

    def __init__(self, source, cfg, bucket_of, lengths, global_batch, seed, shuffle, process_index, process_count,
                 collate):
        self.source, self.cfg, self.bucket_of, self.lengths = source, cfg, bucket_of, lengths
        self.global_batch, self.shuffle = global_batch, shuffle
        self.shuffle_seed, self.aug_seed = (int(s) for s in np.random.SeedSequence(seed).generate_state(2))
        self.local = global_batch // process_count
        self.offset = process_index * self.local
        self.collate = collate
        self.num_batches = int(batches_per_bucket(bucket_of, len(lengths), global_batch).sum())
        self._plan = (None, None)

    def _epoch(self, epoch: int) -> np.ndarray:
        if self._plan[0] != epoch:  # one epoch's plan at a time: O(N) memory, recomputed per epoch
            self._plan = (epoch, epoch_batches(self.bucket_of, len(self.lengths), self.global_batch,
                                               self.shuffle_seed, epoch, self.shuffle))
        return self._plan[1]

    def map_with_index(self, k: int, _):
        epoch, j = divmod(int(k), self.num_batches)
        rows = self._epoch(epoch)[j, self.offset:self.offset + self.local]
        augment = getattr(self.source, "augment", None)
        elements = []
        for r in rows:
            e = self.source[int(r)]
            if augment is not None:  # per (seed, epoch, record), as pipeline.make_iterator
                e = augment(e, np.random.default_rng((self.aug_seed, epoch * len(self.bucket_of) + int(r))))
            elements.append(e)
        length = self.lengths[self.bucket_of[rows[0]]]
        batch = tok.pack_host([frames_of(e) for e in elements], self.cfg, length)
        batch["cond"] = self.collate(elements)
        batch["index"] = rows.astype(np.int64)
        return batch


def make_bucketed_iterator(source, cfg, *, global_batch: int, seed: int, collate: Callable[[list], dict],
                           buckets: Sequence[int] | None = None, length_multiple: int = 1, shuffle: bool = True,
                           num_epochs: int | None = None, process_index: int = 0, process_count: int = 1,
                           worker_count: int = 0, read_threads: int = 4, prefetch_batches: int = 4):
    """Host-local packed training batches, one token-length bucket per global batch.

    Args:
      source: random-access source; elements carry 'frames' [T, H, W, C] or 'image' [H, W, C] plus
        the task's condition fields; mixed-size sources give `frame_shapes()` -> [N, 3].
      cfg: the model config (patch size, [nextline] / [nextframe] layout).
      global_batch, seed, shuffle, num_epochs, process_index, process_count, worker_count,
        read_threads, prefetch_batches: as `pipeline.make_iterator`.
      collate: `collate(elements) -> dict` of `[local_batch, ...]` numpy condition arrays (the task's).
      buckets: token lengths (None / empty: one per distinct length in the data).
      length_multiple: every bucket length is a multiple of it (`assign_buckets`).

    Returns:
      `(iterator, bucket_lengths)`; `next(iterator)` -> {'tokens' [b, L, p*p*C], 'kind' [b, L],
      'positions' [b, L, 3], 'cond': {...}, 'index' [b] source records}, L one of the buckets;
      `get_state()` / `set_state()` and grain's checkpoint handlers resume exactly.
    """
    from flagdit_jax.data.pipeline import _check_int

    process_count = _check_int("process_count", process_count, 1)
    process_index = _check_int("process_index", process_index, 0, process_count)
    global_batch = _check_int("global_batch", global_batch, 1)
    seed = _check_int("seed", seed, 0, 2**32)
    if global_batch % process_count:
        raise ValueError(f"global_batch {global_batch} is not divisible by process_count {process_count}")
    if num_epochs is not None:
        num_epochs = _check_int("num_epochs", num_epochs, 1)
    if len(source) == 0:
        raise ValueError(f"source {source!r} is empty; expected at least one example")
    bucket_of, lengths = assign_buckets(record_shapes(source), cfg, buckets, length_multiple)
    read = _ReadBatch(source, cfg, bucket_of, lengths, global_batch, seed, shuffle, process_index, process_count,
                      collate)
    if read.num_batches == 0:
        counts = np.bincount(bucket_of, minlength=len(lengths))  # records, not batches: say why none fits
        raise ValueError(f"no bucket holds a full global batch of {global_batch}: records per bucket "
                         f"{dict(zip(lengths, counts.tolist()))}")
    ds = grain.MapDataset.range(read.num_batches).repeat(num_epochs).map_with_index(read)
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=_check_int("read_threads", read_threads, 0),
                                              prefetch_buffer_size=_check_int("prefetch_batches", prefetch_batches, 0)))
    if worker_count > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # see pipeline.make_dataset
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=_check_int("worker_count", worker_count, 0)))
    return iter(ds), lengths

