"""Training-free applications (REFERENCE.md §6): compositional regions, style sharing, img2img
editing and resolution extrapolation, on tiny random T2I Flag-DiT / Next-DiT models."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import HashEncoder, StubVAE, assert_parity

from flagdit_jax import pipeline as pl
from flagdit_jax import tokens as tok
from flagdit_jax.applications import compositional as comp
from flagdit_jax.applications import editing, extrapolation, style
from flagdit_jax.models import layers as L
from flagdit_jax.models import registry
from flagdit_jax.models.common import InferenceOptions, RegionalCaptions

CAP_DIM = 32


def randomize(shapes, seed=0):
    """Every leaf of a (shape) tree random and non-zero: zero-init gates / adaLN would make the
    model trivial. From the shapes alone, so nothing is compiled for `init`."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(0.3 * rng.standard_normal(x.shape), jnp.float32), nn.unbox(shapes))


def random_params(cfg, seed=0):
    return registry.build(cfg), randomize(registry.abstract_params(cfg), seed)


@pytest.fixture(scope="module")
def models():
    """preset -> (module, random params, jitted apply(params, packed, t, **kw, options=static))."""
    out = {}
    for preset in ("lumina-next-tiny", "lumina-t2i-tiny"):
        model, params = random_params(registry.get_config(preset))
        out[preset] = (model, params, jax.jit(lambda p, *a, options=None, _m=model, **kw: _m.apply(
            {"params": p}, *a, options=options, **kw), static_argnames="options"))
    return out


@pytest.fixture(scope="module")
def next_pipe(models):
    model, params, _ = models["lumina-next-tiny"]
    return pl.LuminaNextPipeline(model, params, vae=StubVAE(), text_encoder=HashEncoder(), train_image_size=32)


@pytest.fixture(scope="module")
def flag_pipe(models):
    model, params, _ = models["lumina-t2i-tiny"]
    return pl.FlagDiTPipeline(model, params, vae=StubVAE(), text_encoder=HashEncoder(), train_image_size=32)


FAST = dict(num_inference_steps=3, method="euler")

# ------------------------------------------------------------------------------------------------
# compositional generation
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def attn():
    """One Lumina attention layer (random weights, non-zero gate) on a 6x8-patch latent."""
    cfg = registry.get_config("lumina-next-tiny")
    layer = L.Attention(cfg)
    packed = tok.pack_for(cfg, jnp.zeros((1, 1, 12, 16, 4)))
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k1, (1, packed.tokens.shape[1], cfg.dim))
    angles = L.rope_angles(packed.positions[..., 1:], cfg.head_dim, theta=cfg.rope_theta)
    y = jax.random.normal(k2, (1, 5, CAP_DIM))
    params = randomize(jax.eval_shape(layer.init, k3, x, angles, None, y, jnp.ones((1, 5), bool))["params"])
    apply = jax.jit(lambda *a, **kw: layer.apply({"params": params}, *a, **kw))
    return cfg, apply, x, angles


def regional_call(attn, feats, mask, boxes):
    cfg, apply, x, angles = attn
    region = comp.region_masks(cfg, 12, 16, boxes)
    return np.asarray(apply(x, angles, None, feats[None], mask[None], y_region=jnp.asarray(region)[None])), region


def test_prompt_k_only_changes_tokens_in_its_box_and_equals_plain_cross_attention_there(attn):
    cfg, apply, x, angles = attn
    feats = jax.random.normal(jax.random.key(5), (3, 5, CAP_DIM))
    mask = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], bool)
    boxes = [(0, 0, 12, 8), (0, 8, 6, 16), (6, 8, 12, 16)]  # left half, top right, bottom right
    out, region = regional_call(attn, feats, mask, boxes)
    for k in range(3):
        changed, _ = regional_call(attn, feats.at[k].set(jax.random.normal(jax.random.key(k), (5, CAP_DIM))),
                                   mask, boxes)
        moved = np.abs(changed - out).max(-1)[0]
        assert moved[region[k]].min() > 0, k
        np.testing.assert_array_equal(moved[~region[k]], 0.0, err_msg=f"prompt {k} leaked outside its box")
        plain = np.asarray(apply(x, angles, None, feats[k][None], mask[k][None]))
        assert_parity(out[0, region[k]], plain[0, region[k]])


