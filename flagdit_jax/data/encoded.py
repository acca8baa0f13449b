"""The caption-embedding cache: VAE latents + text-encoder features, written once, read in training.

Training never runs the VAE or the text encoder (the official T2I trainers run both at every step,
LT `lumina_t2i/train.py`; here they run once over the data). `encode_dataset` takes a raw source
(`source[i]` -> {'image' [H, W, C] in [-1, 1], 'caption' str, integer metadata...}, e.g.
`mnist_t2i.MnistT2I` or `image_text.ImageTextFolder`; or clips, 'frames' [T, H, W, C] instead of
'image', e.g. `moving_mnist.MovingMnistSource(raw=True)`, whose frames go through the VAE one by
one, as the video papers encode theirs), and writes

  {prefix}-{s:05d}-of-{n:05d}.array_record   one record per example, shards hold contiguous runs
  {prefix}-{s:05d}-of-{n:05d}.json           that shard's rows, latent shapes and caption lengths
  {prefix}.json                              the sidecar: encoders, latent scale, caption width,
                                             the null caption (the encoder's output for "")

The shard's .json is written after its records, so a shard without one is an unfinished write.
`EncodedSource` reads them back as a captioned training source (the protocol of `captioned.py`).

Record layout: magic `FDT1`, a little-endian uint32 field count, then per field a uint16 name length,
a uint64 data length, the UTF-8 name and the field as `.npy` bytes (shape and dtype, no pickle):
'latent' [h, w, c] float32 (scaled, as `vae.encode` returns it; [T, h, w, c] for a clip, frame k the
encoding of frame k alone), 'cap_feats' [s_i, D] (trimmed to
the caption's own length), 'caption' (the text, a 0-d unicode array) and every integer metadata
field of the raw record ('label', 'size', 'box', ...).

Caption features are stored as float16 by default: a token's features are a few KiB at fp32
(D = 2048 for Gemma-2B, 4096 for LLaMA-2-7B, up to 128-256 tokens: ~1-4 MiB per caption), so the
cache would be dominated by them; fp16 keeps 11 significant bits, more than the bf16 the model
computes in, and `encode_dataset` refuses values outside fp16's range (say `cap_dtype='float32'`
then). The null caption in the sidecar and the latents stay float32.
"""

from __future__ import annotations

import glob
import io
import json
import os
import struct

import numpy as np

from flagdit_jax.data.latents import find_shards, shard_paths

FORMAT = "flagdit_jax.encoded/1"
_MAGIC = b"FDT1"
_COUNT = struct.Struct("<4sI")
_FIELD = struct.Struct("<HQ")
_RESERVED = ("image", "caption", "latent", "cap_feats", "cap_mask", "frames")


# --- records ------------------------------------------------------------------------------------

def encode_record(fields: dict[str, np.ndarray]) -> bytes:
    """`{name: array}` -> bytes (the layout in the module docstring)."""
    out = [_COUNT.pack(_MAGIC, len(fields))]
    for name, value in fields.items():
        buf = io.BytesIO()
        np.save(buf, np.asarray(value), allow_pickle=False)  # not ascontiguousarray: it makes 0-d arrays 1-d
        key = name.encode("utf-8")
        out += [_FIELD.pack(len(key), buf.tell()), key, buf.getvalue()]
    return b"".join(out)


def decode_record(record: bytes) -> dict[str, np.ndarray]:
    """bytes -> `{name: array}` as stored."""
    magic, count = _COUNT.unpack_from(record)
    if magic != _MAGIC:
        raise ValueError(f"encoded record magic {magic!r}; expected {_MAGIC!r} (not written by encode_dataset?)")
    fields, pos = {}, _COUNT.size
    for _ in range(count):
        n_key, n_data = _FIELD.unpack_from(record, pos)
        pos += _FIELD.size
        name = record[pos:pos + n_key].decode("utf-8")
        pos += n_key
        fields[name] = np.load(io.BytesIO(record[pos:pos + n_data]), allow_pickle=False)
        pos += n_data
    return fields


