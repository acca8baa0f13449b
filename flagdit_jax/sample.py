"""Sampling from a training workdir: EMA params from the latest checkpoint -> images / PNG grid.

The whole sampler (CFG on the doubled batch, the ODE loop) is one jitted computation.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from flagdit_jax import checkpoint, tokens as tok, train
from flagdit_jax.flow import samplers


def load_params(config, workdir: str | pathlib.Path, *, use_ema: bool = True):
    """Params (EMA by default) of the latest checkpoint in `workdir`, restored onto this host's mesh.

    Only the one params tree is read (Orbax partial restore), so a checkpoint whose optimizer state
    differs from `config.optim` (another schedule, another optimizer) still samples.
    """
    s, _ = train.setup(config)
    key = "ema_params" if use_ema else "params"
    abstract = {key: getattr(s.abstract_state, key)}
    restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding), abstract)
    mngr = checkpoint.make_manager(pathlib.Path(workdir) / "checkpoints", every_steps=1, keep=1)
    step = mngr.latest_step()
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {pathlib.Path(workdir) / 'checkpoints'}; run `flagdit train` first")
    args = ocp.args.PyTreeRestore(item=abstract, restore_args=restore_args, partial_restore=True)
    params = mngr.restore(step, args=ocp.args.Composite(state=args)).state[key]
    mngr.close()
    return params, s, step


def make_generator(s: "train.Setup", n: int, *, method: str, num_steps: int, cfg_scale: float,
                   cfg_channels: int | None = None, shift: float = 1.0):
    """Jitted `generate(params, labels [n], key) -> images [n, H, W, C]`.

    cfg_channels=None guides every channel; 3 is the reference's first-3-latent-channel CFG
    (REFERENCE.md §4); shift > 1 puts more of the steps near the noise end (time shifting).
    The ODE state is kept as [n, L, p*p, C] so that the channel axis is last.
    """
    cfg, size = s.model_cfg, s.config.data.image_size
    layout = tok.pack(jnp.zeros((n, 1, size, size, cfg.in_channels)), cfg.patch_size, nextline=cfg.nextline)
    pair = tok.pack(jnp.zeros((2 * n, 1, size, size, cfg.in_channels)), cfg.patch_size, nextline=cfg.nextline)
    null = cfg.num_classes
    shape = layout.tokens.shape[:2] + (cfg.patch_size ** 2, cfg.in_channels)

    @jax.jit
    def generate(params, labels, key):
        def model_fn(x, t, y):
            tokens = x.reshape(x.shape[:2] + (-1,))
            return s.model.apply({"params": params}, pair.replace(tokens=tokens), t, y=y).reshape(x.shape)

        v = samplers.guided_velocity_fn(model_fn, labels, jnp.full_like(labels, null), cfg_scale,
                                        channels=cfg_channels)
        x0 = jax.random.normal(key, shape)
        x1 = samplers.sample_ode(v, x0, method=method, num_steps=num_steps, shift=shift)
        return tok.unpack(x1.reshape(layout.tokens.shape), layout)[:, 0]

    return generate


def generate_images(config, params, s, labels: np.ndarray, seed: int, batch: int | None = None) -> np.ndarray:
    """Images `[N, H, W, C]` in [-1, 1] for class `labels`, in batches of `batch`."""
    sc = config.sample
    batch = batch or len(labels)
    gen = make_generator(s, batch, method=sc.method, num_steps=sc.num_steps, cfg_scale=sc.cfg_scale,
                         cfg_channels=sc.get("cfg_channels"), shift=sc.get("shift", 1.0))
    out = []
    for i in range(0, len(labels), batch):
        lb = np.asarray(labels[i:i + batch], np.int32)
        pad = batch - len(lb)
        lb_full = np.concatenate([lb, np.zeros(pad, np.int32)])
        imgs = gen(params, jnp.asarray(lb_full), jax.random.fold_in(jax.random.key(seed), i))
        out.append(np.asarray(imgs)[: len(lb)])
    return np.clip(np.concatenate(out), -1.0, 1.0)


def save_grid(path: pathlib.Path, images: np.ndarray, rows: int) -> None:
    """`[N, H, W, C]` in [-1, 1] -> one PNG grid with `rows` rows (C = 1 or 3)."""
    from PIL import Image

    n, h, w, c = images.shape
    cols = n // rows
    grid = images[: rows * cols].reshape(rows, cols, h, w, c).transpose(0, 2, 1, 3, 4).reshape(rows * h, cols * w, c)
    grid = np.uint8(np.clip((grid + 1) * 127.5, 0, 255))
    Image.fromarray(grid[..., 0] if c == 1 else grid).save(path)


def sample_grid(config, workdir: str | pathlib.Path, out: str | pathlib.Path | None = None) -> pathlib.Path:
    """One row per class, `config.sample.per_class` columns; writes `workdir/samples_<step>.png`."""
    params, s, step = load_params(config, workdir, use_ema=config.sample.use_ema)
    n_cls = s.model_cfg.num_classes
    labels = np.repeat(np.arange(n_cls), config.sample.per_class)
    images = generate_images(config, params, s, labels, seed=config.seed)
    if images.shape[-1] not in (1, 3):  # VAE latents: no image to show without a decoder
        out = pathlib.Path(out) if out else pathlib.Path(workdir) / f"samples_{step}.npz"
        np.savez(out, latents=images, labels=labels)
        print(f"wrote {out}: {images.shape} latents (decode with the run's VAE), labels {labels.shape}")
        return out
    out = pathlib.Path(out) if out else pathlib.Path(workdir) / f"samples_{step}.png"
    save_grid(out, images, rows=n_cls)
    print(f"wrote {out} ({n_cls} rows, one per class; step {step}, {config.sample.method} x{config.sample.num_steps},"
          f" cfg {config.sample.cfg_scale})")
    return out
