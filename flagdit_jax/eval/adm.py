"""The ADM evaluation suite: FID, sFID, Inception Score, precision and recall, and reference batches.

Follows openai/guided-diffusion `evaluations/evaluator.py` (the evaluator of ADM, DiT, SiT and
Lumina's ImageNet tables) on Inception-v3 features (`eval/inception.py` gives them as a dict
{'pool' [N, 2048], 'spatial' [N, 2023], 'logits_unbiased' [N, 1008], ...}):

    FID        Fréchet distance of Gaussians fitted to pool features (`eval/fid.py`, scipy sqrtm route)
    sFID       the same on the spatial features (the first 7 channels of mixed_6/conv, 17x17x7)
    IS         mean over consecutive splits of `split_size` (5000) samples of exp(mean KL(p(y|x) || p(y)))
               with p(y|x) = softmax(pool @ W), W the last layer's weights without the bias
    precision  share of samples inside the reference manifold; recall: share of the reference inside the
               sample manifold. A manifold is the union of balls around each point whose radius is the
               distance to its k-th (k=3) nearest neighbour in the same set, the point itself counted as
               its own 0-th neighbour (ADM's ManifoldEstimator, after Kynkäänniemi et al. 2019)

Reference batches are `.npz` files in ADM's format: `mu`, `sigma` (pool), `mu_s`, `sigma_s` (spatial), and
optionally `arr_0` (uint8 images [N, H, W, 3], as ADM's VIRTUAL_*.npz); ours also store the raw features
(`pool`, `spatial`, `logits_unbiased`) so precision / recall need no Inception pass over the reference.
Files are read with allow_pickle=False.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
import zipfile
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from flagdit_jax.eval import fid

METRICS = ("fid", "sfid", "is", "precision", "recall")
STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")
FEATURE_KEYS = ("pool", "spatial", "logits_unbiased")

FeatureFn = Callable[[np.ndarray], dict]  # uint8 [N, H, W, 3] -> {'pool': [N, D], 'spatial': [N, Ds], ...}


# ----------------------------------------------------------------------------------------------- IS

def inception_score(logits_unbiased, split_size: int = 5000) -> float:
    """ADM's Inception Score from logits `[N, K]` (pool features times the softmax weights, no bias).

    Consecutive splits of `split_size` samples (the last may be shorter, as ADM), each
    exp(mean_i KL(p_i || mean_j p_j)); returns the mean over splits. Computed in float64 with
    log_softmax (ADM takes np.log of a float32 softmax: equal unless a probability underflows to 0,
    where ADM gives nan).
    """
    z = np.asarray(logits_unbiased, np.float64)
    if z.ndim != 2 or z.shape[0] < 1:
        raise ValueError(f"logits must be [N, K] with N >= 1, got shape {z.shape}")
    if not isinstance(split_size, (int, np.integer)) or split_size < 1:
        raise ValueError(f"split_size must be a positive int, got {split_size!r}")
    if not np.all(np.isfinite(z)):
        raise ValueError(f"logits have {int(np.sum(~np.isfinite(z)))} non-finite values")
    log_p = z - z.max(1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(1, keepdims=True))
    scores = []
    for i in range(0, len(z), split_size):
        lp = log_p[i:i + split_size]
        p = np.exp(lp)
        log_q = np.log(p.mean(0, keepdims=True))
        scores.append(np.exp(np.mean(np.sum(p * (lp - log_q), 1))))
    return float(np.mean(scores))


# ------------------------------------------------------------------------------- precision / recall

def _sq_dists(u, v, half: bool = False):
    """ADM's _batch_pairwise_distances: |u|^2 - 2 u.v + |v|^2, clamped at 0, float32 [Nu, Nv].

    HIGHEST precision: on GPUs the default f32 matmul may run in TF32. `half` emulates ADM's DistanceBlock,
    which runs this in fp16 (inputs, norms, product and sum rounded to fp16; fp32 accumulation assumed, as
    cuBLAS does) and falls back to fp32 for a block with non-finite values; TF's exact fp16 kernels are not
    reproduced, so `half` shows the size of the effect rather than ADM's bits."""
    def f32():
        nu = jnp.sum(u * u, 1)[:, None]
        nv = jnp.sum(v * v, 1)[None, :]
        return jnp.maximum(nu - 2.0 * jnp.matmul(u, v.T, precision=jax.lax.Precision.HIGHEST) + nv, 0.0)

    if not half:
        return f32()
    h, f = jnp.float16, jnp.float32
    uh, vh = u.astype(h), v.astype(h)
    nu = jnp.sum(uh.astype(f) ** 2, 1).astype(h)[:, None]
    nv = jnp.sum(vh.astype(f) ** 2, 1).astype(h)[None, :]
    mm = jnp.matmul(uh, vh.T, preferred_element_type=f, precision=jax.lax.Precision.HIGHEST).astype(h)
    d = jnp.maximum(nu - h(2.0) * mm + nv, h(0.0))
    return jnp.where(jnp.all(jnp.isfinite(d)), d.astype(f), f32())


