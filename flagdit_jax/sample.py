"""Sampling from a training workdir: EMA params from the latest checkpoint -> images / PNG grid.

The whole sampler (CFG on the doubled batch, the ODE loop) is one jitted computation.
"""

from __future__ import annotations

import logging
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from flagdit_jax import checkpoint, tasks, tokens as tok, train
from flagdit_jax.flow import losses, paths, samplers
from flagdit_jax.models.common import InferenceOptions


def load_params(config, workdir: str | pathlib.Path, *, use_ema: bool = True):
    """Params (EMA by default) of the newest good checkpoint in `workdir`, restored onto this host's mesh.

    Only the one params tree is read (Orbax partial restore), so a checkpoint whose optimizer state
    differs from `config.optim` (another schedule, another optimizer) still samples. The manager is
    read-only (a running `flagdit train` may share the workdir). A checkpoint that cannot be read or
    fails its checksum is skipped with a warning (nothing is moved); one that does not fit the
    config's model raises CheckpointMismatch naming the first mismatching parameters.
    """
    s, _ = train.setup(config)
    key = "ema_params" if use_ema else "params"
    abstract = {key: getattr(s.abstract_state, key)}
    directory = pathlib.Path(workdir).absolute() / "checkpoints"
    steps = []
    if directory.is_dir():
        mngr = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True))
        steps = sorted(mngr.all_steps(), reverse=True)
    if not steps:
        raise FileNotFoundError(f"no checkpoint in {directory}; run `flagdit train` with --workdir {workdir} first")
    errors = []
    try:
        for step in steps:
            try:
                # Either block layout: a per-layer run samples from a scanned config and vice versa.
                return checkpoint.restore_params(mngr, step, key, abstract[key], s.model_cfg), s, step
            except Exception as e:  # noqa: BLE001 - reported, then the previous checkpoint is tried
                errors.append(e)
                logging.warning("checkpoint %s is unreadable (%s: %s); trying the previous one", directory / str(step),
                                type(e).__name__, checkpoint._first_line(e))
    finally:
        mngr.close()
    mismatch = next((e for e in errors if isinstance(e, checkpoint.CheckpointMismatch)), None)
    if mismatch is not None:
        raise mismatch
    raise OSError(f"no readable checkpoint in {directory} (newest, step {steps[0]}: {type(errors[0]).__name__}: "
                  f"{checkpoint._first_line(errors[0])})") from errors[0]


