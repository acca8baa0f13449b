"""The prompt-following reader of the embedded text-to-image data (eval/layout_eval.py): real renders
follow their captions; moved, resized or empty canvases do not."""

import numpy as np
import pytest

from flagdit_jax.data import mnist_t2i as m
from flagdit_jax.eval import classifier, layout_eval


@pytest.fixture(scope="module")
def renders():
    src = m.MnistT2I("eval")
    recs = [src[i] for i in range(120)]
    return (np.stack([r["image"] for r in recs if r["canvas"] == 1]),
            {k: np.array([r[k] for r in recs if r["canvas"] == 1]) for k in ("label", "box", "size", "position")})


def test_real_renders_follow_their_captions_and_moved_ones_do_not(renders):
    images, meta = renders
    params = classifier.init_params()  # position / size do not depend on the classifier
    st = layout_eval.ink_stats(images)
    thr = layout_eval.calibrate(st["extent"][meta["size"] == 0], st["extent"][meta["size"] == 1])
    assert 10 <= thr <= 20  # small digits (16 px box) vs large (28 px box)
    ok = layout_eval.score(images, meta["label"], meta["box"], meta["size"], classifier_params=params,
                           size_threshold=thr)
    assert ok["position"] == 1.0 and ok["size"] == 1.0 and ok["empty"] == 0.0
    # Swap each wide canvas's left and right halves: left / right digits are now in the wrong place.
    swapped = np.concatenate([images[:, :, 32:], images[:, :, :32]], axis=2)
    bad = layout_eval.score(swapped, meta["label"], meta["box"], meta["size"], classifier_params=params,
                            size_threshold=thr)
    sides = meta["position"] != 1
    assert bad["position"] <= 1.0 - sides.mean() + 1e-9
    # Asking for the other size fails size; an empty canvas fails everything.
    other = layout_eval.score(images, meta["label"], meta["box"], 1 - meta["size"], classifier_params=params,
                              size_threshold=thr)
    assert other["size"] == 0.0
    empty = layout_eval.score(np.full_like(images, -1.0), meta["label"], meta["box"], meta["size"],
                              classifier_params=params, size_threshold=thr)
    assert empty["empty"] == 1.0 and empty["position"] == 0.0 and empty["all"] == 0.0


def test_digit_crops_center_the_ink():
    img = np.full((1, 32, 64, 1), -1.0, np.float32)
    img[0, 10:20, 40:46] = 1.0
    crop = layout_eval.digit_crops(img)[0, ..., 0]
    ys, xs = np.nonzero(crop > 0)
    assert abs(ys.mean() - 15.5) < 1.5 and abs(xs.mean() - 15.5) < 1.5
    with pytest.raises(ValueError, match="grayscale"):
        layout_eval.ink_stats(np.zeros((1, 8, 8, 3)))
