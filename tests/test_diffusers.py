"""diffusers `LuminaNextDiT2DModel` <-> our Next-DiT T2I: output parity, exact round trip, refusals, CLI.

A tiny diffusers model has every tensor re-drawn at random after construction (its zero-initialised
gates, adaLN and final layers included), so a wrong mapping of any tensor shows in the output.
"""

import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
from diffusers import LuminaNextDiT2DModel  # noqa: E402
from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina  # noqa: E402

from flagdit_jax import checkpoint, cli, tokens as tok  # noqa: E402
from flagdit_jax.convert import diffusers as conv  # noqa: E402
from flagdit_jax.convert.official import CheckpointMismatch  # noqa: E402
from flagdit_jax.models import registry  # noqa: E402
from flagdit_jax.models.common import InferenceOptions  # noqa: E402
from conftest import assert_parity  # noqa: E402

TINY = dict(sample_size=16, patch_size=2, in_channels=4, hidden_size=64, num_layers=2, num_attention_heads=4,
            num_kv_heads=2, cross_attention_dim=32)
# Full MHA, no QK norm, no learned sigma, custom FFN width: the converter's other branches.
TINY_ALT = dict(TINY, num_kv_heads=None, qk_norm=False, learn_sigma=False, ffn_dim_multiplier=1.5, multiple_of=32,
                norm_eps=1e-6)


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Re-draw every parameter; norm scales near 1. The cross-attention query copies the
    self-attention's, as in any checkpoint converted from the official layout."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if p.ndim == 2:
                p.copy_(r / math.sqrt(p.shape[1]))
            elif name.endswith(".weight"):  # 1-D weights are RMSNorm / LayerNorm scales
                p.copy_(1.0 + 0.3 * r)
            else:  # biases, gates, pad_token
                p.copy_(0.5 * r)
        for layer in model.layers:
            layer.attn2.to_q.weight.copy_(layer.attn1.to_q.weight)
            if layer.attn1.norm_q is not None:
                layer.attn2.norm_q.load_state_dict(layer.attn1.norm_q.state_dict())


def _tiny(sizes=TINY, seed=0) -> LuminaNextDiT2DModel:
    model = LuminaNextDiT2DModel(**sizes).eval()
    _randomize(model, seed)
    return model


def _state_dict(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module", params=["tiny", "tiny_alt"])
def pair(request):
    """(diffusers model, our config, our params, our module)."""
    model = _tiny(TINY if request.param == "tiny" else TINY_ALT, seed=1 if request.param == "tiny" else 2)
    cfg = conv.config_from_diffusers(dict(model.config))
    params = conv.params_from_diffusers(_state_dict(model), cfg)
    return model, cfg, params, registry.build(cfg)


def _inputs(cfg, height, width, *, batch=2, cap_len=6, cap_lens=None, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, cfg.in_channels, height, width)).astype(np.float32)
    t = rng.uniform(0.05, 0.95, batch).astype(np.float32)
    cap = rng.standard_normal((batch, cap_len, cfg.cap_feat_dim)).astype(np.float32)
    lens = cap_lens or [cap_len] * batch
    mask = (np.arange(cap_len)[None] < np.asarray(lens)[:, None]).astype(np.int64)
    return x, t, cap, mask


def _run_diffusers(model, x, t, cap, mask, *, linear_factor=1.0, ntk_factor=1.0, base_sequence_length=None):
    """The transformer call of `LuminaText2ImgPipeline` (its 384 x 384 RoPE table); returns [B, 2C|C, H, W]."""
    rope = get_2d_rotary_pos_embed_lumina(model.head_dim, 384, 384, linear_factor=linear_factor,
                                          ntk_factor=ntk_factor)
    kwargs = {} if base_sequence_length is None else {"base_sequence_length": base_sequence_length}
    with torch.no_grad():
        out = model(hidden_states=torch.from_numpy(x), timestep=torch.from_numpy(t),
                    encoder_hidden_states=torch.from_numpy(cap), encoder_mask=torch.from_numpy(mask),
                    image_rotary_emb=rope, cross_attention_kwargs=kwargs, return_dict=False)[0]
    return out.numpy()


