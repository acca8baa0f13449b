"""Pre-encoded VAE latents in ArrayRecord files, read back through `grain.sources.ArrayRecordDataSource`.

Files: `{path_prefix}-{shard:05d}-of-{num_shards:05d}.array_record`, written with `group_size:1`
(one record per chunk: cheap random access). Shards hold contiguous runs of the input, so record
`i` of the source is row `i` of what was written.

Two record layouts (one record per example), both: 4-byte magic, the label as little-endian int64,
then an array as `.npy` bytes (`np.save`: carries shape and dtype, no pickle):

* `FDL1` (`write_latents`): one latent `[h, w, c]` (e.g. the posterior mean), used as is.
* `FDL2` (`encode_latents`, what `flagdit encode` writes for ImageNet): the VAE posterior of the
  centre crop AND of its mirror image, `[2, 2, h, w, c]` = [flip (0: as cropped, 1: mirrored),
  (mean, std)], float16 by default.

Why moments and not one latent: the reference ImageNet trainer (REFERENCE.md §3, ImageNet column;
Lumina-T2X `Flag-DiT-ImageNet/train.py`, as DiT / SiT) encodes on the fly every step: a random
h-flip of the ADM centre crop, then `vae.encode(x).latent_dist.sample() * 0.18215`. A cache of
one mean latent would silently drop both the flip and the posterior noise. With both posteriors
stored, `LatentSource.augment(element, rng)` (called by the pipelines with the per-(seed, epoch,
record) RNG, as `ImageNetSource.augment`) draws the flip with the same first draw
`rng.random() < 0.5` the pixel source uses, then `z = mean + std * rng.standard_normal()`:
the reference's distribution, deterministic from the seed and new every epoch, for 2x the bytes of
a float32 mean (32 KiB per 32x32x4 latent pair at float16; ~42 GB for ImageNet-1k train).

Latents are stored unscaled, as the VAE encoder emits them; `LatentSource(scale=...)` applies
`(z - shift) * scale` on read (0.18215 for SD-VAE, 0.13025 for SDXL-VAE; shift from the sidecar,
0 for both) so one set of files serves any scale convention.

`encode_latents` also writes a sidecar `{prefix}.json` (format, VAE, scale, image and latent size,
record count, shard count) before any shard, and each shard's `{shard}.json` (its rows) after its
records were renamed into place: a shard without its .json is unfinished. Each process encodes its
own contiguous range of shards, and a rerun skips the finished ones (resume after preemption).
"""

from __future__ import annotations

import concurrent.futures
import glob
import io
import json
import os
import struct

import numpy as np

SD_VAE_SCALE = 0.18215
FORMAT = "flagdit_jax.latents/2"
_MAGIC = b"FDL1"
_MAGIC_MOMENTS = b"FDL2"
_HEADER = struct.Struct("<4sq")  # magic, label


def shard_paths(path_prefix: str, num_shards: int) -> list[str]:
    """The `num_shards` file names `write_latents` uses for `path_prefix`."""
    return [f"{path_prefix}-{i:05d}-of-{num_shards:05d}.array_record" for i in range(num_shards)]


def find_shards(path_prefix: str) -> list[str]:
    """Existing shard files for `path_prefix`, in shard order; FileNotFoundError if none.

    ValueError if files from two different shard counts share the prefix (e.g. a stale write).
    """
    files = sorted(glob.glob(f"{glob.escape(path_prefix)}-[0-9][0-9][0-9][0-9][0-9]-of-[0-9][0-9][0-9][0-9][0-9]"
                             ".array_record"))
    if not files:
        raise FileNotFoundError(f"no latent shards {path_prefix}-NNNNN-of-NNNNN.array_record")
    counts = {f[-len("00000.array_record"):-len(".array_record")] for f in files}
    if len(counts) != 1 or len(files) != int(counts.pop()):
        raise ValueError(f"latent shards for {path_prefix!r} are incomplete or mixed: {files}")
    return files


def encode_record(latent: np.ndarray, label: int) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(latent), allow_pickle=False)
    return _HEADER.pack(_MAGIC, int(label)) + buf.getvalue()


def encode_moments_record(moments: np.ndarray, label: int) -> bytes:
    """`moments [2, 2, h, w, c]` ([flip, (mean, std)]) and a label -> an `FDL2` record."""
    moments = np.asarray(moments)
    if moments.ndim != 5 or moments.shape[:2] != (2, 2):
        raise ValueError(f"moments shape {moments.shape}; expected [2 (flip), 2 (mean, std), h, w, c]")
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(moments), allow_pickle=False)
    return _HEADER.pack(_MAGIC_MOMENTS, int(label)) + buf.getvalue()


