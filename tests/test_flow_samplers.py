"""flow.samplers: convergence orders against an exactly solvable flow, SDE statistics, CFG.

The exact problem: x0 ~ N(0, I), x1 ~ N(m, s^2 I) independent. Along a path x_t = a(t) x1 + c(t) x0
the marginal is N(a m, sig_t^2) with sig_t^2 = a^2 s^2 + c^2, and the marginal-preserving velocity
is v(x, t) = a' m + (sig_t'/sig_t)(x - a m). Its ODE flow maps x(0) to x(1) = m + s x(0) exactly
(x(t) = a m + sig_t x(0)), which gives the reference answer for every integrator.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flagdit_jax.flow.paths import LinearPath
from flagdit_jax.flow.samplers import (
    NFE_PER_STEP,
    cfg_combine,
    guided_velocity_fn,
    sample,
    sample_ode,
    sample_sde,
)
from flagdit_jax.flow.timesteps import time_grid

M, S = 1.0, 2.0


def v_linear(x, t, m=M, s=S):
    """Exact velocity, linear path: sig_t sig_t' = t s^2 - (1 - t)."""
    sig2 = t**2 * s**2 + (1 - t) ** 2
    return m + (t * s**2 - (1 - t)) / sig2 * (x - t * m)


def v_gvp(x, t, m=M, s=S, lib=jnp):
    """Exact velocity, GVP path a = sin(pi t/2), c = cos(pi t/2). lib: jnp, or torch for odeint."""
    h = math.pi / 2
    a, da = lib.sin(h * t), h * lib.cos(h * t)
    c, dc = lib.cos(h * t), -h * lib.sin(h * t)
    sig2 = a**2 * s**2 + c**2
    return da * m + (a * da * s**2 + c * dc) / sig2 * (x - a * m)


STEPS = {"euler": [16, 32, 64, 128], "midpoint": [8, 16, 32, 64], "heun": [8, 16, 32, 64],
         "rk4": [16, 32, 64, 128]}


def _observed_orders(velocity_fn, method):
    # The numerical map is affine, x(1) = A + B x(0); measure both coefficients (x(0) = 0 and 1)
    # so that no lucky cancellation at one starting point hides the leading error term.
    errs = []
    for n in STEPS[method]:
        x = sample_ode(velocity_fn, jnp.array([[0.0], [1.0]], jnp.float64), method=method,
                       num_steps=n)
        a, b = float(x[0, 0]), float(x[1, 0] - x[0, 0])
        errs.append(max(abs(a - M), abs(b - S)))
    errs = np.array(errs)
    return errs, np.log2(errs[:-1] / errs[1:])


@pytest.mark.parametrize("name, v_fn, expected", [
    ("linear", v_linear, {"euler": 1.0, "midpoint": 3.0, "heun": 2.0, "rk4": 4.0}),
    ("gvp", v_gvp, {"euler": 1.0, "midpoint": 2.0, "heun": 2.0, "rk4": 4.0}),
])
def test_fixed_step_orders(name, v_fn, expected):
    """Euler 1, Heun 2, RK4 4 on both paths. Midpoint is 3, not 2, on the linear path: there
    sig_t^2 is quadratic in t, and then the h^3 term of the midpoint local error, sig'''/6 -
    k' sig'/4 - k'' sig/8 with k = sig'/sig, is identically zero (use sig''' = -3 sig' sig''/sig,
    which follows from (sig^2)''' = 0); the GVP path shows the generic second order."""
    with jax.enable_x64(True):
        for method, p in expected.items():
            errs, orders = _observed_orders(v_fn, method)
            print(f"{name:6s} {method:8s} steps {STEPS[method]} errors {errs} orders {orders.round(3)}")
            assert np.all(np.abs(orders[-2:] - p) < 0.25), (method, orders)
            assert np.all(np.abs(orders - p) < 0.5), (method, orders)


