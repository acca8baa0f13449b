"""Pipelines: diffusers-parity of a whole Lumina-Next sampling run, batching, compile reuse, options."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import HashEncoder, StubVAE

from flagdit_jax import pipeline as pl
from flagdit_jax import tokens as tok
from flagdit_jax.flow import samplers
from flagdit_jax.models import registry
from flagdit_jax.models.common import InferenceOptions


def official_grid(num_steps, shift):
    """LT `lumina_next_t2i/transport/integrators.py: ode`: linspace(0, 1, num_steps) then t / (t + s - s*t)."""
    t = np.linspace(0.0, 1.0, num_steps)
    return t / (t + shift - shift * t)


@pytest.fixture(scope="module")
def next_pipe():
    cfg = registry.get_config("lumina-next-tiny")
    model = registry.build(cfg)
    packed, t, kw = registry.example_inputs(cfg)
    params = model.init(jax.random.key(0), packed, t, **kw)["params"]
    # Random non-zero everywhere (the zero-init adaLN / final layer would make the model trivial).
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = jax.tree.unflatten(tree, [0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
    return pl.LuminaNextPipeline(model, params, vae=StubVAE(), text_encoder=HashEncoder(max_len=6), train_image_size=32)


@pytest.mark.slow
def test_batched_prompts_equal_single_prompts(next_pipe):
    """Each image of a batched call equals the image of its own single-prompt call with the same noise."""
    lat = jax.random.normal(jax.random.key(3), (2, 16, 16, 4))
    both = next_pipe(["a red cat", "two dogs"], 32, 32, num_inference_steps=3, latents=lat, output_type="latent")
    one = next_pipe("two dogs", 32, 32, num_inference_steps=3, latents=lat[1:], output_type="latent")
    np.testing.assert_allclose(np.asarray(both[1]), np.asarray(one[0]), rtol=1e-4, atol=1e-4)  # batch-size roundoff
    assert not np.allclose(np.asarray(both[0]), np.asarray(both[1]))


@pytest.mark.slow  # default-suite time budget
def test_compiled_sampler_is_reused(next_pipe):
    next_pipe("a red cat", 32, 32, num_inference_steps=2, seed=0, output_type="latent")
    n = next_pipe._jitted._cache_size()
    # New prompt, seed and guidance scale, same shapes: no new compile.
    next_pipe("blue sky", 32, 32, num_inference_steps=2, seed=5, guidance_scale=2.0, output_type="latent")
    assert next_pipe._jitted._cache_size() == n
    next_pipe("blue sky", 32, 48, num_inference_steps=2, seed=5, output_type="latent")  # new resolution
    assert next_pipe._jitted._cache_size() == n + 1


def test_output_types_and_errors(next_pipe):
    imgs = next_pipe("a red cat", 32, 32, num_inference_steps=2, seed=0)
    assert len(imgs) == 1 and imgs[0].size == (32, 32) and imgs[0].mode == "RGB"
    arr = next_pipe("a red cat", 32, 32, num_inference_steps=2, seed=0, output_type="np")
    assert arr.shape == (1, 32, 32, 3) and 0.0 <= arr.min() and arr.max() <= 1.0
    np.testing.assert_allclose(np.asarray(imgs[0]) / 255.0, arr[0], atol=1 / 255 + 1e-6)
    with pytest.raises(ValueError, match="height=30 and width=32 must be positive multiples of 4"):
        next_pipe("x", 30, 32)
    with pytest.raises(ValueError, match="output_type='png'"):
        next_pipe("x", 32, 32, output_type="png")
    with pytest.raises(ValueError, match="latents shape"):
        next_pipe("x", 32, 32, latents=jnp.zeros((1, 8, 8, 4)))


@pytest.mark.slow
def test_pipeline_is_the_guided_ode_with_the_model_options(next_pipe):
    """An explicit Euler loop over the official grid (4 "steps" = 4 grid points = 3 Euler steps)
    with the model's time-aware RoPE and proportional attention options (at 2x the training side,
    extrapolating) gives the pipeline's latents."""
    cond, uncond = next_pipe.encode_prompt("a red cat")
    lat = jax.random.normal(jax.random.key(7), (1, 32, 32, 4))
    got = next_pipe(None, 64, 64, num_inference_steps=4, latents=lat, output_type="latent", method="euler",
                    prompt_embeds=(cond["cap_feats"], cond["cap_mask"]),
                    negative_prompt_embeds=(uncond["cap_feats"], uncond["cap_mask"]),
                    scaling_watershed=0.3, shift=3.0, guidance_scale=3.0)
    from flagdit_jax import tokens as tok

    model, params = next_pipe.model, next_pipe.params
    x = tok.pack_for(model.cfg, lat[:, None])
    grid = official_grid(4, 3.0)
    options = InferenceOptions(base_seqlen=64, scale_factor=2.0, scale_watershed=0.3)
    caps = {k: jnp.concatenate([cond[k], uncond[k]]) for k in cond}
    for ta, tb in zip(grid[:-1], grid[1:]):
        both = x.replace(tokens=jnp.concatenate([x.tokens, x.tokens]), kind=jnp.concatenate([x.kind] * 2),
                         positions=jnp.concatenate([x.positions] * 2), mask=jnp.concatenate([x.mask] * 2),
                         shapes=x.shapes * 2)
        v = model.apply({"params": params}, both, jnp.full((2,), ta), **caps, options=options)
        v = v.reshape(2, -1, 4, 4)
        g = samplers.cfg_combine(v[:1], v[1:], 3.0, channels=3).reshape(1, -1, 16)
        x = x.replace(tokens=x.tokens + (tb - ta) * g)
    np.testing.assert_allclose(np.asarray(got), np.asarray(tok.unpack(x.tokens, x)[:, 0]), rtol=1e-4, atol=1e-4)


