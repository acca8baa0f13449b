"""Interpolants (probability paths) for flow matching, after SiT's `transport/path.py`.

Convention (REFERENCE.md §3, DESIGN.md principle 3): t=0 is pure noise x0 ~ N(0, I), t=1 is data x1,

    x_t = alpha(t) * x1 + sigma(t) * x0,        u_t = d_alpha(t) * x1 + d_sigma(t) * x0.

`LinearPath` is SiT's / Lumina's `ICPlan` (alpha=t, sigma=1-t, so u = x1 - x0); `GVPPath` is SiT's
`GVPCPlan` (alpha=sin(pi t/2), sigma=cos(pi t/2)); `VPPath` is `VPCPlan`, the VP-SDE's linear beta
schedule run backwards (alpha = exp(log_mean_coeff(1 - t)), sigma = sqrt(1 - alpha^2)), which is
not pure noise at t=0 (alpha(0) ~ 6.6e-3) and has d_sigma -> -inf at t=1. Paths are frozen
dataclasses (`VPPath` with its two floats) so they are hashable and can be passed as static
arguments to `jax.jit`.

Conversions between the three parameterisations (velocity v, noise eps = E[x0|x_t], score
s = grad log p_t(x_t) = -eps / sigma) solve the 2x2 linear system

    [x]   [alpha    sigma  ] [x1 ]
    [v] = [d_alpha  d_sigma] [eps]

whose determinant alpha*d_sigma - sigma*d_alpha is -1 (linear), -pi/2 (GVP) or
-alpha*(d_alpha/alpha)/sigma (VP: never zero on [0, 1), -inf at t=1).
This is algebraically identical to SiT's `get_noise_from_velocity` / `get_score_from_velocity`
(which divide by d_alpha/alpha) but stays finite at t=0 and t=1; e.g. for the linear path it gives
eps = x - t*v and s = (t*v - x) / (1 - t) (REFERENCE.md §4).

All functions accept `x` as an array or a pytree of arrays whose leaves share the leading batch
axis B; `t` is a scalar (0-d) or a `[B]` vector and is broadcast over each leaf's trailing axes.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Callable

import jax
import jax.numpy as jnp

PyTree = Any

__all__ = ["LinearPath", "GVPPath", "VPPath", "get_path", "expand_t_like", "PATHS"]


def _leaves(tree: PyTree) -> list:
    leaves = jax.tree.leaves(tree)
    if not leaves:
        raise ValueError(f"expected an array or a non-empty pytree of arrays, got {tree!r}")
    return leaves


def _check_t(t, x: PyTree) -> None:
    """Validate that t is a scalar or a [B] vector matching every leaf's leading axis."""
    t_shape = jnp.shape(t)
    if len(t_shape) > 1:
        raise ValueError(f"t must be a scalar or a [B] vector, got shape {t_shape}")
    if len(t_shape) == 1:
        for leaf in _leaves(x):
            if jnp.ndim(leaf) == 0 or jnp.shape(leaf)[0] != t_shape[0]:
                raise ValueError(
                    f"t has shape {t_shape} but x has a leaf of shape {jnp.shape(leaf)}; "
                    f"expected leading batch axis {t_shape[0]}")


def expand_t_like(t, leaf):
    """Reshape t (scalar or [B]) to broadcast over `leaf` [B, ...] (SiT's expand_t_like_x)."""
    t = jnp.asarray(t)
    if t.ndim == 0:
        return t
    return t.reshape(t.shape + (1,) * (jnp.ndim(leaf) - 1))


def _map_t(fn: Callable, t, *trees):
    """tree.map `fn(t_expanded, *leaves)` over trees sharing one structure."""
    _check_t(t, trees[0])
    return jax.tree.map(lambda *ls: fn(expand_t_like(t, ls[0]), *ls), *trees)


