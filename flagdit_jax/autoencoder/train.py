"""Trains the project's own small AutoencoderKL on the embedded MNIST digits and saves it as a
diffusers folder (no VAE ships in any wheel, so the embedded text-to-image default makes its own).

    flagdit autoencoder --config configs/autoencoder/mnist.py --workdir runs/ae
    -> runs/ae/vae/{config.json, diffusion_pytorch_model.safetensors}, runs/ae/autoencoder.json

Data: each training image is a canvas (32x32, 32x64 or 64x32, background -1) with one training-split
digit (`data.mnist.load_split('train')`) resized to a random 16..28 px square at a random place, as
the text-to-image data lays digits out. Loss (LDM's autoencoder recipe without the GAN or LPIPS
terms, CompVis `ldm/modules/losses/contperceptual.py`): per-pixel L1 (or L2) reconstruction of a
posterior sample plus `kl_weight` x KL(posterior || N(0, 1)), both summed per image and divided by
the pixel count. The saved `scaling_factor` is 1 / std of posterior samples of training canvases
(LDM's `scale_by_std`, how SD's 0.18215 was chosen); `shift_factor` stays None as SD's.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from typing import Any

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax

from flagdit_jax.autoencoder import convert
from flagdit_jax.autoencoder.kl import VAE, AutoencoderKL, AutoencoderKLConfig, kl_divergence, sample_posterior

LOSSES = ("l1", "l2")
_DIGIT = 28  # MNIST digits are 28x28; load_split pads them to 32x32 with 2 px of background
METRICS_NAME = "autoencoder.json"


def model_config(config) -> AutoencoderKLConfig:
    """`config.model` (AutoencoderKL fields) -> `AutoencoderKLConfig`; scaling_factor is set after training."""
    m = {k: (tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in dict(config.model).items()}
    try:
        return AutoencoderKLConfig(**m)
    except TypeError as e:  # an unknown field
        raise ValueError(f"config.model: {e}") from e


def validate(config) -> None:
    """Checks the config's values before any work; raises ValueError naming the bad key."""
    cfg = model_config(config)
    t, d = config.train, config.data
    for key in ("steps", "batch", "log_every"):
        v = t[key]
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"config.train.{key}={v!r} must be a positive int")
    if t.loss not in LOSSES:
        raise ValueError(f"config.train.loss={t.loss!r}; expected one of {LOSSES}")
    if not (t.lr > 0 and t.kl_weight >= 0 and t.grad_clip > 0 and t.warmup_steps >= 0):
        raise ValueError(f"config.train: lr={t.lr!r} and grad_clip={t.grad_clip!r} must be > 0, kl_weight="
                         f"{t.kl_weight!r} and warmup_steps={t.warmup_steps!r} >= 0")
    if t.init_logvar is not None and not (isinstance(t.init_logvar, (int, float)) and -30 <= t.init_logvar <= 20):
        raise ValueError(f"config.train.init_logvar={t.init_logvar!r} must be None or a number in [-30, 20]")
    lo, hi = d.digit_size
    if not (1 <= lo <= hi):
        raise ValueError(f"config.data.digit_size={tuple(d.digit_size)} must be (min, max) with 1 <= min <= max")
    shapes = [tuple(s) for s in d.canvases]
    if not shapes or len(d.canvas_weights) != len(shapes) or any(w <= 0 for w in d.canvas_weights):
        raise ValueError(f"config.data.canvases={shapes} needs one positive weight each, got "
                         f"canvas_weights={tuple(d.canvas_weights)}")
    for h, w in shapes:
        if h < hi or w < hi or h % cfg.downsample or w % cfg.downsample:
            raise ValueError(f"canvas {h}x{w} must hold a {hi} px digit and be a multiple of the downsample "
                             f"factor {cfg.downsample}")
    if cfg.in_channels != 1 or cfg.out_channels != 1:
        raise ValueError(f"MNIST is grayscale: config.model in_channels/out_channels must be 1, got "
                         f"{cfg.in_channels}/{cfg.out_channels}")


def digits(split: str) -> jax.Array:
    """The split's digits cropped to their 28x28 squares: `[N, 28, 28, 1]` in [-1, 1]."""
    from flagdit_jax.data import mnist

    x, _ = mnist.load_split(split)
    p = (mnist.IMAGE_SIZE - _DIGIT) // 2
    return jnp.asarray(x[:, p:p + _DIGIT, p:p + _DIGIT])


