"""N class-conditional samples from a training workdir as ADM-format sample shards (for `eval/adm.py`).

    write_samples(config, workdir, 50_000, "samples/")   # every process of a multi-host run calls this
    images, labels = load_samples("samples/")           # [N, H, W, 3] uint8, [N] in global index order

Sample i has class label i % num_classes (balanced; ADM's and DiT's sample scripts draw labels uniformly at
random instead: labels='random' does that, per index from the seed) and initial noise from
fold_in(key(seed), i), so with the ODE samplers sample i depends only on (checkpoint, seed, i) -- not on
the device count, host count or chunk size (up to float reduction order). The SDE sampler's step noise is
drawn per chunk of `batch` indices: its samples depend on the chunk size too, but not on devices or hosts.

Each chunk of `batch` global indices is one jitted call with the batch sharded over the (data, fsdp) mesh
axes of all devices of all hosts. Each process keeps the rows its devices hold, decodes them with the run's
VAE (latent runs), converts to uint8 as ADM (((x + 1) * 127.5).clip(0, 255), truncated; grey -> 3 channels)
and writes `{out}/samples-{p:05d}-of-{n:05d}.npz`: `arr_0` uint8 [n_p, H, W, 3] and `arr_1` labels [n_p] (what
ADM's image_sample.py writes) plus `indices` [n_p] (the global sample indices). Finished chunks are kept
under `{out}/parts/` until the shard is written, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from flagdit_jax import sample, tasks
from flagdit_jax.eval import adm

LABELS = ("cyclic", "random")


def shard_name(process: int, count: int) -> str:
    return f"samples-{process:05d}-of-{count:05d}.npz"


def make_chunk_sampler(s, batch: int, *, seed: int, method: str, num_steps: int, cfg_scale: float,
                       cfg_channels: int | None = None, shift: float = 1.0, labels: str = "cyclic"):
    """Jitted `run(params, idx) -> (frames [B, 1, H, W, C] in [-1, 1] (latents when the run has a VAE),
    labels [B])` for global sample indices `idx` int32 [B] (sharded over the batch axes of `s.mesh`).

    `sample.make_solver` (the sampler `flagdit sample` uses) with the noise and the label of each sample a
    function of its index alone.
    """
    if labels not in LABELS:
        raise ValueError(f"labels must be one of {LABELS}, got {labels!r}")
    cfg = s.model_cfg
    solve, state_shape = sample.make_solver(s, batch, method=method, num_steps=num_steps, cfg_scale=cfg_scale,
                                            cfg_channels=cfg_channels, shift=shift)
    k_noise, k_label, k_sde = jax.random.split(jax.random.key(seed), 3)
    out_sharding = NamedSharding(s.mesh, P(("data", "fsdp")))

    def run(params, idx):
        if labels == "cyclic":
            label = idx % cfg.num_classes
        else:
            label = jax.vmap(lambda i: jax.random.randint(jax.random.fold_in(k_label, i), (), 0, cfg.num_classes))(idx)
        label = label.astype(jnp.int32)
        x0 = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(k_noise, i), state_shape[1:]))(idx)
        return solve(params, {"label": label}, x0, jax.random.fold_in(k_sde, idx[0])), label

    return jax.jit(run, out_shardings=(out_sharding, out_sharding))


def _local_rows(arr) -> tuple[np.ndarray, np.ndarray]:
    """(positions [n], rows [n, ...]) of the global batch rows held by this process's devices, each once
    (replicas over the non-batch mesh axes dropped), in position order."""
    seen = {}
    for shard in arr.addressable_shards:
        sl = shard.index[0]
        start = 0 if sl.start is None else sl.start
        if start not in seen:
            seen[start] = np.asarray(shard.data)
    starts = sorted(seen)
    pos = np.concatenate([np.arange(st, st + len(seen[st])) for st in starts])
    return pos, np.concatenate([seen[st] for st in starts])


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[N, H, W, C] in [-1, 1] -> uint8 [N, H, W, 3] as ADM's image_sample.py (((x + 1) * 127.5) clamped and
    truncated); grey (C = 1) repeated to 3 channels for the Inception network."""
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"images must be [N, H, W, 1 or 3], got shape {images.shape}")
    out = np.clip((images.astype(np.float32) + 1.0) * 127.5, 0, 255).astype(np.uint8)
    return np.repeat(out, 3, -1) if out.shape[-1] == 1 else out