def test_flagdit_class_conditional_pipeline():
    cfg = registry.get_config("flagdit-tiny", num_classes=10)
    model = registry.build(cfg)
    packed, t, kw = registry.example_inputs(cfg)
    params = model.init(jax.random.key(0), packed, t, **kw)["params"]
    pipe = pl.FlagDiTPipeline(model, params, vae=StubVAE(), train_image_size=32)
    out = pipe(class_labels=[1, 2, 3], num_inference_steps=2, seed=0, output_type="latent")
    assert out.shape == (3, 16, 16, 4) and np.isfinite(np.asarray(out)).all()
    with pytest.raises(ValueError, match=r"class_labels must be ints in \[0, 10\)"):
        pipe(class_labels=[10])
    with pytest.raises(ValueError, match="needs a text-conditional Next-DiT"):
        pl.LuminaNextPipeline(model, params)


@pytest.mark.slow
def test_lumina_next_pipeline_passes_paper_rope_and_context_drop(next_pipe):
    lat = jax.random.normal(jax.random.key(9), (1, 32, 32, 4))
    run = lambda **o: np.asarray(next_pipe("a red cat", 64, 64, num_inference_steps=2, latents=lat,
                                           output_type="latent", **o))
    base = run()
    for opts in (dict(rope_scaling="time_aware"), dict(rope_scaling="frequency_aware"),
                 dict(context_drop=2), dict(context_drop=2, context_drop_until=0.5)):
        out = run(**opts)
        assert np.isfinite(out).all() and not np.allclose(out, base), opts
    # Dropping only while t < 0 never drops: the plain run.
    np.testing.assert_allclose(run(context_drop=2, context_drop_until=0.0), base, rtol=1e-5, atol=1e-5)


# The official demo's resolution menu (LT lumina_next_t2i/demo.py, "WxH"): RoPE scaling is passed
# (scale_factor = sqrt(W*H)/1024, watershed) exactly for the "(Extrapolation)" entries.
DEMO_RESOLUTIONS = ["1024x1024", "512x2048", "2048x512", "(Extrapolation) 1536x1536", "(Extrapolation) 2048x1024",
                    "(Extrapolation) 1024x2048", "(Extrapolation) 2048x2048", "(Extrapolation) 4096x1024",
                    "(Extrapolation) 1024x4096"]
# LT lumina_next_t2i/sample.py: "res_cat:WxH", do_extrapolation = res_cat > 1024 (sizes from
# lumina_next_t2i_mini/scripts/sample.sh), plus smaller ones.
SAMPLE_RESOLUTIONS = ["512:512x512", "1024:1024x1024", "1536:1536x1536", "1664:1664x1664", "2048:2048x2048"]