def make_canvases(key: jax.Array, pool: jax.Array, batch: int, shape: tuple[int, int],
                  digit_size: tuple[int, int]) -> jax.Array:
    """`batch` canvases `[batch, H, W, 1]` (background -1), each holding a random digit of `pool`
    `[N, 28, 28, 1]` resized (antialiased linear, `jax.image.scale_and_translate`) to a random integer
    size in `digit_size` (inclusive) at a random integer place. Jit-able (shape and sizes static)."""
    h, w = shape
    k_idx, k_size, k_y, k_x = jax.random.split(key, 4)
    idx = jax.random.randint(k_idx, (batch,), 0, pool.shape[0])
    size = jax.random.randint(k_size, (batch,), digit_size[0], digit_size[1] + 1).astype(jnp.float32)
    ty = jnp.floor(jax.random.uniform(k_y, (batch,)) * (h - size + 1))
    tx = jnp.floor(jax.random.uniform(k_x, (batch,)) * (w - size + 1))

    def paste(img, s, y, x):  # resample img + 1 (background 0, which scale_and_translate pads with)
        out = jax.image.scale_and_translate(img + 1.0, (h, w, 1), (0, 1), jnp.stack([s, s]) / _DIGIT,
                                            jnp.stack([y, x]), method="linear", antialias=True)
        return jnp.clip(out, 0.0, 2.0) - 1.0

    return jax.vmap(paste)(pool[idx], size, ty, tx)


canvases = jax.jit(make_canvases, static_argnums=(2, 3, 4))  # outside a training step: one program per shape


def _loss_fn(model: AutoencoderKL, params, x, key, loss: str, kl_weight: float):
    mean, logvar = model.apply({"params": params}, x, method=AutoencoderKL.encode)
    recon = model.apply({"params": params}, sample_posterior(mean, logvar, key), method=AutoencoderKL.decode)
    err = jnp.abs(recon - x) if loss == "l1" else jnp.square(recon - x)
    n_pix = np.prod(x.shape[1:])
    rec = jnp.mean(jnp.sum(err, axis=(1, 2, 3))) / n_pix
    kl = jnp.mean(kl_divergence(mean, logvar)) / n_pix
    return rec + kl_weight * kl, (rec, kl)


def _start_logvar(params, cfg: AutoencoderKLConfig, logvar: float | None):
    """Sets the bias of the encoder's last layer's logvar half (quant_conv's, else conv_out's) to
    `logvar`. At Flax's zero bias the posterior std starts at 1 against a mean of ~0.1, so the
    decoder first learns from noise, and Adam moves a bias by ~lr a step: at lr 2e-3 getting logvar
    to -6 would take ~3,000 steps, more than the whole CPU budget. None keeps the default init."""
    if logvar is None:
        return params
    flat = flax.traverse_util.flatten_dict(params)
    key = ("quant_conv", "bias") if cfg.use_quant_conv else ("encoder", "conv_out", "bias")
    flat[key] = flat[key].at[cfg.latent_channels:].set(logvar)
    return flax.traverse_util.unflatten_dict(flat)


def _schedule(config) -> list[tuple[int, int]]:
    """The canvas shape of each step in one cycle: shape i repeated canvas_weights[i] times, interleaved."""
    shapes, weights = [tuple(s) for s in config.data.canvases], list(config.data.canvas_weights)
    cycle = []
    for r in range(max(weights)):
        cycle += [s for s, w in zip(shapes, weights) if r < w]
    return cycle