def _run_ours(module, cfg, params, x, t, cap, mask, **opts):
    """Our model on the same NCHW input with `InferenceOptions(**opts)`; returns [B, C, H, W]."""
    packed = tok.pack_for(cfg, jnp.asarray(x.transpose(0, 2, 3, 1))[:, None])
    with jax.default_matmul_precision("highest"):
        out = module.apply({"params": params}, packed, jnp.asarray(t), cap_feats=jnp.asarray(cap),
                           cap_mask=jnp.asarray(mask, bool), options=InferenceOptions(**opts))
    return np.asarray(tok.unpack(out, packed))[:, 0].transpose(0, 3, 1, 2)


def _compare(pair, x, t, cap, mask, theirs_kw=None, ours_kw=None):
    model, cfg, params, module = pair
    theirs = _run_diffusers(model, x, t, cap, mask, **(theirs_kw or {}))
    assert theirs.shape == (x.shape[0], cfg.out_channels, *x.shape[2:])  # diffusers keeps the sigma channels
    ours = _run_ours(module, cfg, params, x, t, cap, mask, **(ours_kw or {}))
    err = float(np.max(np.abs(ours - theirs[:, :cfg.in_channels])))
    assert np.abs(theirs).max() > 0.1  # a non-trivial output
    assert_parity(ours, theirs[:, :cfg.in_channels])
    return err


# (name, latent H, W, caption lengths, diffusers call options, our options)
CASES = [
    ("square", 16, 16, None, {}, {}),
    ("non_square", 16, 24, None, {}, {}),
    ("caption_padding", 16, 16, [6, 3], {}, {}),
    ("proportional_attention", 16, 24, None, dict(base_sequence_length=16), dict(base_seqlen=16)),
    ("rope_position_interpolation", 16, 16, None, dict(linear_factor=2.0), dict(pi_factor=2.0)),
    ("rope_ntk", 16, 16, None, dict(ntk_factor=3.0), dict(ntk_factor=3.0)),
]


# non_square's 16x24 shape is also covered by proportional_attention: it runs in the slow suite.
@pytest.mark.parametrize("name,h,w,cap_lens,theirs_kw,ours_kw",
                         [pytest.param(*c, id=c[0], marks=pytest.mark.slow if c[0] == "non_square" else ()) for c in CASES])
def test_parity(pair, name, h, w, cap_lens, theirs_kw, ours_kw):
    x, t, cap, mask = _inputs(pair[1], h, w, cap_lens=cap_lens, seed=sum(map(ord, name)))
    _compare(pair, x, t, cap, mask, theirs_kw, ours_kw)


@pytest.mark.parametrize("t0", [0.2, 0.8])
def test_parity_pipeline_time_aware_rope(pair, t0):
    """The pipeline's time-aware switch (t < watershed: linear_factor = s, else ntk_factor = s) is our
    scale_factor / scale_watershed; with proportional attention, padded captions, non-square latents."""
    model, cfg = pair[0], pair[1]
    s, watershed, base = 1.5, 0.5, (model.config.sample_size * 8 // 16) ** 2
    x, t, cap, mask = _inputs(cfg, 16, 24, cap_lens=[6, 2], seed=7)
    t = np.full_like(t, t0)
    linear, ntk = (s, 1.0) if t[0] < watershed else (1.0, s)
    _compare(pair, x, t, cap, mask, dict(linear_factor=linear, ntk_factor=ntk, base_sequence_length=base),
             dict(scale_factor=s, scale_watershed=watershed, base_seqlen=base))


def test_config_from_diffusers():
    model = _tiny()
    cfg = conv.config_from_diffusers(dict(model.config))
    assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.kv_heads, cfg.cap_feat_dim, cfg.patch_size, cfg.in_channels) == \
        (64, 2, 4, 2, 32, 2, 4)
    assert (cfg.num_classes, cfg.nextline, cfg.pre_norm_affine, cfg.final_shift, cfg.learn_sigma) == \
        (0, False, True, False, True)
    # Round trip of the constructor arguments; diffusers builds the same model from them.
    back = conv.config_to_diffusers(cfg, sample_size=16)
    assert {k: v for k, v in dict(model.config).items() if not k.startswith("_")} == back
    with pytest.raises(ValueError, match="unknown .* field.*'bogus'"):
        conv.config_from_diffusers({**dict(model.config), "bogus": 1})
    with pytest.raises(ValueError, match="_class_name='SD3Transformer2DModel'"):
        conv.config_from_diffusers({"_class_name": "SD3Transformer2DModel"})
    with pytest.raises(ValueError, match="num_classes"):
        conv.config_to_diffusers(registry.get_config("nextdit-tiny"))


