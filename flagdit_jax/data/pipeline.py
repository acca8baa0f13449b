"""Deterministic, checkpointable, process-sharded input pipelines on grain's `MapDataset` API.

API choice: `grain.MapDataset` (not `grain.DataLoader`). Every stage is a pure function of the
element index, so the iterator's whole state is one integer (`{'next_index': k}`, the number of
batches handed out): `get_state()` / `set_state()` and `grain.checkpoint.CheckpointSave` /
`CheckpointRestore` resume bit-exactly, whatever the thread or worker count.

The pipeline, per process:

    source -> map_with_index(augment, +index) -> shuffle(seed) -> repeat(num_epochs)
           -> [:usable] -> batch(global_batch // process_count) -> [process_index::process_count]
           -> to_iter_dataset(threads) -> mp_prefetch(workers)

* One global stream: shuffle and augmentation run on the whole source with the same seed on
  every process; the stream is cut into host-local batches and each process takes every
  `process_count`-th of them (with `drop_remainder`: the finite stream is cut to a multiple of
  `global_batch` first, so all processes make the same number of steps). At step `s`, row `r` of
  process `p` is global-stream element `s * global_batch + p * local_batch + r`: process p holds
  the contiguous block p of the global batch, exactly where `jax.make_array_from_process_local_data`
  puts it, so the global batch does not depend on the number of hosts. Reads stay local: a
  process only reads its own elements.
* Each epoch is reshuffled (grain folds the epoch into the shuffle seed).
* Augmentation (sources with an `augment(element, rng)` method, e.g. ImageNet's flip) draws from
  `np.random.default_rng((aug_seed, i))`, `i = epoch * len(source) + record`: fixed by the seed,
  new each epoch.
* Batching happens on the `MapDataset` (one map element = one batch), so `mp_prefetch` workers
  produce whole batches and the batches are the same for every `worker_count`.
"""

from __future__ import annotations

import numpy as np

import grain

# The embedded modalities (issue 14): name -> (module, class). Each is a captioned source made by code:
# elements {'frames' [T, H, W, C], 'cap_feats', 'cap_mask', ...}, `null_caption()`, `frame_shapes()`; a
# `save_media(stem, frames) -> [paths]` (GIF / WAV beside the PNG strip) and an eval module (evaluate.py).
MODALITY_SOURCES = {
    "moving_mnist": ("flagdit_jax.data.moving_mnist", "MovingMnistSource"),  # text-to-video
    "multiview": ("flagdit_jax.data.multiview", "MultiViewSource"),          # text-to-multi-view
    "sounds": ("flagdit_jax.data.sounds", "SoundSource"),                    # text-to-audio spectrograms
}
SOURCES = ("mnist", "mnist_captions", "imagenet", "latents", "mnist_t2i", "image_text", "encoded", "mnist_joint",
           *MODALITY_SOURCES)
# Sources whose elements carry caption embeddings + masks and that give null_caption() (the caption task).
# 'mnist_t2i' and 'image_text' are raw (pixels + text): `encoded.encode_dataset` turns them into 'encoded'.
CAPTIONED_SOURCES = ("mnist_captions", "encoded", *MODALITY_SOURCES)
# Sources whose elements carry a second modality, 'text' [S, D] tokens (the joint task).
JOINT_SOURCES = ("mnist_joint",)


