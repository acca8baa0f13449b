"""flow.paths and flow.timesteps against hand formulas, jax.grad and diffusers."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from flagdit_jax.flow import paths, timesteps
from flagdit_jax.flow.paths import GVPPath, LinearPath, VPPath, get_path
from flagdit_jax.flow.timesteps import (
    get_time_sampler,
    sample_logit_normal,
    sample_shifted,
    sample_uniform,
    shift_time,
    time_grid,
)

PATHS = [LinearPath(), GVPPath(), VPPath()]  # VP-specific checks: tests/test_flow_vp.py


def _data(key, shape=(3, 4, 5, 2)):
    k0, k1 = jax.random.split(jax.random.key(key))
    return jax.random.normal(k0, shape), 2.0 + 0.5 * jax.random.normal(k1, shape)


# ------------------------------------------------------------------------------------------------
# paths
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", PATHS[:2], ids=lambda p: p.name)  # VP's t=0 is not pure noise
def test_interpolate_endpoints(path):
    x0, x1 = _data(0)
    b = x0.shape[0]
    xt, _ = path.interpolate(x0, x1, jnp.zeros(b))
    np.testing.assert_allclose(xt, x0, atol=1e-6)
    xt, _ = path.interpolate(x0, x1, jnp.ones(b))
    np.testing.assert_allclose(xt, x1, atol=1e-6)


def test_linear_path_is_rectified_flow():
    x0, x1 = _data(1)
    t = jnp.array([0.1, 0.5, 0.9])
    xt, ut = LinearPath().interpolate(x0, x1, t)
    te = t[:, None, None, None]
    np.testing.assert_allclose(xt, te * x1 + (1 - te) * x0, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ut, x1 - x0, rtol=1e-6, atol=1e-6)


def test_gvp_path_hand_formula_and_per_sample_t():
    x0, x1 = _data(2)
    t = np.array([0.2, 0.6, 0.95], np.float32)
    xt, ut = GVPPath().interpolate(x0, x1, jnp.asarray(t))
    for i, ti in enumerate(t):
        a, s = math.sin(math.pi * ti / 2), math.cos(math.pi * ti / 2)
        da, ds = math.pi / 2 * s, -math.pi / 2 * a
        np.testing.assert_allclose(xt[i], a * x1[i] + s * x0[i], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(ut[i], da * x1[i] + ds * x0[i], rtol=1e-5, atol=1e-6)


def test_interpolate_pytree():
    x0, x1 = _data(3)
    tree0, tree1 = {"a": x0, "b": x0[:, 0]}, {"a": x1, "b": x1[:, 0]}
    t = jnp.array([0.3, 0.4, 0.5])
    xt, ut = LinearPath().interpolate(tree0, tree1, t)
    xa, ua = LinearPath().interpolate(x0, x1, t)
    np.testing.assert_allclose(xt["a"], xa)
    np.testing.assert_allclose(xt["b"], xa[:, 0], rtol=1e-6)
    np.testing.assert_allclose(ut["b"], ua[:, 0], rtol=1e-6)


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.name)
def test_derivatives_match_autodiff(path):
    # VP's d_sigma diverges at t=1 (sigma ~ sqrt(0.1 (1 - t))): stop short of it.
    ts = jnp.linspace(0.0, 0.99 if path.name == "vp" else 1.0, 11)
    np.testing.assert_allclose(path.d_alpha(ts), jax.vmap(jax.grad(path.alpha))(ts),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(path.d_sigma(ts), jax.vmap(jax.grad(path.sigma))(ts),
                               rtol=1e-5, atol=1e-5)


def test_gvp_is_variance_preserving():
    p = GVPPath()
    ts = jnp.linspace(0.0, 1.0, 11)
    np.testing.assert_allclose(p.alpha(ts) ** 2 + p.sigma(ts) ** 2, 1.0, atol=1e-6)


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.name)
def test_conversions_recover_the_conditional_truth(path):
    """With v = u_t (the per-pair velocity) the conversions must return the very x0, x1 drawn."""
    x0, x1 = _data(4)
    t = jnp.array([0.1, 0.5, 0.9])
    xt, ut = path.interpolate(x0, x1, t)
    s = path.sigma(t)[:, None, None, None]
    np.testing.assert_allclose(path.noise_from_velocity(ut, xt, t), x0, atol=1e-5)
    np.testing.assert_allclose(path.data_from_velocity(ut, xt, t), x1, atol=1e-5)
    np.testing.assert_allclose(path.score_from_velocity(ut, xt, t), -x0 / s, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(path.velocity_from_noise(x0, xt, t), ut, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(path.velocity_from_score(-x0 / s, xt, t), ut, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(path.noise_from_score(-x0 / s, xt, t), x0, atol=1e-5)
    np.testing.assert_allclose(path.score_from_noise(x0, xt, t), -x0 / s, rtol=1e-5)


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.name)
def test_conversions_round_trip(path):
    x, v = _data(5)
    t = jnp.array([0.05, 0.5, 0.95])
    for a_to_b, b_to_a in [
        (path.noise_from_velocity, path.velocity_from_noise),
        (path.score_from_velocity, path.velocity_from_score),
        (path.noise_from_score, path.score_from_noise),
    ]:
        np.testing.assert_allclose(b_to_a(a_to_b(v, x, t), x, t), v, rtol=1e-4, atol=1e-4)


def test_score_from_velocity_matches_reference_forms():
    """Linear: s = (t v - x)/(1-t) (REFERENCE §4). GVP: SiT's ratio form, evaluated in numpy."""
    x, v = (np.asarray(a, np.float64) for a in _data(6))
    t = np.array([0.2, 0.5, 0.8])
    te = t[:, None, None, None]
    got = LinearPath().score_from_velocity(jnp.asarray(v), jnp.asarray(x), jnp.asarray(t))
    np.testing.assert_allclose(got, (te * v - x) / (1 - te), rtol=1e-4, atol=1e-5)
    # SiT path.py get_score_from_velocity / get_noise_from_velocity with GVPCPlan coefficients.
    a, da = np.sin(te * np.pi / 2), np.pi / 2 * np.cos(te * np.pi / 2)
    s, ds = np.cos(te * np.pi / 2), -np.pi / 2 * np.sin(te * np.pi / 2)
    r = a / da
    sit_score = (r * v - x) / (s**2 - r * ds * s)
    sit_noise = (r * v - x) / (r * ds - s)
    g = GVPPath()
    np.testing.assert_allclose(g.score_from_velocity(v, x, t), sit_score, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(g.noise_from_velocity(v, x, t), sit_noise, rtol=1e-4, atol=1e-4)


def test_diffusion_forms_hand_values():
    t = 0.3
    lin, gvp = LinearPath(), GVPPath()
    np.testing.assert_allclose(lin.diffusion(t, "constant", 2.0), 2.0)
    np.testing.assert_allclose(lin.diffusion(t, "sigma", 2.0), 2.0 * 0.7, rtol=1e-6)
    np.testing.assert_allclose(gvp.diffusion(t, "sigma"), math.cos(math.pi * 0.15), rtol=1e-6)
    np.testing.assert_allclose(gvp.diffusion(t, "linear", 1.5), 1.5 * 0.7, rtol=1e-6)
    # SBDM for the linear path: (1/t)(1-t)^2 + (1-t) = (1-t)/t.
    np.testing.assert_allclose(lin.diffusion(t, "SBDM"), 0.7 / 0.3, rtol=1e-5)
    np.testing.assert_allclose(lin.diffusion(t, "decreasing", 1.0),
                               0.25 * (math.cos(math.pi * t) + 1) ** 2, rtol=1e-6)
    np.testing.assert_allclose(lin.diffusion(t, "increasing-decreasing", 2.0),
                               2.0 * math.sin(math.pi * t) ** 2, rtol=1e-6)
    # SiT's misspelling is accepted as an alias.
    np.testing.assert_allclose(lin.diffusion(t, "inccreasing-decreasing", 2.0),
                               2.0 * math.sin(math.pi * t) ** 2, rtol=1e-6)
    with pytest.raises(ValueError, match="'cosine'"):
        lin.diffusion(t, "cosine")


def test_get_path_and_bad_inputs():
    assert get_path("linear") == LinearPath()
    assert get_path("GVP") == GVPPath()
    assert get_path(GVPPath()) == GVPPath()
    assert get_path("VP") == VPPath(sigma_min=0.1, sigma_max=20.0)  # the official defaults
    with pytest.raises(ValueError, match="'ve'"):
        get_path("ve")
    x0, x1 = _data(7)
    with pytest.raises(ValueError, match=r"\(5,\)"):
        LinearPath().interpolate(x0, x1, jnp.zeros(5))
    with pytest.raises(ValueError, match="shape"):
        LinearPath().interpolate(x0, x1[:, :2], jnp.zeros(3))
    assert paths.expand_t_like(jnp.zeros(3), x0).shape == (3, 1, 1, 1)


# ------------------------------------------------------------------------------------------------
# timesteps
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shift", [1.0, 3.0, 6.0])
def test_shift_time_matches_diffusers_flow_match_scheduler(shift):
    n = 10
    # diffusers shifts whatever sigmas it is given: sigma' = s*sigma / (1 + (s-1)*sigma).
    sigmas = np.sort(np.random.default_rng(0).uniform(0.01, 1.0, n))[::-1]
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(sigmas=list(sigmas))
    t_shift = 1.0 - sched.sigmas.numpy()[:-1].astype(np.float64)
    np.testing.assert_allclose(np.asarray(shift_time(1.0 - sigmas, shift)), t_shift, atol=2e-6)
    # Our grid equals diffusers fed with the sigmas 1 - linspace(0, 1, n+1)[:-1].
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(sigmas=list(1.0 - np.linspace(0.0, 1.0, n + 1)[:-1]))
    ours = np.asarray(time_grid(n, shift))
    assert ours.shape == (n + 1,)
    np.testing.assert_allclose(ours, 1.0 - sched.sigmas.numpy(), atol=2e-6)
    assert isinstance(sched.sigmas, torch.Tensor)


def test_time_grid_properties():
    g = np.asarray(time_grid(7, shift=4.0))
    assert g.shape == (8,) and g[0] == 0.0 and g[-1] == 1.0 and np.all(np.diff(g) > 0)
    # shift > 1: more points near noise, i.e. the grid lies below the uniform one.
    assert np.all(g[1:-1] < np.linspace(0, 1, 8)[1:-1])
    np.testing.assert_allclose(time_grid(4, 1.0, 0.2, 0.6), [0.2, 0.3, 0.4, 0.5, 0.6], atol=1e-6)


def test_logit_normal_moments():
    n = 100_000
    mean, std = 0.5, 1.5
    t = np.asarray(sample_logit_normal(jax.random.key(0), n, mean, std), np.float64)
    assert t.shape == (n,) and np.all((t > 0) & (t < 1))
    logit = np.log(t / (1 - t))
    # standard errors: std/sqrt(n) for the mean, std/sqrt(2n) for the std; 5 SE bounds.
    assert abs(logit.mean() - mean) < 5 * std / math.sqrt(n)
    assert abs(logit.std() - std) < 5 * std / math.sqrt(2 * n) + 1e-3


def test_uniform_and_shift_samplers():
    n = 50_000
    t = np.asarray(sample_uniform(jax.random.key(1), n))
    assert t.min() >= 0 and t.max() < 1 and abs(t.mean() - 0.5) < 5 * math.sqrt(1 / 12 / n)
    key = jax.random.key(2)
    ts = np.asarray(get_time_sampler("shift_3.0")(key, n), np.float64)
    u = np.asarray(jax.random.uniform(key, (n,)), np.float64)
    np.testing.assert_allclose(ts, 3 * u / (1 + 2 * u), rtol=1e-5)
    # Lumina-Next's training shift is the sampling shift with 1/s (module docstring).
    np.testing.assert_allclose(ts, np.asarray(shift_time(u, 1 / 3.0)), rtol=1e-5)
    tu = np.asarray(get_time_sampler("uniform_0.2_0.4")(key, n))
    assert tu.min() >= 0.2 and tu.max() <= 0.4
    assert get_time_sampler("uniform") is sample_uniform
    assert get_time_sampler("lognorm") is sample_logit_normal
    np.testing.assert_allclose(sample_shifted(key, 8, 1.0), jax.random.uniform(key, (8,)), rtol=1e-6)


@pytest.mark.parametrize("bad", ["gauss", "shift_x", "shift_-2", "uniform_0.5_0.2", "lognorm_1"])
def test_bad_sampler_names(bad):
    with pytest.raises(ValueError, match=repr(bad).replace(".", r"\.")):
        get_time_sampler(bad)


def test_bad_numbers():
    with pytest.raises(ValueError, match="-3"):
        time_grid(-3)
    with pytest.raises(ValueError, match="num_steps"):
        time_grid(0)
    with pytest.raises(ValueError, match="2.5"):
        time_grid(2.5)
    with pytest.raises(ValueError, match="shift"):
        shift_time(0.5, 0.0)
    with pytest.raises(ValueError, match="n must"):
        sample_uniform(jax.random.key(0), 0)
    with pytest.raises(ValueError, match="std"):
        sample_logit_normal(jax.random.key(0), 4, std=-1.0)
    assert timesteps.TIME_SAMPLERS
