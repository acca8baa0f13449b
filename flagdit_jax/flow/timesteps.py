"""Time sampling for training and time grids for sampling (REFERENCE.md §3 and §4).

Convention: t=0 is noise, t=1 is data.

Training-time samplers (Lumina `transport.py: Transport.sample`):
  * 'uniform'            t ~ U[0, 1]
  * 'uniform_<a>_<b>'    t ~ U[a, b]                   (Lumina's `uniform_{t0}_{t1}`)
  * 'lognorm'            t = sigmoid(u), u ~ N(0, 1)    (logit-normal; ImageNet runs)
  * 'shift_<s>'          t = s*u / (1 + (s-1)*u), u ~ U[0, 1]   (Lumina-Next)
Note that 'shift_<s>' equals `shift_time(u, 1/s)`: with s > 1 it pushes training times towards the
*data* end, the opposite sense of the sampling-time shift below. That is what the Lumina-Next code
does; we keep it.

Sampling-time shift (Lumina `integrators.py: ode`, = SD3 / diffusers with sigma = 1 - t):
    t' = t / (t + s*(1 - t));   s > 1 puts more grid points near the noise end (t=0).
"""

from __future__ import annotations

import numbers
import re
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "sample_uniform",
    "sample_logit_normal",
    "sample_shifted",
    "shift_time",
    "time_grid",
    "diffusers_grid",
    "sigmoid_grid",
    "get_time_sampler",
    "TIME_SAMPLERS",
]

TimeSampler = Callable[[jax.Array, int], jax.Array]


def _check_n(n) -> int:
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"n must be a positive integer (the batch size), got {n!r}")
    return int(n)


def _check_positive(name: str, value) -> None:
    # Only concrete Python/NumPy numbers can be checked; traced values pass through.
    if isinstance(value, (numbers.Real, np.ndarray)) and not np.all(np.asarray(value) > 0):
        raise ValueError(f"{name} must be > 0, got {value!r}")


def sample_uniform(key: jax.Array, n: int, t0: float = 0.0, t1: float = 1.0) -> jax.Array:
    """t ~ U[t0, t1], shape [n] float32."""
    n = _check_n(n)
    if not 0.0 <= t0 < t1 <= 1.0:
        raise ValueError(f"need 0 <= t0 < t1 <= 1, got t0={t0!r}, t1={t1!r}")
    return jax.random.uniform(key, (n,), minval=t0, maxval=t1)


def sample_logit_normal(key: jax.Array, n: int, mean: float = 0.0, std: float = 1.0) -> jax.Array:
    """Logit-normal times: t = sigmoid(u), u ~ N(mean, std^2); shape [n] float32.

    Lumina's 'lognorm' is mean=0, std=1 (REFERENCE.md §3).
    """
    n = _check_n(n)
    _check_positive("std", std)
    u = mean + std * jax.random.normal(key, (n,))
    return jax.nn.sigmoid(u)


def sample_shifted(key: jax.Array, n: int, shift: float) -> jax.Array:
    """Lumina-Next 'shift_<s>' training times: t = s*u / (1 + (s-1)*u), u ~ U[0, 1]; shape [n]."""
    n = _check_n(n)
    _check_positive("shift", shift)
    u = jax.random.uniform(key, (n,))
    return shift * u / (1.0 + (shift - 1.0) * u)


def shift_time(t, shift: float):
    """Sampling-time shift t' = t / (t + shift*(1 - t)) (REFERENCE.md §4); elementwise.

    Fixes t=0 and t=1; shift > 1 bends the grid towards the noise end (more steps near t=0),
    shift = 1 is the identity. Equals diffusers' `FlowMatchEulerDiscreteScheduler(shift=s)`
    sigma' = s*sigma / (1 + (s-1)*sigma) under sigma = 1 - t.
    """
    _check_positive("shift", shift)
    t = jnp.asarray(t)
    return t / (t + shift * (1.0 - t))