def make_solver(s: "train.Setup", n: int, shape: tuple[int, int, int] | None = None, *, method: str,
                num_steps: int, cfg_scale: float, cfg_channels: int | None = None, shift: float = 1.0,
                options: "InferenceOptions | None" = None):
    """`(solve, state_shape)`: traceable `solve(params, cond, x0, sde_key) -> frames [n, T, H, W, C]` from
    the initial noise `x0` (`state_shape` = [n, L, p*p, C], channels last), and the shape `x0` must have.

    `cond` is the task's condition for n samples (`{'label': [n]}` or `{'cap_feats': [n, S, D],
    'cap_mask': [n, S]}`); guidance pairs it with the task's null condition. `shape` (T, H, W)
    defaults to one `config.data.image_size` square frame. cfg_channels=None guides every channel;
    3 is the reference's first-3-latent-channel CFG (REFERENCE.md §4); shift > 1 puts more of the
    steps near the noise end (time shifting). method 'sde' is SiT's Euler–Maruyama sampler on the
    training path (`s.config.sample` may set diffusion_form / diffusion_norm / last_step). A noise /
    score model is sampled through its velocity, on SiT's sampling interval. `options` (a
    `models.common.InferenceOptions`, None = the defaults) goes to every model call: RoPE scaling
    (ntk_factor, pi_factor, Lumina-Next's scale_factor), proportional attention (base_seqlen), ...;
    a backbone that lacks an option set away from its default raises a ValueError when `solve`
    is traced (`common.resolve_options`).
    """
    if options is not None and not isinstance(options, InferenceOptions):
        raise ValueError(f"options must be a models.common.InferenceOptions (or None), got {options!r}")
    cfg, task = s.model_cfg, s.task
    if shape is None:
        shape = (1, s.config.data.image_size, s.config.data.image_size)
    zeros = jnp.zeros((n, *shape, cfg.in_channels))
    layout = tok.pack_for(cfg, zeros)
    pair = tok.pack_for(cfg, jnp.concatenate([zeros, zeros]))
    state_shape = layout.tokens.shape[:2] + (cfg.patch_size ** 2, cfg.in_channels)
    path, prediction = paths.get_path(s.config.flow.path), s.config.flow.get("prediction", "velocity")
    t0, t1 = losses.sample_interval(path, prediction)

    def solve(params, cond, x0, sde_key):
        def model_fn(x, t, c):
            tokens = x.reshape(x.shape[:2] + (-1,))
            out = s.model.apply({"params": params}, pair.replace(tokens=tokens), t, options=options,
                                **task.model_kwargs(c)).reshape(x.shape)
            return losses.to_velocity(out, x, t, path, prediction)

        v = samplers.guided_velocity_fn(model_fn, cond, task.null_cond(n), cfg_scale, channels=cfg_channels)
        if method == "sde":
            sc = s.config.sample
            x1 = samplers.sample_sde(v, x0, sde_key, num_steps=num_steps, path=path, t0=t0,
                                     diffusion_form=sc.get("diffusion_form", "sigma"),
                                     diffusion_norm=sc.get("diffusion_norm", 1.0), last_step=sc.get("last_step", "Mean"))
        else:
            x1 = samplers.sample_ode(v, x0, method=method, num_steps=num_steps, shift=shift, t0=t0, t1=t1)
        return tok.unpack(x1.reshape(layout.tokens.shape), layout)

    return solve, state_shape


def make_generator(s: "train.Setup", n: int, shape: tuple[int, int, int] | None = None, *, method: str,
                   num_steps: int, cfg_scale: float, cfg_channels: int | None = None, shift: float = 1.0,
                   options: "InferenceOptions | None" = None):
    """Jitted `generate(params, cond, key) -> frames [n, T, H, W, C]` for latent size `shape`: `make_solver`
    from noise drawn with `key` (arguments as there, `options` included)."""
    solve, state_shape = make_solver(s, n, shape, method=method, num_steps=num_steps, cfg_scale=cfg_scale,
                                     cfg_channels=cfg_channels, shift=shift, options=options)

    @jax.jit
    def generate(params, cond, key):
        k_init, k_sde = jax.random.split(key)
        return solve(params, cond, jax.random.normal(k_init, state_shape), k_sde)

    return generate


def generate(config, params, s, cond: dict, seed: int, *, shape: tuple[int, int, int] | None = None,
             batch: int | None = None) -> np.ndarray:
    """Frames `[N, T, H, W, C]` in [-1, 1] for the task conditions `cond` (leaves `[N, ...]`), in batches."""
    sc = config.sample
    total = len(jax.tree.leaves(cond)[0])
    batch = batch or total
    gen = make_generator(s, batch, shape, method=sc.method, num_steps=sc.num_steps, cfg_scale=sc.cfg_scale,
                         cfg_channels=sc.get("cfg_channels"), shift=sc.get("shift", 1.0))
    out = []
    for i in range(0, total, batch):
        part = jax.tree.map(lambda a: np.asarray(a[i:i + batch]), cond)
        m = len(jax.tree.leaves(part)[0])
        full = jax.tree.map(lambda a: np.concatenate([a, np.repeat(a[:1], batch - m, 0)]), part)  # pad the last batch
        frames = gen(params, jax.tree.map(jnp.asarray, full), jax.random.fold_in(jax.random.key(seed), i))
        out.append(np.asarray(frames)[:m])
    return np.clip(np.concatenate(out), -1.0, 1.0)


def generate_images(config, params, s, labels: np.ndarray, seed: int, batch: int | None = None) -> np.ndarray:
    """Class-conditional images `[N, H, W, C]` in [-1, 1] for class `labels`, in batches of `batch`."""
    cond = {"label": np.asarray(labels, np.int32)}
    return generate(config, params, s, cond, seed, batch=batch)[:, 0]