# --- writing ------------------------------------------------------------------------------------

def sidecar_path(path_prefix: str) -> str:
    return f"{path_prefix}.json"


def shard_meta_path(shard_file: str) -> str:
    return shard_file[: -len(".array_record")] + ".json"


def _identity(obj) -> dict:
    """What names an encoder in the sidecar: its class and any plain name/path/kind attributes."""
    out = {"class": f"{type(obj).__module__}.{type(obj).__qualname__}"}
    for attr in ("name", "path", "kind", "model_type", "max_length", "scaling_factor", "shift_factor", "downsample"):
        v = getattr(obj, attr, None)
        if isinstance(v, (str, int, float, bool)) and not callable(v):
            out[attr] = v
    return out


def _valid_length(mask: np.ndarray, what: str) -> int:
    """Length of a right-padded caption mask ([True]*n + [False]*rest); ValueError otherwise."""
    n = int(mask.sum())
    if n == 0 or not mask[:n].all():
        raise ValueError(f"caption mask of {what} is {mask.astype(int).tolist()}; expected a right-padded mask "
                         "(True for the first n >= 1 tokens, then False)")
    return n


def _encode_text(text_encoder, captions: list[str], what: str) -> tuple[np.ndarray, np.ndarray]:
    feats, mask = text_encoder(list(captions))
    feats, mask = np.asarray(feats, np.float32), np.asarray(mask, bool)
    if feats.ndim != 3 or feats.shape[0] != len(captions) or mask.shape != feats.shape[:2]:
        raise ValueError(f"text_encoder({len(captions)} captions) gave feats {feats.shape} and mask {mask.shape} "
                         f"for {what}; expected [B, S, D] and [B, S] with B={len(captions)}")
    if not np.isfinite(feats[mask]).all():
        raise ValueError(f"text_encoder gave non-finite features for {what}")
    return feats, mask


def _write_json(path: str, obj) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def _metadata(record: dict, index: int) -> dict[str, np.ndarray]:
    """The raw record's integer fields (scalars or arrays); other fields are not cached."""
    out = {}
    for k, v in record.items():
        if k in _RESERVED or isinstance(v, str):
            continue
        a = np.asarray(v)
        if a.dtype.kind in "iub":
            out[k] = a
    if ("image" in record) == ("frames" in record) or "caption" not in record:
        raise ValueError(f"raw record {index} has keys {sorted(record)}; expected 'caption' str and one of "
                         "'image' [H, W, C] or 'frames' [T, H, W, C]")
    return out


def _clip(record: dict, index: int) -> tuple[np.ndarray, bool]:
    """A raw record's pixels as a clip `[T, H, W, C]` float32, and whether it is one ('frames') rather
    than an image ('image', T = 1)."""
    if "frames" in record:
        clip = np.asarray(record["frames"], np.float32)
        if clip.ndim != 4 or clip.shape[0] < 1:
            raise ValueError(f"raw record {index} 'frames' has shape {clip.shape}; expected [T >= 1, H, W, C]")
        return clip, True
    image = np.asarray(record["image"], np.float32)
    if image.ndim != 3:
        raise ValueError(f"raw record {index} 'image' has shape {image.shape}; expected [H, W, C]")
    return image[None], False