def test_tokens_outside_every_box_and_empty_captions_get_no_cross_attention(attn):
    cfg, apply, x, angles = attn
    feats = jax.random.normal(jax.random.key(6), (2, 5, CAP_DIM))
    mask = jnp.array([[1, 1, 0, 0, 0], [0, 0, 0, 0, 0]], bool)  # caption 1 has no valid token
    out, region = regional_call(attn, feats, mask, [(0, 0, 4, 4), (4, 4, 12, 16)])
    assert np.isfinite(out).all()
    self_only = np.asarray(apply(x, angles, None))  # no cross-attention at all
    uncovered = ~region[0]  # box 1's caption is empty, box 0 covers 2x2 patches
    assert region[0].sum() == 4 and uncovered.sum() == region.shape[1] - 4
    assert_parity(out[0, uncovered], self_only[0, uncovered])
    assert not np.allclose(out[0, region[0]], self_only[0, region[0]])


def test_boxes_to_token_masks():
    next_cfg = registry.get_config("lumina-next-tiny")
    # A 2x3 grid tiles the canvas: every token in exactly one box (the official (h+1)(w+1)-1
    # index gives (0,1) and (1,0) the same region, and (0,2), (1,0)... collide on 2-D grids).
    boxes = comp.grid_boxes(2, 3, 12, 18)
    m = comp.region_masks(next_cfg, 12, 18, boxes)
    assert m.shape == (6, 6 * 9) and (m.sum(0) == 1).all() and (m.sum(1) == 9).all()
    assert len({(h + 1) * (w + 1) - 1 for h in range(2) for w in range(3)}) < 6
    pos = np.asarray(tok.pack_for(next_cfg, jnp.zeros((1, 1, 12, 18, 4))).positions[0])
    np.testing.assert_array_equal(m[4], (pos[:, 1] >= 3) & (pos[:, 2] >= 3) & (pos[:, 2] < 6))  # row 1, col 1
    # Two boxes side by side in one row, in image pixels (VAE factor 2): disjoint, adjacent.
    a, b = comp.region_masks(next_cfg, 12, 18, [(0, 0, 8, 16), (0, 16, 8, 36)], units="pixel", downsample=2)
    assert not (a & b).any() and a.sum() == 2 * 4 and b.sum() == 2 * 5
    # Flag-DiT [nextline]: belongs to its row's last patch; a full box covers every token.
    flag_cfg = registry.get_config("lumina-t2i-tiny")
    packed = tok.pack_for(flag_cfg, jnp.zeros((1, 1, 8, 8, 4)))
    left, right = comp.region_masks(flag_cfg, 8, 8, [(0, 0, 8, 4), (0, 4, 8, 8)])
    eol = np.asarray(packed.kind[0]) == tok.NEXTLINE
    assert eol.sum() == 4 and right[eol].all() and not left[eol].any() and (left ^ right).all()
    with pytest.raises(ValueError, match="bottom > top"):
        comp.region_masks(next_cfg, 12, 18, [(4, 0, 4, 8)])
    with pytest.raises(ValueError, match="units='cm'"):
        comp.region_masks(next_cfg, 12, 18, boxes, units="cm")


@pytest.fixture(scope="module")
def flag_batch(models):
    """A Flag-DiT ([nextline], GQA) forward on 4 images and its plain output."""
    cfg = registry.get_config("lumina-t2i-tiny")
    _, params, apply = models["lumina-t2i-tiny"]
    packed = tok.pack_for(cfg, jax.random.normal(jax.random.key(1), (4, 1, 8, 8, 4)))
    feats = jax.random.normal(jax.random.key(2), (4, 4, CAP_DIM))
    mask = jnp.array([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0]], bool)
    t = jnp.full((4,), 0.4)
    run = lambda **kw: np.asarray(apply(params, packed, t, cap_feats=feats, cap_mask=mask, **kw))
    return cfg, packed, feats, mask, run, run()