@pytest.mark.slow  # default-suite time budget (dopri5 also runs in test_dopri5_steps_like_torchdiffeq)
def test_dopri5_meets_tolerance_and_counts_nfe():
    atol, rtol = 1e-6, 1e-3
    # One starting point per solve: the controller's error norm is an RMS over the whole state,
    # so the elementwise bound below is only promised for one-element states.
    errs = []
    for x0 in (-2.0, -1.0, 0.5, 1.0, 2.0):
        x_init = jnp.array([[x0]])
        exact = M + S * x0
        x = sample_ode(v_linear, x_init, method="dopri5", atol=atol, rtol=rtol)
        errs.append(abs(float(x[0, 0]) - exact))
        assert errs[-1] < 10 * (atol + rtol * abs(exact)), (x0, errs[-1])
    # Several elements in one state: the bound holds with the state's largest magnitude.
    x_init = jnp.linspace(-2.0, 2.0, 9)[:, None]
    exact = M + S * x_init
    x, nfe = sample_ode(v_linear, x_init, method="dopri5", atol=atol, rtol=rtol, return_nfe=True)
    err = np.abs(np.asarray(x - exact))
    assert err.max() < 10 * (atol + rtol * float(jnp.abs(exact).max()))
    # The reported NFE is the real number of calls (counted by a host callback): 6 per attempted
    # step + 2 for the first-step selection + 1 for diffrax's first FSAL stage.
    count = [0]

    def counted(x, t):
        jax.debug.callback(lambda: count.__setitem__(0, count[0] + 1))
        return v_linear(x, t)

    _, nfe2 = sample_ode(counted, x_init, method="dopri5", atol=atol, rtol=rtol, return_nfe=True)
    jax.effects_barrier()
    assert count[0] == int(nfe2) == int(nfe)
    # Tighter tolerances: smaller error, more work; saved points on a grid end at the final state.
    x3, traj, nfe3 = sample_ode(v_linear, x_init, method="dopri5", atol=1e-8, rtol=1e-6,
                                num_steps=4, return_trajectory=True, return_nfe=True)
    assert np.abs(np.asarray(x3 - exact)).max() < err.max() and int(nfe3) > int(nfe)
    assert traj.shape == (5,) + x_init.shape
    np.testing.assert_allclose(traj[-1], x3)
    np.testing.assert_allclose(traj[0], x_init, atol=1e-6)


def _torchdiffeq_dopri5(v_fn, x_init, t_grid, atol, rtol):
    """The official sampler's call (transport/integrators.py: ode.sample): torchdiffeq.odeint with
    method='dopri5' in float64; returns the states at t_grid [K, ...] and the number of calls."""
    import torch
    import torchdiffeq

    calls = [0]

    def f(t, y):
        calls[0] += 1
        return v_fn(y, t, lib=torch) if v_fn is v_gvp else v_fn(y, t)

    ys = torchdiffeq.odeint(f, torch.tensor(np.asarray(x_init, np.float64)),
                            torch.tensor(np.asarray(t_grid, np.float64)), method="dopri5",
                            atol=atol, rtol=rtol)
    return ys.numpy(), calls[0]