def get_source(name: str, split: str = "train", **kwargs):
    """Factory: 'mnist' (no options), 'mnist_captions' (`CaptionedMnistSource` kwargs: cap_dim,
    cap_len, shapes), 'imagenet' (`ImageNetSource` kwargs), 'latents', 'mnist_t2i' (`MnistT2I`
    kwargs: seed, repeats), 'image_text' (`ImageTextFolder`: `path=` a folder or .jsonl manifest of
    this split, plus its crop kwargs) or 'encoded' (`EncodedSource`).

    'latents' and 'encoded' take `path_prefix=` (as given to `write_latents` / `encode_dataset`) or
    `data_dir=` (files `{data_dir}/{split}-NNNNN-of-NNNNN.array_record`), plus `scale=` ('latents')
    or `cap_len=` ('encoded'). 'mnist_joint': digits + text tokens for the joint model (`JointMnistSource`
    kwargs: text_dim). The embedded modalities (`MODALITY_SOURCES`) take their class's kwargs.
    """
    if name == "mnist":
        from flagdit_jax.data.mnist import MnistSource

        if kwargs:
            raise ValueError(f"the mnist source takes no options, got {sorted(kwargs)}")
        return MnistSource(split)
    if name == "mnist_captions":
        from flagdit_jax.data.captioned import CaptionedMnistSource

        return CaptionedMnistSource(split, **kwargs)
    if name == "mnist_joint":
        from flagdit_jax.data.joint_mnist import JointMnistSource

        return JointMnistSource(split, **kwargs)
    if name in MODALITY_SOURCES:
        import importlib

        module, cls = MODALITY_SOURCES[name]
        return getattr(importlib.import_module(module), cls)(split, **kwargs)
    if name == "imagenet":
        from flagdit_jax.data.imagenet import ImageNetSource

        return ImageNetSource(split, **kwargs)
    if name == "mnist_t2i":
        from flagdit_jax.data.mnist_t2i import MnistT2I

        return MnistT2I(split, **kwargs)
    if name == "image_text":
        from flagdit_jax.data.image_text import ImageTextFolder

        if "path" not in kwargs:
            raise ValueError(f"the image_text source needs path= (a folder or .jsonl manifest), got {sorted(kwargs)}")
        return ImageTextFolder(kwargs.pop("path"), **kwargs)
    if name in ("latents", "encoded"):
        import os

        if split not in ("train", "eval"):
            raise ValueError(f"{name} split {split!r}; expected one of ('train', 'eval')")
        prefix, data_dir = kwargs.pop("path_prefix", None), kwargs.pop("data_dir", None)
        if (prefix is None) == (data_dir is None):
            raise ValueError(f"the {name} source needs exactly one of path_prefix= or data_dir=, "
                             f"got path_prefix={prefix!r}, data_dir={data_dir!r}")
        prefix = prefix if prefix is not None else os.path.join(data_dir, split)
        if name == "encoded":
            from flagdit_jax.data.encoded import EncodedSource

            return EncodedSource(prefix, **kwargs)
        from flagdit_jax.data.latents import LatentSource

        return LatentSource(prefix, **kwargs)
    raise ValueError(f"unknown data source {name!r}; expected one of {SOURCES}")


class _AugmentAndIndex(grain.transforms.MapWithIndex):
    """Applies `augment(element, default_rng((seed, i)))` and/or adds 'index' = record index.

    A class, not a closure, so that `mp_prefetch` workers can pickle it.
    """

    def __init__(self, augment, seed: int, n: int, return_index: bool):
        self.augment, self.seed, self.n, self.return_index = augment, seed, n, return_index

    def map_with_index(self, index: int, element):
        if self.augment is not None:
            element = self.augment(element, np.random.default_rng((self.seed, index)))
        if self.return_index:
            element = dict(element, index=np.int64(index % self.n))
        return element


def _check_int(name: str, value, lo: int, hi: int | None = None) -> int:
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if not ok or value < lo or (hi is not None and value >= hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi})"
        raise ValueError(f"{name} {value!r}; expected an int {rng}")
    return int(value)