def test_one_box_over_the_whole_image_is_the_plain_model(flag_batch, models):
    """K = 1 caption over every token (incl. [nextline]) = the plain model; the global caption only
    feeds the pooled adaLN."""
    cfg, packed, feats, mask, run, plain = flag_batch
    region = jnp.asarray(comp.region_masks(cfg, 8, 8, [(0, 0, 8, 8)]))
    regions = RegionalCaptions(feats[:, None], mask[:, None], jnp.broadcast_to(region, (4, 1, region.shape[1])))
    assert_parity(run(regions=regions), plain)
    model, params, _ = models["lumina-t2i-tiny"]
    t = jnp.full((4,), 0.4)
    with pytest.raises(ValueError, match=r"regions.region must be \[B, K, L\]"):
        model.apply({"params": params}, packed, t, cap_feats=feats, cap_mask=mask,
                    regions=RegionalCaptions(feats[:, None], mask[:, None], region[None]))


@pytest.mark.slow
def test_compositional_pipeline(next_pipe):
    prompts = ["a red cat", "two dogs", "blue sky", "green tree"]
    boxes = comp.grid_boxes(2, 2, 32, 32)
    out = comp.compositional(next_pipe, prompts, boxes, 32, 32, seed=1, num_images=2, **FAST)
    assert out.shape == (2, 16, 16, 4) and np.isfinite(np.asarray(out)).all()
    # The uncond half: the negative caption over the whole image, its K-1 other slots empty.
    cond, uncond = comp.regional_inputs(next_pipe.cfg, 16, 16, HashEncoder()(prompts), HashEncoder()(["x"]),
                                        HashEncoder()([""]), boxes)
    assert uncond["regions"].region[0, 0].all() and not uncond["regions"].region[0, 1:].any()
    assert not uncond["regions"].mask[0, 1:].any() and cond["regions"].feats.shape == (1, 4, 8, CAP_DIM)
    with pytest.raises(ValueError, match="3 boxes for 4 region captions"):
        comp.compositional(next_pipe, prompts, boxes[:3], 32, 32)


# ------------------------------------------------------------------------------------------------
# style-consistent batches
# ------------------------------------------------------------------------------------------------


def test_style_sharing_keeps_the_reference_and_changes_the_others(next_pipe):
    prompts = ["a red cat", "two dogs", "blue sky"]
    lat = jax.random.normal(jax.random.key(3), (3, 16, 16, 4))
    shared = np.asarray(style.style_aligned(next_pipe, prompts, 32, 32, latents=lat, **FAST))
    for i, p in enumerate(prompts):
        solo = np.asarray(next_pipe(p, 32, 32, latents=lat[i:i + 1], output_type="latent", **FAST))[0]
        if i == 0:  # the reference attends only to itself (batch-size roundoff only)
            np.testing.assert_allclose(shared[0], solo, rtol=1e-4, atol=1e-4)
        else:
            assert np.abs(shared[i] - solo).max() > 1e-2, i


@pytest.mark.slow
def test_style_sharing_in_flagdit_forward(flag_batch, models):
    """One Flag-DiT forward ([nextline], GQA) on a [cond; uncond] batch of 2+2: each reference's
    output is its solo output, the others change; style_groups=0 is the default call exactly."""
    cfg, packed, feats, mask, run, alone = flag_batch
    shared = run(options=InferenceOptions(style_groups=2))
    np.testing.assert_array_equal(run(options=InferenceOptions(style_groups=0)), alone)
    assert_parity(shared[[0, 2]], alone[[0, 2]])
    assert np.abs(shared[[1, 3]] - alone[[1, 3]]).max() > 1e-3
    with pytest.raises(ValueError, match="style_groups=3 must divide the batch size 4"):
        run(options=InferenceOptions(style_groups=3))
    model, params, _ = models["lumina-t2i-tiny"]
    t = jnp.full((4,), 0.4)
    mixed = tok.pack_for(cfg, [jnp.zeros((1, 8, 8, 4)), jnp.zeros((1, 8, 12, 4))])
    with pytest.raises(ValueError, match="no \\[PAD\\] tokens"):
        model.apply({"params": params}, mixed, t[:2], cap_feats=feats[:2], cap_mask=mask[:2],
                    options=InferenceOptions(style_groups=1))
    with pytest.raises(ValueError, match="cannot be combined with context_drop"):
        InferenceOptions(style_groups=2, context_drop=2)


# ------------------------------------------------------------------------------------------------
# editing / img2img
# ------------------------------------------------------------------------------------------------


