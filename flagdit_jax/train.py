"""The train loop (big_vision style: one readable function over a pytree state).

config -> validate -> mesh + logical rules -> grain iterator (host-local shards, token-length
buckets, packed on the host) -> global batch -> task: noise, times, condition dropout -> flow-matching
loss over real tokens -> AdamW (clip) -> EMA -> metrics -> Orbax save every N steps (state + data
iterator). What differs between class labels, captions and joint modalities lives in the task
(`flagdit_jax/tasks.py`); the loop never branches on it. The same loop runs data / FSDP / tensor parallel by changing only
`config.mesh.shape` and `config.rules`; multi-host via `jax.distributed.initialize()`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import pathlib
import signal
import threading
import time
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from flagdit_jax import checkpoint, sharding, tasks, tokens as tok
from flagdit_jax.flow import paths, timesteps
from flagdit_jax.models import registry

log = logging.getLogger("flagdit_jax.train")


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any
    rng: jax.Array


# ------------------------------------------------------------------------------------------------
# config
# ------------------------------------------------------------------------------------------------


def model_config(config: ml_collections.ConfigDict):
    """The model config named by `config.model` (a preset plus field overrides)."""
    fields = dict(config.model)
    preset = fields.pop("preset")
    return registry.get_config(preset, **fields)


def num_devices(config) -> int:
    """Devices the mesh spans: all of them unless `config.mesh.num_devices` (> 0) takes the first n."""
    n = config.mesh.get("num_devices", -1)
    if n == -1:
        return jax.device_count()
    if not 0 < n <= jax.device_count():
        raise ValueError(f"config.mesh.num_devices={n} must be -1 (all) or in [1, {jax.device_count()}]")
    return n


def mesh_shape(config) -> tuple[int, ...]:
    shape = list(config.mesh.shape)
    if len(shape) != len(sharding.MESH_AXES):
        raise ValueError(f"config.mesh.shape={tuple(shape)} must have {len(sharding.MESH_AXES)} entries "
                         f"{sharding.MESH_AXES}")
    if shape.count(-1) > 1:
        raise ValueError(f"config.mesh.shape={tuple(shape)}: at most one -1")
    known = int(np.prod([s for s in shape if s != -1]))
    n = num_devices(config)
    if -1 in shape:
        if n % known:
            raise ValueError(f"config.mesh.shape={tuple(shape)} cannot fill {n} devices "
                             f"({n} is not a multiple of {known})")
        shape[shape.index(-1)] = n // known
    if int(np.prod(shape)) != n:
        raise ValueError(f"config.mesh.shape={tuple(config.mesh.shape)} needs {int(np.prod(shape))} devices but "
                         f"{n} are available; shapes that fit: e.g. ({n}, 1, 1, 1) or (-1, 1, 1, 1)")
    return tuple(shape)


def validate(config: ml_collections.ConfigDict) -> None:
    """Check the config before any compile or I/O; errors name the key, its value and what fits."""
    for key in ("total_steps", "global_batch", "grad_accum_steps", "log_every_steps"):
        _int_at_least(config, key, 1)
    _int_at_least(config, "seed", 0, below=2**31 - 1)  # seed + 1 seeds the state's key; grain takes < 2**32
    try:
        cfg = model_config(config)  # raises on bad model fields
    except (ValueError, TypeError) as e:
        raise ValueError(f"config.model: {e}") from e
    validate_optim(config)
    shape = mesh_shape(config)
    data_ways = shape[0] * shape[1]
    b, a = config.global_batch, config.grad_accum_steps
    if b % a:
        raise ValueError(f"config.global_batch={b} must be divisible by config.grad_accum_steps={a}")
    if (b // a) % data_ways:
        fit = [x for x in range(data_ways, 4 * data_ways * max(1, b // data_ways) + 1, data_ways)][:4]
        raise ValueError(f"config.global_batch={b} (per accumulation step {b // a}) must be divisible by the data "
                         f"axes data*fsdp={data_ways} of config.mesh.shape={shape}; e.g. {fit}")
    if b % jax.process_count():
        raise ValueError(f"config.global_batch={b} must be divisible by the process count {jax.process_count()}")
    from flagdit_jax.data import pipeline

    if config.data.name not in pipeline.SOURCES:
        raise ValueError(f"config.data.name={config.data.name!r}; expected one of {pipeline.SOURCES}")
    if config.data.name in ("latents", "encoded") and not any(dict(config.data.get("options", {})).get(k)
                                                              for k in ("data_dir", "path_prefix")):
        writer = "flagdit_jax.data.latents.write_latents" if config.data.name == "latents" else "`flagdit encode`"
        raise ValueError(f"config.data.name={config.data.name!r} needs config.data.options.data_dir (a folder of "
                         f"train-*.array_record shards written by {writer}) or config.data.options.path_prefix; "
                         f"got options={dict(config.data.get('options', {}))}")
    _int_at_least(config.data, "worker_count", 0, prefix="config.data.")
    if not _is_int(config.data.image_size) or config.data.image_size <= 0 or config.data.image_size % cfg.patch_size:
        raise ValueError(f"config.data.image_size={config.data.image_size} must be a positive multiple of "
                         f"config.model.patch_size={cfg.patch_size}")
    buckets = tuple(config.data.get("buckets", ()) or ())
    if any(not _is_int(b) or b <= 0 for b in buckets):
        raise ValueError(f"config.data.buckets={buckets}; expected positive token lengths, or () for one bucket per "
                         "length in the data")
    rules = tuple(config.get("rules", sharding.DEFAULT_RULES))
    from flagdit_jax.models import sequence_parallel

    try:  # heads against a sequence-parallel mesh (ulysses), before anything compiles
        sequence_parallel.check_mesh(cfg, shape, rules)
    except ValueError as e:
        raise ValueError(f"config.model / config.mesh.shape: {e}") from e
    for n in buckets:  # data-derived buckets are rounded up to the sequence axis size instead
        sharding.check_sequence_length(n, shape, rules, what=f"config.data.buckets length {n}")
    name = tasks.task_name(config, cfg)
    if name == "caption" and config.data.name not in pipeline.CAPTIONED_SOURCES:
        raise ValueError(f"config.task='caption' needs captioned data; config.data.name={config.data.name!r} has none "
                         f"(expected one of {pipeline.CAPTIONED_SOURCES})")
    if name == "joint" and config.data.name not in pipeline.JOINT_SOURCES:
        raise ValueError(f"config.task='joint' needs paired data with 'text' tokens; config.data.name="
                         f"{config.data.name!r} has none (expected one of {pipeline.JOINT_SOURCES})")
    jc = config.get("joint", None)
    if jc is not None:
        if name != "joint":
            raise ValueError(f"config.joint={dict(jc)} is for the joint task; config.task={name!r}")
        tasks.Joint(**tasks.joint_endpoints(config))
    if not 0.0 <= float(config.get("caption_dropout", 0.1)) < 1.0:
        raise ValueError(f"config.caption_dropout={config.caption_dropout} must be in [0, 1)")
    if config.data.channels != cfg.in_channels:
        raise ValueError(f"config.data.channels={config.data.channels} must equal config.model.in_channels="
                         f"{cfg.in_channels}")
    for key, get in (("path", paths.get_path), ("time_sampler", timesteps.get_time_sampler)):
        try:
            get(config.flow[key])
        except (ValueError, TypeError) as e:
            raise ValueError(f"config.flow.{key}={config.flow[key]!r}: {e}") from e
    if config.flow.prediction not in ("velocity", "noise", "score"):
        raise ValueError(f"config.flow.prediction={config.flow.prediction!r}; expected velocity, noise or score")
    if config.optim.get("schedule", "constant") not in ("constant", "cosine"):
        raise ValueError(f"config.optim.schedule={config.optim.schedule!r}; expected 'constant' or 'cosine'")
    validate_sampling(config.get("sample", None), channels=cfg.in_channels)
    validate_eval(config.get("eval", None))
    if not _is_num(config.ema_decay) or not 0.0 <= config.ema_decay < 1.0:
        raise ValueError(f"config.ema_decay={config.ema_decay!r} must be in [0, 1) (e.g. 0.999)")
    for key in ("every_steps", "keep"):
        _int_at_least(config.checkpoint, key, 1, prefix="config.checkpoint.")


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and math.isfinite(v)


def _int_at_least(node, key: str, low: int, *, below: int | None = None, prefix: str = "config.") -> None:
    v = node[key]
    if not _is_int(v) or v < low or (below is not None and v >= below):
        fit = f"an integer >= {low}" + (f" and < {below}" if below is not None else "")
        raise ValueError(f"{prefix}{key}={v!r} must be {fit}")


def validate_optim(config) -> None:
    """`config.optim`: AdamW with global-norm clipping and a warm-up."""
    o = config.optim
    if not _is_num(o.lr) or o.lr <= 0:
        raise ValueError(f"config.optim.lr={o.lr!r} must be a finite number > 0 (e.g. 1e-4)")
    for key in ("b1", "b2"):
        if not _is_num(o[key]) or not 0.0 <= o[key] < 1.0:
            raise ValueError(f"config.optim.{key}={o[key]!r} must be in [0, 1) (AdamW's default: b1=0.9, b2=0.999)")
    if not _is_num(o.weight_decay) or o.weight_decay < 0:
        raise ValueError(f"config.optim.weight_decay={o.weight_decay!r} must be a finite number >= 0")
    if not _is_num(o.grad_clip) or o.grad_clip <= 0:
        raise ValueError(f"config.optim.grad_clip={o.grad_clip!r} must be a finite number > 0 (global-norm clip, "
                         "e.g. 1.0)")
    _int_at_least(o, "warmup_steps", 0, prefix="config.optim.")


def validate_data(config, source) -> None:
    """The config's data keys against the source itself (before any compile): a fixed-size source's
    records must be `data.image_size` square with `data.channels` channels. Mixed-size sources
    (`frame_shapes()`) train at their own sizes; there `image_size` only sizes sample grids."""
    from flagdit_jax.data.buckets import frames_of

    if len(source) == 0:
        raise ValueError(f"config.data.name={config.data.name!r}: the source is empty")
    frames = frames_of(source[0])
    if frames.shape[-1] != config.data.channels:
        raise ValueError(f"config.data.channels={config.data.channels} but the {config.data.name!r} records have "
                         f"{frames.shape[-1]} channels; set config.data.channels={frames.shape[-1]}")
    if hasattr(source, "frame_shapes"):
        return
    h, w = frames.shape[1:3]
    if (h, w) != (config.data.image_size, config.data.image_size):
        fit = f"set config.data.image_size={h}" if h == w else "this source is not square"
        raise ValueError(f"config.data.image_size={config.data.image_size} but the {config.data.name!r} records are "
                         f"{h}x{w}; {fit}")


def validate_sampling(sc, channels: int | None = None) -> None:
    """`config.sample` (read by `flagdit sample` / `eval`), checked with the rest at train time."""
    if sc is None:
        return
    from flagdit_jax.flow import samplers

    methods = samplers.ODE_METHODS + ("sde",)
    if sc.method not in methods:
        raise ValueError(f"config.sample.method={sc.method!r}; expected one of {methods}")
    if not _is_int(sc.num_steps) or sc.num_steps <= 0:
        raise ValueError(f"config.sample.num_steps={sc.num_steps!r} must be a positive integer")
    if not _is_num(sc.cfg_scale) or sc.cfg_scale < 0.0:  # also refuses nan / inf
        raise ValueError(f"config.sample.cfg_scale={sc.cfg_scale!r} must be a finite number >= 0 (1 = no guidance)")
    if not _is_num(sc.get("shift", 1.0)) or not sc.get("shift", 1.0) > 0.0:
        raise ValueError(f"config.sample.shift={sc.get('shift')!r} must be a finite number > 0")
    if not isinstance(sc.get("use_ema", True), bool):
        raise ValueError(f"config.sample.use_ema={sc.use_ema!r} must be True or False")
    cc = sc.get("cfg_channels")
    if cc is not None and (not _is_int(cc) or not 0 < cc <= (channels or cc)):
        raise ValueError(f"config.sample.cfg_channels={cc!r} must be None (all) or in [1, {channels}] "
                         "(3 = the reference's first-3-latent-channel guidance)")
    if sc.method == "sde":
        if sc.get("diffusion_form", "sigma") not in paths.DIFFUSION_FORMS:
            raise ValueError(f"config.sample.diffusion_form={sc.diffusion_form!r}; expected one of "
                             f"{paths.DIFFUSION_FORMS}")
        if not _is_num(sc.get("diffusion_norm", 1.0)) or sc.get("diffusion_norm", 1.0) < 0:
            raise ValueError(f"config.sample.diffusion_norm={sc.diffusion_norm!r} must be a finite number >= 0")
        if sc.get("last_step", "Mean") not in samplers.LAST_STEPS:
            raise ValueError(f"config.sample.last_step={sc.last_step!r}; expected 'Mean', 'Euler', 'Tweedie' or None")
        if float(sc.get("shift", 1.0)) != 1.0:
            raise ValueError(f"config.sample.shift={sc.shift} applies to ODE grids only; method='sde' needs shift=1.0")
    if not _is_int(sc.get("per_class", 1)) or sc.get("per_class", 1) <= 0:
        raise ValueError(f"config.sample.per_class={sc.per_class!r} must be a positive integer")


def validate_eval(ec) -> None:
    """`config.eval` (read by `flagdit eval`), checked with the rest at train time."""
    if ec is None:
        return
    for key, low in (("num_samples", 1), ("batch", 1), ("classifier_steps", 0)):
        if key in ec and ec[key] is not None:
            _int_at_least(ec, key, low, prefix="config.eval.")


# ------------------------------------------------------------------------------------------------
# state, step
# ------------------------------------------------------------------------------------------------


def learning_rate(config) -> optax.Schedule:
    """Linear warm-up, then constant (the reference's choice) or cosine decay to 0 at total_steps."""
    o = config.optim
    if o.get("schedule", "constant") == "constant":
        return optax.join_schedules([optax.linear_schedule(0.0, o.lr, o.warmup_steps), optax.constant_schedule(o.lr)],
                                    [o.warmup_steps]) if o.warmup_steps else optax.constant_schedule(o.lr)
    return optax.warmup_cosine_decay_schedule(0.0 if o.warmup_steps else o.lr, o.lr, o.warmup_steps,
                                              config.total_steps)


def make_optimizer(config) -> optax.GradientTransformation:
    o = config.optim
    return optax.chain(optax.clip_by_global_norm(o.grad_clip),
                       optax.adamw(learning_rate(config), b1=o.b1, b2=o.b2, weight_decay=o.weight_decay))


@dataclasses.dataclass(frozen=True)
class Setup:
    """Everything static that the jitted functions close over."""

    config: Any
    model: nn.Module
    model_cfg: Any
    tx: optax.GradientTransformation
    task: tasks.FlowTask
    mesh: Any
    rules: tuple
    state_shardings: Any
    abstract_state: Any  # TrainState of ShapeDtypeStructs carrying `state_shardings` (restore target)
    batch_sharding: NamedSharding


def make_source(config, split: str = "train"):
    from flagdit_jax.data import pipeline

    return pipeline.get_source(config.data.name, split, **dict(config.data.get("options", {})))


def setup(config, source=None) -> tuple[Setup, Any]:
    """Validate, build model / task / optimizer / mesh and the state shardings; also returns the boxed
    init. `source` (the training data) is read only by tasks that need it (the caption task's null
    caption) and built from the config when not given."""
    validate(config)
    cfg = model_config(config)
    model = registry.build(cfg)
    if tasks.task_name(config, cfg) == "caption" and source is None:
        source = make_source(config)
    task = tasks.get_task(config, cfg, source)
    tx = make_optimizer(config)
    mesh = sharding.make_mesh(mesh_shape(config), devices=jax.devices()[: num_devices(config)])
    rules = tuple(config.get("rules", sharding.DEFAULT_RULES))
    micro = config.global_batch // config.grad_accum_steps
    # Parameters do not depend on the token length: any small layout initialises them.
    layout = tok.pack_for(cfg, jnp.zeros((micro, 1, 2 * cfg.patch_size, 2 * cfg.patch_size, cfg.in_channels)))

    def init_boxed(rng):
        kw = task.model_kwargs(task.example_cond(micro))
        params = model.init({"params": rng, "dropout": rng}, layout, jnp.zeros((micro,)), **kw)["params"]
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                          opt_state=tx.init(params), rng=jax.random.key_data(jax.random.key(config.seed + 1)))

    abstract = jax.eval_shape(init_boxed, jax.random.key(0))
    state_shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, rules)
    abstract_state = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                                  nn.unbox(abstract), state_shardings)
    batch_sharding = NamedSharding(mesh, P(("data", "fsdp")))
    return Setup(config, model, cfg, tx, task, mesh, rules, state_shardings, abstract_state,
                 batch_sharding), init_boxed


