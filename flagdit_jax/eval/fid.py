"""Fréchet distance between Gaussians fitted to feature sets (the FID formula).

    FID = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))

All statistics are float64: with a few hundred samples in ~128 dims the covariances are poorly
conditioned and float32 loses digits in the trace difference.
"""

from __future__ import annotations

import warnings

import numpy as np

try:
    import scipy.linalg as _sl
except ImportError:  # scipy is optional: the eigen route needs only numpy
    _sl = None

_METHODS = ("auto", "scipy", "eigh")


def statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """`[N, D]` features -> (mean `[D]`, covariance `[D, D]`), float64, unbiased (N - 1) covariance."""
    f = np.asarray(features, np.float64)
    if f.ndim != 2:
        raise ValueError(f"features must be 2-D [N, D], got shape {f.shape}")
    if f.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got N={f.shape[0]}")
    if not np.all(np.isfinite(f)):
        raise ValueError(f"features have {int(np.sum(~np.isfinite(f)))} non-finite values")
    return f.mean(0), np.cov(f, rowvar=False)


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix; tiny negative eigenvalues (round-off) -> 0."""
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def _trace_sqrt_eigh(s1: np.ndarray, s2: np.ndarray) -> float:
    # S1 S2 is similar to A S2 A with A = S1^(1/2) (A^-1 (A A S2) A = A S2 A), which is symmetric PSD,
    # so tr((S1 S2)^(1/2)) = sum of sqrt of its eigenvalues; no complex round-off as with sqrtm.
    a = _psd_sqrt(s1)
    w = np.linalg.eigvalsh(a @ s2 @ a)
    return float(np.sum(np.sqrt(np.clip(w, 0.0, None))))


def _trace_sqrt_scipy(s1: np.ndarray, s2: np.ndarray, eps: float) -> float:
    # The reference (pytorch-fid) route: sqrtm of the non-symmetric product, with an eps*I offset
    # when the product is singular enough that sqrtm returns non-finite values.
    with warnings.catch_warnings():
        # Rank-deficient covariances (N < D, or class-mean images) are expected; the root of the
        # singular product is still fine (checked against the eigh route in the tests).
        warnings.filterwarnings("ignore", message="Matrix is singular")
        covmean = _sl.sqrtm(s1 @ s2)
        if not np.all(np.isfinite(covmean)):
            off = np.eye(s1.shape[0]) * eps
            covmean = _sl.sqrtm((s1 + off) @ (s2 + off))
    if np.iscomplexobj(covmean):
        # Imaginary parts are round-off of a matrix whose true root is real (similar to PSD).
        covmean = covmean.real
    return float(np.trace(covmean))


def frechet_distance(mu1, sigma1, mu2, sigma2, *, method: str = "auto", eps: float = 1e-6) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2); means `[D]`, covariances `[D, D]`.

    `method`: "scipy" (scipy.linalg.sqrtm, as pytorch-fid), "eigh" (symmetric eigen-decomposition,
    numpy only), or "auto" (scipy when installed). Both agree to round-off on PSD inputs. The result
    is clamped at 0 (round-off can make identical statistics give -1e-12).
    """
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    if method == "scipy" and _sl is None:
        raise ValueError("method='scipy' needs scipy, which is not installed; use method='eigh'")
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu1.ndim != 1 or mu2.shape != mu1.shape:
        raise ValueError(f"means must be 1-D of equal length, got shapes {mu1.shape} and {mu2.shape}")
    if s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"covariances must be [{d}, {d}] to match the means, got {s1.shape} and {s2.shape}")
    for name, a in (("mu1", mu1), ("sigma1", s1), ("mu2", mu2), ("sigma2", s2)):
        if not np.all(np.isfinite(a)):
            raise ValueError(f"{name} has non-finite values")
    diff = mu1 - mu2
    use_scipy = method == "scipy" or (method == "auto" and _sl is not None)
    tr_covmean = _trace_sqrt_scipy(s1, s2, eps) if use_scipy else _trace_sqrt_eigh(s1, s2)
    fid = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)
    return max(fid, 0.0)


def fid_from_features(a, b, *, method: str = "auto") -> float:
    """FID between feature sets `a` `[N, D]` and `b` `[M, D]` (N, M may differ)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sets must be [N, D] and [M, D] with equal D, got {a.shape} and {b.shape}")
    return frechet_distance(*statistics(a), *statistics(b), method=method)
