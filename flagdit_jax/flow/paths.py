"""Interpolants (probability paths) for flow matching, after SiT's `transport/path.py`.

Convention (REFERENCE.md §3, DESIGN.md principle 3): t=0 is pure noise x0 ~ N(0, I), t=1 is data x1,

    x_t = alpha(t) * x1 + sigma(t) * x0,        u_t = d_alpha(t) * x1 + d_sigma(t) * x0.

`LinearPath` is SiT's / Lumina's `ICPlan` (alpha=t, sigma=1-t, so u = x1 - x0); `GVPPath` is SiT's
`GVPCPlan` (alpha=sin(pi t/2), sigma=cos(pi t/2)). Paths are frozen, field-less dataclasses so they
are hashable and can be passed as static arguments to `jax.jit`.

Conversions between the three parameterisations (velocity v, noise eps = E[x0|x_t], score
s = grad log p_t(x_t) = -eps / sigma) solve the 2x2 linear system

    [x]   [alpha    sigma  ] [x1 ]
    [v] = [d_alpha  d_sigma] [eps]

whose determinant alpha*d_sigma - sigma*d_alpha is -1 (linear) or -pi/2 (GVP) and never vanishes.
This is algebraically identical to SiT's `get_noise_from_velocity` / `get_score_from_velocity`
(which divide by d_alpha/alpha) but stays finite at t=0 and t=1; e.g. for the linear path it gives
eps = x - t*v and s = (t*v - x) / (1 - t) (REFERENCE.md §4).

All functions accept `x` as an array or a pytree of arrays whose leaves share the leading batch
axis B; `t` is a scalar (0-d) or a `[B]` vector and is broadcast over each leaf's trailing axes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

PyTree = Any

__all__ = ["LinearPath", "GVPPath", "get_path", "expand_t_like", "PATHS"]


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

    def _det(self, t):
        # alpha*d_sigma - sigma*d_alpha; constant and non-zero for both paths here.
        return self.alpha(t) * self.d_sigma(t) - self.sigma(t) * self.d_alpha(t)

    def sbdm_diffusion(self, t):
        """SiT's `compute_drift(...)[1]`: (d_alpha/alpha) * sigma^2 - sigma * d_sigma.

        The diffusion of the score-based SDE ("SBDM" form) and the `drift_var` used to weight the
        noise/score losses. Singular at t=0 (alpha=0).
        """
        a, s = self.alpha(t), self.sigma(t)
        return self.d_alpha(t) / a * s**2 - s * self.d_sigma(t)

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
        """v = (d_alpha/alpha)(x - sigma*eps) + d_sigma*eps. Singular at t=0 (alpha=0)."""
        return _map_t(lambda tt, ee, xx: self.d_alpha(tt) / self.alpha(tt)
                      * (xx - self.sigma(tt) * ee) + self.d_sigma(tt) * ee, t, eps, x)

    def velocity_from_score(self, score: PyTree, x: PyTree, t) -> PyTree:
        """SiT `get_velocity_from_score`: v = (d_alpha/alpha) x + sbdm_diffusion(t) * s.

        Singular at t=0 (alpha=0).
        """
        return _map_t(lambda tt, ss, xx: self.d_alpha(tt) / self.alpha(tt) * xx
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


PATHS = {"linear": LinearPath, "gvp": GVPPath}


def get_path(name: str | _Path) -> _Path:
    """'linear' | 'gvp' (case-insensitive) -> path instance; a path instance is returned as is."""
    if isinstance(name, _Path):
        return name
    if not isinstance(name, str) or name.lower() not in PATHS:
        raise ValueError(f"unknown path {name!r}; expected one of {sorted(PATHS)}")
    return PATHS[name.lower()]()
