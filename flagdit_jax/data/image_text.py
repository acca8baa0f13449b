"""The user's image-text pairs (a folder or a JSONL manifest), cropped as the official T2I trainer does.

Two forms:

* a folder: every image file (`IMAGE_EXTENSIONS`) with a caption in a `.txt` file of the same stem
  next to it (`cat.png` + `cat.txt`); records in sorted file-name order (subfolders included).
* a JSONL manifest (`*.jsonl`): one JSON object per line with the image under "image" or "path"
  (relative paths are relative to the manifest's folder) and the caption under "caption", "text"
  or "prompt" ("path"/"prompt" is the official trainer's own format, LT `lumina_t2i/train.py`).

Crops follow LT `lumina_t2i/imgproc.py`: the crop list is `generate_crop_size_list(num_patches,
patch)` with `num_patches = round((image_size / crop_patch) ** 2)` (the official trainer passes
`crop_patch = 8 * model patch size`, i.e. 16 px for patch 2 behind an 8x VAE); `var_center_crop`
ranks the crops by how much of the image each keeps (min/max of the two side ratios), picks one of
the `random_top_k` = 4 best at random, halves the image with a box filter while it is at least twice
the crop, resizes it (bicubic) to cover the crop and cuts the crop out. No flip. Images are
converted to RGB and mapped to [-1, 1] (the official `Normalize(0.5, 0.5)`).

Randomness: the official trainer draws the crop (and the crop offset) with Python's global `random`
on every read. Here both come from `np.random.default_rng((seed, index))`, so a record always gives
the same crop: the caption cache encodes each record once. The official `center_crop` picks its
offset at random despite its name; `offset='center'` (the default) cuts the middle, `offset='random'`
draws it like the official code (from the record's generator).
"""

from __future__ import annotations

import json
import os

import numpy as np

from flagdit_jax.data.buckets import crop_size_list

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
_IMAGE_KEYS = ("image", "path")
_CAPTION_KEYS = ("caption", "text", "prompt")


def choose_crop(width: int, height: int, crops: list[tuple[int, int]], rng: np.random.Generator,
                random_top_k: int = 4) -> tuple[int, int]:
    """One `(crop_w, crop_h)` among the `random_top_k` crops that keep most of a `width` x `height`
    image (LT `imgproc.py: var_center_crop`: same score, same order incl. ties, uniform choice)."""
    rem = [min(cw / width, ch / height) / max(cw / width, ch / height) for cw, ch in crops]
    top = sorted(zip(rem, crops), reverse=True)[:random_top_k]
    return top[int(rng.integers(len(top)))][1]


def crop_to(image, crop: tuple[int, int], rng: np.random.Generator | None = None):
    """PIL image -> PIL image of size `crop` = (w, h): halve (box filter) while at least twice the
    crop, bicubic resize to cover, cut out the middle (`rng` None) or a random offset drawn from `rng`
    (LT `imgproc.py: center_crop`)."""
    from PIL import Image

    cw, ch = crop
    while image.size[0] >= 2 * cw and image.size[1] >= 2 * ch:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.Resampling.BOX)
    scale = max(cw / image.size[0], ch / image.size[1])
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.Resampling.BICUBIC)
    dx, dy = image.size[0] - cw, image.size[1] - ch
    if rng is None:
        left, top = dx // 2, dy // 2
    else:  # random.randint(0, d) is inclusive
        left, top = int(rng.integers(dx + 1)), int(rng.integers(dy + 1))
    return image.crop((left, top, left + cw, top + ch))


def _read_folder(folder: str) -> list[tuple[str, str | None, str]]:
    """(image path, caption or None = read from `txt`, txt path) per image, sorted."""
    items = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            stem, ext = os.path.splitext(name)
            if ext.lower() not in IMAGE_EXTENSIONS:
                continue
            txt = os.path.join(root, stem + ".txt")
            if not os.path.isfile(txt):
                raise ValueError(f"image {os.path.join(root, name)} has no caption file {txt}")
            items.append((os.path.join(root, name), None, txt))
    items.sort(key=lambda it: it[0])
    return items