def make_dataset(source, *, global_batch: int, seed: int, shuffle: bool = True, num_epochs: int | None = None,
                 process_index: int | None = None, process_count: int | None = None, worker_count: int = 0,
                 read_threads: int = 4, prefetch_batches: int = 4,
                 return_index: bool = False) -> grain.IterDataset:
    """The `grain.IterDataset` behind `make_iterator` (same arguments)."""
    if process_index is None or process_count is None:
        import jax  # only for the default: tests and tools pass both explicitly

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    process_count = _check_int("process_count", process_count, 1)
    process_index = _check_int("process_index", process_index, 0, process_count)
    global_batch = _check_int("global_batch", global_batch, 1)
    if global_batch % process_count:
        raise ValueError(f"global_batch {global_batch} is not divisible by process_count {process_count}")
    seed = _check_int("seed", seed, 0, 2**32)
    if num_epochs is not None:
        num_epochs = _check_int("num_epochs", num_epochs, 1)
    worker_count = _check_int("worker_count", worker_count, 0)
    n = len(source)
    if n == 0:
        raise ValueError(f"source {source!r} is empty; expected at least one example")
    shuffle_seed, aug_seed = (int(s) for s in np.random.SeedSequence(seed).generate_state(2))

    ds = grain.MapDataset.source(source)
    augment = getattr(source, "augment", None)
    if augment is not None or return_index:
        # Before shuffle: the index seen here is `epoch * n + record`, independent of the process count.
        ds = ds.map_with_index(_AugmentAndIndex(augment, aug_seed, n, return_index))
    if shuffle:
        ds = ds.shuffle(seed=shuffle_seed)
    ds = ds.repeat(num_epochs)  # None: len(ds) == sys.maxsize, i.e. endless
    usable = len(ds) // global_batch * global_batch
    if usable == 0:
        raise ValueError(f"{n} examples x {num_epochs} epoch(s) give no full global batch of {global_batch}")
    # Host-local batches are contiguous blocks of the global batch: block p of global batch g is
    # local batch g*P + p. `jax.make_array_from_process_local_data` places process p's rows at
    # [p*b, (p+1)*b), so the global batch (and the per-row noise drawn for it) is the same for any
    # number of hosts.
    ds = ds[:usable].batch(global_batch // process_count, drop_remainder=True)
    ds = ds[process_index::process_count]
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=_check_int("read_threads", read_threads, 0),
                                              prefetch_buffer_size=_check_int("prefetch_batches",
                                                                              prefetch_batches, 0)))
    if worker_count > 0:
        from absl import flags

        # grain 0.2.18 reads its absl flag `grain_enable_multiprocess_worker_profiling` when it starts
        # workers (jax's profiler is loaded) and raises UnparsedFlagAccessError outside `absl.app.run`:
        # fall back to the flags' defaults then. Under absl.app the real command line stays in force.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return ds


def make_iterator(source, *, global_batch: int, seed: int, shuffle: bool = True, num_epochs: int | None = None,
                  process_index: int | None = None, process_count: int | None = None, worker_count: int = 0,
                  read_threads: int = 4, prefetch_batches: int = 4,
                  return_index: bool = False) -> grain.DatasetIterator:
    """Host-local batches: dicts of numpy arrays with leading axis `global_batch // process_count`.

    Args:
      source: random-access source (`__len__`, `__getitem__` -> dict of arrays); an optional
        `augment(element, rng)` method is applied with a per-(seed, epoch, record) RNG.
      global_batch: examples per step over all processes; must divide by `process_count`.
      seed: int in [0, 2**32): fixes shuffle order and augmentation.
      shuffle: reshuffle every epoch (False: source order).
      num_epochs: None repeats forever; else the iterator ends after
        `num_epochs * len(source) // global_batch` steps (the remainder is dropped).
      process_index, process_count: this host's shard (default: `jax.process_index()` /
        `jax.process_count()`); pass them explicitly to simulate hosts.
      worker_count: `mp_prefetch` worker processes (0: threads in this process only).
      read_threads, prefetch_batches: `grain.ReadOptions` (threads, batches buffered ahead).
      return_index: add 'index' `[local_batch]` int64, the source record of each row.

    Returns:
      A `grain.DatasetIterator`: `next(it)` -> e.g. `{'image': [B, H, W, C] float32, 'label': [B] int32}`;
      `it.get_state()` / `it.set_state(state)` and `grain.checkpoint.CheckpointSave(it)` resume exactly.
    """
    return iter(make_dataset(source, global_batch=global_batch, seed=seed, shuffle=shuffle, num_epochs=num_epochs,
                             process_index=process_index, process_count=process_count, worker_count=worker_count,
                             read_threads=read_threads, prefetch_batches=prefetch_batches,
                             return_index=return_index))