class _ShardEncoder:
    """Reads one shard's records, encodes same-size images (or clips: same T too) in batches, writes
    in index order."""

    def __init__(self, source, vae, text_encoder, rows, *, batch_size, sample_posterior, seed, cap_dtype,
                 cap_dim, writer, progress):
        self.source, self.vae, self.text_encoder = source, vae, text_encoder
        self.batch_size, self.sample_posterior, self.seed = batch_size, sample_posterior, seed
        self.cap_dtype, self.cap_dim, self.writer, self.progress = cap_dtype, cap_dim, writer, progress
        self.rows, self.done, self.next = rows, {}, 0
        self.shapes, self.cap_lens, self.meta_keys, self.is_clip = [], [], None, None

    def run(self):
        pending: dict[tuple, list] = {}
        # Results wait in `done` until every earlier row is written; a rare image size would hold back
        # the whole shard, so its part-filled batch is encoded early once this many results wait.
        limit = 8 * self.batch_size
        for i in self.rows:
            r = self.source[int(i)]
            meta = _metadata(r, int(i))
            image, is_clip = _clip(r, int(i))
            caption = r["caption"]
            if self.is_clip is None:
                self.is_clip = is_clip
            elif is_clip != self.is_clip:  # one latent rank per cache: the reader's shapes are one table
                raise ValueError(f"raw record {i} has {'frames' if is_clip else 'image'}, record {self.rows[0]} had "
                                 f"{'frames' if self.is_clip else 'image'}; a cache holds images or clips, not both")
            if not isinstance(caption, str):
                raise ValueError(f"raw record {i} 'caption' is {type(caption).__name__}; expected str")
            if self.meta_keys is None:
                self.meta_keys = sorted(meta)
            elif sorted(meta) != self.meta_keys:
                raise ValueError(f"raw record {i} has metadata {sorted(meta)}, record {self.rows[0]} had "
                                 f"{self.meta_keys}; every record needs the same fields")
            group = pending.setdefault(image.shape, [])
            group.append((int(i), image, caption, meta))
            if len(group) == self.batch_size:
                self._encode(pending.pop(image.shape))
            while len(self.done) > limit:
                blocking = int(self.rows[self.next])
                self._encode(pending.pop(next(k for k, g in pending.items() if g[0][0] == blocking)))
        for group in pending.values():
            self._encode(group)
        if self.next != len(self.rows):
            raise RuntimeError(f"wrote {self.next} of {len(self.rows)} records")  # a bug, not bad input

    def _encode(self, group):
        idx = [g[0] for g in group]
        clips = np.stack([g[1] for g in group])  # [B, T, H, W, C]: same shape within a group
        b, t = clips.shape[:2]
        images = clips.reshape(b * t, *clips.shape[2:])  # every frame on its own through the VAE
        if self.sample_posterior:
            import jax

            key = jax.random.fold_in(jax.random.key(self.seed), idx[0])
            latents = self.vae.encode(images, sample=True, rng=key)
        else:
            latents = self.vae.encode(images)
        latents = np.asarray(latents, np.float32)
        if latents.ndim != 4 or latents.shape[0] != b * t:
            raise ValueError(f"vae.encode(images {images.shape}) gave {latents.shape}; expected [B, h, w, c]")
        latents = latents.reshape(b, t, *latents.shape[1:])
        if not self.is_clip:
            latents = latents[:, 0]
        if not np.isfinite(latents).all():
            raise ValueError(f"vae.encode gave non-finite latents for records {idx}")
        feats, mask = _encode_text(self.text_encoder, [g[2] for g in group], f"records {idx}")
        if feats.shape[2] != self.cap_dim:
            raise ValueError(f"text_encoder gave width {feats.shape[2]} for records {idx}, {self.cap_dim} for \"\"")
        for b, (i, _, caption, meta) in enumerate(group):
            n = _valid_length(mask[b], f"record {i}")
            cap = feats[b, :n]
            if self.cap_dtype == np.float16 and np.abs(cap).max() > np.finfo(np.float16).max:
                raise ValueError(f"record {i}'s caption features reach {np.abs(cap).max():.4g}, beyond float16; "
                                 "pass cap_dtype='float32'")
            fields = {"latent": latents[b], "cap_feats": cap.astype(self.cap_dtype),
                      "caption": np.array(caption), **meta}
            self.done[i] = (encode_record(fields), latents[b].shape, n)
        while self.next < len(self.rows) and int(self.rows[self.next]) in self.done:
            data, shape, n = self.done.pop(int(self.rows[self.next]))
            self.writer.write(data)
            self.shapes.append([int(s) for s in shape])
            self.cap_lens.append(n)
            self.next += 1
            self.progress.update(1)


