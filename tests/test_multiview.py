"""Text-to-multi-view on rendered solids: the renderer, the source and the independent reader."""

import numpy as np
import pytest

from flagdit_jax.data import multiview as mv
from flagdit_jax.eval import multiview_eval as me


def test_cube_area_matches_orthographic_projection():
    # elevation 0: a cube of side 1.2 seen face-on is a 1.2 square; at 45 degrees it is 1.2*sqrt(2) wide
    size, half = 32, mv._HALF_EXTENT
    px_per_unit = size / (2 * half)
    for az, width in ((0, 1.2), (45, 1.2 * np.sqrt(2))):
        _, cover = mv.rasterize("cube", az, 0.0, size, supersample=16)  # fine sampling: area to < 1%
        assert cover.sum() == pytest.approx(width * 1.2 * px_per_unit ** 2, rel=0.01)


def test_symmetric_solids_repeat_every_quarter_turn_and_the_l_block_does_not():
    for solid in ("cube", "pyramid", "octahedron"):
        v = mv.render(solid, "green", (30, 120), 25.0, 16)
        np.testing.assert_allclose(v[0], v[1], atol=1e-5)
    v = mv.render("prism", "green", (30, 120, 210), 25.0, 16)
    np.testing.assert_allclose(v[0], v[2], atol=1e-5)  # half-turn symmetric only
    assert np.abs(v[0] - v[1]).max() > 0.5
    v = mv.render("lblock", "green", (0, 90, 180), 25.0, 16)
    assert np.abs(v[0] - v[1]).max() > 0.5 and np.abs(v[0] - v[2]).max() > 0.5


def test_colour_and_background():
    v = mv.render("cube", "red", (0,), 25.0, 16)[0]
    assert v.min() >= -1 and v.max() <= 1
    assert (v[0, 0] == -1).all()  # corner: background
    fg = v[v.max(-1) > -0.5]
    assert (fg[:, 0] > fg[:, 1]).all() and (fg[:, 0] > fg[:, 2]).all()  # red dominates every lit pixel


def test_source_records_deterministic_captioned_and_variable_views():
    tr = mv.MultiViewSource("train", views=(4,), num_records=50)
    ev = mv.MultiViewSource("eval", eval_views=(4, 8), eval_records=20)
    a, b = tr[7], mv.MultiViewSource("train", views=(4,), num_records=50)[7]
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert a["frames"].shape == (4, 16, 16, 3) and a["frames"].dtype == np.float32
    r = tr.record(7)
    assert r["azimuths"] == [(r["azimuths"][0] + 90 * k) % 360 for k in range(4)]
    np.testing.assert_array_equal(a["frames"], mv.render(r["solid"], r["colour"], r["azimuths"], 25.0, 16))
    feats, mask = tr.captions.encode(["<bos>", "a", r["colour"], r["solid"]])
    np.testing.assert_array_equal(a["cap_feats"], feats)
    assert mask.all() and mv.SOLID_NAMES[a["label"]] == r["solid"]
    assert tr.null_caption()["cap_mask"].sum() == 1
    assert set(ev.frame_shapes()[:, 0].tolist()) == {4, 8}
    assert all(ev[i]["frames"].shape[0] == t for i, (t, _, _) in enumerate(ev.frame_shapes()[:4]))
    draw = lambda s, i: (s.record(i)["solid"], s.record(i)["colour"], s.record(i)["azimuths"][0])  # noqa: E731
    assert [draw(tr, i) for i in range(20)] != [draw(ev, i) for i in range(20)]  # the eval split draws other records


def test_bad_options_raise():
    with pytest.raises(ValueError, match="views"):
        mv.MultiViewSource("train", views=(7,))
    with pytest.raises(ValueError, match="split"):
        mv.MultiViewSource("test")
    with pytest.raises(ValueError, match="multiples"):
        mv.render("cube", "red", (10,), 25.0, 16)
    with pytest.raises(ValueError, match="colour"):
        mv.render("cube", "purple", (0,), 25.0, 16)