@pytest.mark.parametrize("sizes", [TINY, TINY_ALT], ids=["tiny", "tiny_alt"])
def test_round_trip_exact(sizes):
    """ours -> diffusers -> ours and diffusers -> ours -> diffusers are bit-exact, and what we write
    loads into diffusers with strict key checking."""
    model = _tiny(sizes, seed=3)
    cfg = conv.config_from_diffusers(dict(model.config))
    rng = np.random.default_rng(0)
    abstract = jax.tree.leaves(registry.abstract_params(cfg))
    ours = jax.tree.unflatten(jax.tree.structure(registry.abstract_params(cfg)),
                              [rng.standard_normal(a.shape).astype(np.float32) for a in abstract])
    ours = jax.tree.map(np.asarray, nn.unbox(ours))
    sd = conv.params_to_diffusers(ours, cfg)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
    back = conv.params_from_diffusers(sd, cfg)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), ours, back)
    assert jax.tree.structure(ours) == jax.tree.structure(back)

    theirs = _state_dict(_tiny(sizes, seed=4))
    again = conv.params_to_diffusers(conv.params_from_diffusers(theirs, cfg), cfg)
    assert sorted(again) == sorted(theirs)
    for k in theirs:
        np.testing.assert_array_equal(again[k], theirs[k], err_msg=k)


def test_refuses_mismatch():
    model = _tiny()
    cfg = conv.config_from_diffusers(dict(model.config))
    good = _state_dict(model)

    sd = dict(good)
    sd.pop("layers.0.attn1.to_q.weight")
    sd["layers.0.attn1.bogus.weight"] = np.zeros(3, np.float32)
    with pytest.raises(CheckpointMismatch, match=r"unexpected keys: layers\.0\.attn1\.bogus\.weight.*"
                                                 r"missing keys: layers\.0\.attn1\.to_q\.weight"):
        conv.params_from_diffusers(sd, cfg)

    sd = dict(good, **{"norm_out.linear_2.bias": np.zeros(7, np.float32)})
    with pytest.raises(CheckpointMismatch, match=r"norm_out\.linear_2\.bias: \(7,\) vs expected \(32,\)"):
        conv.params_from_diffusers(sd, cfg)

    sd = dict(good, **{"patch_embedder.proj.weight": np.zeros((64, 12), np.float32)})
    with pytest.raises(CheckpointMismatch, match=r"patch_embedder\.proj\.weight: \(64, 12\) vs expected \(64, 16\)"):
        conv.params_from_diffusers(sd, cfg)

    for key in ("layers.1.attn2.to_q.weight", "layers.0.attn2.norm_q.bias"):
        sd = dict(good, **{key: good[key] + 1e-3})
        with pytest.raises(CheckpointMismatch, match=rf"query.*{key.replace('.', '[.]')} differs from"):
            conv.params_from_diffusers(sd, cfg)

    # A config with one layer too many: the checkpoint lacks layers.2.
    with pytest.raises(CheckpointMismatch, match=r"missing keys: layers\.2\."):
        conv.params_from_diffusers(good, conv.config_from_diffusers({**dict(model.config), "num_layers": 3}))

    params = conv.params_from_diffusers(good, cfg)
    with pytest.raises(CheckpointMismatch, match=r"missing parameters: pad_token"):
        conv.params_to_diffusers({k: v for k, v in params.items() if k != "pad_token"}, cfg)


def test_cli_convert_diffusers_folder(tmp_path):
    model = _tiny(seed=5)
    model.save_pretrained(tmp_path / "transformer")
    out = tmp_path / "ckpt"
    assert cli.main(["convert", "--diffusers", str(tmp_path / "transformer"), "--output", str(out)]) == 0
    params, cfg = checkpoint.load_params(out)
    assert cfg == conv.config_from_diffusers(dict(model.config))
    expected = conv.params_from_diffusers(_state_dict(model), cfg)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), params, expected)
    # The reloaded checkpoint reproduces diffusers' output.
    x, t, cap, mask = _inputs(cfg, 16, 16, cap_lens=[6, 4], seed=11)
    theirs = _run_diffusers(model, x, t, cap, mask)[:, :cfg.in_channels]
    assert_parity(_run_ours(registry.build(cfg), cfg, params, x, t, cap, mask), theirs)
    # A pipeline folder (transformer/ inside) is accepted as well; --diffusers excludes the other sources.
    assert cli.main(["convert", "--diffusers", str(tmp_path), "--output", str(tmp_path / "ckpt2")]) == 0
    with pytest.raises(SystemExit, match="drop --model-args"):
        cli.main(["convert", "--diffusers", str(tmp_path), "--preset", "lumina-next-tiny",
                  "--output", str(tmp_path / "ckpt3")])
    with pytest.raises(SystemExit, match="exactly one of --checkpoint"):
        cli.main(["convert", "--output", str(tmp_path / "ckpt3")])