@dataclasses.dataclass(frozen=True)
class _Path:
    """Shared machinery; subclasses define alpha, sigma and their derivatives."""

    name = "base"

    # --- coefficients (all elementwise in t; t may be any shape) -----------------------------
    def alpha(self, t):
        raise NotImplementedError

    def sigma(self, t):
        raise NotImplementedError

    def d_alpha(self, t):
        raise NotImplementedError

    def d_sigma(self, t):
        raise NotImplementedError

    def alpha_ratio(self, t):
        """d_alpha / alpha (SiT `compute_d_alpha_alpha_ratio_t`); singular at t=0 where alpha=0."""
        return self.d_alpha(t) / self.alpha(t)

    def _det(self, t):
        # alpha*d_sigma - sigma*d_alpha: -1 (linear), -pi/2 (GVP); VP: non-zero on [0, 1).
        return self.alpha(t) * self.d_sigma(t) - self.sigma(t) * self.d_alpha(t)

    def sbdm_diffusion(self, t):
        """SiT's `compute_drift(...)[1]`: (d_alpha/alpha) * sigma^2 - sigma * d_sigma.

        The diffusion of the score-based SDE ("SBDM" form) and the `drift_var` used to weight the
        noise/score losses. Singular at t=0 for the linear / GVP paths (alpha=0); beta(t)/2 for VP.
        """
        s = self.sigma(t)
        return self.alpha_ratio(t) * s**2 - s * self.d_sigma(t)

    # --- sampling the path -----------------------------------------------------------------------
    def interpolate(self, x0: PyTree, x1: PyTree, t) -> tuple[PyTree, PyTree]:
        """x_t and the conditional velocity u_t of the path (SiT `plan`, REFERENCE.md §3).

        Args:
          x0: noise, array [B, ...] or pytree of such.
          x1: data, same structure and shapes as x0.
          t: [B] (or scalar) times in [0, 1].
        Returns:
          (x_t, u_t), both shaped like x1. For the linear path u_t = x1 - x0.
        """
        if jax.tree.structure(x0) != jax.tree.structure(x1):
            raise ValueError("x0 and x1 must have the same pytree structure, got "
                             f"{jax.tree.structure(x0)} and {jax.tree.structure(x1)}")
        for a, b in zip(_leaves(x0), _leaves(x1)):
            if jnp.shape(a) != jnp.shape(b):
                raise ValueError(f"x0 leaf shape {jnp.shape(a)} != x1 leaf shape {jnp.shape(b)}")
        xt = _map_t(lambda tt, a, b: self.alpha(tt) * b + self.sigma(tt) * a, t, x0, x1)
        ut = _map_t(lambda tt, a, b: self.d_alpha(tt) * b + self.d_sigma(tt) * a, t, x0, x1)
        return xt, ut

    # --- conversions between parameterisations ---------------------------------------------------
    def noise_from_velocity(self, v: PyTree, x: PyTree, t) -> PyTree:
        """eps = (alpha*v - d_alpha*x) / det. Linear path: eps = x - t*v. Shapes like x."""
        return _map_t(lambda tt, vv, xx: (self.alpha(tt) * vv - self.d_alpha(tt) * xx)
                      / self._det(tt), t, v, x)

    def data_from_velocity(self, v: PyTree, x: PyTree, t) -> PyTree:
        """x1_hat = (d_sigma*x - sigma*v) / det. Linear path: x1 = x + (1-t)*v. Shapes like x."""
        return _map_t(lambda tt, vv, xx: (self.d_sigma(tt) * xx - self.sigma(tt) * vv)
                      / self._det(tt), t, v, x)

    def score_from_velocity(self, v: PyTree, x: PyTree, t) -> PyTree:
        """s = -eps/sigma. Linear path: s = (t*v - x)/(1-t) (REFERENCE.md §4). Singular at t=1."""
        return _map_t(lambda tt, vv, xx: -(self.alpha(tt) * vv - self.d_alpha(tt) * xx)
                      / (self._det(tt) * self.sigma(tt)), t, v, x)

    def velocity_from_noise(self, eps: PyTree, x: PyTree, t) -> PyTree:
        """v = (d_alpha/alpha)(x - sigma*eps) + d_sigma*eps. Singular at t=0 if alpha(0)=0."""
        return _map_t(lambda tt, ee, xx: self.alpha_ratio(tt)
                      * (xx - self.sigma(tt) * ee) + self.d_sigma(tt) * ee, t, eps, x)

    def velocity_from_score(self, score: PyTree, x: PyTree, t) -> PyTree:
        """SiT `get_velocity_from_score`: v = (d_alpha/alpha) x + sbdm_diffusion(t) * s.

        Singular at t=0 if alpha(0)=0 (linear, GVP).
        """
        return _map_t(lambda tt, ss, xx: self.alpha_ratio(tt) * xx
                      + self.sbdm_diffusion(tt) * ss, t, score, x)

    def noise_from_score(self, score: PyTree, x: PyTree, t) -> PyTree:
        """eps = -sigma * s (x unused; kept for a uniform signature)."""
        del x
        return _map_t(lambda tt, ss: -self.sigma(tt) * ss, t, score)

    def score_from_noise(self, eps: PyTree, x: PyTree, t) -> PyTree:
        """s = -eps / sigma (SiT `get_score` for noise models). Singular at t=1."""
        del x
        return _map_t(lambda tt, ee: -ee / self.sigma(tt), t, eps)

    # --- SDE diffusion coefficient ---------------------------------------------------------------
    def diffusion(self, t, form: str = "sigma", norm: float = 1.0):
        """w(t) of SiT's `compute_diffusion` (REFERENCE.md §4); elementwise in t.

        Forms: 'constant' (norm), 'SBDM' (norm * sbdm_diffusion(t), singular at t=0), 'sigma'
        (norm * sigma(t)), 'linear' (norm * (1-t)), 'decreasing' (0.25 (norm cos(pi t) + 1)^2),
        'increasing-decreasing' (norm sin(pi t)^2; SiT spells it 'inccreasing-decreasing', which is
        accepted too).
        """
        form = _canonical_diffusion_form(form)
        t = jnp.asarray(t)
        if form == "constant":
            return norm * jnp.ones_like(t)
        if form == "SBDM":
            return norm * self.sbdm_diffusion(t)
        if form == "sigma":
            return norm * self.sigma(t)
        if form == "linear":
            return norm * (1.0 - t)
        if form == "decreasing":
            return 0.25 * (norm * jnp.cos(jnp.pi * t) + 1.0) ** 2
        return norm * jnp.sin(jnp.pi * t) ** 2  # increasing-decreasing