@pytest.mark.parametrize("name, v_fn", [("linear", v_linear), pytest.param("gvp", v_gvp, marks=pytest.mark.slow)])
def test_dopri5_steps_like_torchdiffeq(name, v_fn):
    """Same step-size control as torchdiffeq's dopri5 (first step, I-controller with exponent 1/5,
    steps past t1 + dense output), hence the same accuracy and NFE on the exact Gaussian flow.

    Before the fix (diffrax's defaults: a constant first step 0.01, exponent 1/6, last step
    clipped to t1) the figures differed from torchdiffeq's by up to 40x in error and 25% in NFE.
    """
    atol, rtol = 1e-6, 1e-3
    cases = [  # (x_init, t_grid): one point, a batch with saved points, a backward solve
        (np.array([[0.5]]), np.array([0.0, 1.0])),
        (np.linspace(-2.0, 2.0, 9)[:, None], np.linspace(0.0, 1.0, 5)),
        (np.array([[M + S * -1.0]]), np.array([1.0, 0.0])),
    ]
    with jax.enable_x64(True):
        for x_init, grid in cases:
            ref, ref_nfe = _torchdiffeq_dopri5(v_fn, x_init, grid, atol, rtol)
            _, traj, nfe = sample_ode(v_fn, jnp.asarray(x_init), method="dopri5", atol=atol,
                                      rtol=rtol, t_grid=jnp.asarray(grid), return_trajectory=True,
                                      return_nfe=True)
            traj = np.asarray(traj)
            exact = M + S * x_init if grid[-1] == 1.0 else (x_init - M) / S
            err, ref_err = np.abs(traj[-1] - exact).max(), np.abs(ref[-1] - exact).max()
            print(f"{name} x{x_init.shape} grid {grid.tolist()}: ours err {err:.3e} nfe {int(nfe)}; "
                  f"torchdiffeq err {ref_err:.3e} nfe {ref_nfe}")
            assert abs(err - ref_err) <= 0.2 * ref_err and abs(int(nfe) - ref_nfe) <= 0.2 * ref_nfe
            # Same step sequence, hence the same numbers at every saved point: ~1e-14 apart when
            # run alone; ~1e-9 after float32 dopri5 solves in the same process (diffrax keeps
            # some float32 constant across jax.enable_x64), still 1e4x below the solver error.
            np.testing.assert_allclose(traj, ref, rtol=0, atol=1e-7)
            assert int(nfe) == ref_nfe + 1  # diffrax re-evaluates the first FSAL stage


def test_dopri5_float32_matches_torchdiffeq():
    """Default precision (float32 state and times) still follows torchdiffeq's float64 run."""
    x_init = np.random.RandomState(0).randn(4, 8)
    ref, ref_nfe = _torchdiffeq_dopri5(v_linear, x_init, np.array([0.0, 1.0]), 1e-6, 1e-3)
    x, nfe = sample_ode(v_linear, jnp.asarray(x_init, jnp.float32), method="dopri5",
                        return_nfe=True)
    assert x.dtype == jnp.float32 and int(nfe) == ref_nfe + 1
    np.testing.assert_allclose(x, ref[-1], rtol=1e-5, atol=1e-5)


def test_single_steps_match_torchdiffeq_tableaus():
    """One step on a nonlinear field, against torchdiffeq's formulas transcribed by hand
    (fixed_grid.py / rk_common.py): midpoint, heun2, and rk4 = rk4_alt_step_func (3/8 rule)."""
    f = lambda x, t: jnp.sin(3.0 * x) * (1.0 + t) + t**2
    fn = lambda x, t: np.sin(3.0 * x) * (1.0 + t) + t**2
    x0, t0, h = 0.7, 0.2, 0.5
    k1 = fn(x0, t0)
    mid = x0 + h * fn(x0 + h / 2 * k1, t0 + h / 2)
    heun = x0 + h / 2 * (k1 + fn(x0 + h * k1, t0 + h))
    a2 = fn(x0 + h * k1 / 3, t0 + h / 3)
    a3 = fn(x0 + h * (a2 - k1 / 3), t0 + 2 * h / 3)
    a4 = fn(x0 + h * (k1 - a2 + a3), t0 + h)
    rk38 = x0 + h * (k1 + 3 * (a2 + a3) + a4) / 8
    b2 = fn(x0 + h / 2 * k1, t0 + h / 2)
    b3 = fn(x0 + h / 2 * b2, t0 + h / 2)
    b4 = fn(x0 + h * b3, t0 + h)
    rk_classic = x0 + h * (k1 + 2 * b2 + 2 * b3 + b4) / 6
    with jax.enable_x64(True):
        grid = jnp.array([t0, t0 + h], jnp.float64)
        x = jnp.array([x0], jnp.float64)
        got = {m: float(sample_ode(f, x, method=m, t_grid=grid)[0])
               for m in ("euler", "midpoint", "heun", "rk4")}
    np.testing.assert_allclose(got["euler"], x0 + h * k1, rtol=1e-12)
    np.testing.assert_allclose(got["midpoint"], mid, rtol=1e-12)
    np.testing.assert_allclose(got["heun"], heun, rtol=1e-12)
    np.testing.assert_allclose(got["rk4"], rk38, rtol=1e-12)
    assert abs(rk38 - rk_classic) > 1e-6  # the check can tell the two RK4 variants apart


