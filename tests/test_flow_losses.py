"""flow.losses against the analytic minimum of a Gaussian flow-matching problem.

Problem: x0 ~ N(0, I), x1 ~ N(m, s^2 I) independent, x_t = alpha x1 + sigma x0, u = a' x1 + s' x0
(a' = d_alpha, s' = d_sigma). Everything is jointly Gaussian, so per dimension the best predictor of
u from x_t is E[u | x_t] = a' m + Cov(u, x_t)/Var(x_t) (x_t - alpha m) and the minimal loss is
    Var(u) - Cov(u, x_t)^2 / Var(x_t),
with Var(u) = a'^2 s^2 + s'^2, Cov = alpha a' s^2 + sigma s', Var(x_t) = alpha^2 s^2 + sigma^2. For
the linear path this is (s^2+1) - (t s^2 - (1-t))^2 / sigma_t^2 (sigma_t^2 = t^2 s^2 + (1-t)^2).
Likewise for the noise target x0: 1 - sigma^2 / Var(x_t).
The coefficients are written out here by hand, independently of flagdit_jax.flow.paths.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flagdit_jax.flow.losses import flow_matching_loss, sample_and_loss
from flagdit_jax.flow.paths import GVPPath, LinearPath

M, S = 1.0, 0.5
B, D = 20_000, 8  # 160k elements: standard errors below 0.5 % of the loss


def _coeffs(path_name, t):
    if path_name == "linear":
        return t, 1.0 - t, 1.0, -1.0
    h = math.pi / 2
    return math.sin(h * t), math.cos(h * t), h * math.cos(h * t), -h * math.sin(h * t)


def _exact(path_name, t):
    a, s, da, ds = _coeffs(path_name, t)
    var_x = a * a * S * S + s * s
    cov_ux = a * da * S * S + s * ds
    var_u = da * da * S * S + ds * ds
    v = lambda x: da * M + cov_ux / var_x * (x - a * M)  # E[u | x_t]
    eps = lambda x: s / var_x * (x - a * M)               # E[x0 | x_t]
    return v, eps, var_u - cov_ux**2 / var_x, 1.0 - s * s / var_x, s


def _problem(seed):
    k0, k1 = jax.random.split(jax.random.key(seed))
    x0 = jax.random.normal(k0, (B, D))
    x1 = M + S * jax.random.normal(k1, (B, D))
    return x0, x1


def _se(loss_min):
    # err ~ N(0, L*) per element, so err^2 has variance 2 L*^2; the loss averages B*D of them.
    return loss_min * math.sqrt(2.0 / (B * D))


@pytest.mark.parametrize("path_name", ["linear", "gvp"])
@pytest.mark.parametrize("t", [0.2, 0.5, 0.8])
def test_exact_velocity_reaches_analytic_minimum(path_name, t):
    path = LinearPath() if path_name == "linear" else GVPPath()
    v, _, lmin, _, _ = _exact(path_name, t)
    if path_name == "linear":  # the closed form quoted in the brief
        sig2 = t * t * S * S + (1 - t) ** 2
        assert math.isclose(lmin, (S * S + 1) - (t * S * S - (1 - t)) ** 2 / sig2)
    x0, x1 = _problem(1)
    tt = jnp.full((B,), t)
    loss, per_sample = flow_matching_loss(lambda x, _: v(x), x1, x0, tt, path=path)
    assert per_sample.shape == (B,)
    assert abs(float(loss) - lmin) < 4 * _se(lmin), (float(loss), lmin)
    # Anything else scores higher: a shifted predictor costs exactly delta^2 more in expectation.
    delta = 0.3
    worse, _ = flow_matching_loss(lambda x, _: v(x) + delta, x1, x0, tt, path=path)
    assert float(worse) > float(loss)
    assert abs(float(worse) - (lmin + delta**2)) < 4 * _se(lmin) + 2 * delta * 4 * math.sqrt(lmin / (B * D))
    # ... and so does a rescaled one.
    scaled, _ = flow_matching_loss(lambda x, _: 1.1 * v(x), x1, x0, tt, path=path)
    assert float(scaled) > float(loss)


@pytest.mark.parametrize("t", [0.3, 0.7])
def test_noise_and_score_targets_follow_sit(t):
    """Noise target x0; score target: pred*sigma + x0 -> 0 (SiT training_losses, weight None)."""
    path = LinearPath()
    _, eps, _, lmin_eps, sig = _exact("linear", t)
    x0, x1 = _problem(2)
    tt = jnp.full((B,), t)
    loss_n, _ = flow_matching_loss(lambda x, _: eps(x), x1, x0, tt, path=path, prediction="noise")
    assert abs(float(loss_n) - lmin_eps) < 4 * _se(lmin_eps)
    loss_s, _ = flow_matching_loss(lambda x, _: -eps(x) / sig, x1, x0, tt, path=path,
                                   prediction="score")
    np.testing.assert_allclose(float(loss_s), float(loss_n), rtol=1e-4)
    worse, _ = flow_matching_loss(lambda x, _: eps(x) + 0.2, x1, x0, tt, path=path,
                                  prediction="noise")
    assert float(worse) > float(loss_n)


def test_loss_weights_by_hand():
    """SiT weights for the linear path: drift_var = (1-t)/t, 'likelihood' = drift_var / sigma^2."""
    x0 = jnp.array([[1.0, -1.0], [0.5, 2.0]])
    x1 = jnp.array([[0.0, 3.0], [1.0, 1.0]])
    t = jnp.array([0.25, 0.5])
    pred = jnp.array([[0.3, 0.1], [-0.2, 0.4]])
    err = (np.asarray(pred) - np.asarray(x0)) ** 2
    tn = np.asarray(t)[:, None]
    w_lik = ((1 - tn) / tn) / (1 - tn) ** 2
    w_vel = (((1 - tn) / tn) / (1 - tn)) ** 2
    for name, w in [("likelihood", w_lik), ("velocity", w_vel)]:
        loss, ps = flow_matching_loss(lambda x, _: pred, x1, x0, t, prediction="noise",
                                      loss_weight=name)
        np.testing.assert_allclose(ps, (w * err).mean(1), rtol=1e-5)
        np.testing.assert_allclose(loss, (w * err).mean(), rtol=1e-5)


def test_velocity_loss_by_hand():
    x0 = jnp.array([[1.0, -1.0, 0.0]])
    x1 = jnp.array([[2.0, 0.0, 1.0]])
    t = jnp.array([0.25])
    seen = {}

    def model(xt, tt):
        seen["xt"], seen["t"] = xt, tt
        return jnp.array([[1.0, 1.0, 0.0]])

    loss, ps = flow_matching_loss(model, x1, x0, t)
    np.testing.assert_allclose(seen["xt"], [[1.25, -0.75, 0.25]])
    np.testing.assert_allclose(seen["t"], [0.25])
    # u = x1 - x0 = [1, 1, 1]; squared errors [0, 0, 1] -> mean 1/3.
    np.testing.assert_allclose(ps, [1 / 3], rtol=1e-6)
    np.testing.assert_allclose(loss, 1 / 3, rtol=1e-6)


def test_mask_ignores_padding_and_weighs_samples_equally():
    b, l, d = 2, 6, 3
    k = jax.random.split(jax.random.key(3), 3)
    x0 = jax.random.normal(k[0], (b, l, d))
    x1 = jax.random.normal(k[1], (b, l, d))
    t = jnp.array([0.3, 0.6])
    n_valid = [2, 5]
    mask = jnp.array([[1] * n + [0] * (l - n) for n in n_valid], jnp.float32)  # [B, L] tokens
    pred = jax.random.normal(k[2], (b, l, d))
    loss, ps = flow_matching_loss(lambda x, _: pred, x1, x0, t, mask=mask)
    u = np.asarray(x1 - x0)
    err = (np.asarray(pred) - u) ** 2
    per = [err[i, :n].mean() for i, n in enumerate(n_valid)]
    np.testing.assert_allclose(ps, per, rtol=1e-5)
    np.testing.assert_allclose(loss, np.mean(per), rtol=1e-5)  # equal weight per sample ...
    pooled = sum(err[i, :n].sum() for i, n in enumerate(n_valid)) / (sum(n_valid) * d)
    assert not np.isclose(float(loss), pooled)                  # ... not per token
    # Garbage in padded positions (prediction and data) changes nothing.
    pad = 1.0 - mask[..., None]
    loss2, ps2 = flow_matching_loss(lambda x, _: pred + 100.0 * pad, x1 + 7.0 * pad, x0, t,
                                    mask=mask)
    np.testing.assert_allclose(ps2, ps, rtol=1e-5)
    np.testing.assert_allclose(loss2, loss, rtol=1e-5)
    # A full-shape mask and a [B, L, 1] mask give the same answer.
    loss3, _ = flow_matching_loss(lambda x, _: pred, x1, x0, t,
                                  mask=jnp.broadcast_to(mask[..., None], (b, l, d)))
    loss4, _ = flow_matching_loss(lambda x, _: pred, x1, x0, t, mask=mask[..., None])
    np.testing.assert_allclose([loss3, loss4], [loss, loss], rtol=1e-6)
    # An all-ones mask equals no mask.
    l5, _ = flow_matching_loss(lambda x, _: pred, x1, x0, t, mask=jnp.ones((b, l)))
    l6, _ = flow_matching_loss(lambda x, _: pred, x1, x0, t)
    np.testing.assert_allclose(l5, l6, rtol=1e-6)


def test_sample_and_loss_draws_then_calls_the_loss():
    x1 = jnp.ones((4, 3, 2)) * 2.0
    key = jax.random.key(5)
    model = lambda x, t: x * t[:, None, None]
    loss, aux = jax.jit(lambda k: sample_and_loss(model, x1, k, time_sampler="lognorm"))(key)
    k_noise, k_t = jax.random.split(key)
    x0 = jax.random.normal(k_noise, x1.shape)
    t = jax.nn.sigmoid(jax.random.normal(k_t, (4,)))
    np.testing.assert_allclose(aux["t"], t, rtol=1e-6)
    ref, ref_ps = flow_matching_loss(model, x1, x0, t)
    np.testing.assert_allclose(loss, ref, rtol=1e-5)
    np.testing.assert_allclose(aux["per_sample"], ref_ps, rtol=1e-5)
    # Gradients flow through (used with value_and_grad(has_aux=True) in training).
    g = jax.grad(lambda w: sample_and_loss(lambda x, t: w * x, x1, key)[0])(1.0)
    assert np.isfinite(float(g))
    # Noise prediction keeps t inside SiT's [1e-3, 1 - 1e-3].
    _, aux = sample_and_loss(lambda x, t: x, jnp.ones((4096, 1)), key, prediction="noise")
    assert float(aux["t"].min()) >= 1e-3 and float(aux["t"].max()) <= 1 - 1e-3


def test_bad_inputs_raise_value_error():
    x1 = jnp.zeros((2, 3))
    t = jnp.zeros(2)
    f = lambda x, t: x
    with pytest.raises(ValueError, match="'eps'"):
        flow_matching_loss(f, x1, x1, t, prediction="eps")
    with pytest.raises(ValueError, match="'snr'"):
        flow_matching_loss(f, x1, x1, t, prediction="noise", loss_weight="snr")
    with pytest.raises(ValueError, match=r"\(2, 4\)"):
        flow_matching_loss(f, x1, jnp.zeros((2, 4)), t)
    with pytest.raises(ValueError, match=r"\(3,\)"):
        flow_matching_loss(f, x1, x1, jnp.zeros(3))
    with pytest.raises(ValueError, match="mask"):
        flow_matching_loss(f, x1, x1, t, mask=jnp.ones((2, 5)))
    with pytest.raises(ValueError, match=r"model_fn returned shape \(2, 1\)"):
        flow_matching_loss(lambda x, t: x[:, :1], x1, x1, t)
    with pytest.raises(ValueError, match="'cosmap'"):
        sample_and_loss(f, x1, jax.random.key(0), time_sampler="cosmap")
