"""Does a generated canvas follow its prompt? Digit, position and size, read off the pixels.

For the embedded text-to-image data (digits of two sizes at named places on canvases of three
shapes), each generated image `[H, W, 1]` in [-1, 1] (background -1) is read as:
  * ink: pixels brighter than `INK` (0.0, halfway between background and stroke);
  * position: the ink's centroid; honoured when it lies inside the requested box;
  * size: the ink's extent (the larger side of its bounding box); honoured when it is nearer the
    requested size's typical extent than the other size's (thresholds measured on real renders by
    `calibrate`, not assumed);
  * digit: a square crop around the ink (side = extent x `CROP_MARGIN`, the ratio of the 32-px MNIST
    canvas to a digit's ~20-px stroke extent), resized to 32x32, read by the project's MNIST
    classifier (`eval/classifier.py`).
The same reading applied to real renders gives the floor a perfect generator would reach.
"""

from __future__ import annotations

import numpy as np

INK = 0.0
CROP_MARGIN = 1.6
_EMPTY = -1


def ink_stats(images) -> dict[str, np.ndarray]:
    """`images [N, H, W, 1]` (or `[N, H, W]`) in [-1, 1] -> per image: 'cy', 'cx' (ink centroid, pixels;
    nan when no ink), 'extent' (larger side of the ink's bounding box; 0 when no ink), 'bbox'
    `[N, 4]` (y0, x0, y1, x1), 'ink' (pixel count)."""
    x = np.asarray(images, np.float32)
    if x.ndim == 4:
        if x.shape[-1] != 1:
            raise ValueError(f"images must be grayscale [N, H, W, 1], got shape {x.shape}")
        x = x[..., 0]
    if x.ndim != 3:
        raise ValueError(f"images must be [N, H, W, 1] or [N, H, W], got shape {np.shape(images)}")
    ink = x > INK
    w = np.clip(x + 1.0, 0.0, None) * ink  # brightness-weighted centroid of the ink
    n, h, wd = x.shape
    mass = w.sum((1, 2))
    ys, xs = np.arange(h, dtype=np.float64), np.arange(wd, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        cy = (w.sum(2) * ys).sum(1) / mass
        cx = (w.sum(1) * xs).sum(1) / mass
    rows, cols = ink.any(2), ink.any(1)
    bbox = np.zeros((n, 4), np.int64)
    for i in range(n):
        r, c = np.flatnonzero(rows[i]), np.flatnonzero(cols[i])
        if len(r):
            bbox[i] = (r[0], c[0], r[-1] + 1, c[-1] + 1)
    extent = np.maximum(bbox[:, 2] - bbox[:, 0], bbox[:, 3] - bbox[:, 1])
    return {"cy": cy, "cx": cx, "extent": extent, "bbox": bbox, "ink": ink.sum((1, 2))}


def digit_crops(images, stats: dict | None = None, size: int = 32) -> np.ndarray:
    """Square crops `[N, size, size, 1]` around each image's ink (background-padded at the edges),
    resized with bilinear interpolation: the classifier's input layout."""
    import jax

    x = np.asarray(images, np.float32)
    x = x[..., 0] if x.ndim == 4 else x
    stats = ink_stats(x) if stats is None else stats
    out = np.full((len(x), size, size), -1.0, np.float32)
    for i, img in enumerate(x):
        if stats["extent"][i] == 0:
            continue
        y0, x0, y1, x1 = stats["bbox"][i]
        side = max(int(round(stats["extent"][i] * CROP_MARGIN)), 4)
        cy, cx = (y0 + y1) / 2.0, (x0 + x1) / 2.0
        top, left = int(round(cy - side / 2)), int(round(cx - side / 2))
        canvas = np.full((side, side), -1.0, np.float32)
        sy0, sx0 = max(top, 0), max(left, 0)
        sy1, sx1 = min(top + side, img.shape[0]), min(left + side, img.shape[1])
        canvas[sy0 - top:sy1 - top, sx0 - left:sx1 - left] = img[sy0:sy1, sx0:sx1]
        out[i] = np.asarray(jax.image.resize(canvas, (size, size), "bilinear"))
    return out[..., None]


def calibrate(extents_small, extents_large) -> float:
    """The size threshold: midway between the median ink extents of real small and large digits."""
    s, l_ = float(np.median(extents_small)), float(np.median(extents_large))
    if not s < l_:
        raise ValueError(f"real small digits (median extent {s}) are not smaller than large ones ({l_})")
    return (s + l_) / 2.0


def score(images, labels, boxes, sizes, *, classifier_params, size_threshold: float) -> dict:
    """Scores `images [N, H, W, 1]` against the requested `labels [N]` (0..9), `boxes [N, 3]`
    (y0, x0, side in pixels: where the digit was asked to be) and `sizes [N]` (0 small, 1 large).

    Returns shares in [0, 1]: 'digit' (classifier on the ink crop == label), 'position' (ink centroid
    inside the box), 'size' (extent on the requested side of `size_threshold`), 'all' (all three),
    'empty' (no ink at all); plus 'n' and per-digit accuracy."""
    from flagdit_jax.eval import classifier as clf

    labels, boxes, sizes = np.asarray(labels), np.asarray(boxes), np.asarray(sizes)
    n = len(labels)
    if boxes.shape != (n, 3) or sizes.shape != (n,) or np.shape(images)[0] != n:
        raise ValueError(f"need images [N, H, W, 1], labels [N], boxes [N, 3], sizes [N] with one N; got "
                         f"{np.shape(images)}, {labels.shape}, {boxes.shape}, {sizes.shape}")
    st = ink_stats(images)
    pred = clf.logits(classifier_params, digit_crops(images, st)).argmax(-1)
    digit = pred == labels
    y0, x0, side = boxes[:, 0], boxes[:, 1], boxes[:, 2]
    with np.errstate(invalid="ignore"):
        position = (st["cy"] >= y0) & (st["cy"] < y0 + side) & (st["cx"] >= x0) & (st["cx"] < x0 + side)
    size = np.where(sizes == 1, st["extent"] > size_threshold, (st["extent"] <= size_threshold) & (st["extent"] > 0))
    per_digit = {str(d): float(digit[labels == d].mean()) for d in range(10) if (labels == d).any()}
    return {"n": int(n), "digit": float(digit.mean()), "position": float(position.mean()), "size": float(size.mean()),
            "all": float((digit & position & size).mean()), "empty": float((st["extent"] == 0).mean()),
            "per_digit": per_digit}