def test_load_diffusers_bfloat16_folder(tmp_path):
    """safetensors.numpy cannot read bfloat16; the loader falls back to ml_dtypes."""
    model = _tiny(seed=6).to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["_class_name"] == "LuminaNextDiT2DModel"
    params, cfg = conv.load_diffusers(tmp_path)
    expected = conv.params_from_diffusers({k: v.float().numpy() for k, v in model.state_dict().items()}, cfg)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), params, expected)


@pytest.mark.parametrize("height,width,shift", [(128, 128, 1.0), pytest.param(128, 192, 3.0, marks=pytest.mark.slow),
                                                pytest.param(96, 128, 1.0, marks=pytest.mark.slow)])
def test_whole_sampling_run_matches_lumina_text2img_pipeline(height, width, shift):
    """diffusers' LuminaPipeline (was LuminaText2ImgPipeline; transformer + FlowMatchEulerDiscreteScheduler, Euler in
    sigma, first-3-channel CFG, proportional attention, RoPE scaled by sqrt(HW)/S with watershed
    1.0 at every size) vs our LuminaNextPipeline with the same latents and caption embeddings and
    diffusers' options (grid='diffusers': N steps; rope_scaling_always: s < 1 scales too)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.lumina.pipeline_lumina import LuminaPipeline as LuminaText2ImgPipeline

    from flagdit_jax import pipeline as pl

    model = _tiny(TINY, seed=3)
    cfg = conv.config_from_diffusers(dict(model.config))
    params = conv.params_from_diffusers(_state_dict(model), cfg)
    theirs = LuminaText2ImgPipeline(transformer=model, scheduler=FlowMatchEulerDiscreteScheduler(shift=shift),
                                    vae=None, text_encoder=None, tokenizer=None)
    rng = np.random.default_rng(4)
    h, w = height // 8, width // 8
    lat = rng.standard_normal((2, 4, h, w)).astype(np.float32)
    cap = rng.standard_normal((2, 5, 32)).astype(np.float32)
    neg = rng.standard_normal((2, 5, 32)).astype(np.float32)
    cap_mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
    neg_mask = np.array([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0]], bool)
    with torch.no_grad():
        ref = theirs(height=height, width=width, num_inference_steps=4, guidance_scale=3.0,
                     latents=torch.from_numpy(lat), prompt_embeds=torch.from_numpy(cap),
                     prompt_attention_mask=torch.from_numpy(cap_mask).long(),
                     negative_prompt_embeds=torch.from_numpy(neg),
                     negative_prompt_attention_mask=torch.from_numpy(neg_mask).long(),
                     output_type="latent", clean_caption=False).images.numpy()
    ours = pl.LuminaNextPipeline(registry.build(cfg), params, train_image_size=16 * 8)
    with jax.default_matmul_precision("highest"):
        got = ours(None, height, width, num_inference_steps=4, guidance_scale=3.0, output_type="latent",
                   latents=jnp.asarray(lat.transpose(0, 2, 3, 1)), prompt_embeds=(cap, cap_mask),
                   negative_prompt_embeds=(neg, neg_mask), method="euler", grid="diffusers", shift=shift,
                   scaling_watershed=1.0, rope_scaling_always=True, proportional_attn=True)
    np.testing.assert_allclose(np.asarray(got).transpose(0, 3, 1, 2), ref, atol=1e-4, rtol=1e-5)
    if height * width < (16 * 8) ** 2:  # below the training size the official code does not scale RoPE
        official = ours(None, height, width, num_inference_steps=4, guidance_scale=3.0, output_type="latent",
                        latents=jnp.asarray(lat.transpose(0, 2, 3, 1)), prompt_embeds=(cap, cap_mask),
                        negative_prompt_embeds=(neg, neg_mask), method="euler", grid="diffusers", shift=shift,
                        scaling_watershed=1.0, proportional_attn=True)
        assert not np.allclose(np.asarray(official).transpose(0, 3, 1, 2), ref, atol=1e-3)