def test_edit_grid_is_the_official_cut():
    t = np.linspace(0.0, 1.0, 30)
    official = (t / (t + 4.0 - 4.0 * t))[int(30 * (1 - 0.6)):]  # LT transport.py: ODE(strength=0.6)
    np.testing.assert_allclose(np.asarray(editing.edit_grid(30, 4.0, strength=0.6)), official, atol=1e-6)
    assert editing.edit_grid(30, 4.0, strength=1.0).shape == (30,)
    np.testing.assert_array_equal(np.asarray(editing.edit_grid(30, 4.0, strength=0.0)), [1.0])
    g = np.asarray(editing.edit_grid(5, 1.0, start_time=0.3))
    np.testing.assert_allclose(g, [0.3, 0.5, 0.75, 1.0])
    with pytest.raises(ValueError, match="at most one of strength"):
        editing.edit_grid(30, 4.0, strength=0.5, start_time=0.5)


def test_edit_endpoints(next_pipe):
    src = jax.random.normal(jax.random.key(4), (1, 16, 16, 4))
    eps = jax.random.normal(jax.random.key(5), (1, 16, 16, 4))
    kw = dict(source=src, noise=eps, num_inference_steps=2, method="euler")  # 2 grid points: one compile
    # lambda = 1: the source latent itself; lambda -> 1: one tiny step away from it.
    np.testing.assert_array_equal(np.asarray(editing.edit(next_pipe, "two dogs", start_time=1.0, **kw)), src)
    np.testing.assert_array_equal(np.asarray(editing.edit(next_pipe, "two dogs", strength=0.0, **kw)), src)
    near = editing.edit(next_pipe, "two dogs", start_time=1.0 - 1e-6, **kw)
    np.testing.assert_allclose(np.asarray(near), np.asarray(src), atol=1e-3)
    # lambda = 0: plain sampling from the same noise over the same grid.
    zero = editing.edit(next_pipe, "two dogs", start_time=0.0, **kw)
    plain = next_pipe("two dogs", 32, 32, latents=eps, output_type="latent", num_inference_steps=2, method="euler")
    np.testing.assert_allclose(np.asarray(zero), np.asarray(plain), rtol=1e-5, atol=1e-5)
    mid = np.asarray(editing.edit(next_pipe, "two dogs", start_time=0.5, **kw))
    assert np.isfinite(mid).all() and not np.allclose(mid, src) and not np.allclose(mid, plain)


@pytest.mark.slow
def test_edit_upsamples_images_and_normalises_channels(flag_pipe):
    images = jnp.tanh(jax.random.normal(jax.random.key(6), (2, 16, 16, 3)))
    out = editing.edit(flag_pipe, ["a cat", "a dog"], 32, 32, source_images=images, seed=0, normalize="source",
                       **FAST)
    assert out.shape == (2, 16, 16, 4) and np.isfinite(np.asarray(out)).all()
    x1 = editing.source_latents(flag_pipe, 32, 32, images=images)
    np.testing.assert_allclose(np.asarray(out).mean((1, 2)), np.asarray(x1).mean((1, 2)), atol=1e-4)
    np.testing.assert_allclose(np.asarray(out).std((1, 2)), np.asarray(x1).std((1, 2)), rtol=1e-3)


# ------------------------------------------------------------------------------------------------
# resolution extrapolation
# ------------------------------------------------------------------------------------------------


def test_extrapolation_variants_are_the_official_ratios(next_pipe, flag_pipe):
    """2x the training area (32x64 pixels at train size 32): k = 2 tokens ratio, s = sqrt(2)."""
    nv, fv = extrapolation.variants(next_pipe, 32, 64), extrapolation.variants(flag_pipe, 32, 64)
    common = {"plain", "time shift", "proportional attention", "NTK", "PI", "official"}
    assert set(fv) == common and set(nv) == common | {"time-aware switch (code, watershed 0.3)",
                                                       "paper time-aware", "paper frequency-aware"}
    s = 2 ** 0.5
    assert nv["NTK"][0].ntk_factor == pytest.approx(s) and fv["NTK"][0].ntk_factor == pytest.approx(2.0)
    assert nv["official"] == (next_pipe.inference_options(32, 64), 4.0)
    assert nv["official"][0].scale_factor == pytest.approx(s) and nv["official"][0].scale_watershed == 0.3
    assert fv["official"] == (flag_pipe.inference_options(32, 64), 4.0) and fv["official"][0].ntk_factor == 2.0
    assert nv["proportional attention"][0].base_seqlen == 64 and fv["proportional attention"][0].base_seqlen == 80