def init_state(s: Setup, init_boxed) -> TrainState:
    with jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules):
        return jax.jit(lambda r: nn.unbox(init_boxed(r)), out_shardings=s.state_shardings)(
            jax.random.key(s.config.seed))


def make_train_step(s: Setup):
    """Jitted `step(state, batch) -> (state, metrics)` with in/out NamedShardings.

    `batch` is a packed global batch ({'tokens', 'kind', 'positions', 'cond', ...}, see
    `data.buckets`); each token-length bucket compiles once. The task draws noise, times and
    condition dropout once for the whole global batch; they are then split with it into
    `grad_accum_steps` micro-batches, so accumulation equals the full-batch step (up to float sums).
    """
    config, model, tx, task, cfg = s.config, s.model, s.tx, s.task, s.model_cfg
    accum = config.grad_accum_steps

    def micro_loss(params, packed, cond, draws):
        def apply(p, t, **kw):
            return model.apply({"params": params}, p, t, **kw)

        return task.loss(apply, packed, cond, draws)

    def step_fn(state: TrainState, batch):
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        packed = tok.as_packed(batch, cfg)
        draws = task.draw(rng, packed, batch["cond"])
        b = packed.tokens.shape[0]
        micro = jax.tree.map(lambda a: a.reshape(accum, b // accum, *a.shape[1:]), (packed, batch["cond"], draws))
        grad_fn = jax.value_and_grad(micro_loss)

        def body(carry, xs):
            loss_sum, grad_sum = carry
            loss, grads = grad_fn(state.params, *xs)
            return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), None

        if accum == 1:  # XLA keeps a length-1 scan as a while loop; skip it (bench-small step 1.03x, ~noise)
            loss, grads = grad_fn(state.params, *jax.tree.map(lambda a: a[0], micro))
        else:
            zeros = jax.tree.map(jnp.zeros_like, state.params)
            (loss, grads), _ = jax.lax.scan(body, (jnp.zeros(()), zeros), micro)
            loss, grads = loss / accum, jax.tree.map(lambda g: g / accum, grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        d = config.ema_decay
        ema = jax.tree.map(lambda e, p: e + (1.0 - d) * (p - e), state.ema_params, params)
        grad_norm = optax.tree.norm(grads)
        # One flag for the loop's non-finite stop (read a step late, so it costs no sync).
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.all(
            jnp.stack([jnp.isfinite(p).all() for p in jax.tree.leaves(params)]))
        metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite}
        return state.replace(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state), metrics

    return jax.jit(step_fn, in_shardings=(s.state_shardings, s.batch_sharding),
                   out_shardings=(s.state_shardings, None), donate_argnums=0)


def global_batch(s: Setup, local: dict) -> dict:
    """Host-local numpy batch (a nested dict) -> global jax.Arrays sharded over the data axes."""
    return jax.tree.map(lambda v: jax.make_array_from_process_local_data(s.batch_sharding, np.asarray(v)), local)


def pack_batch(s: Setup, elements: list[dict], pad_to: int | None = None) -> dict:
    """Source elements -> one host-local packed batch, as the data iterator makes them (for tests and
    tools that feed batches by hand). `pad_to` defaults to the longest element."""
    from flagdit_jax.data.buckets import frames_of

    frames = [frames_of(e) for e in elements]
    if pad_to is None:
        pad_to = max(tok.seq_len(f.shape[:3], *tok.layout_of(s.model_cfg)) for f in frames)
    return dict(tok.pack_host(frames, s.model_cfg, pad_to), cond=s.task.collate(elements))


# ------------------------------------------------------------------------------------------------
# the loop
# ------------------------------------------------------------------------------------------------


def make_data_iterator(s: Setup, source):
    """The bucketed, packed, checkpointable iterator of this process (`data.buckets`)."""
    from flagdit_jax.data import buckets

    it, _ = buckets.make_bucketed_iterator(
        source, s.model_cfg, global_batch=s.config.global_batch, seed=s.config.seed, collate=s.task.collate,
        buckets=tuple(s.config.data.get("buckets", ()) or ()),
        length_multiple=sharding.sequence_shards(s.mesh.devices.shape, s.rules), process_index=jax.process_index(),
        process_count=jax.process_count(), worker_count=s.config.data.worker_count)
    return it


TrainingStopped = checkpoint.TrainingStopped


def state_bytes(abstract_state, *, per_device: bool = True) -> dict[str, int]:
    """Bytes of the params, EMA and optimizer state (one device's shards, or the global arrays)."""
    def nbytes(tree):
        total = 0
        for a in jax.tree.leaves(tree):
            shape = a.sharding.shard_shape(a.shape) if per_device and getattr(a, "sharding", None) else a.shape
            total += int(np.prod(shape, dtype=np.int64)) * np.dtype(a.dtype).itemsize
        return total

    return {"parameters": nbytes(abstract_state.params), "EMA": nbytes(abstract_state.ema_params),
            "optimizer state": nbytes(abstract_state.opt_state)}


def available_memory(device) -> tuple[int | None, str]:
    """(bytes free for one device, what that is): the accelerator's limit minus its use, or the
    host's available memory shared by all local CPU devices."""
    if device.platform == "cpu":
        import psutil

        n = max(1, sum(d.platform == "cpu" for d in jax.local_devices()))
        return psutil.virtual_memory().available // n, f"host memory available / {n} CPU devices"
    stats = device.memory_stats() or {}
    if "bytes_limit" not in stats:
        return None, "unknown"
    return stats["bytes_limit"] - stats.get("bytes_in_use", 0), f"{device.device_kind} memory free"


def check_memory(s: Setup) -> None:
    """Refuse before init / compile when the state alone cannot fit: parameters + EMA + optimizer
    state + gradients (x2: the step's gradients and their accumulation carry) per device, a lower
    bound of what the step needs (activations come on top)."""
    parts = state_bytes(s.abstract_state)
    parts["gradients"] = 2 * parts["parameters"]
    need = sum(parts.values())
    device = s.mesh.devices.flat[0]
    free, what = available_memory(device)
    if free is None or need <= free:
        return
    gib = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
    raise ValueError(f"config.model ({s.model_cfg.__class__.__name__} dim={getattr(s.model_cfg, 'dim', '?')}, "
                     f"n_layers={getattr(s.model_cfg, 'n_layers', '?')}) needs at least {gib(need)} per device before "
                     "activations (" + ", ".join(f"{k} {gib(v)}" for k, v in parts.items()) + f") but {device} has "
                     f"{gib(free)} ({what}); use a smaller config.model or shard it (config.mesh.shape fsdp axis)")


class StopSignals:
    """SIGTERM / SIGINT on a single host: remember the signal; the loop finishes its step, saves and
    stops. Multi-host runs leave SIGTERM to JAX's preemption notifier (Orbax `reached_preemption`
    keeps every host on the same step), so no handler is installed there. A second SIGINT stops at once."""

    def __init__(self):
        self.signum, self._old = None, {}

    def __enter__(self):
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def _check_finite(mngr, step: int, metrics: dict, index) -> None:
    """Stop (TrainingStopped) when step `step`'s loss, gradients or new parameters are not finite,
    naming the step and the batch's source records."""
    if bool(metrics["finite"]):
        return
    loss, gn = float(metrics["loss"]), float(metrics["grad_norm"])
    what = ", ".join([f"loss={loss}"] * (not math.isfinite(loss)) + [f"grad_norm={gn}"] * (not math.isfinite(gn))) \
        or "parameters (loss and grad_norm finite: the update overflowed)"
    rows = "unknown" if index is None else np.asarray(index).ravel().tolist()
    if isinstance(rows, list) and len(rows) > 16:
        rows = f"{rows[:16]} ... ({len(rows)} records)"
    host = f" of process {jax.process_index()}" if jax.process_count() > 1 else ""
    raise TrainingStopped(f"non-finite {what} at step {step} (batch{host} of source records {rows}); stopped before "
                          f"saving it, last checkpoint: {checkpoint.latest_step_text(mngr)}. Try a lower "
                          "config.optim.lr or config.optim.grad_clip, or check those records")


def _close_quietly(fn, what: str) -> None:
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - already stopping for another reason
        log.warning("while stopping: %s failed (%s: %s)", what, type(e).__name__, e)


def train(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> TrainState:
    """Train (or resume) in `workdir`; returns the final state.

    Before any compile: the config (`validate`), the workdir lock (one writer), the data against
    the config, a writable checkpoint dir with room for one checkpoint, and the state's memory.
    Stops with TrainingStopped (nothing non-finite saved) on a non-finite step or a failed save,
    and saves then returns on SIGTERM / SIGINT (single host) or preemption (multi-host).
    """
    validate(config)  # before any compile or I/O
    workdir = pathlib.Path(workdir).absolute()
    check_init_from(config, workdir)
    source = make_source(config)
    validate_data(config, source)
    with contextlib.ExitStack() as stack:
        if jax.process_index() == 0:  # one lock per run: the other hosts of a run share the workdir
            stack.enter_context(checkpoint.lock_workdir(workdir))
        s, init_boxed = setup(config, source)
        check_memory(s)
        checkpoint.check_writable(workdir / "checkpoints",
                                  sum(state_bytes(s.abstract_state, per_device=False).values()))
        stop = stack.enter_context(StopSignals())
        data_iter = make_data_iterator(s, source)
        if hasattr(data_iter, "close"):  # grain worker processes
            stack.callback(_close_quietly, data_iter.close, "closing the data iterator")
        mngr = checkpoint.make_manager(workdir / "checkpoints", every_steps=config.checkpoint.every_steps,
                                       keep=config.checkpoint.keep, async_save=config.checkpoint.async_save)
        stack.callback(_close_quietly, mngr.close, "closing the checkpoint manager")
        restored = checkpoint.restore_latest(mngr, s.abstract_state, data_iter)
        if restored is None:
            state = init_state(s, init_boxed)
            if config.get("init_from"):
                state = init_from(s, state, config.init_from)
            if jax.process_index() == 0:
                checkpoint.write_config(workdir, config)
        else:
            state = restored
        state = _loop(s, state, data_iter, mngr, stop, workdir, stack)
        mngr.wait_until_finished()
        checkpoint.check_for_save_errors(mngr, int(state.step))
    return state


def check_init_from(config, workdir: pathlib.Path) -> None:
    """`config.init_from` (optional): a finished run's workdir (its newest checkpoint) or a parameter
    checkpoint (`flagdit convert --output`, a folder with model.json) to start a fresh run from, as the
    official T2I stages (256 -> 512 -> 1024 px) each start from the previous stage's weights. It only
    seeds a run that has no checkpoint of its own: resuming always wins."""
    src = config.get("init_from") or None
    if src is None:
        return
    p = pathlib.Path(src).absolute()
    if not ((p / "model.json").is_file() or (p / "checkpoints").is_dir()):
        raise ValueError(f"config.init_from={src!r}: expected a training workdir (with checkpoints/) or a parameter "
                         "checkpoint folder (with model.json, as `flagdit convert` writes)")
    if p == workdir:
        raise ValueError(f"config.init_from={src!r} is this run's own workdir; a run resumes from its own checkpoints "
                         "without init_from")


def init_from(s: Setup, state: TrainState, src) -> TrainState:
    """`state` with params and EMA params taken from `src` (see `check_init_from`); the optimizer
    state, step and RNG stay fresh. A workdir gives its newest good checkpoint's params and EMA; a
    parameter checkpoint gives one tree used for both. Shapes must match this run's model."""
    from flagdit_jax import sample

    p = pathlib.Path(src).absolute()
    if (p / "model.json").is_file():
        params, _ = checkpoint.load_params(p)
        want = jax.tree.map(lambda a: (a.shape, a.dtype), state.params)
        got = jax.tree.map(lambda a: (a.shape, a.dtype), params)
        if jax.tree.structure(want) != jax.tree.structure(got) or want != got:
            raise checkpoint.CheckpointMismatch(f"config.init_from={src!r}: its parameters do not fit config.model")
        params = jax.device_put(params, s.state_shardings.params)
        ema = params
    else:
        params, _, step = sample.load_params(s.config, p, use_ema=False)
        ema, _, _ = sample.load_params(s.config, p, use_ema=True)
        log.info("initialised from %s step %d", p, step)
    return state.replace(params=params, ema_params=ema)


def _loop(s: Setup, state, data_iter, mngr, stop, workdir, stack) -> TrainState:
    config = s.config
    start = int(state.step)
    step_fn = make_train_step(s)
    lr_fn = learning_rate(config)
    writer = checkpoint.MetricWriter(workdir) if jax.process_index() == 0 else None
    if writer:
        stack.callback(_close_quietly, writer.close, "closing the metric writer")
    t_last, n_last, tokens = time.time(), start, 0
    steps = _AotSteps(s, step_fn)
    from tqdm import tqdm

    bar = tqdm(total=config.total_steps, initial=start, desc="train", mininterval=10,
               disable=jax.process_index() != 0)
    stack.callback(bar.close)
    pending, last_saved = None, None  # (step, metrics, batch index) not yet checked for finiteness
    with jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules):
        for step in range(start, config.total_steps):
            local = next(data_iter)
            tokens += int((local["kind"] == tok.PATCH).sum()) * jax.process_count()  # real tokens only
            state, metrics = steps(state, global_batch(s, local))
            done = step + 1
            if pending is not None:  # the previous step, read while this one runs
                _check_finite(mngr, *pending)
            pending = (done, metrics, local.get("index"))
            if last_saved is not None:
                checkpoint.check_for_save_errors(mngr, last_saved)
            bar.update(1)
            log_now = done % config.log_every_steps == 0 or done == config.total_steps
            save_now = mngr.should_save(done) or done == config.total_steps
            stop_now = stop.signum is not None or mngr.reached_preemption(done)
            if log_now or save_now or stop_now:
                _check_finite(mngr, *pending)
                pending = None
            if log_now:
                m = {k: float(v) for k, v in metrics.items() if k != "finite"}
                dt = time.time() - t_last
                m["steps_per_sec"] = (done - n_last) / dt
                m["tokens_per_sec"] = tokens / dt
                m.update(steps.throughput(dt))
                m["learning_rate"] = float(lr_fn(done - 1))
                t_last, n_last, tokens = time.time(), done, 0
                if writer:
                    writer.write(done, m)
            saved = False
            if save_now:
                saved = checkpoint.save(mngr, done, state, data_iter, force=done == config.total_steps)
            if stop_now:
                if not saved:
                    saved = checkpoint.save(mngr, done, state, data_iter, force=True)
                why = signal.Signals(stop.signum).name if stop.signum is not None else "preemption signal"
                log.warning("%s at step %d: saved checkpoint %d and stopping (rerun the same command to resume)",
                            why, done, done)
            if saved:
                last_saved = done
            if stop_now:
                break
    return state


def _report(line: str) -> None:
    """A start-up report line on stdout (process 0), beside the loop's `step N: ...` metric lines."""
    if jax.process_index() == 0:
        print(line, flush=True)


class _AotSteps:
    """Runs `step_fn` ahead-of-time compiled: the first batch of each token-length bucket is
    lowered and compiled once (`aot.compile_with_report`; the first one's compile time, per-device
    memory and FLOPs are logged before it runs) and that executable runs every step of the bucket,
    so no step compiles twice. Also sums the analytic model FLOPs of the steps run, for
    `flops_per_sec` and `mfu` (`hardware.mfu`; None on kinds without a known peak, e.g. CPU)."""

    def __init__(self, s: Setup, step_fn):
        from flagdit_jax import hardware

        self.s, self.step_fn, self.compiled, self.flops = s, step_fn, {}, {}
        self.devices = s.mesh.devices.size
        self.kind = s.mesh.devices.flat[0].device_kind
        self.dtype = str(getattr(s.model_cfg, "dtype", "float32"))
        self.window_flops = 0.0
        _report(hardware.describe_peak(self.kind, self.dtype))

    def __call__(self, state, batch):
        key = tuple((tuple(a.shape), str(a.dtype)) for a in jax.tree.leaves(batch))
        if key not in self.compiled:
            from flagdit_jax import aot

            compiled, report = aot.compile_with_report(self.step_fn, state, batch)
            self.compiled[key] = compiled
            tokens = batch["tokens"]
            cap = batch["cond"].get("cap_feats") if isinstance(batch.get("cond"), dict) else None
            self.flops[key] = aot.model_flops(self.s.model_cfg, state.params, batch=tokens.shape[0],
                                              seq_len=tokens.shape[1], cap_len=0 if cap is None else cap.shape[1])
            what = f"train step, batch {tokens.shape[0]} x {tokens.shape[1]} tokens"
            for line in report.lines() + [f"model FLOPs (analytic, forward + backward): "
                                          f"{self.flops[key] / 1e9:.2f} GFLOP per step, all devices"]:
                _report(f"{what}: {line}")
        self.window_flops += self.flops[key]
        return self.compiled[key](state, batch)

    def throughput(self, seconds: float) -> dict:
        """`flops_per_sec` (model FLOPs, all devices) and `mfu` since the last call (mfu only when
        the device kind has a known peak), then start a new window."""
        from flagdit_jax import hardware

        out = {"flops_per_sec": self.window_flops / seconds}
        util = hardware.mfu(self.window_flops, 1.0 / seconds, self.kind, self.devices, self.dtype)
        if util is not None:
            out["mfu"] = util
        self.window_flops = 0.0
        return out


def maybe_initialize_distributed() -> None:
    """Multi-host: `jax.distributed.initialize()` when a cluster is detected (SLURM, TPU pods, GKE)
    or when the coordinator is given by environment (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
    JAX_PROCESS_ID). Single-process runs skip it."""
    import os

    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize(
            coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
        )
    elif any(k in os.environ for k in ("SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")):
        jax.distributed.initialize()
