"""A small MNIST CNN that the project trains itself: the feature network for FID and the judge of
class-conditional accuracy.

Inception-v3 features (standard FID) neither fit 32x32 one-channel digits nor ship with the project,
so the digits' FID is computed on the penultimate layer of this net. Numbers are therefore only
comparable between runs that share the same cached net (`workdir/feature_net/`), which is why
`load_or_train` reuses the cache instead of retraining.

Images everywhere are float32 `[N, 32, 32, 1]` in [-1, 1]: 28x28 MNIST padded with background -1.
"""

from __future__ import annotations

import json
import pathlib
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

IMAGE_SHAPE = (32, 32, 1)
NUM_CLASSES = 10
FEATURE_DIM = 128
DEFAULT_STEPS = 1200
DEFAULT_BATCH = 64
DEFAULT_SEED = 0
_SHIFT = 2  # augmentation: random translations of up to +-2 px
_CHUNK = 250  # fixed inference batch: one jit compilation whatever N is
_CACHE_DIR = "feature_net"
_META = "classifier.json"
# Bumped whenever DigitCNN changes: same-shaped params of an older net would otherwise restore fine.
ARCH = "digitcnn-c32-64-64-swish128-v1"


class DigitCNN(nn.Module):
    """32x32x1 -> (logits [N, 10], features [N, feature_dim]).

    Three 3x3 conv blocks (32x32 -> 16 -> 8 -> 4 after pooling), then a dense feature layer whose
    activations (the classifier's input, as with Inception's pool3) are the FID features. The feature
    layer uses swish, not ReLU: with ReLU ~60% of its units died in training, leaving a rank-55
    feature covariance; swish keeps all 128 dims alive (full rank) at the same accuracy.
    """

    feature_dim: int = FEATURE_DIM
    channels: tuple[int, ...] = (32, 64, 64)

    @nn.compact
    def __call__(self, x):
        for c in self.channels:
            x = nn.relu(nn.Conv(c, (3, 3))(x))
            x = nn.avg_pool(x, (2, 2), (2, 2))
        x = x.reshape(x.shape[0], -1)
        feats = nn.swish(nn.Dense(self.feature_dim)(x))
        return nn.Dense(NUM_CLASSES)(feats), feats


_MODEL = DigitCNN()


# ---------------------------------------------------------------- data: the same split as training
# (flagdit_jax.data.mnist), so the held-out digits that FID compares against are never digits the
# generator was trained on.

def digits(split: str) -> tuple[np.ndarray, np.ndarray]:
    """`("train" | "eval")` -> images `[N, 32, 32, 1]` in [-1, 1], labels `[N]` (4,500 or 500)."""
    from flagdit_jax.data import mnist

    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    return mnist.load_split(split)


def check_images(images, name: str = "images") -> np.ndarray:
    """Validates and returns float32 `[N, 32, 32, 1]` clipped to [-1, 1].

    Also accepts the single-frame layout `[N, 1, 32, 32, 1]` that the samplers produce. Values a
    little outside [-1, 1] (ODE-sampler overshoot) are clipped; far outside (e.g. 0..255 pixels) or
    non-finite values are an error rather than a silently wrong FID.
    """
    x = np.asarray(images)
    if x.ndim == 5 and x.shape[1] == 1:
        x = x[:, 0]
    if x.ndim != 4 or tuple(x.shape[1:]) != IMAGE_SHAPE:
        raise ValueError(f"{name} must have shape [N, 32, 32, 1], got {tuple(np.shape(images))}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty (shape {x.shape})")
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise ValueError(f"{name} must be real numbers, got dtype {x.dtype}")
    x = x.astype(np.float32)
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} has {int(np.sum(~np.isfinite(x)))} non-finite values")
    lo, hi = float(x.min()), float(x.max())
    if lo < -2.0 or hi > 2.0:
        raise ValueError(f"{name} must be in [-1, 1], got range [{lo:g}, {hi:g}] (0..255 or 0..1 pixels?)")
    return np.clip(x, -1.0, 1.0)


@jax.jit
def _apply(params, x):
    return _MODEL.apply({"params": params}, x)


def logits_and_features(params, images) -> tuple[np.ndarray, np.ndarray]:
    """`[N, 32, 32, 1]` in [-1, 1] -> (logits `[N, 10]`, features `[N, 128]`), float32.

    Runs in chunks of fixed size (last one padded) so any N reuses one compiled program.
    """
    x = check_images(images)
    n = x.shape[0]
    pad = (-n) % _CHUNK
    if pad:
        x = np.concatenate([x, np.full((pad, *IMAGE_SHAPE), -1.0, np.float32)])
    outs = [_apply(params, x[i:i + _CHUNK]) for i in range(0, len(x), _CHUNK)]
    lg = np.concatenate([np.asarray(o[0]) for o in outs])[:n]
    ft = np.concatenate([np.asarray(o[1]) for o in outs])[:n]
    return lg, ft


def logits(params, images) -> np.ndarray:
    """`[N, 32, 32, 1]` in [-1, 1] -> class logits `[N, 10]` float32."""
    return logits_and_features(params, images)[0]


def features(params, images) -> np.ndarray:
    """`[N, 32, 32, 1]` in [-1, 1] -> penultimate (swish) features `[N, 128]` float32."""
    return logits_and_features(params, images)[1]


