"""Pipelines: diffusers-parity of a whole Lumina-Next sampling run, batching, compile reuse, options."""

import dataclasses
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flagdit_jax import pipeline as pl
from flagdit_jax.flow import samplers
from flagdit_jax.models import registry


class HashEncoder:
    """A tiny deterministic 'text encoder': one random vector per word, mask = word count."""

    def __init__(self, dim=32, max_len=6):
        self.dim, self.max_len = dim, max_len

    def __call__(self, prompts):
        feats = np.zeros((len(prompts), self.max_len, self.dim), np.float32)
        mask = np.zeros((len(prompts), self.max_len), bool)
        for i, p in enumerate(prompts):
            words = (p.split() or ["<empty>"])[: self.max_len]
            for j, w in enumerate(words):
                feats[i, j] = np.random.default_rng(zlib.crc32(w.encode())).standard_normal(self.dim)
                mask[i, j] = True
        return feats, mask


@dataclasses.dataclass
class StubVAE:
    """Nearest-neighbour upsampling of the first 3 latent channels, squashed to [-1, 1]."""

    scaling_factor: float = 0.5
    shift_factor: float = 0.0
    downsample: int = 2

    def decode(self, z):
        z = jnp.repeat(jnp.repeat(z[..., :3], self.downsample, 1), self.downsample, 2)
        return jnp.tanh(z)


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
    return pl.LuminaNextPipeline(model, params, vae=StubVAE(), text_encoder=HashEncoder(), train_image_size=32)


def test_batched_prompts_equal_single_prompts(next_pipe):
    """Each image of a batched call equals the image of its own single-prompt call with the same noise."""
    lat = jax.random.normal(jax.random.key(3), (2, 16, 16, 4))
    both = next_pipe(["a red cat", "two dogs"], 32, 32, num_inference_steps=3, latents=lat, output_type="latent")
    one = next_pipe("two dogs", 32, 32, num_inference_steps=3, latents=lat[1:], output_type="latent")
    np.testing.assert_allclose(np.asarray(both[1]), np.asarray(one[0]), rtol=1e-4, atol=1e-4)  # batch-size roundoff
    assert not np.allclose(np.asarray(both[0]), np.asarray(both[1]))


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


def test_pipeline_is_the_guided_ode_with_the_model_options(next_pipe):
    """An explicit Euler loop over the same grid with the model's time-aware RoPE and proportional
    attention options (at 2x the training side) gives the pipeline's latents."""
    cond, uncond = next_pipe.encode_prompt("a red cat")
    lat = jax.random.normal(jax.random.key(7), (1, 32, 32, 4))
    got = next_pipe(None, 64, 64, num_inference_steps=4, latents=lat, output_type="latent", method="euler",
                    prompt_embeds=(cond["cap_feats"], cond["cap_mask"]),
                    negative_prompt_embeds=(uncond["cap_feats"], uncond["cap_mask"]),
                    scaling_watershed=0.3, shift=3.0, guidance_scale=3.0)
    from flagdit_jax import tokens as tok

    model, params = next_pipe.model, next_pipe.params
    x = tok.pack(lat[:, None], 2, nextline=False)
    grid = np.asarray(pl.make_grid("lumina", 4, 3.0))
    caps = {k: jnp.concatenate([cond[k], uncond[k]]) for k in cond}
    for ta, tb in zip(grid[:-1], grid[1:]):
        both = x.replace(tokens=jnp.concatenate([x.tokens, x.tokens]), kind=jnp.concatenate([x.kind] * 2),
                         positions=jnp.concatenate([x.positions] * 2), mask=jnp.concatenate([x.mask] * 2),
                         shapes=x.shapes * 2)
        v = model.apply({"params": params}, both, jnp.full((2,), ta), **caps, base_seqlen=64,
                        scale_factor=2.0, scale_watershed=0.3)
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
