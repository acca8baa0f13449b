"""Text-to-video on moving MNIST: the source's clips move as captioned, the tracker reads known motion."""

import numpy as np
import pytest

from flagdit_jax.data import moving_mnist as mm
from flagdit_jax.eval import video_eval


@pytest.fixture(scope="module")
def source():
    return mm.MovingMnistSource("eval", frames=(3, 4), max_frames=6)


def _square(t, start, step, canvas=32, side=8):
    """A bright square (no digit) moving `step` px per frame: motion known exactly."""
    return mm.render(np.ones((side, side), np.float32), t, start, step, canvas)


def test_tracker_reads_known_motion():
    cases = [((10, 20), (0, -3), "left", 3.0), ((10, 2), (0, 1), "right", 1.0), ((20, 5), (-2, 0), "up", 2.0),
             ((0, 12), (3, 0), "down", 3.0)]
    clips = np.stack([_square(5, start, step) for start, step, _, _ in cases])
    tr = video_eval.track(clips)
    assert [mm.DIRECTION_WORDS[d] for d in tr["direction"]] == [c[2] for c in cases]
    np.testing.assert_allclose(tr["speed_px"], [c[3] for c in cases], atol=1e-6)
    # The centroid of an 8-px square at (y, x) is (y + 3.5, x + 3.5) in every frame.
    np.testing.assert_allclose(tr["cy"][0], 10 + 3.5)
    np.testing.assert_allclose(tr["cx"][0], 20 + 3.5 - 3 * np.arange(5))
    assert list(video_eval.speed_class([1.0, 3.0, 2.1, 1.9], (1, 3))) == [0, 1, 1, 0]


def test_tracker_no_motion_or_empty_has_no_direction():
    still = _square(3, (5, 5), (0, 0))
    empty = np.full_like(still, -1.0)
    tr = video_eval.track(np.stack([still, empty]))
    assert list(tr["direction"]) == [video_eval.NO_DIRECTION] * 2
    with pytest.raises(ValueError, match="T >= 2"):
        video_eval.track(still[None, :1])


def test_real_clips_move_as_captioned(source):
    # Every record, rendered at its own T and at the extrapolated max_frames: the tracker recovers the
    # captioned direction and speed of all of them, and the digit box never leaves the canvas.
    idx = np.arange(0, len(source), 7)[:120]
    for t in (None, source.max_frames):
        clips = [source.clip(int(i), t) for i in idx]
        by_t = {}
        for i, c in zip(idx, clips):
            by_t.setdefault(len(c), []).append((i, c))
        for _, items in by_t.items():
            tr = video_eval.track(np.stack([c for _, c in items]))
            words = [source.caption_words(int(i)) for i, _ in items]
            assert [mm.DIRECTION_WORDS[d] for d in tr["direction"]] == [w[3] for w in words]
            speeds = video_eval.speed_class(tr["speed_px"], source.speeds)
            assert [mm.SPEED_WORDS[s] for s in speeds] == [w[4] for w in words]
            assert [w[1] for w in words] == [f"digit_{source.label(int(i))}" for i, _ in items]


def test_ink_moves_by_the_speed_exactly(source):
    # Consecutive frames are the same digit shifted by the captioned step (pixel-exact).
    for i in range(0, 40, 3):
        m, c = source.motion(i), source.clip(i, source.max_frames)[..., 0]
        dy, dx = m["step"]
        for k in range(1, len(c)):
            np.testing.assert_array_equal(np.roll(c[k - 1], (dy, dx), axis=(0, 1)), c[k])
        assert abs(dy) + abs(dx) == source.speeds[m["speed"]]


def test_deterministic_and_variable_length(source):
    a, b = source[5], mm.MovingMnistSource("eval", frames=(3, 4), max_frames=6)[5]
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    other = mm.MovingMnistSource("eval", frames=(3, 4), max_frames=6, seed=1)
    assert any(other.motion(i) != source.motion(i) for i in range(10))
    shapes = source.frame_shapes()
    assert shapes.shape == (len(source), 3)
    assert set(shapes[:, 0].tolist()) == {3, 4} and (shapes[:, 1:] == 32).all()
    for i in (0, 1, 2, 3):
        assert source[i]["frames"].shape == (shapes[i, 0], 32, 32, 1)
    # The caption is the encoding of its words, and the null caption is <bos> alone.
    feats, mask = source.captions.encode(source.caption_words(3))
    np.testing.assert_array_equal(source[3]["cap_feats"], feats)
    assert mask.sum() == 5 and source.null_caption()["cap_mask"].sum() == 1


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="leaves|moves"):
        mm.MovingMnistSource("eval", speeds=(1, 4), max_frames=6)  # 20 px of travel in 16 px of room
    with pytest.raises(ValueError, match="max_frames"):
        mm.MovingMnistSource("eval", frames=(3, 8), max_frames=6)
    with pytest.raises(ValueError, match="speeds"):
        mm.MovingMnistSource("eval", speeds=(3, 1))
    src = mm.MovingMnistSource("eval")
    with pytest.raises(ValueError, match="max_frames"):
        src.clip(0, 7)