@functools.partial(jax.jit, static_argnames="half")
def _knn_update(smallest, u, v, col_valid, half=False):
    """Running k+1 smallest squared distances of rows `u` over column blocks `v` (padded columns masked)."""
    d = jnp.where(col_valid[None, :], _sq_dists(u, v, half), jnp.inf)
    both = jnp.concatenate([smallest, d], axis=1)
    return -jax.lax.top_k(-both, smallest.shape[1])[0]


@functools.partial(jax.jit, static_argnames="half")
def _inside(u, radii_u, v, radii_v, half=False):
    """For a block: rows of u inside any ball of v (radii_v) and columns of v inside any ball of u."""
    d = _sq_dists(u, v, half)
    return jnp.any(d <= radii_v[None, :], axis=1), jnp.any(d <= radii_u[:, None], axis=0)


def _pad(a: np.ndarray, n: int) -> np.ndarray:
    return np.concatenate([a, np.zeros((n - len(a),) + a.shape[1:], a.dtype)]) if n > len(a) else a


def _blocks(n: int, block: int) -> tuple[int, int]:
    b = min(block, n)
    return b, -(-n // b) * b


def manifold_radii(features, k: int = 3, block: int = 10000, *, half: bool = False) -> np.ndarray:
    """Squared distance of each row of `features` `[N, D]` to its k-th nearest neighbour in the set, the row
    itself included as the 0-th (ADM's `manifold_radii` with nhood_sizes=(k,)): `[N]` float32.

    Row and column blocks of `block` bound the memory at block x block distances.
    """
    f = np.asarray(features, np.float32)
    n = len(f)
    if f.ndim != 2 or n < k + 1:
        raise ValueError(f"features must be [N, D] with N > k={k}, got shape {f.shape}")
    b, n_pad = _blocks(n, block)
    fp = _pad(f, n_pad)
    valid = np.arange(n_pad) < n
    out = []
    for r in range(0, n_pad, b):
        smallest = jnp.full((b, k + 1), jnp.inf, jnp.float32)
        for c in range(0, n_pad, b):
            smallest = _knn_update(smallest, fp[r:r + b], fp[c:c + b], valid[c:c + b], half=half)
        out.append(np.asarray(smallest[:, k]))
    return np.concatenate(out)[:n]


def precision_recall(reference, samples, k: int = 3, block: int = 10000, *, half: bool = False
                     ) -> tuple[float, float]:
    """ADM's improved precision and recall (k-NN manifolds, k=3) of `samples` `[M, D]` against
    `reference` `[N, D]`: precision = share of samples within the k-NN radius of some reference point
    (`distance <= radius`), recall = share of reference points within that of some sample.

    Distances are float32 (ADM computes them in fp16 when finite, which can flip points near a ball's
    boundary; `half=True` emulates that, see `_sq_dists`; the definition is otherwise the same). Memory is
    bounded by `block` x `block` distances.
    """
    ref, smp = np.asarray(reference, np.float32), np.asarray(samples, np.float32)
    if ref.ndim != 2 or smp.ndim != 2 or ref.shape[1] != smp.shape[1]:
        raise ValueError(f"reference and samples must be [N, D] and [M, D] with equal D, got {ref.shape} "
                         f"and {smp.shape}")
    for name, a in (("reference", ref), ("samples", smp)):
        if len(a) <= k:
            raise ValueError(f"{name} needs more than k={k} feature vectors, got {len(a)}")
        if not np.all(np.isfinite(a)):
            raise ValueError(f"{name} features have {int(np.sum(~np.isfinite(a)))} non-finite values")
    r_ref, r_smp = manifold_radii(ref, k, block, half=half), manifold_radii(smp, k, block, half=half)
    b1, n1 = _blocks(len(ref), block)
    b2, n2 = _blocks(len(smp), block)
    # Padded points get radius -inf (no ball) and their own status is dropped.
    refp, smpp = _pad(ref, n1), _pad(smp, n2)
    rr = np.concatenate([r_ref, np.full(n1 - len(ref), -np.inf, np.float32)])
    rs = np.concatenate([r_smp, np.full(n2 - len(smp), -np.inf, np.float32)])
    ref_in = np.zeros(n1, bool)  # reference point inside the sample manifold (recall)
    smp_in = np.zeros(n2, bool)  # sample inside the reference manifold (precision)
    for i in range(0, n1, b1):
        for j in range(0, n2, b2):
            a_in, b_in = _inside(refp[i:i + b1], rr[i:i + b1], smpp[j:j + b2], rs[j:j + b2], half=half)
            ref_in[i:i + b1] |= np.asarray(a_in)
            smp_in[j:j + b2] |= np.asarray(b_in)
    return float(np.mean(smp_in[:len(smp)])), float(np.mean(ref_in[:len(ref)]))


# ---------------------------------------------------------------------------------- reference batch

@dataclasses.dataclass(frozen=True)
class Reference:
    """A reference batch: FID statistics (pool `mu` [D], `sigma` [D, D]; spatial `mu_s`, `sigma_s`) and,
    when known, the raw features (`pool` [N, D], `spatial` [N, Ds], `logits_unbiased` [N, K])."""

    mu: np.ndarray
    sigma: np.ndarray
    mu_s: np.ndarray
    sigma_s: np.ndarray
    pool: np.ndarray | None = None
    spatial: np.ndarray | None = None
    logits_unbiased: np.ndarray | None = None


def _check_features(features: dict, what: str, need=("pool", "spatial")) -> None:
    if not isinstance(features, dict):
        raise ValueError(f"{what} must be a dict of feature arrays, got {type(features).__name__}")
    missing = [k for k in need if k not in features]
    if missing:
        raise ValueError(f"{what} lacks {missing} (has {sorted(features)})")
    n = None
    for key in FEATURE_KEYS:
        if key in features:
            a = np.asarray(features[key])
            if a.ndim != 2:
                raise ValueError(f"{what}[{key!r}] must be 2-D [N, D], got shape {a.shape}")
            if n is not None and len(a) != n:
                raise ValueError(f"{what} arrays have different N: {key!r} has {len(a)}, expected {n}")
            n = len(a)


def _check_stats(mu, sigma, name: str, path) -> None:
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise ValueError(f"{path}: {name} statistics must be mean [D] and covariance [D, D], got {mu.shape} and "
                         f"{sigma.shape}")


def write_reference(path, features: dict, images: np.ndarray | None = None) -> pathlib.Path:
    """Write an ADM-format reference batch: `mu`, `sigma`, `mu_s`, `sigma_s` (float64, unbiased covariance,
    as ADM's np.cov) from `features['pool']` / `features['spatial']`, the raw features themselves, and the
    images as `arr_0` when given (uint8 [N, H, W, 3]). Written atomically (temporary file, then rename)."""
    _check_features(features, "features")
    feats = {k: np.asarray(features[k], np.float32) for k in FEATURE_KEYS if k in features}
    out = {}
    if images is not None:
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be uint8 [N, H, W, 3], got {images.dtype} {images.shape}")
        if len(images) != len(feats["pool"]):
            raise ValueError(f"{len(images)} images but {len(feats['pool'])} feature rows")
        out["arr_0"] = images
    out["mu"], out["sigma"] = fid.statistics(feats["pool"])
    out["mu_s"], out["sigma_s"] = fid.statistics(feats["spatial"])
    out.update(feats)
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:  # a file object: np.savez would append '.npz' to a path
        np.savez(f, **out)
    os.replace(tmp, path)
    return path


def read_reference(path, feature_fn: FeatureFn | None = None, *, batch: int = 500) -> Reference:
    """Read a reference batch `.npz` (ours or ADM's VIRTUAL_*.npz) without pickle.

    Statistics: `mu`, `sigma`, `mu_s`, `sigma_s` when stored (ADM uses the stored ones), else computed from
    the features. Features: the stored `pool` / `spatial` / `logits_unbiased`, else -- when the file has
    images `arr_0` and `feature_fn` is given -- computed from them in batches of `batch` images, as ADM's
    evaluator does (it always recomputes the reference activations for precision / recall). A file with only
    statistics gives a Reference without features (FID and sFID only).
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no reference batch at {path}")
    with np.load(path, allow_pickle=False) as z:
        keys = set(z.files)
        stats = {k: np.asarray(z[k], np.float64) for k in STAT_KEYS if k in keys}
        feats = {k: np.asarray(z[k], np.float32) for k in FEATURE_KEYS if k in keys}
    if stats and len(stats) != len(STAT_KEYS):
        raise ValueError(f"{path} has {sorted(stats)} but not {sorted(set(STAT_KEYS) - set(stats))}: a reference "
                         f"batch stores all of {STAT_KEYS} or none")
    if "pool" not in feats and "arr_0" in keys and feature_fn is not None:
        feats = features_of(iter_npz_batches(path, "arr_0", batch), feature_fn)
    if feats:
        _check_features(feats, f"{path} features")
    if not stats:
        if not feats:
            raise ValueError(f"{path} has none of {STAT_KEYS}, no features {FEATURE_KEYS}"
                             + (" and images arr_0 but no feature_fn to compute them" if "arr_0" in keys else
                                f" and no images arr_0 (keys: {sorted(keys)})"))
        stats["mu"], stats["sigma"] = fid.statistics(feats["pool"])
        stats["mu_s"], stats["sigma_s"] = fid.statistics(feats["spatial"])
    _check_stats(stats["mu"], stats["sigma"], "pool", path)
    _check_stats(stats["mu_s"], stats["sigma_s"], "spatial", path)
    for key, mu in (("pool", stats["mu"]), ("spatial", stats["mu_s"])):
        if key in feats and feats[key].shape[1] != len(mu):
            raise ValueError(f"{path}: {key} features have width {feats[key].shape[1]} but the statistics {len(mu)}")
    return Reference(**stats, **feats)


def features_of(batches, feature_fn: FeatureFn) -> dict:
    """Concatenated `feature_fn` outputs over an iterable of uint8 image batches `[n, H, W, 3]`."""
    parts: dict[str, list] = {}
    for images in batches:
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be uint8 [N, H, W, 3], got {images.dtype} {images.shape}")
        for key, value in feature_fn(images).items():
            parts.setdefault(key, []).append(np.asarray(value, np.float32))
    if not parts:
        raise ValueError("no images to compute features of")
    return {k: np.concatenate(v) for k, v in parts.items()}


# --------------------------------------------------------------------------------------- evaluation

def evaluate(sample_feats: dict, reference: Reference, *, metrics=METRICS, split_size: int = 5000,
             k: int = 3, block: int = 10000, half: bool = False, fid_method: str = "scipy") -> dict:
    """The ADM suite of `sample_feats` (InceptionFeatures output: 'pool' [M, D], 'spatial' [M, Ds],
    'logits_unbiased' [M, K]) against `reference`: {'fid', 'sfid', 'is', 'precision', 'recall'} (those in
    `metrics`). Precision / recall need the reference's pool features; `half` emulates ADM's fp16 distances.
    `fid_method` 'scipy' is ADM's / pytorch-fid's sqrtm (~100 s for 2048 wide on 2 busy CPU cores); 'eigh'
    (`eval/fid.py`) gives the same value to round-off in a few seconds."""
    bad = [m for m in metrics if m not in METRICS]
    if bad or not metrics:
        raise ValueError(f"metrics must be a non-empty subset of {METRICS}, got {tuple(metrics)}")
    need = [n for m, n in (("fid", "pool"), ("precision", "pool"), ("recall", "pool"), ("sfid", "spatial"),
                           ("is", "logits_unbiased")) if m in metrics]
    _check_features(sample_feats, "sample features", need=tuple(dict.fromkeys(need)))
    if ("precision" in metrics or "recall" in metrics) and reference.pool is None:
        raise ValueError("precision / recall need the reference's pool features: the reference batch has only "
                         "statistics; give read_reference images (arr_0) and a feature_fn, or drop these metrics")
    for key, mu in (("pool", reference.mu), ("spatial", reference.mu_s)):
        if key in need and np.shape(sample_feats[key])[1] != len(mu):
            raise ValueError(f"sample {key} features have width {np.shape(sample_feats[key])[1]} but the reference "
                             f"{len(mu)}")
    out = {}
    if "fid" in metrics:
        # The scipy route: sqrtm of sigma1 sigma2 with ADM's / pytorch-fid's eps offset when singular.
        out["fid"] = fid.frechet_distance(*fid.statistics(sample_feats["pool"]), reference.mu, reference.sigma,
                                          method=fid_method)
    if "sfid" in metrics:
        out["sfid"] = fid.frechet_distance(*fid.statistics(sample_feats["spatial"]), reference.mu_s,
                                           reference.sigma_s, method=fid_method)
    if "is" in metrics:
        out["is"] = inception_score(sample_feats["logits_unbiased"], split_size)
    if "precision" in metrics or "recall" in metrics:
        p, r = precision_recall(reference.pool, sample_feats["pool"], k=k, block=block, half=half)
        out.update({m: v for m, v in (("precision", p), ("recall", r)) if m in metrics})
    return out


# ------------------------------------------------------------------------------------ npz streaming

def npz_array_info(path, key: str) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of array `key` in an `.npz` without reading its data."""
    with _open_member(path, key) as f:
        shape, _, dtype = _read_header(f, path, key)
    return shape, dtype


def iter_npz_batches(path, key: str, batch: int) -> Iterator[np.ndarray]:
    """Stream array `key` of an `.npz` (stored or deflated) in leading-axis batches of `batch` rows, so a
    50K-image batch need not fit in memory (as ADM's StreamingNpzArrayReader). No pickle."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    with _open_member(path, key) as f:
        shape, fortran, dtype = _read_header(f, path, key)
        if fortran or dtype.hasobject or not shape:
            raise ValueError(f"{path}:{key} must be a C-ordered numeric array with a leading axis, got "
                             f"{'Fortran order' if fortran else dtype}, shape {shape}")
        row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        for start in range(0, shape[0], batch):
            n = min(batch, shape[0] - start)
            data = f.read(n * row)
            if len(data) != n * row:
                raise ValueError(f"{path}:{key} is truncated: expected {n * row} bytes at row {start}, got {len(data)}")
            yield np.frombuffer(data, dtype).reshape((n,) + tuple(shape[1:]))


class _open_member:
    def __init__(self, path, key):
        self.path, self.key = pathlib.Path(path), key

    def __enter__(self):
        self.zf = zipfile.ZipFile(self.path)
        name = f"{self.key}.npy"
        if name not in self.zf.namelist():
            names = sorted(n[:-4] for n in self.zf.namelist() if n.endswith(".npy"))
            self.zf.close()
            raise ValueError(f"{self.path} has no array {self.key!r} (has {names})")
        self.f = self.zf.open(name)
        return self.f

    def __exit__(self, *exc):
        self.f.close()
        self.zf.close()


def _read_header(f, path, key):
    version = np.lib.format.read_magic(f)
    if version not in ((1, 0), (2, 0), (3, 0)):
        raise ValueError(f"{path}:{key}: unsupported .npy version {version}")
    read = {(1, 0): np.lib.format.read_array_header_1_0}.get(version, np.lib.format.read_array_header_2_0)
    shape, fortran, dtype = read(f)
    return tuple(shape), fortran, dtype


class NpzStreamWriter:
    """Write an `.npz` member by member, each in row chunks (a 50K-image array need not be in memory):

        with NpzStreamWriter(path) as w:
            w.begin("arr_0", (n, h, w, 3), np.uint8); w.write(chunk); ...; w.end()

    The file appears at `path` only on a clean exit (written to `path + '.tmp'`, then renamed)."""

    def __init__(self, path):
        self.path = pathlib.Path(path)
        self.tmp = self.path.with_name(self.path.name + ".tmp")

    def __enter__(self):
        self.zf = zipfile.ZipFile(self.tmp, "w", zipfile.ZIP_STORED, allowZip64=True)
        self.member = None
        return self

    def begin(self, key: str, shape, dtype) -> None:
        if self.member is not None:
            raise ValueError(f"end() member {self.name!r} before beginning {key!r}")
        self.name, self.shape, self.dtype = key, tuple(int(s) for s in shape), np.dtype(dtype)
        self.rows = 0
        self.member = self.zf.open(f"{key}.npy", "w", force_zip64=True)
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": self.shape}
        np.lib.format.write_array_header_2_0(self.member, header)

    def write(self, chunk) -> None:
        chunk = np.ascontiguousarray(chunk, self.dtype)
        if chunk.shape[1:] != self.shape[1:] or self.rows + len(chunk) > self.shape[0]:
            raise ValueError(f"chunk {chunk.shape} does not fit {self.name!r} {self.shape} after {self.rows} rows")
        self.member.write(chunk.tobytes())
        self.rows += len(chunk)

    def end(self) -> None:
        if self.rows != self.shape[0]:
            raise ValueError(f"{self.name!r}: wrote {self.rows} of {self.shape[0]} rows")
        self.member.close()
        self.member = None

    def add(self, key: str, array) -> None:
        a = np.asarray(array)
        if a.ndim < 1:
            raise ValueError(f"{key!r}: arrays with a leading axis only, got shape {a.shape}")
        self.begin(key, a.shape, a.dtype)
        self.write(a)
        self.end()

    def __exit__(self, exc_type, *exc):
        if self.member is not None and exc_type is None:
            self.zf.close()
            raise ValueError(f"member {self.name!r} was not ended")
        self.zf.close()
        if exc_type is None:
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)