DIFFUSION_FORMS = ("constant", "SBDM", "sigma", "linear", "decreasing", "increasing-decreasing")


def _canonical_diffusion_form(form: str) -> str:
    if form == "inccreasing-decreasing":  # SiT's spelling
        return "increasing-decreasing"
    if form not in DIFFUSION_FORMS:
        raise ValueError(f"unknown diffusion_form {form!r}; expected one of {DIFFUSION_FORMS}")
    return form


@dataclasses.dataclass(frozen=True)
class LinearPath(_Path):
    """Rectified-flow / SiT `ICPlan`: x_t = t x1 + (1-t) x0, u = x1 - x0 (REFERENCE.md §3)."""

    name = "linear"

    def alpha(self, t):
        return jnp.asarray(t)

    def sigma(self, t):
        return 1.0 - jnp.asarray(t)

    def d_alpha(self, t):
        return jnp.ones_like(jnp.asarray(t))

    def d_sigma(self, t):
        return -jnp.ones_like(jnp.asarray(t))


@dataclasses.dataclass(frozen=True)
class GVPPath(_Path):
    """SiT `GVPCPlan` (variance preserving, alpha^2 + sigma^2 = 1): sin / cos of pi t / 2."""

    name = "gvp"

    def alpha(self, t):
        return jnp.sin(jnp.asarray(t) * (math.pi / 2))

    def sigma(self, t):
        return jnp.cos(jnp.asarray(t) * (math.pi / 2))

    def d_alpha(self, t):
        return (math.pi / 2) * jnp.cos(jnp.asarray(t) * (math.pi / 2))

    def d_sigma(self, t):
        return -(math.pi / 2) * jnp.sin(jnp.asarray(t) * (math.pi / 2))


