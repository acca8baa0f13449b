"""flow VP path (`VPPath`) against the official `VPCPlan`, and its handling in losses / samplers.

Official: Alpha-VLLM/Lumina-T2X `lumina_next_t2i/transport/path.py` (same in Flag-DiT-ImageNet and
SiT), `transport/__init__.py: create_transport`, `transport/transport.py: check_interval`.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flagdit_jax.flow import losses, paths
from flagdit_jax.flow.paths import GVPPath, LinearPath, VPPath
from flagdit_jax.flow.samplers import sample_sde


class OfficialVPCPlan:
    """NumPy transcription of the official `VPCPlan` (and the `ICPlan` methods it inherits).

    The official code already writes the VP SDE in Lumina's time (t=0 noise, t=1 data) through
    `1 - t`; `diffusion_time` below makes that flip explicit: s = 1 - t is the VP-SDE's own time,
    in which beta(s) = sigma_min + s (sigma_max - sigma_min) and data sits at s=0.
    """

    def __init__(self, sigma_min=0.1, sigma_max=20.0):
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    @staticmethod
    def diffusion_time(t):
        return 1 - t

    def log_mean_coeff(self, t):
        s = self.diffusion_time(t)
        return -0.25 * (s**2) * (self.sigma_max - self.sigma_min) - 0.5 * s * self.sigma_min

    def d_log_mean_coeff(self, t):
        s = self.diffusion_time(t)
        return 0.5 * s * (self.sigma_max - self.sigma_min) + 0.5 * self.sigma_min

    def compute_alpha_t(self, t):
        alpha_t = np.exp(self.log_mean_coeff(t))
        return alpha_t, alpha_t * self.d_log_mean_coeff(t)

    def compute_sigma_t(self, t):
        p_sigma_t = 2 * self.log_mean_coeff(t)
        sigma_t = np.sqrt(1 - np.exp(p_sigma_t))
        d_sigma_t = np.exp(p_sigma_t) * (2 * self.d_log_mean_coeff(t)) / (-2 * sigma_t)
        return sigma_t, d_sigma_t

    def compute_drift(self, x, t):
        beta_t = self.sigma_min + self.diffusion_time(t) * (self.sigma_max - self.sigma_min)
        return -0.5 * beta_t * x, beta_t / 2

    def compute_diffusion(self, x, t, form="constant", norm=1.0):
        return {"constant": norm + 0 * t, "SBDM": norm * self.compute_drift(x, t)[1],
                "sigma": norm * self.compute_sigma_t(t)[0], "linear": norm * (1 - t),
                "decreasing": 0.25 * (norm * np.cos(np.pi * t) + 1) ** 2,
                "inccreasing-decreasing": norm * np.sin(np.pi * t) ** 2}[form]

    def get_score_from_velocity(self, velocity, x, t):
        alpha_t, d_alpha_t = self.compute_alpha_t(t)
        sigma_t, d_sigma_t = self.compute_sigma_t(t)
        reverse_alpha_ratio = alpha_t / d_alpha_t
        var = sigma_t**2 - reverse_alpha_ratio * d_sigma_t * sigma_t
        return (reverse_alpha_ratio * velocity - x) / var

    def get_noise_from_velocity(self, velocity, x, t):
        alpha_t, d_alpha_t = self.compute_alpha_t(t)
        sigma_t, d_sigma_t = self.compute_sigma_t(t)
        reverse_alpha_ratio = alpha_t / d_alpha_t
        var = reverse_alpha_ratio * d_sigma_t - sigma_t
        return (reverse_alpha_ratio * velocity - x) / var

    def get_velocity_from_score(self, score, x, t):
        drift, var = self.compute_drift(x, t)
        return var * score - drift

    def plan(self, t, x0, x1):
        alpha_t, d_alpha_t = self.compute_alpha_t(t)
        sigma_t, d_sigma_t = self.compute_sigma_t(t)
        return alpha_t * x1 + sigma_t * x0, d_alpha_t * x1 + d_sigma_t * x0


T = np.array([0.0, 0.05, 0.3, 0.5, 0.8, 0.95, 0.999])


@pytest.mark.parametrize("smin, smax", [(0.1, 20.0), (0.5, 5.0)])
def test_vp_coefficients_match_official(smin, smax):
    off, ours = OfficialVPCPlan(smin, smax), VPPath(smin, smax)
    with jax.enable_x64(True):
        t = jnp.asarray(T)
        a, da = off.compute_alpha_t(T)
        s, ds = off.compute_sigma_t(T)
        np.testing.assert_allclose(ours.alpha(t), a, rtol=1e-12)
        np.testing.assert_allclose(ours.d_alpha(t), da, rtol=1e-12)
        np.testing.assert_allclose(ours.sigma(t), s, rtol=1e-9)  # official sqrt(1 - exp) rounds
        np.testing.assert_allclose(ours.d_sigma(t), ds, rtol=1e-9)
        np.testing.assert_allclose(ours.alpha_ratio(t), off.d_log_mean_coeff(T), rtol=1e-12)
        np.testing.assert_allclose(ours.sbdm_diffusion(t), off.compute_drift(0.0, T)[1], rtol=1e-12)
        # The generic SBDM formula (d_alpha/alpha) sigma^2 - sigma d_sigma gives the same beta/2.
        np.testing.assert_allclose(paths._Path.sbdm_diffusion(ours, t), ours.sbdm_diffusion(t),
                                   rtol=1e-9)
        for form in ("constant", "SBDM", "sigma", "linear", "decreasing", "inccreasing-decreasing"):
            np.testing.assert_allclose(ours.diffusion(t, form, 1.5),
                                       off.compute_diffusion(0.0, T, form, 1.5), rtol=1e-9)


def test_vp_is_the_vp_sde_run_backwards():
    """Independent of the closed form: alpha(t) = exp(-1/2 int_0^{1-t} beta(u) du) (Song et al.'s
    VP SDE mean coefficient at diffusion time s = 1 - t), by quadrature; alpha^2 + sigma^2 = 1."""
    p = VPPath()
    for t in (0.0, 0.2, 0.7, 1.0):
        u = np.linspace(0.0, 1.0 - t, 20001)
        beta = 0.1 + u * (20.0 - 0.1)
        integral = np.sum((beta[1:] + beta[:-1]) / 2 * np.diff(u))
        np.testing.assert_allclose(float(p.alpha(t)), math.exp(-0.5 * integral), rtol=1e-5)
    ts = jnp.linspace(0.0, 1.0, 11)
    np.testing.assert_allclose(p.alpha(ts) ** 2 + p.sigma(ts) ** 2, 1.0, atol=1e-6)
    # Endpoints: data exactly at t=1; at t=0 only nearly noise (alpha(0) = exp(-5.025)).
    np.testing.assert_allclose([float(p.alpha(1.0)), float(p.sigma(1.0))], [1.0, 0.0])
    np.testing.assert_allclose(float(p.alpha(0.0)), math.exp(-5.025), rtol=1e-6)
    assert 0.9999 < float(p.sigma(0.0)) < 1.0


def test_vp_interpolation_and_conversions_match_official():
    off, ours = OfficialVPCPlan(), VPPath()
    rng = np.random.RandomState(0)
    x0, x1, v = rng.randn(3, 7, 4, 2)
    t = np.array([0.02, 0.1, 0.3, 0.5, 0.7, 0.9, 0.99])
    te = t[:, None, None]
    with jax.enable_x64(True):
        xt, ut = ours.interpolate(jnp.asarray(x0), jnp.asarray(x1), jnp.asarray(t))
        oxt, out = off.plan(te, x0, x1)
        np.testing.assert_allclose(xt, oxt, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(ut, out, rtol=1e-9, atol=1e-12)
        # Conversions against the official ratio forms (which divide by d_alpha/alpha).
        x = jnp.asarray(xt)
        np.testing.assert_allclose(ours.score_from_velocity(jnp.asarray(v), x, t),
                                   off.get_score_from_velocity(v, oxt, te), rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(ours.noise_from_velocity(jnp.asarray(v), x, t),
                                   off.get_noise_from_velocity(v, oxt, te), rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(ours.velocity_from_score(jnp.asarray(v), x, t),
                                   off.get_velocity_from_score(v, oxt, te), rtol=1e-10, atol=1e-12)


def test_train_interval_matches_official_check_interval():
    """create_transport + check_interval(eval=False): VP trains on [0, 1 - 1e-5] whatever the
    prediction; linear/GVP on [0, 1] for velocity, [1e-3, 1 - 1e-3] for noise/score."""
    assert losses.train_interval("vp", "velocity") == (0.0, 1.0 - 1e-5)
    assert losses.train_interval(VPPath(), "noise") == (0.0, 1.0 - 1e-5)
    assert losses.train_interval("vp", "velocity", train_eps=1e-3) == (0.0, 1.0 - 1e-3)
    for p in (LinearPath(), GVPPath()):
        assert losses.train_interval(p, "velocity") == (0.0, 1.0)
        assert losses.train_interval(p, "score") == (1e-3, 1.0 - 1e-3)
    with pytest.raises(ValueError, match="0.7"):
        losses.train_interval("vp", "velocity", train_eps=0.7)
    with pytest.raises(ValueError, match="sigma_max=0.05"):
        VPPath(sigma_min=0.1, sigma_max=0.05)


def test_sample_and_loss_vp_draws_times_in_the_official_interval():
    """The drawn t cover [0, 1 - 1e-5] (affine map of the sampler's [0, 1)), and the loss is the
    VP velocity target d_alpha x1 + d_sigma x0, finite there."""
    n = 4096
    x1 = jnp.ones((n, 2))
    # A "sampler" returning its extreme values: the map must send 0 -> 0 and 1 -> 1 - 1e-5.
    edge = lambda key, b: jnp.linspace(0.0, 1.0, b)
    with jax.enable_x64(True):
        loss, aux = losses.sample_and_loss(lambda x, t: jnp.zeros_like(x), x1.astype(jnp.float64),
                                           jax.random.key(0), path="vp", time_sampler=edge)
        t = np.asarray(aux["t"])
        np.testing.assert_allclose([t.min(), t.max()], [0.0, 1.0 - 1e-5], rtol=0, atol=1e-15)
        assert np.isfinite(float(loss))
    _, aux = losses.sample_and_loss(lambda x, t: x, x1, jax.random.key(1), path="vp",
                                    prediction="noise")
    assert float(aux["t"].min()) >= 0.0 and float(aux["t"].max()) <= 1.0 - 1e-5


def _v_vp_gaussian(path, m, s):
    """Exact marginal velocity for data N(m, s^2) on `path` (see tests/test_flow_samplers.py):
    v = a' m + (sig'/sig)(x - a m), sig^2 = a^2 s^2 + c^2."""
    def v(x, t):
        a, da, c, dc = path.alpha(t), path.d_alpha(t), path.sigma(t), path.d_sigma(t)
        sig2 = a**2 * s**2 + c**2
        return da * m + (a * da * s**2 + c * dc) / sig2 * (x - a * m)
    return v


def _official_scheme_moments(off, m, s, n_steps, form="SBDM", h_last=0.04):
    """Exact mean / variance after SiT's Euler-Maruyama + 'Mean' last step (integrators.py: sde,
    transport.py: sample_sde with t0=0, t1=1-h_last for VP), all coefficients from the official
    transcription. The Gaussian problem makes v, score and drift affine in x, so each step is
    x' = a x + c + noise and the moments propagate exactly (as `_scheme_moments` in
    tests/test_flow_samplers.py does for the linear path)."""
    def v(x, t):
        a, da = off.compute_alpha_t(t)
        c, dc = off.compute_sigma_t(t)
        return da * m + (a * da * s**2 + c * dc) / (a**2 * s**2 + c**2) * (x - a * m)

    def drift(x, t):
        return v(x, t) + off.compute_diffusion(x, t, form) * off.get_score_from_velocity(
            v(x, t), x, t)

    ts = np.linspace(0.0, 1.0 - h_last, n_steps + 1)
    dt = ts[1] - ts[0]
    mu, var = 0.0, 1.0
    for t in ts[:-1]:
        a, c = 1 + dt * (drift(1.0, t) - drift(0.0, t)), dt * drift(0.0, t)
        mu, var = a * mu + c, a * a * var + 2 * off.compute_diffusion(0.0, t, form) * dt
    a, c = 1 + h_last * (drift(1.0, ts[-1]) - drift(0.0, ts[-1])), h_last * drift(0.0, ts[-1])
    return a * mu + c, a * a * var


@pytest.mark.parametrize("form", ["SBDM", "sigma"])
def test_sde_on_the_vp_path_follows_the_official_scheme(form):
    """SiT's SDE sampler on the VP path with the exact velocity for data N(m, s^2): our samples
    have the moments of the official scheme (official score-from-velocity and diffusion), and
    SBDM runs from t0=0 as officially (its w = beta/2 is finite there for VP)."""
    m, s, n, steps = 1.0, 0.5, 8000, 100
    p = VPPath()
    x_init = jax.random.normal(jax.random.key(0), (n, 1))
    x = sample_sde(_v_vp_gaussian(p, m, s), x_init, jax.random.key(1), num_steps=steps, path=p,
                   diffusion_form=form)
    x = np.asarray(x, np.float64).ravel()
    mu_d, var_d = _official_scheme_moments(OfficialVPCPlan(), m, s, steps, form)
    print(f"VP SDE {form}: mean {x.mean():.4f} (scheme {mu_d:.4f}, target {m}), "
          f"var {x.var():.4f} (scheme {var_d:.4f}, target {s * s})")
    assert abs(x.mean() - mu_d) < 4 * math.sqrt(var_d / n)
    assert abs(x.var() - var_d) < 4 * var_d * math.sqrt(2.0 / (n - 1))
    # The scheme itself lands near the data distribution (its noise-free 'Mean' last step with
    # w(0.96) = beta(0.04)/2 shrinks the variance, as for the linear path).
    assert abs(mu_d - m) < 0.02 and 0.75 * s * s < var_d < 1.05 * s * s


def test_sbdm_from_t0_zero_is_refused_only_where_singular():
    x_init = jnp.zeros((2, 1))
    with pytest.raises(ValueError, match="linear"):  # w = (1 - t)/t is infinite at t=0
        sample_sde(_v_vp_gaussian(LinearPath(), 1.0, 0.5), x_init, jax.random.key(1), num_steps=4,
                   diffusion_form="SBDM")
    with pytest.raises(ValueError, match="gvp"):
        sample_sde(_v_vp_gaussian(GVPPath(), 1.0, 0.5), x_init, jax.random.key(1), num_steps=4,
                   path="gvp", diffusion_form="SBDM")


def test_sample_interval_matches_official_check_interval_for_sampling():
    # SiT create_transport: sample_eps = 1e-3; check_interval(eval=True) keeps t0 = 0 on VP and for
    # velocity models, and moves both ends in by eps for noise / score models on linear / GVP.
    assert losses.sample_interval(VPPath(), "velocity") == (0.0, 1.0 - 1e-3)
    assert losses.sample_interval(VPPath(), "noise") == (0.0, 1.0 - 1e-3)
    assert losses.sample_interval(LinearPath(), "velocity") == (0.0, 1.0)
    for path in (LinearPath(), GVPPath()):
        for pred in ("noise", "score"):
            assert losses.sample_interval(path, pred) == (1e-3, 1.0 - 1e-3)
    with pytest.raises(ValueError, match="sample_eps"):
        losses.sample_interval(LinearPath(), "noise", sample_eps=0.7)


@pytest.mark.parametrize("path", [LinearPath(), VPPath()], ids=["linear", "vp"])
@pytest.mark.parametrize("prediction", ["velocity", "noise", "score"])
def test_sampling_through_to_velocity_recovers_point_data(path, prediction):
    # Data = the point c: the exact model of each parameterisation is analytic
    # (eps = (x - alpha c) / sigma, score = -eps / sigma, v = d_alpha c + d_sigma eps);
    # integrating its velocity over the sampling interval must land on ~c.
    from flagdit_jax.flow.samplers import sample_ode

    c = jnp.asarray([0.5, -1.0, 2.0])

    def exact(x, t):
        t = jnp.minimum(t, 1.0 - 1e-6)  # the exact velocity is 0/0 at t=1 for point data
        eps = (x - path.alpha(t) * c) / path.sigma(t)
        return {"velocity": path.d_alpha(t) * c + path.d_sigma(t) * eps, "noise": eps,
                "score": -eps / path.sigma(t)}[prediction]

    t0, t1 = losses.sample_interval(path, prediction)
    v = lambda x, t: losses.to_velocity(exact(x, t), x, t, path, prediction)
    x0 = jax.random.normal(jax.random.key(0), (4, 3))
    x1 = sample_ode(v, x0, method="heun", num_steps=200, t0=t0, t1=t1)
    # At t1 = 1 - 1e-3 the state still holds sigma(t1) of noise (VP: ~0.1, linear: 1e-3).
    tol = float(path.sigma(jnp.asarray(t1))) * 4 + 1e-2  # fp32 round-off near t=1
    np.testing.assert_allclose(np.asarray(x1), np.broadcast_to(np.asarray(c), (4, 3)), atol=tol)