def time_grid(num_steps: int, shift: float = 1.0, t0: float = 0.0, t1: float = 1.0,
              dtype=None) -> jax.Array:
    """The num_steps+1 grid points of a fixed-step sampler, from t0 to t1, then time-shifted.

    NOTE: `num_steps` counts *steps* (intervals); the official Lumina/SiT code's `num_steps` N
    counts *grid points* (`torch.linspace(t0, t1, N)`, i.e. N-1 steps). Official N <-> ours N-1.
    As in Lumina's `ode`, the shift is applied after the linspace over [t0, t1].

    Args:
      num_steps: number of steps, >= 1.
      shift: time-shift factor s > 0 (`shift_time`); 1.0 = uniform grid.
      t0, t1: interval, 0 <= t0 < t1 <= 1.
      dtype: defaults to JAX's default float (float32, or float64 under x64).
    Returns:
      [num_steps + 1] increasing times.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    _check_positive("shift", shift)
    if not 0.0 <= t0 < t1 <= 1.0:
        raise ValueError(f"need 0 <= t0 < t1 <= 1, got t0={t0!r}, t1={t1!r}")
    dtype = jnp.result_type(float) if dtype is None else dtype
    grid = jnp.linspace(t0, t1, int(num_steps) + 1, dtype=dtype)
    if isinstance(shift, numbers.Real) and shift == 1.0:
        return grid
    return shift_time(grid, shift).astype(dtype)


def diffusers_grid(num_steps: int, shift: float = 1.0, num_train_timesteps: int = 1000, dtype=None) -> jax.Array:
    """The grid of diffusers' `FlowMatchEulerDiscreteScheduler(shift).set_timesteps(num_steps)` as times.

    Its sigmas are g(linspace(1, g(1/T), n)) followed by 0, g(s) = shift*s / (1 + (shift-1)*s),
    T = num_train_timesteps: the scheduler's smallest training sigma is already shifted and
    `set_timesteps` shifts again. Under t = 1 - sigma that is n shifted points ending short of 1,
    then t = 1, so the last step is longer than in Lumina's `time_grid(n, shift)`.
    Returns `[num_steps + 1]` increasing times.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    _check_positive("shift", shift)
    dtype = jnp.result_type(float) if dtype is None else dtype
    g = lambda sig: shift * sig / (1.0 + (shift - 1.0) * sig)
    sigma = g(np.linspace(1.0, g(1.0 / num_train_timesteps), int(num_steps)))
    return jnp.asarray(np.append(1.0 - sigma, 1.0), dtype)


def sigmoid_grid(num_steps: int, mu: float = 0.6, alpha: float = 6.0, shift: float = 1.0, dtype=None) -> jax.Array:
    """Lumina-Next's sigmoid time discretisation, as we read the paper [UNVERIFIED, REFERENCE.md §4].

    No released code has it. The paper finds Euler's local error largest near t=0 and second near
    t=1 and puts finer steps at both ends; we take the uniform grid u_i = i/n through a normalised
    logistic, t = (S(u) - S(0)) / (S(1) - S(0)), S(u) = 1 / (1 + exp(-alpha (u - mu))): steps are
    smallest at the ends and largest at u = mu (mu > 0.5 keeps the noise end finer than the data end).
    The paper's third parameter (beta = 20 in REFERENCE.md) has no role we could pin down and is
    not used. `shift` optionally bends the result like `time_grid`. Returns `[num_steps + 1]`.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    _check_positive("alpha", alpha)
    if not 0.0 < mu < 1.0:
        raise ValueError(f"mu must be in (0, 1), got {mu!r}")
    dtype = jnp.result_type(float) if dtype is None else dtype
    u = np.linspace(0.0, 1.0, int(num_steps) + 1)
    sig = lambda z: 1.0 / (1.0 + np.exp(-alpha * (z - mu)))
    t = (sig(u) - sig(0.0)) / (sig(1.0) - sig(0.0))
    t[0], t[-1] = 0.0, 1.0
    grid = jnp.asarray(t, dtype)
    return grid if shift == 1.0 else shift_time(grid, shift).astype(dtype)


TIME_SAMPLERS = ("uniform", "uniform_<t0>_<t1>", "lognorm", "shift_<s>")


def get_time_sampler(name: str | TimeSampler) -> TimeSampler:
    """Training-time sampler by name -> `fn(key, n) -> t [n]` (see module docstring).

    A callable is returned unchanged. Unknown names raise ValueError listing the valid forms.
    """
    if callable(name):
        return name
    if not isinstance(name, str):
        raise ValueError(f"time sampler must be a name or a callable, got {name!r}")
    if name == "uniform":
        return sample_uniform
    if name == "lognorm":
        return sample_logit_normal
    m = re.fullmatch(r"uniform_([0-9.eE+-]+)_([0-9.eE+-]+)", name)
    if m:
        try:
            a, b = float(m.group(1)), float(m.group(2))
        except ValueError:
            raise ValueError(f"bad time sampler {name!r}: expected uniform_<t0>_<t1>") from None
        if not 0.0 <= a < b <= 1.0:
            raise ValueError(f"bad time sampler {name!r}: need 0 <= t0 < t1 <= 1")
        return lambda key, n: sample_uniform(key, n, a, b)
    m = re.fullmatch(r"shift_([0-9.eE+-]+)", name)
    if m:
        try:
            s = float(m.group(1))
        except ValueError:
            raise ValueError(f"bad time sampler {name!r}: expected shift_<s>, e.g. shift_3.0") from None
        if not s > 0:
            raise ValueError(f"bad time sampler {name!r}: the shift must be > 0")
        return lambda key, n: sample_shifted(key, n, s)
    raise ValueError(f"unknown time sampler {name!r}; expected one of {TIME_SAMPLERS}")