def accuracy(params, images, labels) -> float:
    """Share of `images` `[N, 32, 32, 1]` whose argmax logit equals `labels` `[N]`."""
    lab = np.asarray(labels)
    pred = logits(params, images).argmax(-1)
    if lab.shape != pred.shape:
        raise ValueError(f"labels must have shape {pred.shape}, got {lab.shape}")
    return float(np.mean(pred == lab))


# ---------------------------------------------------------------- training

def _shift(x, key):
    """Random translation by up to +-_SHIFT px per image: pad with background, crop back."""
    n = x.shape[0]
    xp = jnp.pad(x, ((0, 0), (_SHIFT, _SHIFT), (_SHIFT, _SHIFT), (0, 0)), constant_values=-1.0)
    off = jax.random.randint(key, (n, 2), 0, 2 * _SHIFT + 1)
    crop = lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), IMAGE_SHAPE)
    return jax.vmap(crop)(xp, off)


def init_params(seed: int = DEFAULT_SEED):
    """Fresh parameters (a pytree) for `DigitCNN`."""
    return _MODEL.init(jax.random.key(seed), jnp.zeros((1, *IMAGE_SHAPE)))["params"]


def train_classifier(images, labels, *, steps: int = DEFAULT_STEPS, seed: int = DEFAULT_SEED,
                     batch: int = DEFAULT_BATCH, lr: float = 2e-3):
    """Trains `DigitCNN` on `images` `[N, 32, 32, 1]` in [-1, 1] and int `labels` `[N]` in 0..9.

    Adam with cosine decay, batches of `batch` drawn with replacement, +-2 px random shifts (so it
    judges slightly off-centre generated digits as it judges real ones). Returns the params pytree.
    """
    if not isinstance(steps, (int, np.integer)) or steps <= 0:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if not isinstance(batch, (int, np.integer)) or batch <= 0:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    x = check_images(images)
    y = np.asarray(labels)
    if y.shape != (x.shape[0],):
        raise ValueError(f"labels must have shape ({x.shape[0]},) to match images, got {y.shape}")
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= NUM_CLASSES:
        raise ValueError(f"labels must be ints in 0..9, got dtype {y.dtype} range [{y.min()}, {y.max()}]")

    tx = optax.adam(optax.cosine_decay_schedule(lr, steps, alpha=0.05))
    params = init_params(seed)
    opt_state = tx.init(params)
    xd, yd = jnp.asarray(x), jnp.asarray(y, jnp.int32)

    @jax.jit
    def step(params, opt_state, key):
        k_idx, k_aug = jax.random.split(key)
        idx = jax.random.randint(k_idx, (batch,), 0, xd.shape[0])
        xb, yb = _shift(xd[idx], k_aug), yd[idx]

        def loss_fn(p):
            lg, _ = _MODEL.apply({"params": p}, xb)
            return optax.softmax_cross_entropy_with_integer_labels(lg, yb).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    key = jax.random.key(seed + 1)
    for k in jax.random.split(key, steps):
        params, opt_state, _ = step(params, opt_state, k)
    return jax.block_until_ready(params)


# ---------------------------------------------------------------- cache

def _save(directory: pathlib.Path, params) -> None:
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(directory / "params", params, force=True)
        ckptr.wait_until_finished()


def _restore(directory: pathlib.Path):
    import orbax.checkpoint as ocp

    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), jax.eval_shape(init_params))
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(directory / "params", abstract)


def load_or_train(workdir, *, steps: int | None = None, seed: int | None = None) -> tuple[dict, dict]:
    """Returns `(params, info)` for the feature net cached in `workdir/feature_net/`.

    If a cached net exists it is loaded (so every FID in a workdir uses the same features), unless
    it is of another architecture (`ARCH`) or `steps`/`seed` are given and differ from the cached
    ones, in which case it is retrained and the cache replaced. Otherwise it is trained on the 4,500 train digits (defaults: 1,200 steps, seed 0).
    `info` is the cached JSON (steps, seed, held-out accuracy on the 500 eval digits, train seconds)
    plus `"loaded": bool` saying whether the cache was reused.
    """
    if steps is not None and (not isinstance(steps, (int, np.integer)) or steps <= 0):
        raise ValueError(f"steps must be a positive int or None, got {steps!r}")
    directory = pathlib.Path(workdir).absolute() / _CACHE_DIR
    meta_path = directory / _META
    if meta_path.exists() and (directory / "params").exists():
        meta = json.loads(meta_path.read_text())
        if (meta.get("arch") == ARCH and (steps is None or meta["steps"] == steps)
                and (seed is None or meta["seed"] == seed)):
            return _restore(directory), {**meta, "loaded": True}

    steps = DEFAULT_STEPS if steps is None else int(steps)
    seed = DEFAULT_SEED if seed is None else int(seed)
    x_tr, y_tr = digits("train")
    x_ev, y_ev = digits("eval")
    t0 = time.perf_counter()
    params = train_classifier(x_tr, y_tr, steps=steps, seed=seed)
    train_s = time.perf_counter() - t0
    meta = {"arch": ARCH, "steps": steps, "seed": seed, "batch": DEFAULT_BATCH, "feature_dim": FEATURE_DIM,
            "heldout_accuracy": accuracy(params, x_ev, y_ev), "n_train": int(len(y_tr)),
            "n_heldout": int(len(y_ev)), "train_seconds": round(train_s, 2)}
    directory.mkdir(parents=True, exist_ok=True)
    if meta_path.exists():
        meta_path.unlink()  # the JSON marks a complete cache: drop it before replacing the params
    _save(directory, params)
    meta_path.write_text(json.dumps(meta, indent=1))
    return params, {**meta, "loaded": False}