def _read_manifest(manifest: str) -> list[tuple[str, str | None, str]]:
    base = os.path.dirname(os.path.abspath(manifest))
    items = []
    with open(manifest, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{manifest} line {n}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where} is not valid JSON: {e}") from e
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
            image = next((row[k] for k in _IMAGE_KEYS if k in row), None)
            caption = next((row[k] for k in _CAPTION_KEYS if k in row), None)
            if not isinstance(image, str) or not image:
                raise ValueError(f"{where}: no image path under {_IMAGE_KEYS}; got keys {sorted(row)}")
            if not isinstance(caption, str):
                raise ValueError(f"{where} ({image}): no caption string under {_CAPTION_KEYS}; got keys {sorted(row)}")
            items.append((image if os.path.isabs(image) else os.path.join(base, image), caption, where))
    return items


class ImageTextFolder:
    """Raw image-text source: `source[i]` -> {'image' [h, w, 3] float32 in [-1, 1] at one of the
    official crop sizes, 'caption' str, 'orig_size' int32 [2] (H, W) before cropping}.

    Args:
      path: a folder of images + same-stem `.txt` captions, or a `.jsonl` manifest.
      image_size: the resolution whose patch budget sizes the crop list (256: 256x256 and its
        aspect-ratio variants of the same area).
      crop_patch: pixel step of the crop sizes (official: 8 x model patch size = 16).
      max_ratio: longest side / shortest side allowed (official 4).
      random_top_k: the crop is drawn among this many best-fitting sizes (official 4; 1: the closest).
      seed: with the record index, fixes each record's crop.
      offset: 'center' (cut the middle) or 'random' (the official code's random offset).
    """

    def __init__(self, path: str | os.PathLike, *, image_size: int = 256, crop_patch: int = 16,
                 max_ratio: float = 4.0, random_top_k: int = 4, seed: int = 0, offset: str = "center"):
        path = os.fspath(path)
        for name, v in (("image_size", image_size), ("crop_patch", crop_patch), ("random_top_k", random_top_k)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name}={v!r}; expected a positive int")
        if crop_patch > image_size:
            raise ValueError(f"crop_patch={crop_patch} is larger than image_size={image_size}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
            raise ValueError(f"seed={seed!r}; expected an int in [0, 2**32)")
        if offset not in ("center", "random"):
            raise ValueError(f"offset={offset!r}; expected 'center' or 'random'")
        if os.path.isdir(path):
            self.items = _read_folder(path)
        elif os.path.isfile(path) and path.endswith(".jsonl"):
            self.items = _read_manifest(path)
        else:
            raise ValueError(f"image-text path {path!r} is neither a folder of images with .txt captions nor a "
                             ".jsonl manifest")
        if not self.items:
            raise ValueError(f"no image-text pairs in {path!r} (image extensions {IMAGE_EXTENSIONS})")
        self.path, self.seed, self.random_top_k, self.offset = path, int(seed), int(random_top_k), offset
        self.crops = crop_size_list(round((image_size / crop_patch) ** 2), int(crop_patch), max_ratio)

    def __len__(self) -> int:
        return len(self.items)

    def caption(self, index: int) -> str:
        """Caption of record `index` (the `.txt` file stripped of surrounding whitespace)."""
        _, caption, txt = self.items[int(index)]
        if caption is not None:
            return caption
        try:
            with open(txt, encoding="utf-8") as f:
                return f.read().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read caption file {txt}: {e}") from e

    def __getitem__(self, index: int) -> dict:
        from PIL import Image, UnidentifiedImageError

        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} out of range [0, {len(self)})")
        path = self.items[index][0]
        try:
            with Image.open(path) as im:
                image = im.convert("RGB")
        except (OSError, UnidentifiedImageError, ValueError) as e:
            raise ValueError(f"cannot read image {path} (record {index}): {e}") from e
        rng = np.random.default_rng((self.seed, index))
        crop = choose_crop(*image.size, self.crops, rng, self.random_top_k)
        orig = np.array([image.size[1], image.size[0]], np.int32)
        image = crop_to(image, crop, rng if self.offset == "random" else None)
        pixels = np.asarray(image, np.float32) / 127.5 - 1.0
        return {"image": pixels, "caption": self.caption(index), "orig_size": orig}

    def __repr__(self) -> str:
        return f"ImageTextFolder({self.path!r}, n={len(self)}, crops={len(self.crops)}, offset={self.offset!r})"