@pytest.mark.slow
def test_extrapolation_at_twice_the_training_area(next_pipe):
    _check_extrapolation(next_pipe, ["paper frequency-aware"])


@pytest.mark.slow
@pytest.mark.parametrize("which", ["next", "flag"])
def test_extrapolation_with_every_technique(which, next_pipe, flag_pipe):
    _check_extrapolation(next_pipe if which == "next" else flag_pipe, None)


def _check_extrapolation(pipe, names):
    train = names is None
    out = extrapolation.extrapolate(pipe, ["a red cat", "two dogs"], [(32, 64)], names=names, num_inference_steps=2,
                                    method="euler", include_train=train)
    table = extrapolation.variants(pipe, 32, 64)
    assert list(out) == [extrapolation.TRAIN] * train + [f"32x64, {n}" for n in table if train or n in names]
    assert not train or out[extrapolation.TRAIN].shape == (2, 16, 16, 4)
    for name, x in out.items():
        assert np.isfinite(np.asarray(x)).all(), name
        assert name == extrapolation.TRAIN or x.shape == (2, 16, 32, 4), name


@pytest.mark.slow
def test_run_helpers_write_grids(tmp_path, next_pipe):
    from PIL import Image

    p = style.run_style(next_pipe, ["a cat", "a dog"], tmp_path / "style.png", num_inference_steps=2)
    assert Image.open(p).size == (2 * 34, 2 * 34)
    p = comp.run_compositional(next_pipe, ["a cat", "a dog"], [(0, 0, 32, 16), (0, 16, 32, 32)],
                               tmp_path / "comp.png", num_images=1, num_inference_steps=2)
    assert Image.open(p).size == (34, 2 * 34)
    src = jax.random.normal(jax.random.key(0), (1, 16, 16, 4))
    p = editing.run_edit(next_pipe, "a cat", tmp_path / "edit.png", source=src, strengths=(0.5,),
                         num_inference_steps=2)
    assert Image.open(p).size == (2 * 34, 34)
    p, rows = extrapolation.run_extrapolation(next_pipe, ["a cat", "a dog"], tmp_path / "extra.png", names=["PI"],
                                              num_inference_steps=2)
    assert rows == [extrapolation.TRAIN, "32x64, PI"] and Image.open(p).size == (2 * 66, 2 * 34)
    scores = extrapolation.score_table(next_pipe, *next_pipe.encode_prompt(["a cat", "a dog", "a cow"]),
                                       lambda im: {"mean": im.mean(), "n": len(im)}, names=["PI"], batch=2,
                                       num_inference_steps=2, log=None)
    assert list(scores) == [extrapolation.TRAIN, "32x64, PI"] and all(s["n"] == 3 for s in scores.values())


@pytest.mark.slow
def test_inference_options_under_remat(models):
    """Rematerialised blocks (cfg.remat='full') give the plain blocks' output with proportional
    attention, context drop, style sharing and regional captions (their static settings are
    block fields, not traced call arguments)."""
    cfg = registry.get_config("lumina-next-tiny")
    model, params, _ = models["lumina-next-tiny"]
    remat = registry.build(dataclasses.replace(cfg, remat="full"))
    packed = tok.pack_for(cfg, jax.random.normal(jax.random.key(1), (2, 1, 8, 8, 4)))
    feats, mask, t = jax.random.normal(jax.random.key(2), (2, 4, CAP_DIM)), jnp.ones((2, 4), bool), jnp.full((2,), 0.2)
    region = jnp.asarray(comp.region_masks(cfg, 8, 8, [(0, 0, 8, 4)]))[None].repeat(2, 0)
    for kw in (dict(options=InferenceOptions(base_seqlen=8, context_drop=2, context_drop_until=0.5)),
               dict(options=InferenceOptions(style_groups=1, base_seqlen=8)),
               dict(regions=RegionalCaptions(feats[:, None], mask[:, None], region))):
        want = model.apply({"params": params}, packed, t, cap_feats=feats, cap_mask=mask, **kw)
        assert_parity(remat.apply({"params": params}, packed, t, cap_feats=feats, cap_mask=mask, **kw), want)