def write_samples(config, workdir, num_samples: int, out, *, batch: int | None = None, seed: int | None = None,
                  labels: str = "cyclic", vae=None, params_and_setup=None) -> pathlib.Path:
    """Write `num_samples` samples of the workdir's newest checkpoint (EMA per `config.sample.use_ema`) with
    the sampler `config.sample` as this process's shard in `out`; returns its path. Call it on every
    process. `batch` (global, per chunk; default `config.eval.batch`) must be a multiple of the batch-sharded
    device count; `seed` defaults to `config.seed`. `vae` overrides the run's VAE (`config.vae.path`);
    `params_and_setup` = (params, Setup, step) skips loading (tests)."""
    if not isinstance(num_samples, (int, np.integer)) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    if labels not in LABELS:
        raise ValueError(f"labels must be one of {LABELS}, got {labels!r}")
    params, s, step = params_and_setup or sample.load_params(config, workdir, use_ema=config.sample.use_ema)
    if not isinstance(s.task, tasks.ClassLabel):
        raise ValueError(f"sample_batch writes class-conditional samples; config.task gives {type(s.task).__name__}")
    sc = config.sample
    seed = config.seed if seed is None else int(seed)
    batch = int(batch or config.eval.get("batch") or 64)
    ways = s.mesh.shape["data"] * s.mesh.shape["fsdp"]
    if batch < 1 or batch % ways:
        raise ValueError(f"batch ({batch}) must be a positive multiple of the {ways} devices the batch is sharded "
                         f"over (mesh data x fsdp)")
    if vae is None:
        vae = sample._vae_of(config)
    if vae is None and s.model_cfg.in_channels not in (1, 3):
        raise ValueError(f"the model makes {s.model_cfg.in_channels}-channel latents but config.vae.path is unset: "
                         f"no decoder for images")

    p, n_proc = jax.process_index(), jax.process_count()
    out = pathlib.Path(out)
    final = out / shard_name(p, n_proc)
    meta = dict(num_samples=int(num_samples), batch=batch, seed=seed, labels=labels, step=int(step),
                method=sc.method, num_steps=int(sc.num_steps), cfg_scale=float(sc.cfg_scale),
                cfg_channels=sc.get("cfg_channels"), shift=float(sc.get("shift", 1.0)), processes=n_proc)
    parts = out / "parts" / final.stem
    meta_path = parts / "meta.json"
    if meta_path.exists():
        old = json.loads(meta_path.read_text())
        if old != meta:
            diff = {k: (old.get(k), v) for k, v in meta.items() if old.get(k) != v}
            raise ValueError(f"{parts} holds chunks of another run (differs in {diff}); remove it or use another "
                             f"output folder")
    elif final.exists():
        raise ValueError(f"{final} exists (a finished run); remove it or use another output folder")
    else:
        parts.mkdir(parents=True, exist_ok=True)
        meta_path.write_text(json.dumps(meta, indent=1))

    n_chunks = -(-num_samples // batch)
    done = np.array([(parts / f"chunk-{c:06d}.npz").exists() for c in range(n_chunks)])
    if n_proc > 1:  # a chunk is skipped only when every process has it: each chunk is one collective call
        from jax.experimental import multihost_utils

        done = np.all(multihost_utils.process_allgather(done), axis=0)
    todo = [c for c in range(n_chunks) if not done[c]]
    run = make_chunk_sampler(s, batch, seed=seed, method=sc.method, num_steps=sc.num_steps, cfg_scale=sc.cfg_scale,
                             cfg_channels=sc.get("cfg_channels"), shift=sc.get("shift", 1.0), labels=labels)
    in_sharding = NamedSharding(s.mesh, P(("data", "fsdp")))
    t0 = time.time()
    for i, c in enumerate(todo):
        # Indices past num_samples (the last chunk) are computed and dropped.
        idx = np.arange(c * batch, (c + 1) * batch, dtype=np.int32)
        idx_g = jax.make_array_from_callback(idx.shape, in_sharding, lambda index: idx[index])
        with jax.set_mesh(s.mesh), _rules(s):
            frames, lab = run(params, idx_g)
        pos, rows = _local_rows(frames)
        _, lab_rows = _local_rows(lab)
        keep = idx[pos] < num_samples
        images = to_uint8(sample.decode(vae, rows)[:, 0])[keep]  # all rows: a process may keep none
        _save_part(parts / f"chunk-{c:06d}.npz", images, lab_rows[keep], idx[pos][keep])
        if p == 0 and (i + 1) % max(1, len(todo) // 10) == 0:
            print(f"chunk {c + 1}/{n_chunks}: {min((c + 1) * batch, num_samples)} samples, {time.time() - t0:.0f} s")
    _merge(parts, n_chunks, final)
    shutil.rmtree(parts)
    return final


def _rules(s):
    import flax.linen as nn

    return nn.logical_axis_rules(s.rules)


def _save_part(path: pathlib.Path, images, labels, indices) -> None:
    with adm.NpzStreamWriter(path) as w:
        w.add("arr_0", images)
        w.add("arr_1", labels.astype(np.int64))
        w.add("indices", indices.astype(np.int64))


def _merge(parts: pathlib.Path, n_chunks: int, final: pathlib.Path) -> None:
    """Concatenate the chunk files into one shard, streaming the images (a host's 50K / n share need not be
    in memory twice)."""
    files = [parts / f"chunk-{c:06d}.npz" for c in range(n_chunks)]
    shapes = [adm.npz_array_info(f, "arr_0")[0] for f in files]
    n = sum(sh[0] for sh in shapes)
    img_shape = shapes[0][1:] if shapes else (0, 0, 3)
    labels, indices = [], []
    with adm.NpzStreamWriter(final) as w:
        w.begin("arr_0", (n,) + tuple(img_shape), np.uint8)
        for f in files:
            with np.load(f, allow_pickle=False) as z:
                w.write(z["arr_0"])
                labels.append(z["arr_1"])
                indices.append(z["indices"])
        w.end()
        w.add("arr_1", np.concatenate(labels) if labels else np.zeros(0, np.int64))
        w.add("indices", np.concatenate(indices) if indices else np.zeros(0, np.int64))


def sample_files(path) -> list[pathlib.Path]:
    """The sample shards at `path`: the file itself, or a folder's `samples-*-of-*.npz` (all `of` the same
    count, none missing), in process order."""
    path = pathlib.Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"no samples at {path}")
    files = sorted(path.glob("samples-*-of-*.npz"))
    if not files:
        raise FileNotFoundError(f"no samples-*-of-*.npz in {path}")
    counts = {f.stem.split("-of-")[1] for f in files}
    if len(counts) != 1 or len(files) != int(next(iter(counts))):
        raise ValueError(f"{path} has shards {[f.name for f in files]}: expected samples-PPPPP-of-NNNNN.npz for every "
                         f"process of one run (an unfinished or mixed run?)")
    return files


def sample_order(path) -> np.ndarray:
    """Permutation putting the rows of the shards at `path` (concatenated in file order) in global index
    order; identity for files without `indices`. Raises unless the indices are exactly 0..N-1."""
    idx = []
    for f in sample_files(path):
        with np.load(f, allow_pickle=False) as z:
            idx.append(z["indices"] if "indices" in z.files else None)
    if any(i is None for i in idx):
        return np.arange(sum(adm.npz_array_info(f, "arr_0")[0][0] for f in sample_files(path)))
    idx = np.concatenate(idx)
    order = np.argsort(idx, kind="stable")
    if not np.array_equal(idx[order], np.arange(len(idx))):
        raise ValueError(f"the shards at {path} do not hold sample indices 0..{len(idx) - 1} exactly once")
    return order


def iter_samples(path, batch: int = 500):
    """Stream uint8 image batches [n, H, W, 3] of the shards at `path`, in file order (see `sample_order`)."""
    for f in sample_files(path):
        yield from adm.iter_npz_batches(f, "arr_0", batch)


def load_samples(path) -> tuple[np.ndarray, np.ndarray | None]:
    """(images uint8 [N, H, W, 3], labels [N] or None) of the shards at `path` (a folder or one file, ours or
    ADM's `samples_*.npz`), in global sample index order."""
    images, labels = [], []
    for f in sample_files(path):
        with np.load(f, allow_pickle=False) as z:
            images.append(z["arr_0"])
            labels.append(z["arr_1"] if "arr_1" in z.files else None)
    order = sample_order(path)
    imgs = np.concatenate(images)[order]
    labs = None if any(x is None for x in labels) else np.concatenate(labels)[order]
    return imgs, labs
