"""Next-DiT inference options: paper RoPE scalings (limits checked analytically) and context drop."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flagdit_jax import tokens as tok
from flagdit_jax.models import layers as L
from flagdit_jax.models import registry
from flagdit_jax.models.common import InferenceOptions
from flagdit_jax.models.layers import pool_keys_values


def test_time_aware_scaling_limits():
    """t=1 is plain NTK (theta * s); t=0 is position interpolation for every pair with e_j*d >= 1."""
    hd, s = 16, 2.0
    pos = jnp.asarray(np.random.default_rng(0).integers(0, 40, (1, 7, 2)))
    e = np.asarray(L.rope_exponents(hd, 2))
    end = L.rope_angles(pos, hd, freq_factor=L.scaled_rope_factor(hd, 2, s, hd))
    np.testing.assert_allclose(end, L.rope_angles(pos, hd, ntk_factor=s), rtol=1e-5)
    start = np.asarray(L.rope_angles(pos, hd, freq_factor=L.scaled_rope_factor(hd, 2, s, 1.0)))
    pi = np.asarray(L.rope_angles(pos, hd, pi_factor=s))
    np.testing.assert_allclose(start[..., e * hd >= 1], pi[..., e * hd >= 1], rtol=1e-5)
    np.testing.assert_allclose(start[..., e == 0], np.asarray(L.rope_angles(pos, hd))[..., e == 0], rtol=1e-6)


def test_frequency_aware_scaling_is_pi_past_the_training_wavelength():
    hd, s, theta, train_len = 64, 2.0, 10000.0, 64
    e = np.asarray(L.rope_exponents(hd, 2))
    rho = math.log(train_len / (2 * math.pi), theta)  # exponent whose wavelength 2pi*theta^e is train_len
    f = np.asarray(L.scaled_rope_factor(hd, 2, s, hd * rho))
    np.testing.assert_allclose(f[e >= rho], 1 / s, rtol=1e-6)
    inner = e < rho
    np.testing.assert_allclose(f[inner], s ** (-e[inner] / rho), rtol=1e-6)  # NTK with b * s^(1/rho)
    assert np.all(np.diff(f) <= 1e-7)  # monotone from 1 (highest frequency) down to 1/s


@pytest.fixture(scope="module")
def next_model():
    cfg = registry.get_config("lumina-next-tiny")
    model = registry.build(cfg)
    packed = tok.pack_for(cfg, jnp.asarray(np.random.default_rng(1).standard_normal((2, 1, 16, 24, 4)), jnp.float32))
    rng = np.random.default_rng(2)
    kw = dict(cap_feats=jnp.asarray(rng.standard_normal((2, 5, 32)), jnp.float32),
              cap_mask=jnp.asarray([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool))
    params = model.init(jax.random.key(0), packed, jnp.zeros(2), **kw)["params"]
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(3), len(leaves))
    params = jax.tree.unflatten(tree, [0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
    return model, params, packed, kw


def test_paper_scalings_run_and_differ(next_model):
    model, params, packed, kw = next_model
    run = lambda **o: np.asarray(model.apply({"params": params}, packed, jnp.full((2,), 0.5), **kw,
                                             options=InferenceOptions(**o)))
    base = run()
    ta = run(rope_scaling="time_aware", scale_factor=2.0)
    fa = run(rope_scaling="frequency_aware", scale_factor=2.0, rope_train_len=8)
    assert np.isfinite(ta).all() and np.isfinite(fa).all()
    assert not np.allclose(ta, base) and not np.allclose(fa, base) and not np.allclose(ta, fa)
    np.testing.assert_allclose(run(rope_scaling="time_aware", scale_factor=1.0), base, atol=1e-5)  # s=1: no-op
    with pytest.raises(ValueError, match="rope_train_len"):
        run(rope_scaling="frequency_aware", scale_factor=2.0)
    # The watershed switch with the official default watershed 1.0 is PI at every t < 1.
    np.testing.assert_array_equal(run(scale_factor=2.0), run(pi_factor=2.0))
    np.testing.assert_array_equal(run(scale_factor=2.0, scale_watershed=0.5), run(ntk_factor=2.0))  # t=0.5: NTK


def test_pool_keys_values_groups_r_by_r_patches():
    t, h, w, r = 1, 4, 6, 2
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    z = jnp.asarray(np.stack([rows, cols], -1).reshape(1, 1, h * w, 2), jnp.float32)
    pooled = np.asarray(pool_keys_values(z, (t, h, w, r)))[0, 0].reshape(h // r, w // r, 2)
    np.testing.assert_allclose(pooled[..., 0], np.arange(h // r)[:, None] * r + 0.5 + 0 * pooled[..., 1])
    np.testing.assert_allclose(pooled[..., 1], np.arange(w // r)[None, :] * r + 0.5 + 0 * pooled[..., 0])


def test_context_drop_is_time_aware(next_model):
    model, params, packed, kw = next_model
    run = lambda t, **o: np.asarray(model.apply({"params": params}, packed, jnp.full((2,), t), **kw,
                                                options=InferenceOptions(**o)))
    for t in (0.2, 0.8):
        full, drop = run(t), run(t, context_drop=2)
        assert not np.allclose(full, drop)  # pooling keys changes the output...
        assert np.abs(full - drop).mean() < np.abs(full).mean()  # ...but keeps it close
        timed = run(t, context_drop=2, context_drop_until=0.5)
        np.testing.assert_allclose(timed, drop if t < 0.5 else full, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(run(0.3, context_drop=1), run(0.3), atol=0)
    mixed = tok.pack_for(model.cfg, [jnp.zeros((1, 16, 16, 4)), jnp.zeros((1, 8, 8, 4))])
    with pytest.raises(ValueError, match="context_drop needs one latent size"):
        model.apply({"params": params}, mixed, jnp.zeros(2), **kw, options=InferenceOptions(context_drop=2))
    with pytest.raises(ValueError, match="must divide the token grid"):
        run(0.3, context_drop=5)


@pytest.mark.slow  # default-suite time budget
@pytest.mark.parametrize("rope_axes", [2, 3])
def test_video_frames_with_2d_and_3d_rope(rope_axes):
    """Two identical frames: 2-D RoPE (row, col) cannot tell them apart, 3-D (frame, row, col) can."""
    cfg = registry.get_config("nextdit-tiny", dim=96, n_heads=4, n_kv_heads=None, rope_axes=rope_axes)
    model = registry.build(cfg)
    frame = np.random.default_rng(0).standard_normal((1, 1, 8, 8, 4)).astype(np.float32)
    packed = tok.pack_for(cfg, jnp.asarray(np.concatenate([frame, frame], 1)))
    params = model.init(jax.random.key(0), packed, jnp.zeros(1), y=jnp.zeros(1, jnp.int32))["params"]
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = jax.tree.unflatten(tree, [0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
    out = tok.unpack(model.apply({"params": params}, packed, jnp.full((1,), 0.5), y=jnp.ones(1, jnp.int32)),
                     packed)[0]
    same = np.allclose(np.asarray(out[0]), np.asarray(out[1]), atol=1e-5)
    assert same == (rope_axes == 2)
    with pytest.raises(ValueError, match="divisible by 2\\*rope_axes=6"):
        registry.get_config("nextdit-tiny", rope_axes=3)  # head_dim 16