def decode_record(record: bytes) -> tuple[np.ndarray, int]:
    """bytes -> (array as stored, label): a latent `[h, w, c]` (FDL1) or moments `[2, 2, h, w, c]` (FDL2)."""
    magic, label = _HEADER.unpack_from(record)
    if magic not in (_MAGIC, _MAGIC_MOMENTS):
        raise ValueError(f"latent record magic {magic!r}; expected {_MAGIC!r} or {_MAGIC_MOMENTS!r} (not written by "
                         "write_latents / encode_latents?)")
    arr = np.load(io.BytesIO(record[_HEADER.size:]), allow_pickle=False)
    if magic == _MAGIC_MOMENTS and (arr.ndim != 5 or arr.shape[:2] != (2, 2)):
        raise ValueError(f"FDL2 record holds shape {arr.shape}; expected [2, 2, h, w, c]")
    return arr, label


def write_latents(path_prefix: str, latents: np.ndarray, labels: np.ndarray, *, num_shards: int = 1,
                  overwrite: bool = False) -> list[str]:
    """Writes `latents [N, h, w, c]` (float16/float32, unscaled) and `labels [N]` to `num_shards` files.

    Returns the file paths. Refuses to mix with existing shards of `path_prefix` unless `overwrite`.
    """
    from array_record.python.array_record_module import ArrayRecordWriter

    latents, labels = np.asarray(latents), np.asarray(labels)
    if latents.ndim != 4:
        raise ValueError(f"latents shape {latents.shape}; expected [N, h, w, c]")
    if latents.dtype not in (np.float16, np.float32):
        raise ValueError(f"latents dtype {latents.dtype}; expected float16 or float32")
    if labels.shape != (latents.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels shape {labels.shape} dtype {labels.dtype}; expected integer [{latents.shape[0]}]")
    n = latents.shape[0]
    if not isinstance(num_shards, (int, np.integer)) or not 1 <= num_shards <= max(n, 1) or n == 0:
        raise ValueError(f"num_shards {num_shards!r} for {n} latents; expected an int in [1, N] and N >= 1")
    try:
        old = find_shards(path_prefix)
    except (FileNotFoundError, ValueError):
        old = glob.glob(f"{glob.escape(path_prefix)}-*-of-*.array_record")
    if old and not overwrite:
        raise FileExistsError(f"{len(old)} shard(s) already exist for {path_prefix!r}; pass overwrite=True")
    for f in old:  # stale shards with another count would otherwise be picked up on read
        os.remove(f)
    os.makedirs(os.path.dirname(os.path.abspath(path_prefix)), exist_ok=True)
    paths = shard_paths(path_prefix, int(num_shards))
    for path, rows in zip(paths, np.array_split(np.arange(n), num_shards)):
        writer = ArrayRecordWriter(path, "group_size:1")
        try:
            for i in rows:
                writer.write(encode_record(latents[i], labels[i]))
        finally:
            writer.close()
    return paths


# --- encoding a pixel source once (`flagdit encode` for ImageNet) ---------------------------------

def sidecar_path(path_prefix: str) -> str:
    return f"{path_prefix}.json"


def shard_meta_path(shard_file: str) -> str:
    return shard_file[: -len(".array_record")] + ".json"


def _write_json(path: str, obj) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)  # atomic: a reader sees the old file or the whole new one


def process_shards(num_shards: int, process_index: int, process_count: int) -> tuple[int, int]:
    """The contiguous shard range `(first, stop)` process `process_index` of `process_count` encodes;
    the ranges of all processes partition `range(num_shards)` (a process may get none)."""
    for name, v, lo in (("num_shards", num_shards, 1), ("process_count", process_count, 1)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
            raise ValueError(f"{name}={v!r}; expected an int >= {lo}")
    if isinstance(process_index, bool) or not isinstance(process_index, (int, np.integer)) \
            or not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index!r}; expected an int in [0, {process_count})")
    return process_index * num_shards // process_count, (process_index + 1) * num_shards // process_count


def _vae_identity(vae, name: str | None) -> dict:
    out = {"class": f"{type(vae).__module__}.{type(vae).__qualname__}", "name": name}
    for attr in ("scaling_factor", "shift_factor", "downsample", "latent_channels"):
        v = getattr(vae, attr, None)
        if isinstance(v, (int, float)):
            out[attr] = v
    return out