@dataclasses.dataclass(frozen=True)
class VPPath(_Path):
    """SiT / Lumina `VPCPlan` (`transport/path.py`): the VP-SDE with a linear beta schedule.

    The VP SDE (beta(s) = sigma_min + s (sigma_max - sigma_min), named sigma_* as officially, i.e.
    beta_min=0.1, beta_max=20) runs in diffusion time s = 1 - t from data (s=0) to noise (s=1);
    our / Lumina's t=0 is noise, so with s = 1 - t
        log_mean_coeff = -1/4 s^2 (sigma_max - sigma_min) - 1/2 s sigma_min  (= -1/2 int_0^s beta),
        alpha = exp(log_mean_coeff),  sigma = sqrt(1 - alpha^2),
        d_alpha/alpha = beta(1 - t) / 2  (d/dt = -d/ds),  sbdm_diffusion = beta(1 - t) / 2.
    alpha(0) = exp(-5.025) ~ 6.6e-3, so x_t at t=0 is not exactly noise; d_sigma ~ -1/sqrt(1-t)
    diverges at t=1, which is why official training stops at t = 1 - 1e-5 (`losses.train_interval`)
    and sampling at t = 1 - 1e-3.
    """

    sigma_min: float = 0.1
    sigma_max: float = 20.0
    name = "vp"

    def __post_init__(self):
        if not (isinstance(self.sigma_min, numbers.Real) and isinstance(self.sigma_max, numbers.Real)
                and 0.0 <= self.sigma_min < self.sigma_max):
            raise ValueError("VPPath needs numbers 0 <= sigma_min < sigma_max (beta_min, beta_max), "
                             f"got sigma_min={self.sigma_min!r}, sigma_max={self.sigma_max!r}")

    def beta(self, t):
        """beta at diffusion time s = 1 - t (official `compute_drift`'s beta_t)."""
        return self.sigma_min + (1.0 - jnp.asarray(t)) * (self.sigma_max - self.sigma_min)

    def _log_mean_coeff(self, t):
        s = 1.0 - jnp.asarray(t)
        return -0.25 * s**2 * (self.sigma_max - self.sigma_min) - 0.5 * s * self.sigma_min

    def alpha_ratio(self, t):
        # Official `d_log_mean_coeff`: exact, no division (alpha is never 0 here anyway).
        return 0.5 * self.beta(t)

    def alpha(self, t):
        return jnp.exp(self._log_mean_coeff(t))

    def sigma(self, t):
        # sqrt(-expm1(2 lmc)) = sqrt(1 - alpha^2), accurate near t=1 where alpha^2 -> 1.
        return jnp.sqrt(-jnp.expm1(2.0 * self._log_mean_coeff(t)))

    def d_alpha(self, t):
        return self.alpha(t) * self.alpha_ratio(t)

    def d_sigma(self, t):
        # d/dt sqrt(1 - alpha^2) = -alpha^2 (d_alpha/alpha) / sigma (official compute_sigma_t).
        return -self.alpha(t) ** 2 * self.alpha_ratio(t) / self.sigma(t)

    def sbdm_diffusion(self, t):
        # Official VPCPlan.compute_drift()[1] = beta/2 (the generic formula equals it, see tests).
        return 0.5 * self.beta(t)


PATHS = {"linear": LinearPath, "gvp": GVPPath, "vp": VPPath}


def get_path(name: str | _Path) -> _Path:
    """'linear' | 'gvp' | 'vp' (case-insensitive) -> path instance with the official defaults
    (VP: sigma_min=0.1, sigma_max=20); a path instance is returned as is."""
    if isinstance(name, _Path):
        return name
    if not isinstance(name, str) or name.lower() not in PATHS:
        raise ValueError(f"unknown path {name!r}; expected one of {sorted(PATHS)}")
    return PATHS[name.lower()]()