def test_nfe_per_step_and_single_trace():
    calls = []

    def f(x, t):
        calls.append(1)  # Python side effect: runs once per trace of a stage
        return -x * t

    for method, k in NFE_PER_STEP.items():
        calls.clear()
        _, nfe = sample_ode(f, jnp.ones((2, 3)), method=method, num_steps=7, return_nfe=True)
        # the step is traced once inside lax.scan, not unrolled over the 7 steps
        assert len(calls) == k and nfe == 7 * k, (method, len(calls), nfe)


def test_shifted_grid_and_trajectory():
    # With v = 1, Euler's trajectory is x0 + (grid - t0): it exposes the grid actually used.
    ones = lambda x, t: jnp.ones_like(x)
    x, traj = sample_ode(ones, jnp.zeros((1,)), method="euler", num_steps=6, shift=3.0,
                         return_trajectory=True)
    np.testing.assert_allclose(traj[:, 0], time_grid(6, 3.0), atol=1e-6)
    g = np.asarray(time_grid(6, 1.0))
    np.testing.assert_allclose(g[1:] / (g[1:] + 3.0 * (1 - g[1:])), traj[1:, 0], atol=1e-6)
    np.testing.assert_allclose(x, [1.0], atol=1e-6)
    # Shifted grids still converge to the exact map.
    with jax.enable_x64(True):
        x = sample_ode(v_linear, jnp.array([0.5], jnp.float64), method="rk4", num_steps=64,
                       shift=3.0)
        assert abs(float(x[0]) - (M + S * 0.5)) < 1e-5


def test_backward_grid_inverts_forward():
    x_init = jnp.array([[-1.0], [0.3]])
    x1 = sample_ode(v_linear, x_init, method="rk4", num_steps=64)
    back = sample_ode(v_linear, x1, method="rk4", t_grid=jnp.linspace(1.0, 0.0, 65))
    np.testing.assert_allclose(back, x_init, atol=1e-3)


def test_jit_pytree_bf16_and_traced_params():
    def field(x, t):
        return jax.tree.map(lambda a: v_linear(a, t), x)

    tree = {"a": jnp.zeros((2, 3)), "b": jnp.ones((2,))}
    out = sample_ode(field, tree, method="heun", num_steps=32)
    np.testing.assert_allclose(out["a"], M, atol=2e-2)
    np.testing.assert_allclose(out["b"], M + S, atol=2e-2)
    xb = jnp.ones((4, 2), jnp.bfloat16)
    ob = sample_ode(v_linear, xb, method="midpoint", num_steps=8)
    assert ob.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(ob, np.float32), M + S, atol=5e-2)
    # dopri5 on a pytree with a bf16 leaf, inside a user's jit: each leaf keeps its dtype.
    mixed = {"a": jnp.zeros((2, 3)), "b": jnp.ones((2,), jnp.bfloat16)}
    od = jax.jit(lambda x: sample_ode(field, x, method="dopri5"))(mixed)
    assert od["a"].dtype == jnp.float32 and od["b"].dtype == jnp.bfloat16
    np.testing.assert_allclose(od["a"], M, atol=1e-2)
    np.testing.assert_allclose(np.asarray(od["b"], np.float32), M + S, atol=5e-2)

    # Called inside a user's jit with params traced (the pattern for real models).
    @jax.jit
    def run(params, x):
        return sample_ode(lambda y, t: v_linear(y, t, params["m"], params["s"]), x,
                          method="rk4", num_steps=16)

    got = run({"m": 0.5, "s": 3.0}, jnp.array([[1.0]]))
    np.testing.assert_allclose(got, [[0.5 + 3.0]], atol=1e-3)