def test_gif_written_and_readable(tmp_path, source):
    from PIL import Image

    clips = np.stack([source.clip(i, 4) for i in range(3)])
    (path,) = source.save_media(tmp_path / "clip", clips)
    with Image.open(path) as im:
        assert im.n_frames == 4 and im.size == (2 * (3 * 32 + 2 * 2), 2 * 32)
        frames = []
        for k in range(im.n_frames):
            im.seek(k)
            frames.append(np.asarray(im.convert("L"), np.float32))
    # Frame k of the GIF is the three clips' frame k, side by side (2x nearest upsampling).
    got = frames[2][::2, ::2][:, :32] / 127.5 - 1.0
    np.testing.assert_allclose(got, clips[0, 2, :, :, 0], atol=1.5 / 127.5)


def test_digit_crops_frame_the_digit_like_mnist(source):
    # A crop around a moving digit's centroid, resized to 32, matches the digit as the classifier saw it
    # (the 32x32 image the source shrank): same ink centroid within a pixel and a similar picture.
    i = 4
    clip = source.clip(i, 4)[None]
    tr = video_eval.track(clip)
    crops = video_eval.digit_crops(clip, tr["cy"], tr["cx"], source.digit_size)
    ref = source.images[i % len(source.labels)]
    (cy_c, cx_c), (cy_r, cx_r) = video_eval.centroids(crops), video_eval.centroids(ref[None])
    assert np.all(np.abs(cy_c - cy_r) < 1.0) and np.all(np.abs(cx_c - cx_r) < 1.0)
    assert np.corrcoef(crops[0].ravel(), ref.ravel())[0, 1] > 0.8


def test_time_reversal_flips_the_direction(source):
    clips = np.stack([source.clip(i, 4) for i in range(20)])
    fwd, back = video_eval.track(clips)["direction"], video_eval.track(clips[:, ::-1])["direction"]
    opposite = {"left": "right", "right": "left", "up": "down", "down": "up"}
    assert [opposite[mm.DIRECTION_WORDS[d]] for d in fwd] == [mm.DIRECTION_WORDS[d] for d in back]


def test_score_on_real_clips(source):
    # Real clips score 1 on direction and speed; a still clip scores 0 on both. The digit reader is a
    # stand-in that reads crops of the true digit correctly only where the crop holds ink.
    idx = range(12)
    clips = np.stack([source.clip(i, 3) for i in idx])
    labels = np.array([source.label(i) for i in idx])
    dirs = np.array([source.motion(i)["direction"] for i in idx])
    speeds = np.array([source.motion(i)["speed"] for i in idx])
    truth = np.repeat(labels, 3)
    classify = lambda crops: np.where((crops > 0).any((1, 2, 3)), truth, (truth + 1) % 10)  # noqa: E731
    kw = dict(classify=classify, digit_size=source.digit_size, speeds_px=source.speeds)
    rep = video_eval.score(clips, labels, dirs, speeds, **kw)
    assert rep == {**rep, "direction": 1.0, "speed": 1.0, "digit": 1.0, "digit_frame": 1.0, "all": 1.0, "n": 12,
                   "frames": 3, "empty_frames": 0.0}
    still = np.repeat(clips[:, :1], 3, axis=1)
    rep = video_eval.score(still, labels, dirs, speeds, **kw)
    assert rep["direction"] == 0.0 and rep["speed"] == 0.0 and rep["all"] == 0.0 and rep["digit"] == 1.0
    # An empty last frame: no direction, and the majority vote still reads the digit from 2 of 3 frames.
    blank = clips.copy()
    blank[:, -1] = -1.0
    rep = video_eval.score(blank, labels, dirs, speeds, **kw)
    assert rep["direction"] == 0.0 and rep["digit"] == 1.0 and abs(rep["digit_frame"] - 2 / 3) < 1e-9
    with pytest.raises(ValueError, match="labels"):
        video_eval.score(clips, labels[:3], dirs, speeds, **kw)
    with pytest.raises(ValueError, match="exactly one"):
        video_eval.score(clips, labels, dirs, speeds, digit_size=16, speeds_px=(1, 3))


def test_eval_refuses_lengths_past_max_frames(tmp_path):
    import importlib.util
    import pathlib

    spec = importlib.util.spec_from_file_location(
        "t2v_config", pathlib.Path(__file__).resolve().parents[1] / "configs" / "t2v" / "mnist.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    config = mod.get_config()
    config.eval.frames = (3, 9)
    with pytest.raises(ValueError, match="max_frames"):
        video_eval.run(config, tmp_path)