def encode_dataset(raw_source, vae, text_encoder, path_prefix: str, *, num_shards: int = 1, batch_size: int = 16,
                   sample_posterior: bool = False, seed: int = 0, cap_dtype: str = "float16",
                   shard_range: tuple[int, int] | None = None, overwrite: bool = False,
                   progress: bool = True) -> list[str]:
    """Encodes `raw_source` once and writes the cache (module docstring); returns the shard files written.

    Args:
      raw_source: `len()` and `source[i]` -> {'image' [H, W, C] float in [-1, 1], 'caption' str, ...},
        or clips: 'frames' [T, H, W, C] instead of 'image' (all records one or the other; T may vary,
        each frame is encoded alone); integer fields ('label', 'size', 'box', ...) are kept as metadata.
      vae: `vae.encode(images [B, H, W, C]) -> scaled latents [B, h, w, c]`; with
        `sample_posterior`, `vae.encode(images, sample=True, rng=jax key)` (key = fold_in(key(seed),
        first record of the batch)). Its `scaling_factor` / `shift_factor` / `downsample` go to the sidecar.
      text_encoder: `text_encoder(list[str]) -> (feats [B, S, D] float32, mask [B, S] bool)`, right-padded.
      path_prefix: files `{path_prefix}-NNNNN-of-NNNNN.array_record` (+ .json), `{path_prefix}.json`.
      num_shards: shards over contiguous runs of records (`np.array_split`), record i is row i.
      batch_size: records per encoder call (batch_size * T frames for clips); a batch holds records of
        one size (and frame count) only.
      cap_dtype: 'float16' or 'float32', the stored caption features.
      shard_range: `(first, stop)` shard indices this call writes (default all): one call per host
        writes a disjoint range; the call that writes shard 0 also writes the sidecar.
      overwrite: replace this call's existing files (otherwise FileExistsError).
      progress: a tqdm bar over records.
    """
    from array_record.python.array_record_module import ArrayRecordWriter
    from tqdm import tqdm

    n = len(raw_source)
    for name, v, lo in (("num_shards", num_shards, 1), ("batch_size", batch_size, 1), ("seed", seed, 0)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
            raise ValueError(f"{name}={v!r}; expected an int >= {lo}")
    if n == 0 or num_shards > n:
        raise ValueError(f"num_shards={num_shards} for {n} records; expected 1 <= num_shards <= N and N >= 1")
    if cap_dtype not in ("float16", "float32"):
        raise ValueError(f"cap_dtype={cap_dtype!r}; expected 'float16' or 'float32'")
    first, stop = (0, num_shards) if shard_range is None else tuple(int(v) for v in shard_range)
    if not 0 <= first < stop <= num_shards:
        raise ValueError(f"shard_range={shard_range!r}; expected (first, stop) with 0 <= first < stop <= {num_shards}")
    files = shard_paths(path_prefix, num_shards)[first:stop]
    targets = [p for f in files for p in (f, shard_meta_path(f))] + ([sidecar_path(path_prefix)] if first == 0 else [])
    if (first, stop) == (0, num_shards):  # the whole cache: shards of another count would be read back too
        targets += glob.glob(f"{glob.escape(path_prefix)}-[0-9][0-9][0-9][0-9][0-9]-of-[0-9][0-9][0-9][0-9][0-9].*")
    existing = sorted({p for p in targets if os.path.exists(p)})
    if existing and not overwrite:
        raise FileExistsError(f"{len(existing)} cache file(s) already exist for {path_prefix!r} (e.g. {existing[0]}); "
                              "pass overwrite=True")
    for p in existing:
        os.remove(p)
    os.makedirs(os.path.dirname(os.path.abspath(path_prefix)), exist_ok=True)

    # The null caption first: it fixes D, and a broken encoder fails before any image is read.
    null_feats, null_mask = _encode_text(text_encoder, [""], 'the empty caption ""')
    null_len = _valid_length(null_mask[0], 'the empty caption ""')
    cap_dim = int(null_feats.shape[2])
    rows_of = np.array_split(np.arange(n), num_shards)
    dtype = np.dtype(cap_dtype).type
    meta_keys, max_len = None, null_len
    with tqdm(total=sum(len(rows_of[s]) for s in range(first, stop)), desc=f"encoding {path_prefix}",
              disable=not progress, unit="rec") as bar:
        for s, path in zip(range(first, stop), files):
            tmp = f"{path}.tmp{os.getpid()}"
            writer = ArrayRecordWriter(tmp, "group_size:1")
            try:
                enc = _ShardEncoder(raw_source, vae, text_encoder, rows_of[s], batch_size=int(batch_size),
                                    sample_posterior=sample_posterior, seed=int(seed), cap_dtype=dtype,
                                    cap_dim=cap_dim, writer=writer, progress=bar)
                enc.run()
            finally:
                writer.close()
            os.replace(tmp, path)
            meta_keys, max_len = enc.meta_keys, max(max_len, *enc.cap_lens)
            _write_json(shard_meta_path(path), {
                "rows": [int(rows_of[s][0]), int(rows_of[s][-1]) + 1], "latent_shapes": enc.shapes,
                "cap_lens": enc.cap_lens, "max_cap_len": max(enc.cap_lens), "metadata": meta_keys})
    if first == 0:
        _write_json(sidecar_path(path_prefix), {
            "format": FORMAT, "num_records": n, "num_shards": int(num_shards),
            "vae": _identity(vae), "text_encoder": _identity(text_encoder),
            "latent_scale": float(getattr(vae, "scaling_factor", 1.0)),
            "latent_shift": float(getattr(vae, "shift_factor", None) or 0.0),
            "sample_posterior": bool(sample_posterior), "seed": int(seed),
            "cap_dim": cap_dim, "cap_dtype": cap_dtype, "metadata": meta_keys,
            # longest caption incl. "" (None when other calls write other shards: see the shards' .json)
            "max_cap_len": max_len if (first, stop) == (0, num_shards) else None,
            # float32 -> JSON float -> float32 is exact
            "null_caption": {"length": null_len, "feats": null_feats[0, :null_len].tolist()}})
    return files


# --- reading ------------------------------------------------------------------------------------

class EncodedSource:
    """Grain random-access source over an `encode_dataset` cache (the captioned-source protocol).

    `source[i]` -> {'frames' [T, h, w, c] float32 (scaled latents; T = 1 for images, the clip's own
    frame count for clips), 'cap_feats' [cap_len, D] float32 (zeros past the caption), 'cap_mask'
    [cap_len] bool, 'label' int32 (-1 when the data has none), and the cached metadata fields};
    `frame_shapes()` -> [N, 3] (T, h, w); `null_caption()`; `caption(i)` -> str.

    Args:
      path_prefix: as given to `encode_dataset`.
      cap_len: caption length to pad to (default: the longest cached caption, incl. the null caption).
    """

    def __init__(self, path_prefix: str | os.PathLike, *, cap_len: int | None = None):
        import grain

        self.path_prefix = os.fspath(path_prefix)
        side = sidecar_path(self.path_prefix)
        if not os.path.isfile(side):
            raise FileNotFoundError(f"no cache sidecar {side} (written by encode_dataset with the shards)")
        with open(side) as f:
            self.info = json.load(f)
        if self.info.get("format") != FORMAT:
            raise ValueError(f"{side} has format {self.info.get('format')!r}; expected {FORMAT!r}")
        self.files = find_shards(self.path_prefix)
        if len(self.files) != self.info["num_shards"]:
            raise ValueError(f"{self.path_prefix!r} has {len(self.files)} shards but its sidecar says "
                             f"{self.info['num_shards']}")
        shapes, lens, stop = [], [], 0  # shapes: [h, w, c] per image record, [T, h, w, c] per clip
        for path in self.files:
            meta_path = shard_meta_path(path)
            if not os.path.isfile(meta_path):
                raise FileNotFoundError(f"shard {path} has no {meta_path}: its write did not finish")
            with open(meta_path) as f:
                meta = json.load(f)
            if meta["rows"][0] != stop or len(meta["latent_shapes"]) != meta["rows"][1] - meta["rows"][0]:
                raise ValueError(f"{meta_path} covers rows {meta['rows']}; expected a run starting at {stop}")
            stop = meta["rows"][1]
            shapes += meta["latent_shapes"]
            lens += meta["cap_lens"]
        if stop != self.info["num_records"]:
            raise ValueError(f"the shards of {self.path_prefix!r} hold {stop} records; the sidecar says "
                             f"{self.info['num_records']}")
        ranks = {len(x) for x in shapes}
        if not ranks <= {3, 4} or len(ranks) > 1:
            raise ValueError(f"the shards of {self.path_prefix!r} list latent shapes of ranks {sorted(ranks)}; "
                             "expected all [h, w, c] (images) or all [T, h, w, c] (clips)")
        table = np.asarray(shapes, np.int64).reshape(len(shapes), -1)
        if table.shape[1] == 3:
            table = np.concatenate([np.ones((len(table), 1), np.int64), table], axis=1)
        self.frame_counts = table[:, 0]  # [N]: 1 for image records
        self.latent_shapes = table[:, 1:]  # [N, 3]: (h, w, c) of each frame
        self.cap_lens = np.asarray(lens, np.int64)
        null = self.info["null_caption"]
        longest = max(int(self.cap_lens.max()), int(null["length"]))
        if cap_len is None:
            cap_len = longest
        if isinstance(cap_len, bool) or not isinstance(cap_len, (int, np.integer)) or cap_len < longest:
            raise ValueError(f"cap_len={cap_len!r}; expected an int >= {longest}, the longest cached caption")
        self.cap_len, self.cap_dim = int(cap_len), int(self.info["cap_dim"])
        self._null = self._pad(np.asarray(null["feats"], np.float32).reshape(-1, self.cap_dim))
        self._src = grain.sources.ArrayRecordDataSource(self.files)
        if len(self._src) != len(self.latent_shapes):
            raise ValueError(f"the shards of {self.path_prefix!r} hold {len(self._src)} records; their .json files "
                             f"list {len(self.latent_shapes)}")

    def __len__(self) -> int:
        return len(self.latent_shapes)

    @property
    def scaling_factor(self) -> float:
        return float(self.info["latent_scale"])

    def frame_shapes(self) -> np.ndarray:
        """`[N, 3]` (T, h, w) latent sizes (T = 1 for images), from the shards' .json files (no record is read)."""
        return np.concatenate([self.frame_counts[:, None], self.latent_shapes[:, :2]], axis=1)

    def _pad(self, feats: np.ndarray) -> dict[str, np.ndarray]:
        out = np.zeros((self.cap_len, self.cap_dim), np.float32)
        out[: len(feats)] = feats
        return {"cap_feats": out, "cap_mask": np.arange(self.cap_len) < len(feats)}

    def null_caption(self) -> dict[str, np.ndarray]:
        """The empty caption's features `[cap_len, D]` and mask `[cap_len]` (the encoder's output for "")."""
        return {k: v.copy() for k, v in self._null.items()}

    def _decode(self, record: bytes) -> dict[str, np.ndarray]:
        fields = decode_record(record)
        fields.pop("caption")  # text: `caption(i)` reads it; the model gets the features
        frames = fields.pop("latent").astype(np.float32)
        frames = frames[None] if frames.ndim == 3 else frames  # an image is a one-frame clip
        out = {"frames": frames, **self._pad(fields.pop("cap_feats").astype(np.float32))}
        out["label"] = np.int32(fields.pop("label", -1))
        out.update(fields)
        return out

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return self._decode(self._src[int(index)])

    def __getitems__(self, indices) -> list[dict[str, np.ndarray]]:
        return [self._decode(r) for r in self._src.__getitems__([int(i) for i in indices])]

    def caption(self, index: int) -> str:
        """The text of record `index`'s caption."""
        return decode_record(self._src[int(index)])["caption"].item()

    def __repr__(self) -> str:
        return (f"EncodedSource({self.path_prefix!r}, n={len(self)}, cap_len={self.cap_len}, cap_dim={self.cap_dim}, "
                f"{len(self.files)} shards)")