# ------------------------------------------------------------------------------------------------
# SDE
# ------------------------------------------------------------------------------------------------
W_FORMS = {  # SiT's compute_diffusion for the linear path, norm 1, written out by hand
    "constant": lambda t: 1.0,
    "SBDM": lambda t: (1 - t) / t,
    "sigma": lambda t: 1 - t,
    "linear": lambda t: 1 - t,
    "decreasing": lambda t: 0.25 * (math.cos(math.pi * t) + 1) ** 2,
    "increasing-decreasing": lambda t: math.sin(math.pi * t) ** 2,
}


def _scheme_moments(n_steps, m, s, form="sigma", last_step="Mean", method="Euler", t0=0.0,
                    h_last=0.04):
    """Exact mean and variance after SiT's discrete SDE scheme on the linear Gaussian problem.

    v = A x + C with A = k(t) = (t s^2 - (1-t))/sig_t^2, C = m (1 - k t); the linear-path score
    (t v - x)/(1 - t) and hence drift = v + w score are affine in x, so every Euler–Maruyama (or
    SiT-Heun) step is x' = a x + b + noise and the moments propagate exactly:
    mu' = a mu + b, V' = a^2 V + noise variance.
    """
    w_fn = W_FORMS[form]
    t1 = 1.0 - h_last if last_step is not None else 1.0
    ts = np.linspace(t0, t1, n_steps + 1)
    dt = ts[1] - ts[0]

    def vel(t):
        k = (t * s**2 - (1 - t)) / (t**2 * s**2 + (1 - t) ** 2)
        return k, m * (1 - k * t)

    def drift(t):
        a, c = vel(t)
        w = w_fn(t)
        return a + w * (t * a - 1) / (1 - t), c * (1 + w * t / (1 - t))

    mu, var = 0.0, 1.0
    for t in ts[:-1]:
        w = w_fn(t)
        if method == "Euler":
            ad, cd = drift(t)
            mu, var = (1 + dt * ad) * mu + dt * cd, (1 + dt * ad) ** 2 * var + 2 * w * dt
        else:  # SiT's __Heun_step: noise first, then a trapezoidal drift step
            var += 2 * w * dt
            a1, c1 = drift(t)
            a2, c2 = drift(t + dt)
            a = 1 + dt / 2 * (a1 + a2 * (1 + dt * a1))
            b = dt / 2 * (c1 + a2 * dt * c1 + c2)
            mu, var = a * mu + b, a * a * var
    if last_step == "Mean":
        ad, cd = drift(t1)
        a, b = 1 + h_last * ad, h_last * cd
    elif last_step == "Euler":
        av, cv = vel(t1)
        a, b = 1 + h_last * av, h_last * cv
    elif last_step == "Tweedie":  # (x + sigma^2 score) / alpha
        av, cv = vel(t1)
        a, b = (1 + (1 - t1) * (t1 * av - 1)) / t1, (1 - t1) * cv
    else:
        a, b = 1.0, 0.0
    return a * mu + b, a * a * var