class _Posterior:
    """Batched `vae.posterior` of images and their mirror images, sharded over this process's devices."""

    def __init__(self, vae, batch_size: int):
        import copy

        import jax

        self.vae, self.batch_size = vae, batch_size
        devices = jax.local_devices()
        self.sharding = None
        # Both halves (crops, mirrors) split evenly over the local devices: one program, data parallel.
        if len(devices) > 1 and (2 * batch_size) % len(devices) == 0:
            mesh = jax.sharding.Mesh(np.asarray(devices), ("batch",))
            self.sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch"))
            if hasattr(vae, "params"):  # replicate the weights once, not at every call
                self.vae = copy.copy(vae)
                self.vae.params = jax.device_put(vae.params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))

    def __call__(self, images: np.ndarray):
        """`images [b <= batch_size, H, W, C]` -> device arrays (mean, logvar) `[2 * batch_size, h, w, c]`:
        rows [0, batch_size) the crops, [batch_size, 2 * batch_size) their mirrors (zero-padded past b)."""
        import jax

        b = images.shape[0]
        both = np.zeros((2 * self.batch_size, *images.shape[1:]), np.float32)  # padded: one compile per shape
        both[:b], both[self.batch_size:self.batch_size + b] = images, images[:, :, ::-1]
        x = jax.device_put(both, self.sharding) if self.sharding is not None else both
        return self.vae.posterior(x)