def test_reader_scores_real_renders_perfectly_and_shuffled_views_poorly():
    src = mv.MultiViewSource("eval", eval_views=(8,), eval_records=40)
    tmpl = me.templates(src.size, src.elevation)
    recs = [src[i] for i in range(40)]
    real = np.stack([r["frames"] for r in recs])
    solid, colour = np.array([r["label"] for r in recs]), np.array([r["colour"] for r in recs])
    m = me.score(real, solid, colour, tmpl)
    assert m["consistent"] == m["identity"] == m["caption"] == m["pose_step"] == 1.0
    # a little noise does not change the reading
    noisy = np.clip(real + 0.1 * np.random.default_rng(0).standard_normal(real.shape), -1, 1)
    assert me.score(noisy, solid, colour, tmpl)["caption"] == 1.0
    shuffled = np.stack([real[np.random.default_rng(k).permutation(40), k] for k in range(8)], 1)
    assert me.score(shuffled, solid, colour, tmpl)["consistent"] < 0.1
    # views turning the wrong way break the pose step of the L block, not its identity
    l_rows = solid == mv.SOLID_NAMES.index("lblock")
    assert l_rows.any()
    m = me.score(real[l_rows][:, ::-1], solid[l_rows], colour[l_rows], tmpl)
    assert m["identity"] == 1.0 and m["pose_step"] == 0.0


def test_save_media_writes_a_turntable_gif(tmp_path):
    from PIL import Image

    src = mv.MultiViewSource("train", num_records=3)
    frames = np.stack([src[i]["frames"] for i in range(3)])
    (path,) = src.save_media(tmp_path / "strip", frames, scale=2)
    gif = Image.open(path)
    assert gif.n_frames == 4 and gif.size == (3 * 16 * 2, 16 * 2)
    gif.seek(1)
    first = np.asarray(gif.convert("RGB"))[:32, :32].astype(float) / 127.5 - 1
    np.testing.assert_allclose(first, frames[0, 1].repeat(2, 0).repeat(2, 1), atol=0.05)
    with pytest.raises(ValueError, match="frames"):
        src.save_media(tmp_path / "x", frames[0])


def _config(arg="next"):
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "configs/t2mv/solids.py"
    spec = importlib.util.spec_from_file_location("solids", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg)


@pytest.mark.parametrize("arg", ["next", "flag"])
def test_config_validates_and_its_source_packs(arg):
    from flagdit_jax import tasks, tokens, train
    from flagdit_jax.data import buckets

    c = _config(arg)
    c.data.options.num_records, c.data.options.eval_records = 8, 8
    train.validate(c)
    src = train.make_source(c)
    train.validate_data(c, src)
    cfg = train.model_config(c)
    task = tasks.get_task(c, cfg, src)
    batch = tokens.pack_host([src[i]["frames"] for i in range(2)], cfg, int(buckets.assign_buckets(
        buckets.record_shapes(src), cfg, None)[1][0]))
    assert batch["tokens"].shape[0] == 2 and task.collate([src[0], src[1]])["cap_feats"].shape == (2, 4, 32)
    with pytest.raises(ValueError, match="solids.py:bad"):
        _config("bad")


@pytest.mark.slow
def test_train_sample_eval_end_to_end(tmp_path):
    import json

    from flagdit_jax import sample, train

    c = _config()
    c.total_steps, c.log_every_steps, c.checkpoint.every_steps = 4, 2, 4
    c.model.dim, c.model.n_layers = 48, 1
    c.data.options.num_records, c.data.options.eval_records = 64, 8
    c.sample.num_steps, c.sample.per_class = 2, 2
    c.eval.num_samples, c.eval.batch = 2, 2
    train.train(c, tmp_path)
    written = sample.sample_grid(c, tmp_path)
    assert {p.suffix for p in written} == {".png", ".gif"} and len(written) == 4  # 4 and 8 views
    rep = me.run(c, tmp_path)
    saved = json.loads((tmp_path / "eval_4.json").read_text())
    assert set(saved["by_views"]) == {"4", "8"} and saved["by_views"]["8"]["generated"]["views"] == 8
    assert saved["by_views"]["4"]["real_floor"]["consistent"] == 1.0 == rep["by_views"]["4"]["real_floor"]["caption"]
    assert (tmp_path / "eval_4_8views.gif").is_file() and (tmp_path / "eval_4_4views.png").is_file()
