"""Scores generated digits: FID on the project's own MNIST classifier features, against the 500
held-out real digits, and class-conditional accuracy (does the classifier read the conditioned
class?).

Neither number is enough alone: per-class mean images score 100% accuracy yet are obviously not
digits (FID catches the missing variety), and FID alone does not check the conditioning. FID with
a few hundred samples is biased upwards and depends on N, so `baselines` scores stand-in
"generators" at the same N: real train digits (the floor a perfect model would reach), noise, and
class means.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np

from flagdit_jax.eval import classifier as clf
from flagdit_jax.eval import fid as fidlib


def _check_labels(labels, n: int) -> np.ndarray:
    y = np.asarray(labels)
    if y.shape != (n,):
        raise ValueError(f"conditioned_labels must have shape ({n},) to match the images, got {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"conditioned_labels must be integers, got dtype {y.dtype}")
    if y.min() < 0 or y.max() >= clf.NUM_CLASSES:
        raise ValueError(f"conditioned_labels must be in 0..9, got range [{y.min()}, {y.max()}]")
    return y


def evaluate(workdir, generated_images, conditioned_labels, *, classifier=None) -> dict:
    """FID and class-conditional accuracy of `generated_images` `[N, 32, 32, 1]` in [-1, 1]
    (`[N, 1, 32, 32, 1]` also accepted) conditioned on int `conditioned_labels` `[N]` in 0..9.

    `classifier`: `(params, info)` from `classifier.load_or_train`; loaded (or trained once and
    cached) from `workdir` when None. Returns a JSON-ready dict: `fid` (vs the 500 held-out
    digits), `accuracy` (share with argmax logits == conditioned label), `per_class_accuracy`
    (`{"0": ..., "9": ...}`, None for classes with no samples), `per_class_count`, `n`,
    `n_reference`, and the classifier's `classifier_heldout_accuracy`.
    """
    x = clf.check_images(generated_images, "generated_images")
    n = x.shape[0]
    if n < 2:
        raise ValueError(f"need at least 2 generated images for a covariance, got N={n}")
    y = _check_labels(conditioned_labels, n)
    params, info = classifier if classifier is not None else clf.load_or_train(workdir)

    lg, ft = clf.logits_and_features(params, x)
    x_ref, _ = clf.digits("eval")
    ref = clf.features(params, x_ref)
    correct = lg.argmax(-1) == y
    counts = np.bincount(y, minlength=clf.NUM_CLASSES)
    per_class = {str(c): (float(correct[y == c].mean()) if counts[c] else None) for c in range(clf.NUM_CLASSES)}
    return {
        "fid": fidlib.fid_from_features(ft, ref),
        "accuracy": float(correct.mean()),
        "per_class_accuracy": per_class,
        "per_class_count": {str(c): int(counts[c]) for c in range(clf.NUM_CLASSES)},
        "n": int(n),
        "n_reference": int(len(x_ref)),
        "classifier_heldout_accuracy": float(info["heldout_accuracy"]),
    }


def baselines(workdir, n: int = 500, seed: int = 0, *, classifier=None) -> dict:
    """`evaluate` applied to three stand-in generators of `n` images each (labels 0..9 cycled):

    - `real_floor`: `n` random real train digits (never the held-out ones) with their true labels:
      the FID a perfect generator would get at this N (nonzero: finite-sample noise), 2 <= n <= 4500;
    - `noise`: uniform noise in [-1, 1] (an upper reference; accuracy ~ chance);
    - `class_mean`: each class's mean train digit, repeated: ~100% accuracy, yet a large FID.

    Returns `{"n", "seed", "real_floor": {...}, "noise": {...}, "class_mean": {...}}`, each inner dict
    as returned by `evaluate`.
    """
    x_tr, y_tr = clf.digits("train")
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or not 2 <= n <= len(y_tr):
        raise ValueError(f"n must be an int in 2..{len(y_tr)} (real train digits available), got {n!r}")
    classifier = classifier if classifier is not None else clf.load_or_train(workdir)
    rng = np.random.default_rng(seed)

    idx = rng.choice(len(y_tr), size=n, replace=False)
    labels = np.arange(n) % clf.NUM_CLASSES
    noise = rng.uniform(-1.0, 1.0, size=(n, *clf.IMAGE_SHAPE)).astype(np.float32)
    means = np.stack([x_tr[y_tr == c].mean(0) for c in range(clf.NUM_CLASSES)])
    return {
        "n": int(n),
        "seed": int(seed),
        "real_floor": evaluate(workdir, x_tr[idx], y_tr[idx], classifier=classifier),
        "noise": evaluate(workdir, noise, labels, classifier=classifier),
        "class_mean": evaluate(workdir, means[labels], labels, classifier=classifier),
    }


def report(workdir, generated_images, conditioned_labels, *, seed: int = 0) -> dict:
    """`evaluate` of the generated digits beside `baselines` at the same N (N <= 4500)."""
    classifier = clf.load_or_train(workdir)
    gen = evaluate(workdir, generated_images, conditioned_labels, classifier=classifier)
    return {"generated": gen, "baselines": baselines(workdir, gen["n"], seed, classifier=classifier)}


def write_report(path, report_dict: dict) -> pathlib.Path:
    """Writes `report_dict` as indented JSON (numpy scalars converted), creating parent folders."""
    def default(o):
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
        raise TypeError(f"not JSON serialisable: {type(o).__name__}")

    if not isinstance(report_dict, dict):
        raise ValueError(f"report_dict must be a dict, got {type(report_dict).__name__}")
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report_dict, indent=1, default=default))
    return path