def train(config, *, progress: bool = True) -> tuple[dict, AutoencoderKLConfig, list[dict]]:
    """Trains from scratch; returns `(params, model config, history)` where history holds
    `{'step', 'loss', 'rec', 'kl'}` every `config.train.log_every` steps (loss averaged over them)."""
    validate(config)
    cfg, t = model_config(config), config.train
    model = AutoencoderKL(cfg)
    pool = digits(config.data.split)
    params = _start_logvar(convert.init_params(cfg, config.seed), cfg, t.init_logvar)
    tx = optax.chain(optax.clip_by_global_norm(t.grad_clip),
                     optax.adam(optax.warmup_cosine_decay_schedule(0.0, t.lr, min(t.warmup_steps, t.steps // 2), t.steps,
                                                                   end_value=t.lr * 0.05)))
    opt_state = tx.init(params)
    digit_size = tuple(int(v) for v in config.data.digit_size)

    def step(params, opt_state, pool, key, shape):  # pool as an argument, not a 14 MB constant in the HLO
        k_data, k_z = jax.random.split(key)
        x = make_canvases(k_data, pool, t.batch, shape, digit_size)
        (loss, (rec, kl)), grads = jax.value_and_grad(
            lambda p: _loss_fn(model, p, x, k_z, t.loss, t.kl_weight), has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, jnp.stack([loss, rec, kl])

    step = jax.jit(step, static_argnames="shape", donate_argnums=(0, 1))
    cycle, history, acc = _schedule(config), [], []
    from tqdm import tqdm

    keys = jax.random.split(jax.random.key(config.seed + 1), t.steps)
    with tqdm(total=t.steps, desc="autoencoder", mininterval=5, disable=not progress) as bar:
        for i in range(t.steps):
            params, opt_state, m = step(params, opt_state, pool, keys[i], shape=cycle[i % len(cycle)])
            acc.append(m)
            if (i + 1) % t.log_every == 0 or i + 1 == t.steps:
                loss, rec, kl = np.mean(np.asarray(jnp.stack(acc)), axis=0)
                if not np.isfinite(loss):
                    raise FloatingPointError(f"autoencoder loss is {loss} at step {i + 1}")
                history.append(dict(step=i + 1, loss=float(loss), rec=float(rec), kl=float(kl)))
                bar.set_postfix(loss=f"{loss:.4f}", kl=f"{kl:.3g}")
                acc = []
            bar.update(1)
    return jax.block_until_ready(params), cfg, history


def latent_statistics(params, cfg: AutoencoderKLConfig, config, *, num_images: int, seed: int = 0) -> dict:
    """Mean and std over all elements of posterior samples of `num_images` training canvases
    (the config's shapes in its proportions) and `scaling_factor` = 1 / std (LDM `scale_by_std`)."""
    vae, pool = VAE(params, cfg), digits(config.data.split)
    digit_size = tuple(int(v) for v in config.data.digit_size)
    cycle, key, zs = _schedule(config), jax.random.key(seed), []
    per = max(1, num_images // len(cycle))
    for shape in cycle:
        key, k_x, k_z = jax.random.split(key, 3)
        x = canvases(k_x, pool, per, shape, digit_size)
        zs.append(np.asarray(vae.encode(x, sample=True, rng=k_z) / vae.scaling_factor + vae.shift_factor).ravel())
    z = np.concatenate(zs)
    return {"latent_mean": float(z.mean()), "latent_std": float(z.std()), "scaling_factor": float(1.0 / z.std()),
            "num_images": per * len(cycle)}


def evaluate_reconstructions(vae: VAE, workdir, *, classifier_steps: int | None = None) -> dict:
    """The project's MNIST classifier (`eval.classifier.load_or_train(workdir)`, cached there) on the
    500 held-out digits as they are (28 px centred on 32x32) and after encode (posterior mean) ->
    decode, clipped to [-1, 1]. Returns both accuracies and the mean |error| per pixel."""
    from flagdit_jax.eval import classifier as clf

    params, info = clf.load_or_train(workdir, steps=classifier_steps)
    x, y = clf.digits("eval")
    recon = np.concatenate([np.asarray(vae.decode(vae.encode(x[i:i + 100]) / vae.scaling_factor + vae.shift_factor))
                            for i in range(0, len(x), 100)])
    recon = np.clip(recon, -1.0, 1.0)
    return {"accuracy_original": clf.accuracy(params, x, y), "accuracy_reconstructed": clf.accuracy(params, recon, y),
            "l1_per_pixel": float(np.mean(np.abs(recon - x))), "n": int(len(y)),
            "classifier_steps": int(info["steps"])}


def save_trained(params, cfg: AutoencoderKLConfig, config, workdir, *, history=(), train_seconds=None) -> pathlib.Path:
    """Measures the latent scale of trained `params`, writes `workdir/vae/` (a diffusers AutoencoderKL
    folder with that `scaling_factor`, written atomically) and `workdir/autoencoder.json` (history,
    latent statistics, timings and, with `config.eval.classifier`, the classifier accuracies of
    held-out originals vs reconstructions). Returns the folder's path."""
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    stats = latent_statistics(params, cfg, config, num_images=config.scaling.num_images, seed=config.seed)
    cfg = dataclasses.replace(cfg, scaling_factor=stats["scaling_factor"])
    path = convert.save_folder(workdir / "vae", params, cfg)
    report: dict[str, Any] = {"train_seconds": train_seconds, "history": list(history), "latents": stats,
                              "config": config.to_dict()}
    if config.eval.classifier:
        t1 = time.perf_counter()
        report["reconstruction"] = evaluate_reconstructions(VAE(params, cfg), workdir,
                                                            classifier_steps=config.eval.classifier_steps or None)
        report["eval_seconds"] = round(time.perf_counter() - t1, 1)
        r = report["reconstruction"]
        print(f"classifier accuracy on {r['n']} held-out digits: originals {r['accuracy_original']:.3f}, "
              f"reconstructions {r['accuracy_reconstructed']:.3f} (L1/pixel {r['l1_per_pixel']:.4f})")
    (workdir / METRICS_NAME).write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(f"saved {path} (scaling_factor {cfg.scaling_factor:.5f})")
    return path


def train_autoencoder(config, workdir) -> pathlib.Path:
    """`flagdit autoencoder`: validates `config`, trains (`train`), then `save_trained` into `workdir`.
    Returns the path of the saved diffusers folder `workdir/vae`."""
    validate(config)
    t0 = time.perf_counter()
    params, cfg, history = train(config)
    train_s = round(time.perf_counter() - t0, 1)
    print(f"trained {config.train.steps} steps in {train_s:.0f} s")
    return save_trained(params, cfg, config, workdir, history=history, train_seconds=train_s)