def test_rope_scaling_only_when_extrapolating_as_the_official_code(next_pipe):
    pipe = dataclasses.replace(next_pipe, train_image_size=1024, vae=None, vae_downsample=8)
    cases = [("Extrapolation" in r, r.split(" ")[-1]) for r in DEMO_RESOLUTIONS]
    cases += [(int(r.split(":")[0]) > 1024, r.split(":")[1]) for r in SAMPLE_RESOLUTIONS]
    for official, res in cases:
        w, h = map(int, res.split("x"))
        opts = pipe.inference_options(h, w)
        s = math.sqrt(w * h / 1024 ** 2)  # the official scale_factor when extrapolating
        assert opts.scale_factor == pytest.approx(s if official else 1.0, rel=1e-12), res
        assert opts.scale_watershed == 0.3 and opts.base_seqlen == (1024 // 16) ** 2, res
        # diffusers' LuminaPipeline: always sqrt(W*H)/S, below the training size too.
        assert pipe.inference_options(h, w, rope_scaling_always=True).scale_factor == pytest.approx(s, rel=1e-12), res


def test_step_count_is_grid_points_as_official():
    """Official num_steps N = N grid points = N-1 solver steps; diffusers' N = N steps."""
    for n, shift in [(30, 4.0), (2, 1.0), (7, 3.0)]:
        np.testing.assert_allclose(np.asarray(pl.make_grid("lumina", n, shift)), official_grid(n, shift), atol=1e-6)
        assert pl.make_grid("sigmoid", n, shift).shape == (n,)
        assert pl.make_grid("diffusers", n, shift).shape == (n + 1,)
    with pytest.raises(ValueError, match="num_inference_steps=1 must be an integer >= 2 for grid='lumina'"):
        pl.make_grid("lumina", 1, 1.0)


@pytest.mark.slow  # default-suite time budget
def test_class_conditional_defaults_are_the_official_imagenet_sampling():
    """FlagDiTPipeline(class_labels) with no sampler arguments = the official ImageNet sample.py:
    torchdiffeq dopri5 (atol 1e-6, rtol 1e-3) over linspace(0, 1, N), no time shift, CFG 4 on the
    first 3 channels; here with a Next-DiT ImageNet model, against torchdiffeq itself."""
    torch = pytest.importorskip("torch")
    torchdiffeq = pytest.importorskip("torchdiffeq")
    cfg = registry.get_config("nextdit-tiny", num_classes=10)
    model = registry.build(cfg)
    packed, t, kw = registry.example_inputs(cfg)
    params = model.init(jax.random.key(0), packed, t, **kw)["params"]
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = jax.tree.unflatten(tree, [0.2 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
    pipe = pl.FlagDiTPipeline(model, params, vae=StubVAE(), train_image_size=16)
    lat = jax.random.normal(jax.random.key(2), (2, 8, 8, 4))
    got = np.asarray(pipe(class_labels=[3, 7], latents=lat, output_type="latent"))

    labels = jnp.asarray([3, 7, 10, 10], jnp.int32)  # [cond; uncond], null class = num_classes
    both = tok.pack_for(cfg, jnp.concatenate([lat, lat])[:, None])

    @jax.jit
    def forward_with_cfg(x, t):  # the official forward_with_cfg: the model sees [half; half], half = x[:B]
        half = jnp.concatenate([x[:2], x[:2]])
        out = tok.unpack(model.apply({"params": params}, both.replace(tokens=tok.pack_for(cfg, half[:, None]).tokens),
                                     jnp.full((4,), t), y=labels), both)[:, 0]
        c, u = out[:2, ..., :3], out[2:, ..., :3]
        half = u + 4.0 * (c - u)
        return jnp.concatenate([jnp.concatenate([half, half]), out[..., 3:]], -1)

    f = lambda t, x: torch.from_numpy(np.array(forward_with_cfg(jnp.asarray(x.numpy()), float(t))))
    z = torch.from_numpy(np.array(jnp.concatenate([lat, lat])))
    ref = torchdiffeq.odeint(f, z, torch.linspace(0, 1, 250), method="dopri5", atol=1e-6, rtol=1e-3)[-1].numpy()[:2]
    assert np.abs(got - np.asarray(lat)).max() > 0.1  # the model moved the latents
    # Two adaptive solvers at the same tolerances (rtol 1e-3) agree to a few times rtol.
    np.testing.assert_allclose(got, ref, rtol=5e-3, atol=2e-3)
    euler = np.asarray(pipe(class_labels=[3, 7], latents=lat, output_type="latent", method="euler",
                            num_inference_steps=3))
    assert np.abs(euler - ref).max() > 10 * np.abs(got - ref).max()  # and the check can tell solvers apart
