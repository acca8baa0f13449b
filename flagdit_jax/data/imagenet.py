"""ImageNet through `tfds.data_source` (random access over ArrayRecord files, no TF graph).

Preprocessing follows ADM / DiT / Lumina's Flag-DiT-ImageNet (`center_crop_arr`): repeatedly
halve the image with a BOX filter while its short side is >= 2 * size, resize with BICUBIC so the
short side is exactly `size`, then take the centre `size x size` crop. Pixels go to float32 in
[-1, 1], channel-last.

The random horizontal flip is not applied in `__getitem__` (a source only sees the record
index, so a flip drawn there would be the same in every epoch). Instead the source offers
`augment(element, rng)` and `pipeline.make_iterator` calls it with
`np.random.default_rng((aug_seed, i))`, where `i = epoch * len(source) + record`: the flip is
deterministic from the seed, differs between epochs, and does not depend on the process count.

tfds 4.9.x names the entry point `tfds.data_source` (singular); the data must already be prepared
in `data_dir` (ImageNet needs a manual download), so `download=False` by default.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

# Our split names -> tfds split names of imagenet2012.
SPLITS = {"train": "train", "eval": "validation"}
DEFAULT_BUILDER = "imagenet2012"


def center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """ADM's centre crop: PIL image (W x H) -> uint8 array `[image_size, image_size, C]`."""
    # BOX-halve first: a single big BICUBIC downscale would alias; this matches ADM exactly.
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.asarray(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y: crop_y + image_size, crop_x: crop_x + image_size]


def to_float(arr: np.ndarray) -> np.ndarray:
    """uint8 `[..., C]` -> float32 in [-1, 1]."""
    return arr.astype(np.float32) / 127.5 - 1.0


class ImageNetSource:
    """Grain random-access source over a tfds ImageNet split (or any tfds builder with `image`/`label`).

    `source[i]` -> `{'image': [image_size, image_size, 3] float32 in [-1, 1], 'label': int32 scalar}`
    (centre crop, never flipped); `augment(element, rng)` applies the random horizontal flip.

    Args:
      split: 'train' or 'eval' (tfds 'validation').
      image_size: side of the square crop (256 for the paper's ImageNet runs).
      random_flip: whether `augment` flips (with probability 1/2).
      data_dir: tfds data directory (None: tfds default, `~/tensorflow_datasets`).
      builder: tfds builder name, e.g. 'imagenet2012' or 'imagenet2012:5.1.0'.
      download: let tfds try to download and prepare (ImageNet needs manual files anyway).
    """

    def __init__(self, split: str = "train", *, image_size: int = 256, random_flip: bool = True,
                 data_dir: str | None = None, builder: str = DEFAULT_BUILDER, download: bool = False):
        if split not in SPLITS:
            raise ValueError(f"ImageNet split {split!r}; expected one of {tuple(SPLITS)}")
        if not isinstance(image_size, (int, np.integer)) or image_size <= 0:
            raise ValueError(f"image_size {image_size!r}; expected a positive int")
        import tensorflow_datasets as tfds  # lazy: tfds import is slow and MNIST runs never need it

        self.split, self.image_size, self.random_flip = split, int(image_size), bool(random_flip)
        self.builder = builder
        self._src = tfds.data_source(builder, split=SPLITS[split], data_dir=data_dir, download=download)

    def __len__(self) -> int:
        return len(self._src)

    def crop(self, index: int) -> tuple[np.ndarray, int]:
        """Record `index` -> (its ADM centre crop, uint8 `[image_size, image_size, 3]`, its label)."""
        record = self._src[int(index)]
        img = np.asarray(record["image"])
        img = Image.fromarray(img[..., 0] if img.ndim == 3 and img.shape[-1] == 1 else img)
        if img.mode != "RGB":  # a few ImageNet JPEGs are CMYK / greyscale
            img = img.convert("RGB")
        return center_crop_arr(img, self.image_size), int(record["label"])

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        arr, label = self.crop(index)
        return {"image": to_float(arr), "label": np.int32(label)}

    def augment(self, element: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Random horizontal flip (p = 1/2) drawn from `rng`; returns a new dict, input untouched."""
        if self.random_flip and rng.random() < 0.5:
            element = dict(element, image=np.ascontiguousarray(element["image"][:, ::-1]))
        return element

    def __repr__(self) -> str:
        return (f"ImageNetSource(builder={self.builder!r}, split={self.split!r}, image_size={self.image_size}, "
                f"random_flip={self.random_flip}, n={len(self)})")


def reference_images(split: str = "train", num: int = 10_000, *, image_size: int = 256, seed: int = 0,
                     data_dir: str | None = None, builder: str = DEFAULT_BUILDER, read_threads: int = 8,
                     return_indices: bool = False):
    """`num` ADM centre crops of a random subset of `split` -> uint8 `[num, image_size, image_size, 3]`.

    ADM's ImageNet 256 reference batch (`VIRTUAL_imagenet256_labeled.npz`, guided-diffusion
    `evaluations/README.md`) holds statistics of the whole training set plus 10,000 of its images
    (used for precision / recall), centre-cropped as `center_crop_arr`; this draws such a subset:
    the records `np.random.default_rng(seed).choice(N, num, replace=False)`, in ascending record
    order (reads stay local), cropped exactly as training sees them (never flipped). With
    `return_indices`, returns `(images, indices [num] int64)`.
    """
    if isinstance(num, bool) or not isinstance(num, (int, np.integer)) or num < 1:
        raise ValueError(f"num={num!r}; expected an int >= 1")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed={seed!r}; expected an int >= 0")
    src = ImageNetSource(split, image_size=image_size, random_flip=False, data_dir=data_dir, builder=builder)
    if num > len(src):
        raise ValueError(f"num={num} images from {src!r}, which has {len(src)}")
    indices = np.sort(np.random.default_rng(seed).choice(len(src), int(num), replace=False)).astype(np.int64)
    out = np.empty((int(num), src.image_size, src.image_size, 3), np.uint8)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max(1, int(read_threads))) as pool:  # JPEG decode + resize release the GIL
        for k, (arr, _) in enumerate(pool.map(src.crop, indices.tolist())):
            out[k] = arr
    return (out, indices) if return_indices else out