def save_grid(path: pathlib.Path, images: np.ndarray, rows: int) -> None:
    """`[N, H, W, C]` in [-1, 1] -> one PNG grid with `rows` rows (C = 1 or 3)."""
    from PIL import Image

    n, h, w, c = images.shape
    cols = n // rows
    grid = images[: rows * cols].reshape(rows, cols, h, w, c).transpose(0, 2, 1, 3, 4).reshape(rows * h, cols * w, c)
    grid = np.uint8(np.clip((grid + 1) * 127.5, 0, 255))
    Image.fromarray(grid[..., 0] if c == 1 else grid).save(path)


def sample_grid(config, workdir: str | pathlib.Path, out: str | pathlib.Path | None = None) -> list[pathlib.Path]:
    """Write sample grids to `workdir` (or `out`); returns their paths.

    Class labels: one row per class, `config.sample.per_class` columns (`samples_<step>.png`).
    Captions: for every latent size of the eval split, one grid of `per_class` samples drawn with
    the captions of the first eval records of that size, frames of a clip side by side
    (`samples_<step>_<T>x<H>x<W>.png`).
    """
    if config.get("task") == "joint":
        from flagdit_jax import sample_joint

        return sample_joint.sample_grid(config, workdir, out)
    params, s, step = load_params(config, workdir, use_ema=config.sample.use_ema)
    sc = config.sample
    what = f"{sc.method} x{sc.num_steps}, cfg {sc.cfg_scale}"
    if isinstance(s.task, tasks.ClassLabel):
        n_cls = s.model_cfg.num_classes
        labels = np.repeat(np.arange(n_cls), sc.per_class)
        images = generate_images(config, params, s, labels, seed=config.seed)
        if images.shape[-1] not in (1, 3):  # VAE latents: no image to show without a decoder
            path = pathlib.Path(out) if out else pathlib.Path(workdir) / f"samples_{step}.npz"
            np.savez(path, latents=images, labels=labels)
            print(f"wrote {path}: {images.shape} latents (decode with the run's VAE), labels {labels.shape}")
            return [path]
        path = pathlib.Path(out) if out else pathlib.Path(workdir) / f"samples_{step}.png"
        save_grid(path, images, rows=n_cls)
        print(f"wrote {path} ({n_cls} rows, one per class; step {step}, {what})")
        return [path]
    from flagdit_jax.data.buckets import record_shapes

    vae = _vae_of(config)
    source = train.make_source(config, "eval")
    shapes = record_shapes(source)
    media = media_source(config, source)
    folder = pathlib.Path(out) if out else pathlib.Path(workdir)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for shape in sorted({tuple(x) for x in shapes.tolist()}):
        rows = np.flatnonzero((shapes == shape).all(1))[: sc.per_class]
        cond = s.task.collate([source[int(r)] for r in rows])
        frames = decode(vae, generate(config, params, s, cond, seed=config.seed, shape=shape))  # [n, T, H, W, C]
        n, t, h, w, c = frames.shape
        strip = frames.transpose(0, 2, 1, 3, 4).reshape(n, h, t * w, c)  # frames side by side
        path = folder / f"samples_{step}_{t}x{h}x{w}.png"
        if c in (1, 3):
            save_grid(path, strip, rows=1)
        else:
            path = path.with_suffix(".npz")
            np.savez(path, latents=frames, records=rows)
        written.append(path)
        if media is not None and c in (1, 3):  # the modality's own form: GIF clips, WAV sounds
            written += media.save_media(path.with_suffix(""), frames)
        print(f"wrote {path} ({n} samples of latent size {shape}; step {step}, {what})")
    return written


def media_source(config, source):
    """What writes a run's samples in their modality's own form (`save_media(stem, frames)`: GIFs,
    WAVs): `source` itself, or for a latent cache ('encoded') the raw source it was encoded from, which
    is handed the decoded pixels; None when there is no such form."""
    if hasattr(source, "save_media"):
        return source
    if config.data.name == "encoded" and config.get("encode"):
        from flagdit_jax import encoders

        raw = encoders.raw_source(config, "eval")
        return raw if hasattr(raw, "save_media") else None
    return None