def test_euler_maruyama_marginals():
    m, s, n, steps = 1.0, 0.5, 20_000, 100
    x_init = jax.random.normal(jax.random.key(0), (n, 2))
    field = lambda x, t: v_linear(x, t, m, s)
    x, nfe = sample_sde(field, x_init, jax.random.key(1), num_steps=steps, return_nfe=True)
    assert nfe == steps + 1
    x = np.asarray(x, np.float64).ravel()  # 40k draws (2 independent dims)
    mu_d, var_d = _scheme_moments(steps, m, s)
    # Discretisation bias of the scheme itself (exact recursion): the mean is exact here and the
    # variance is low by ~0.0065 (2.6 %), mostly from the noise-free last step of size 0.04.
    assert abs(mu_d - m) < 1e-9 and abs(var_d - s * s) < 0.01, (mu_d, var_d)
    se_mu = math.sqrt(var_d / x.size)
    se_var = var_d * math.sqrt(2.0 / (x.size - 1))
    print(f"EM: mean {x.mean():.5f} (scheme {mu_d:.5f}, se {se_mu:.5f}); "
          f"var {x.var():.5f} (scheme {var_d:.5f}, target {s * s}, se {se_var:.5f})")
    assert abs(x.mean() - mu_d) < 4 * se_mu
    assert abs(x.var() - var_d) < 4 * se_var
    # Hence against the true target: a few standard errors plus the stated bias bound.
    assert abs(x.mean() - m) < 4 * se_mu
    assert abs(x.var() - s * s) < 4 * se_var + 0.01