def encode_latents(source, vae, path_prefix: str, *, num_shards: int, batch_size: int = 64,
                   dtype: str = "float16", process_index: int | None = None, process_count: int | None = None,
                   vae_name: str | None = None, read_threads: int = 8, overwrite: bool = False,
                   progress: bool = True) -> list[str]:
    """Encodes a fixed-size pixel source into `FDL2` moment shards (module docstring); returns this
    process's shard files. Finished shards (with their .json) are skipped, so a rerun resumes.

    Args:
      source: `len()` and `source[i]` -> {'image' [H, W, C] float in [-1, 1], 'label' int}, every
        record the same size (e.g. `ImageNetSource(random_flip=False)`: the ADM centre crop).
      vae: `vae.posterior(images [B, H, W, C]) -> (mean, logvar)` each `[B, H/f, W/f, c]`
        (`autoencoder.VAE`); its `scaling_factor` / `shift_factor` go to the sidecar.
      path_prefix: files `{path_prefix}-NNNNN-of-NNNNN.array_record` (+ .json) and `{path_prefix}.json`.
      num_shards: shards over contiguous runs of records (`np.array_split`): record i is row i.
      batch_size: crops per VAE call (the call encodes 2x: crops and mirrors); with several local
        devices the 2 * batch_size rows are split over them.
      dtype: 'float16' (default: 11 significant bits, values checked to fit) or 'float32'.
      process_index, process_count: this process writes shards `process_shards(...)` (default:
        `jax.process_index()` / `jax.process_count()`); the process holding shard 0 writes the sidecar.
      vae_name: what the sidecar calls the VAE (e.g. the diffusers folder it came from).
      read_threads: threads decoding and cropping records (JPEG decode dominates on CPU).
      overwrite: re-encode this process's shards even if finished (and replace a sidecar that
        disagrees); otherwise a sidecar from another VAE / size / shard count is a ValueError.
    """
    from array_record.python.array_record_module import ArrayRecordWriter
    from tqdm import tqdm

    n = len(source)
    for name, v, lo in (("num_shards", num_shards, 1), ("batch_size", batch_size, 1), ("read_threads", read_threads, 1)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
            raise ValueError(f"{name}={v!r}; expected an int >= {lo}")
    if n == 0 or num_shards > n:
        raise ValueError(f"num_shards={num_shards} for {n} records; expected 1 <= num_shards <= N and N >= 1")
    if dtype not in ("float16", "float32"):
        raise ValueError(f"dtype={dtype!r}; expected 'float16' or 'float32'")
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    first, stop = process_shards(int(num_shards), process_index, process_count)
    r0 = source[0]
    if "image" not in r0 or "label" not in r0 or np.ndim(r0["image"]) != 3:
        raise ValueError(f"source[0] has {({k: np.shape(v) for k, v in r0.items()})}; expected 'image' [H, W, C] "
                         "and 'label'")
    image_shape = tuple(int(d) for d in np.shape(r0["image"]))
    f = int(getattr(vae, "downsample", 1))
    if image_shape[0] % f or image_shape[1] % f:
        raise ValueError(f"images are {image_shape[:2]}; the VAE needs multiples of its downsampling factor {f}")
    sidecar = {
        "format": FORMAT, "layout": "[flip (0: centre crop, 1: mirrored), (mean, std), h, w, c], unscaled",
        "num_records": n, "num_shards": int(num_shards), "dtype": dtype, "image_shape": list(image_shape),
        "latent_shape": [image_shape[0] // f, image_shape[1] // f, int(getattr(vae, "latent_channels", 0)) or None],
        "vae": _vae_identity(vae, vae_name), "latent_scale": float(getattr(vae, "scaling_factor", 1.0)),
        "latent_shift": float(getattr(vae, "shift_factor", None) or 0.0), "source": repr(source)}
    side = sidecar_path(path_prefix)
    if os.path.exists(side) and not overwrite:
        with open(side) as fh:
            old = json.load(fh)
        diff = sorted(k for k in sidecar if k != "source" and old.get(k) != sidecar[k])
        if diff:
            raise ValueError(f"{side} was written for another encode ({', '.join(f'{k}: {old.get(k)!r} -> {sidecar[k]!r}' for k in diff)}); "
                             "pass overwrite=True (`flagdit encode --overwrite`) or another data_dir")
    os.makedirs(os.path.dirname(os.path.abspath(path_prefix)), exist_ok=True)
    if first == 0:  # first, so that readers can tell an unfinished cache (shards without .json) from a stale one
        if overwrite:  # shards of another count would make the prefix unreadable (find_shards: "mixed")
            keep = set(shard_paths(path_prefix, int(num_shards)))
            pattern = f"{glob.escape(path_prefix)}-[0-9][0-9][0-9][0-9][0-9]-of-[0-9][0-9][0-9][0-9][0-9]"
            for stale in glob.glob(pattern + ".array_record"):
                if stale not in keep:
                    os.remove(stale)
                    if os.path.exists(shard_meta_path(stale)):
                        os.remove(shard_meta_path(stale))
        _write_json(side, sidecar)

    files = shard_paths(path_prefix, int(num_shards))[first:stop]
    rows_of = np.array_split(np.arange(n), num_shards)
    todo = [(s, p) for s, p in zip(range(first, stop), files)
            if overwrite or not (os.path.exists(p) and os.path.exists(shard_meta_path(p)))]
    store = np.dtype(dtype)
    posterior = _Posterior(vae, int(batch_size))
    with concurrent.futures.ThreadPoolExecutor(int(read_threads)) as pool, \
            tqdm(total=sum(len(rows_of[s]) for s, _ in todo), desc=f"encoding {path_prefix}", disable=not progress,
                 unit="img") as bar:
        for s, path in todo:
            for stale in [shard_meta_path(path), path, *glob.glob(f"{glob.escape(path)}.tmp*")]:
                if os.path.exists(stale):
                    os.remove(stale)
            rows = rows_of[s]
            batches = [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
            tmp = f"{path}.tmp{os.getpid()}"
            writer = ArrayRecordWriter(tmp, "group_size:1")
            try:
                reads = pool.map(source.__getitem__, [int(i) for i in batches[0]])
                for k, batch in enumerate(batches):
                    records = list(reads)
                    if k + 1 < len(batches):  # decode the next batch while the device encodes this one
                        reads = pool.map(source.__getitem__, [int(i) for i in batches[k + 1]])
                    images = np.stack([np.asarray(r["image"], np.float32) for r in records])
                    if images.shape[1:] != image_shape:
                        bad = next(int(i) for i, r in zip(batch, records) if np.shape(r["image"]) != image_shape)
                        raise ValueError(f"record {bad} has image shape {np.shape(source[bad]['image'])}; record 0 "
                                         f"has {image_shape} (encode_latents needs one size)")
                    mean, logvar = (np.asarray(a, np.float32) for a in posterior(images))
                    moments = np.stack([mean, np.exp(0.5 * logvar)], axis=1)  # [2B, 2, h, w, c]
                    b = len(batch)
                    pairs = np.stack([moments[:b], moments[batch_size:batch_size + b]], axis=1)  # [b, 2, 2, h, w, c]
                    if not np.isfinite(pairs).all():
                        raise ValueError(f"vae.posterior gave non-finite values for records {batch.tolist()}")
                    if store == np.float16 and np.abs(pairs).max() > np.finfo(np.float16).max:
                        raise ValueError(f"posterior values reach {np.abs(pairs).max():.4g}, beyond float16; pass "
                                         "dtype='float32'")
                    for i, r, m in zip(batch, records, pairs.astype(store)):
                        writer.write(encode_moments_record(m, int(r["label"])))
                    bar.update(b)
            finally:
                writer.close()
            os.replace(tmp, path)
            _write_json(shard_meta_path(path), {"rows": [int(rows[0]), int(rows[-1]) + 1], "format": FORMAT})
    return files


class LatentSource:
    """Grain random-access source over latent shards (`write_latents` or `encode_latents` files).

    `source[i]` -> `{'image': [h, w, c] float32 ((stored latent - shift) * scale), 'label': int32}`;
    for moment files the latent is the posterior mean of the centre crop and, when `random_flip` or
    `sample_posterior`, the element also carries 'posterior' `[2, 2, h, w, c]` which
    `augment(element, rng)` turns into a flipped and/or sampled latent (module docstring).

    Args:
      files: a path prefix given to `write_latents` / `encode_latents`, or an explicit list of shard files.
      scale: multiplied into every latent on read (VAE scaling factor); must match the sidecar's
        VAE when there is one.
      random_flip: moment files: `augment` picks the mirrored crop's posterior w.p. 1/2.
      sample_posterior: moment files: `augment` draws z = mean + std * eps (else the mean).
    """

    def __init__(self, files: str | os.PathLike | list[str], *, scale: float = SD_VAE_SCALE,
                 random_flip: bool = True, sample_posterior: bool = True):
        import grain

        self.info, self.shift = None, 0.0
        if isinstance(files, (str, os.PathLike)):
            prefix = os.fspath(files)
            self.files = find_shards(prefix)
            if os.path.isfile(sidecar_path(prefix)):
                self._check_sidecar(prefix, scale)
        else:
            self.files = list(files)
        if not self.files:
            raise ValueError("LatentSource got an empty file list; expected shard paths or a path prefix")
        self.scale = float(scale)
        self.random_flip, self.sample_posterior = bool(random_flip), bool(sample_posterior)
        self._src = grain.sources.ArrayRecordDataSource(self.files)
        if self.info is not None and len(self._src) != self.info["num_records"]:
            raise ValueError(f"the shards hold {len(self._src)} records; the sidecar says {self.info['num_records']}")

    def _check_sidecar(self, prefix: str, scale: float) -> None:
        with open(sidecar_path(prefix)) as f:
            info = json.load(f)
        if info.get("format") != FORMAT:
            raise ValueError(f"{sidecar_path(prefix)} has format {info.get('format')!r}; expected {FORMAT!r}")
        if len(self.files) != info["num_shards"]:
            raise ValueError(f"{prefix!r} has {len(self.files)} shards; its sidecar says {info['num_shards']}")
        unfinished = [f for f in self.files if not os.path.isfile(shard_meta_path(f))]
        if unfinished:
            raise FileNotFoundError(f"{len(unfinished)} of {len(self.files)} shards of {prefix!r} are unfinished (no "
                                    f".json, e.g. {unfinished[0]}): rerun `flagdit encode` to finish them")
        if not np.isclose(scale, info["latent_scale"], rtol=1e-6):
            raise ValueError(f"scale={scale} but {prefix!r} was encoded by a VAE with scaling_factor "
                             f"{info['latent_scale']}; set config.data.options.scale={info['latent_scale']}")
        self.info, self.shift = info, float(info.get("latent_shift", 0.0))

    def __len__(self) -> int:
        return len(self._src)

    def _decode(self, record: bytes) -> dict[str, np.ndarray]:
        arr, label = decode_record(record)
        if arr.ndim == 5:  # FDL2 moments
            out = {"image": self._scaled(arr[0, 0]), "label": np.int32(label)}
            if self.random_flip or self.sample_posterior:
                out["posterior"] = arr
            return out
        return {"image": self._scaled(arr), "label": np.int32(label)}

    def _scaled(self, z: np.ndarray) -> np.ndarray:
        return (z.astype(np.float32) - np.float32(self.shift)) * np.float32(self.scale)

    def augment(self, element: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Moment files: flip (w.p. 1/2, the same first draw as `ImageNetSource.augment`) and posterior
        sample from `rng`; returns a new dict without 'posterior'. Other elements pass through."""
        if "posterior" not in element:
            return element
        out = {k: v for k, v in element.items() if k != "posterior"}
        moments = element["posterior"]
        flip = bool(self.random_flip and rng.random() < 0.5)
        mean, std = (m.astype(np.float32) for m in moments[int(flip)])
        z = mean + std * rng.standard_normal(mean.shape, dtype=np.float32) if self.sample_posterior else mean
        out["image"] = self._scaled(z)
        return out

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return self._decode(self._src[int(index)])

    def __getitems__(self, indices) -> list[dict[str, np.ndarray]]:
        # Batched read: grain's ArrayRecord source fetches many records in one call.
        return [self._decode(r) for r in self._src.__getitems__([int(i) for i in indices])]

    def __repr__(self) -> str:
        return f"LatentSource({len(self.files)} shards, n={len(self)}, scale={self.scale})"