def _vae_of(config):
    """The run's VAE (`config.vae.path`) when it has one, else None (pixel-space runs)."""
    if not config.get("vae") or not config.vae.get("path"):
        return None
    from flagdit_jax import encoders

    return encoders.load_vae(config)


def decode(vae, frames: np.ndarray) -> np.ndarray:
    """Latent frames `[N, T, h, w, c]` (scaled, as trained) -> pixels `[N, T, H, W, C]` in [-1, 1] with
    `vae` (diffusers' convention: z / scaling_factor + shift_factor); unchanged when `vae` is None."""
    if vae is None:
        return frames
    n, t = frames.shape[:2]
    z = frames.reshape(n * t, *frames.shape[2:]) / vae.scaling_factor + getattr(vae, "shift_factor", 0.0)
    images = np.concatenate([np.asarray(vae.decode(jnp.asarray(z[i:i + 64]))) for i in range(0, len(z), 64)])
    return np.clip(images.reshape(n, t, *images.shape[1:]), -1.0, 1.0)


def encode_prompts(config, s: "train.Setup", prompts: list[str], text_encoder=None) -> dict:
    """Prompts -> the caption task's condition {'cap_feats' [N, S, D], 'cap_mask' [N, S]} with the run's
    text encoder, padded to the length S of the run's null caption (guidance pairs them)."""
    from flagdit_jax import encoders

    if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}")
    feats, mask = (text_encoder or encoders.load_text_encoder(config))(list(prompts))
    s_null, d = s.task.caption_shape
    if feats.shape[-1] != d:
        raise ValueError(f"the text encoder gives width {feats.shape[-1]} but the model was trained on width {d}")
    if feats.shape[1] > s_null:
        if mask[:, s_null:].any():
            longest = int(mask.sum(1).max())
            raise ValueError(f"a prompt has {longest} tokens; this run's captions (and its null caption) have at most "
                             f"{s_null}: shorten the prompt")
        feats, mask = feats[:, :s_null], mask[:, :s_null]
    pad = s_null - feats.shape[1]
    return {"cap_feats": np.pad(feats, ((0, 0), (0, pad), (0, 0))), "cap_mask": np.pad(mask, ((0, 0), (0, pad)))}


def sample_prompts(config, workdir, prompts: list[str], *, size: tuple[int, int] | None = None, n_per_prompt: int = 4,
                   out=None) -> pathlib.Path:
    """Text-to-image from a training workdir: `n_per_prompt` samples of each prompt (one row per prompt) at
    `size` = (H, W) pixels (default: the square `config.data.image_size` latent), decoded with the run's
    VAE; writes a PNG (`prompts_<step>.png` in the workdir, or `out`)."""
    params, s, step = load_params(config, workdir, use_ema=config.sample.use_ema)
    if not isinstance(s.task, tasks.Caption):
        raise ValueError("--prompt needs a text-to-image run (config.task='caption')")
    vae = _vae_of(config)
    f = vae.downsample if vae is not None else 1
    h, w = size or (config.data.image_size * f,) * 2
    if h % (f * s.model_cfg.patch_size) or w % (f * s.model_cfg.patch_size):
        raise ValueError(f"size {h}x{w} must be a multiple of {f * s.model_cfg.patch_size} pixels (VAE {f}x, patch "
                         f"{s.model_cfg.patch_size})")
    cond = encode_prompts(config, s, [p for p in prompts for _ in range(n_per_prompt)])
    frames = decode(vae, generate(config, params, s, cond, seed=config.seed, shape=(1, h // f, w // f)))
    path = pathlib.Path(out) if out else pathlib.Path(workdir) / f"prompts_{step}.png"
    save_grid(path, frames[:, 0], rows=len(prompts))
    print(f"wrote {path} ({len(prompts)} prompts x {n_per_prompt}, {h}x{w} px; step {step})")
    return path
