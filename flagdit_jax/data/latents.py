"""Pre-encoded VAE latents in ArrayRecord files, read back through `grain.sources.ArrayRecordDataSource`.

Files: `{path_prefix}-{shard:05d}-of-{num_shards:05d}.array_record`, written with `group_size:1`
(one record per chunk: cheap random access). Shards hold contiguous runs of the input, so record
`i` of the source is row `i` of what was written.

Record layout (one per example): 4-byte magic `FDL1`, the label as little-endian int64, then the
latent as `.npy` bytes (`np.save`: carries shape and dtype, no pickle). Latents are stored
unscaled, as the VAE encoder emits them; `LatentSource(scale=...)` multiplies on read (0.18215
for SD-VAE, 0.13025 for SDXL-VAE) so one set of files serves any scale convention.
"""

from __future__ import annotations

import glob
import io
import os
import struct

import numpy as np

SD_VAE_SCALE = 0.18215
_MAGIC = b"FDL1"
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


def decode_record(record: bytes) -> tuple[np.ndarray, int]:
    """bytes -> (latent as stored, label)."""
    magic, label = _HEADER.unpack_from(record)
    if magic != _MAGIC:
        raise ValueError(f"latent record magic {magic!r}; expected {_MAGIC!r} (not written by write_latents?)")
    return np.load(io.BytesIO(record[_HEADER.size:]), allow_pickle=False), label


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


class LatentSource:
    """Grain random-access source over latent shards.

    `source[i]` -> `{'image': [h, w, c] float32 (stored latent * scale), 'label': int32 scalar}`.

    Args:
      files: a path prefix given to `write_latents`, or an explicit list of shard files (in order).
      scale: multiplied into every latent on read (VAE scaling factor).
    """

    def __init__(self, files: str | os.PathLike | list[str], *, scale: float = SD_VAE_SCALE):
        import grain

        self.files = find_shards(os.fspath(files)) if isinstance(files, (str, os.PathLike)) else list(files)
        if not self.files:
            raise ValueError("LatentSource got an empty file list; expected shard paths or a path prefix")
        self.scale = float(scale)
        self._src = grain.sources.ArrayRecordDataSource(self.files)

    def __len__(self) -> int:
        return len(self._src)

    def _decode(self, record: bytes) -> dict[str, np.ndarray]:
        latent, label = decode_record(record)
        return {"image": latent.astype(np.float32) * np.float32(self.scale), "label": np.int32(label)}

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return self._decode(self._src[int(index)])

    def __getitems__(self, indices) -> list[dict[str, np.ndarray]]:
        # Batched read: grain's ArrayRecord source fetches many records in one call.
        return [self._decode(r) for r in self._src.__getitems__([int(i) for i in indices])]

    def __repr__(self) -> str:
        return f"LatentSource({len(self.files)} shards, n={len(self)}, scale={self.scale})"