@pytest.mark.parametrize("kw", [
    dict(last_step="Tweedie"), dict(last_step="Euler"), dict(last_step=None),
    dict(sampling_method="Heun"), dict(diffusion_form="SBDM", t0=1e-3),
    dict(diffusion_form="constant"), dict(diffusion_form="linear"),
    dict(diffusion_form="decreasing"), dict(diffusion_form="increasing-decreasing"),
], ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_sde_options_match_their_scheme_moments(kw):
    m, s, n, steps = 1.0, 0.5, 4000, 50
    field = lambda x, t: v_linear(x, t, m, s)
    x_init = jax.random.normal(jax.random.key(2), (n, 1))
    x, traj = sample_sde(field, x_init, jax.random.key(3), num_steps=steps,
                         return_trajectory=True, **kw)
    assert traj.shape == (steps + 1, n, 1)
    np.testing.assert_allclose(traj[-1], x)
    x = np.asarray(x, np.float64).ravel()
    mu_d, var_d = _scheme_moments(steps, m, s, form=kw.get("diffusion_form", "sigma"),
                                  last_step=kw.get("last_step", "Mean"),
                                  method=kw.get("sampling_method", "Euler"), t0=kw.get("t0", 0.0))
    assert abs(x.mean() - mu_d) < 5 * math.sqrt(var_d / n), (x.mean(), mu_d)
    assert abs(x.var() - var_d) < 5 * var_d * math.sqrt(2.0 / (n - 1)), (x.var(), var_d)
    assert abs(mu_d - m) < 0.01
    # The schemes land near s^2 = 0.25, except 'constant' diffusion, whose noise-free last
    # 'Mean' step (drift with w = 1 near t = 1) shrinks the variance by ~25 %: SiT's scheme.
    if kw.get("diffusion_form") == "constant":
        assert 0.15 < var_d < 0.2
    else:
        assert abs(var_d - s * s) < 0.02, var_d


# ------------------------------------------------------------------------------------------------
# CFG
# ------------------------------------------------------------------------------------------------
def test_cfg_combine_by_hand():
    vc = jnp.array([[[1.0, 2.0, 3.0, 4.0]]])
    vu = jnp.array([[[0.0, 1.0, 1.0, -4.0]]])
    np.testing.assert_allclose(cfg_combine(vc, vu, 4.0),
                               [[[4.0, 5.0, 9.0, 28.0]]])  # vu + 4 (vc - vu)
    got = cfg_combine(vc, vu, 4.0, channels=3)
    np.testing.assert_allclose(got, [[[4.0, 5.0, 9.0, 4.0]]])  # channel 4 stays conditional
    np.testing.assert_allclose(cfg_combine(vc, vu, 1.0), vc)


def test_guided_velocity_fn_doubles_the_batch_once():
    calls = []

    def model_fn(x, t, cond):
        calls.append((x.shape, t.shape, cond["y"]))
        return x * cond["y"][:, None, None] + t[:, None, None]

    b, l, c = 2, 3, 4
    x = jnp.arange(b * l * c, dtype=jnp.float32).reshape(b, l, c) / 10
    cond, uncond = {"y": jnp.array([2.0, 3.0])}, {"y": jnp.array([0.0, 0.0])}
    vf = guided_velocity_fn(model_fn, cond, uncond, 4.0, channels=3)
    out = vf(x, jnp.asarray(0.25))
    assert len(calls) == 1 and calls[0][0] == (2 * b, l, c) and calls[0][1] == (2 * b,)
    np.testing.assert_allclose(calls[0][2], [2.0, 3.0, 0.0, 0.0])  # [cond; uncond]
    vc = x * jnp.array([2.0, 3.0])[:, None, None] + 0.25
    vu = jnp.zeros_like(x) + 0.25
    np.testing.assert_allclose(out, cfg_combine(vc, vu, 4.0, channels=3), rtol=1e-6)
    np.testing.assert_allclose(out[..., 3], vc[..., 3], rtol=1e-6)
    # It is a velocity_fn: it drives the samplers (inside their jit).
    y = sample_ode(guided_velocity_fn(model_fn, cond, uncond, 1.5), x, method="euler",
                   num_steps=3)
    assert y.shape == x.shape and np.all(np.isfinite(np.asarray(y)))


# ------------------------------------------------------------------------------------------------
# input validation and dispatch
# ------------------------------------------------------------------------------------------------
def test_bad_inputs_raise_value_error_naming_the_value():
    x = jnp.zeros((2, 1))
    key = jax.random.key(0)
    cases = [
        (lambda: sample_ode(v_linear, x, method="rk45", num_steps=4), "'rk45'"),
        (lambda: sample_ode(v_linear, x, method="euler", num_steps=-3), "-3"),
        (lambda: sample_ode(v_linear, x, method="euler", num_steps=0), "0"),
        (lambda: sample_ode(v_linear, x, method="euler"), "num_steps"),
        (lambda: sample_ode(v_linear, x, method="euler", num_steps=4, shift=-1.0), "shift"),
        (lambda: sample_ode(v_linear, x, method="dopri5", atol=0.0), "atol"),
        (lambda: sample_ode(v_linear, x, method="euler", t_grid=[0.0, 0.5, 0.4]), "monotonic"),
        (lambda: sample_ode(v_linear, jnp.zeros(2, jnp.int32), method="euler", num_steps=2), "int32"),
        (lambda: sample_sde(v_linear, x, key, num_steps=-1), "-1"),
        (lambda: sample_sde(v_linear, x, key, num_steps=5, last_step="Median"), "'Median'"),
        (lambda: sample_sde(v_linear, x, key, num_steps=5, diffusion_form="vp"), "'vp'"),
        (lambda: sample_sde(v_linear, x, key, num_steps=5, diffusion_form="SBDM"), "t0"),
        (lambda: sample_sde(v_linear, x, key, num_steps=5, last_step_size=1.5), "1.5"),
        (lambda: sample_sde(v_linear, x, key, num_steps=5, sampling_method="RK"), "'RK'"),
        (lambda: cfg_combine(jnp.zeros((1, 4)), jnp.zeros((1, 4)), 2.0, channels=5), "5"),
        (lambda: cfg_combine(jnp.zeros((1, 4)), jnp.zeros((1, 3)), 2.0), r"\(1, 3\)"),
        (lambda: sample(v_linear, x, sampler="flow", num_steps=2), "'flow'"),
        (lambda: sample(v_linear, x, sampler="sde", num_steps=2), "key"),
    ]
    for fn, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            fn()


def test_sample_dispatch():
    x = jnp.array([[0.5]])
    np.testing.assert_allclose(sample(v_linear, x, method="rk4", num_steps=8),
                               sample_ode(v_linear, x, method="rk4", num_steps=8))
    np.testing.assert_allclose(
        sample(v_linear, x, jax.random.key(0), sampler="sde", num_steps=8),
        sample_sde(v_linear, x, jax.random.key(0), num_steps=8))
    assert isinstance(LinearPath(), LinearPath)
