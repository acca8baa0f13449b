"""Orbax checkpoints of model parameters plus the model config (all checkpoint code lives here).

A converted or trained model is a directory: `params/` (Orbax StandardCheckpointer) and
`model.json` (the backbone kind and its config fields, `models.registry.config_to_dict`), so
`load_params` can rebuild the model through the registry's kind table.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import os
import pathlib
import shutil
import time

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp

from flagdit_jax.models import registry


def save_params(directory: str | pathlib.Path, params, cfg, *, overwrite: bool = False) -> pathlib.Path:
    """Write `params` (a pytree of arrays) and `cfg` to `directory`; refuses to overwrite by default."""
    directory = pathlib.Path(directory).absolute()
    if directory.exists() and any(directory.iterdir()) and not overwrite:
        raise FileExistsError(f"{directory} exists and is not empty; pass overwrite=True (--overwrite) to replace it")
    directory.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(directory / "params", params, force=overwrite)
        ckptr.wait_until_finished()
    (directory / "model.json").write_text(json.dumps(registry.config_to_dict(cfg), indent=1))
    return directory


def load_params(directory: str | pathlib.Path, *, scan_layers: bool | None = None):
    """Returns `(params, cfg)` from a directory written by `save_params`.

    scan_layers: None keeps the saved block layout; True / False returns the params stacked /
    per layer and `cfg` with that `scan_layers` (`registry.params_for`), so a folder written by a
    per-layer run loads into a scanned model and vice versa.
    """
    if scan_layers is not None and not isinstance(scan_layers, bool):
        raise ValueError(f"scan_layers={scan_layers!r}; expected None, True or False")
    directory = pathlib.Path(directory).absolute()
    meta = directory / "model.json"
    if not meta.exists():
        raise FileNotFoundError(f"{meta} not found: not a flagdit_jax parameter checkpoint")
    try:
        cfg = registry.config_from_dict(json.loads(meta.read_text()))
    except ValueError as e:
        raise ValueError(f"{meta}: {e}") from e
    abstract = nn.unbox(registry.abstract_params(cfg))
    with ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore(directory / "params", jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                                                   abstract))
    if scan_layers is not None and scan_layers != cfg.scan_layers:
        cfg = dataclasses.replace(cfg, scan_layers=scan_layers)
        params = registry.params_for(params, cfg)
    return params, cfg


# ------------------------------------------------------------------------------------------------
# training checkpoints: train state + data iterator + config, via CheckpointManager
# ------------------------------------------------------------------------------------------------


class TrainingStopped(RuntimeError):
    """Training stopped to protect the run (non-finite values, a failed save, no readable
    checkpoint); the message names the step and what is kept."""


class CheckpointMismatch(ValueError):
    """A checkpoint whose arrays do not fit the config's model; names the first mismatches."""


class WorkdirLocked(OSError):
    """Another `flagdit train` holds the workdir's lock."""


FINGERPRINT_KEY = "flagdit_fingerprint"  # in the step's custom metadata
DATA_STATE_KEY = "flagdit_data_state"


def leaf_name(path) -> str:
    """'params/layers_0/attention/wq/kernel' for a tree path (attribute, dict and sequence keys)."""
    return "/".join(str(getattr(k, "name", getattr(k, "key", getattr(k, "idx", k)))) for k in path)


def _words(x):
    """The bits of `x` as uint32 words (16- and 8-bit types widened, 64-bit split)."""
    from jax import lax
    import jax.numpy as jnp

    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    size = x.dtype.itemsize
    if size == 4:
        return lax.bitcast_convert_type(x, jnp.uint32)
    if size < 4:
        return lax.bitcast_convert_type(x, {2: jnp.uint16, 1: jnp.uint8}[size]).astype(jnp.uint32)
    return lax.bitcast_convert_type(x, jnp.uint32)  # 64-bit: a trailing axis of two words


def _positions(shape):
    """Flat element index (mod 2**32) of every element of an array of `shape`."""
    import jax.numpy as jnp
    from jax import lax

    idx, stride = jnp.zeros(shape, jnp.uint32), 1
    for d in reversed(range(len(shape))):
        idx = idx + lax.broadcasted_iota(jnp.uint32, shape, d) * np.uint32(stride % 2**32)
        stride *= shape[d]
    return idx


@jax.jit
def _fingerprint_leaves(leaves):
    import jax.numpy as jnp

    sums, weighted, finite = [], [], []
    for x in leaves:
        w = _words(x)
        # Two sums mod 2**32 (exact, whatever the order or sharding; plain sums all-reduce on every
        # backend): of the words, and of the words times an odd weight per position. A flipped bit
        # changes both; moved data changes the second.
        sums.append(jnp.sum(w, dtype=jnp.uint32))
        weighted.append(jnp.sum(w * (2 * _positions(w.shape) + 1), dtype=jnp.uint32))
        finite.append(jnp.isfinite(x).all() if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.bool_(True))
    return jnp.stack(sums), jnp.stack(weighted), jnp.stack(finite)


def fingerprint(tree) -> tuple[dict, list[str]]:
    """`({leaf name: [uint32 sum, uint32 position-weighted sum] of its bits}, [names of non-finite leaves])`.

    Computed on the devices from the arrays themselves (a global reduction: the same on every
    host, whatever the sharding), so it can be taken from the state handed to an async save and
    checked against what a later restore reads back: any single flipped bit changes both words.
    """
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    names = [leaf_name(p) for p, _ in flat]
    sums, weighted, finite = (np.asarray(a) for a in _fingerprint_leaves([x for _, x in flat]))
    fp = {n: [int(s), int(x)] for n, s, x in zip(names, sums, weighted)}
    return fp, [n for n, ok in zip(names, finite) if not ok]


def _data_digest(data_iter) -> str | None:
    if jax.process_count() > 1 or not hasattr(data_iter, "get_state"):
        return None  # only the primary host writes metadata; other hosts' positions differ
    return hashlib.sha256(json.dumps(data_iter.get_state(), sort_keys=True, default=str).encode()).hexdigest()


def make_manager(directory: str | pathlib.Path, *, every_steps: int, keep: int, async_save: bool = True):
    """Orbax CheckpointManager: save every N steps (plus preemption), keep the latest `keep`."""
    policy = ocp.checkpoint_managers
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=policy.AnySavePolicy([policy.FixedIntervalPolicy(every_steps),
                                                   policy.PreemptionCheckpointingPolicy()]),
        preservation_policy=policy.LatestN(keep),
        enable_async_checkpointing=async_save,
    )
    return ocp.CheckpointManager(pathlib.Path(directory).absolute(), options=options)


def save(mngr, step: int, state, data_iter, *, force: bool = False) -> bool:
    """Save the train state and the data iterator's position at `step` (async when configured).

    The state's fingerprint goes into the step's metadata (committed with it); a state with a
    non-finite float is never written (raises TrainingStopped): older, good checkpoints would
    otherwise be rotated out by NaN ones.
    """
    import grain

    if not force and not mngr.should_save(step):
        return False
    fp, bad = fingerprint(state)
    if bad:
        raise TrainingStopped(f"step {step}: non-finite values in {', '.join(bad[:3])}"
                              f"{f' and {len(bad) - 3} more arrays' if len(bad) > 3 else ''}; not saved "
                              f"(last checkpoint: {latest_step_text(mngr)})")
    meta = {FINGERPRINT_KEY: fp, DATA_STATE_KEY: _data_digest(data_iter)}
    previous = mngr.latest_step()
    try:  # mngr.save waits for the previous async save first: name that step if it is the one that failed
        mngr.wait_until_finished()
    except Exception as e:  # noqa: BLE001
        raise TrainingStopped(f"saving checkpoint step {previous} to {mngr.directory} failed: {type(e).__name__}: "
                              f"{_first_line(e)}; training stopped at step {step}, last good checkpoint: "
                              f"{_good_steps_text(mngr, previous)}") from e
    try:
        return mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                       data=grain.checkpoint.CheckpointSave(data_iter)),
                         force=force, custom_metadata=meta)
    except Exception as e:  # noqa: BLE001 - the blocking part of a save (or the previous async one) failed
        raise TrainingStopped(f"saving checkpoint step {step} to {mngr.directory} failed: {type(e).__name__}: "
                              f"{_first_line(e)}; training stopped, last good checkpoint: "
                              f"{_good_steps_text(mngr, step)}") from e


def latest_step_text(mngr) -> str:
    steps = mngr.all_steps()
    return f"step {max(steps)} in {mngr.directory}" if steps else f"none in {mngr.directory}"


def check_fits(step_dir: pathlib.Path, abstract, keys=("params", "ema_params")) -> None:
    """Raise CheckpointMismatch naming the first arrays of `keys` whose shape / dtype in the saved
    state (`step_dir/state`) differ from `abstract`'s (a dict or TrainState of ShapeDtypeStructs),
    or that one side lacks. An unreadable metadata file raises whatever Orbax raises."""
    with ocp.StandardCheckpointer() as ckptr:
        saved_tree = ckptr.metadata(step_dir / "state").item_metadata.tree
    problems = []
    for key in keys:
        want = getattr(abstract, key, None) if not isinstance(abstract, dict) else abstract.get(key)
        if want is None:
            continue
        if key not in saved_tree:
            problems.append(f"{key} missing in the checkpoint")
            continue
        saved = {f"{key}/{leaf_name(p)}": (tuple(m.shape), np.dtype(m.dtype))
                 for p, m in jax.tree_util.tree_flatten_with_path(saved_tree[key])[0]}
        wanted = {f"{key}/{leaf_name(p)}": (tuple(a.shape), np.dtype(a.dtype))
                  for p, a in jax.tree_util.tree_flatten_with_path(want)[0]}
        for name, (shape, dtype) in wanted.items():
            if name not in saved:
                problems.append(f"{name} {shape} is not in the checkpoint")
            elif saved[name] != (shape, dtype):
                problems.append(f"{name} is {saved[name][0]} {saved[name][1]} in the checkpoint, "
                                f"{shape} {dtype} for this config")
        problems += [f"{name} {saved[name][0]} is in the checkpoint but not in this config's model"
                     for name in saved if name not in wanted]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise CheckpointMismatch(f"checkpoint {step_dir} does not fit the config's model: " + "; ".join(problems[:3])
                                 + more + ". Use the config the run was trained with (its config.json) or "
                                          "another --workdir")


def restore_params(mngr, step: int, key: str, abstract, cfg):
    """`state[key]` ('params' or 'ema_params') of checkpoint `step`, restored onto `abstract` (the
    tree of ShapeDtypeStructs with shardings of `cfg`'s model, e.g. `Setup.abstract_state.params`)
    whichever block layout the run that wrote it used: a per-layer run's checkpoint loads into a
    scanned model (`cfg.scan_layers`) and vice versa (`registry.params_for`). Only that tree is
    read (partial restore); `check_fits` and `verify` (checksums, in the saved layout) run first.

    Raises:
      CheckpointMismatch: the saved tree does not fit the config's model in either layout.
      ValueError: the arrays do not match the checksum saved with them.
    """
    from flagdit_jax.models import layer_stack

    step_dir = pathlib.Path(mngr.directory) / str(step)
    with ocp.StandardCheckpointer() as ckptr:
        saved = ckptr.metadata(step_dir / "state").item_metadata.tree
    name = registry.block_name(cfg)
    layout = layer_stack.block_layout(saved[key], name) if isinstance(saved.get(key), dict) else None
    other = layout is not None and (layout == "scanned") != cfg.scan_layers
    target = layer_stack.to_layout(abstract, scan=not cfg.scan_layers, n_layers=cfg.n_layers, name=name) \
        if other else abstract
    check_fits(step_dir, {key: target}, keys=(key,))
    restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding), {key: target})
    args = ocp.args.PyTreeRestore(item={key: target}, restore_args=restore_args, partial_restore=True)
    params = mngr.restore(step, args=ocp.args.Composite(state=args)).state[key]
    verify(mngr, step, {key: params})
    if other:
        params = jax.device_put(registry.params_for(params, cfg), jax.tree.map(lambda a: a.sharding, abstract))
    return params


def verify(mngr, step: int, tree, *, data_iter=None) -> None:
    """Compare `tree` (restored from `step`; a TrainState or a dict of some of its fields) with the
    fingerprint saved with it; raises ValueError naming the first differing arrays. Checkpoints
    written before fingerprints existed (no custom metadata at all) pass with a warning."""
    # Read the step's metadata file directly: Orbax logs an unreadable one and returns empty
    # metadata, which would pass for the older format.
    path = pathlib.Path(mngr.directory) / str(step) / "_CHECKPOINT_METADATA"
    try:
        custom = dict(json.loads(path.read_text()).get("custom_metadata") or {})
    except (OSError, ValueError, AttributeError) as e:
        raise ValueError(f"{path} is unreadable ({type(e).__name__}: {e})") from e
    if not custom:
        logging.warning("checkpoint %s carries no checksum (older format); restored unverified",
                        pathlib.Path(mngr.directory) / str(step))
        return
    if FINGERPRINT_KEY not in custom:
        raise ValueError(f"its metadata lacks the checksum ({sorted(custom)})")
    saved = custom[FINGERPRINT_KEY]
    got, bad = fingerprint(tree)
    wrong = [n for n, v in got.items() if saved.get(n) != v]
    if wrong:
        raise ValueError(f"checksum mismatch in {', '.join(wrong[:3])}"
                         f"{f' and {len(wrong) - 3} more arrays' if len(wrong) > 3 else ''} (corrupted data)")
    if bad:
        raise ValueError(f"non-finite values in {', '.join(bad[:3])}")
    want = custom.get(DATA_STATE_KEY)
    if data_iter is not None and want is not None and _data_digest(data_iter) not in (None, want):
        raise ValueError("the data iterator's saved position does not match its checksum (corrupted data state)")


def restore_latest(mngr, abstract_state, data_iter):
    """Restore the newest good checkpoint onto `abstract_state`'s shardings (any mesh).

    A checkpoint that fails to restore (truncated or garbage files) or whose arrays do not match
    the checksum saved with them (a flipped bit) is reported with a warning naming it, and the
    next older one is tried; once an older one restores, the bad newer ones are moved aside
    (never deleted). Returns None when there is no checkpoint at all. Raises CheckpointMismatch
    when the checkpoints are readable but do not fit the config's model, TrainingStopped when
    none can be read.
    """
    import grain

    steps = sorted(mngr.all_steps(), reverse=True)
    errors = []
    for step in steps:
        step_dir = pathlib.Path(mngr.directory) / str(step)
        try:
            check_fits(step_dir, abstract_state)
            out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                             data=grain.checkpoint.CheckpointRestore(data_iter)))
            verify(mngr, step, out.state, data_iter=data_iter)
        except Exception as e:  # noqa: BLE001 - reported, then the previous checkpoint is tried
            errors.append((step, e))
            logging.warning("checkpoint %s is unreadable (%s: %s); trying the previous one", step_dir,
                            type(e).__name__, _first_line(e))
            continue
        logging.info("restored step %d from %s", step, mngr.directory)
        # Move unreadable newer checkpoints aside (kept for inspection, never deleted) so that the
        # resumed run can save those steps again.
        for bad, _ in errors:
            src = pathlib.Path(mngr.directory) / str(bad)
            dst = src.with_name(f"{bad}.unreadable-{int(time.time())}")
            src.rename(dst)
            logging.warning("moved unreadable checkpoint %s to %s", src, dst)
        if errors:
            mngr.reload()
        return out.state
    if errors:
        mismatch = next((e for _, e in errors if isinstance(e, CheckpointMismatch)), None)
        if mismatch is not None:  # the config changed, not the files: nothing is moved
            raise mismatch
        raise TrainingStopped(f"no readable checkpoint in {mngr.directory} (" + "; ".join(
            f"step {s}: {type(e).__name__}: {_first_line(e)}"[:200] for s, e in errors) +
            "); move the folder aside to start afresh") from errors[0][1]
    return None


def _first_line(e: BaseException) -> str:
    return next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)


def check_for_save_errors(mngr, last_saved: int | None) -> None:
    """Raise TrainingStopped when a finished async save failed (ENOSPC, I/O or permission errors),
    with the cause; the checkpoints already written stay as they are."""
    try:
        mngr.check_for_errors()
        if last_saved is not None and not mngr.is_saving_in_progress():
            mngr.wait_until_finished()  # returns at once; raises the finalize thread's error, if any
    except Exception as e:  # noqa: BLE001 - any failure of the background write
        raise TrainingStopped(f"saving checkpoint step {last_saved} to {mngr.directory} failed: "
                              f"{type(e).__name__}: {_first_line(e)}; training stopped, last good checkpoint: "
                              f"{_good_steps_text(mngr, last_saved)}") from e


def _good_steps_text(mngr, failed: int | None) -> str:
    d = pathlib.Path(mngr.directory)
    steps = sorted(int(p.name) for p in d.iterdir() if p.name.isdigit() and int(p.name) != failed
                   and (p / "_CHECKPOINT_METADATA").exists()) if d.exists() else []
    return f"step {steps[-1]} in {d}" if steps else f"none in {d}"


def check_writable(directory: pathlib.Path, need_bytes: int = 0) -> None:
    """Refuse at start-up (before any compile) a checkpoint directory that cannot be written, or
    whose filesystem cannot hold one checkpoint of `need_bytes`."""
    directory = pathlib.Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-test-{os.getpid()}"
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as e:
        raise _os_error(e.errno, f"cannot write checkpoints to {directory}: {e.strerror or e}; "
                                 "fix its permissions / free space or pass another --workdir") from e
    free = shutil.disk_usage(directory).free
    if need_bytes and free < need_bytes:
        raise _os_error(errno.ENOSPC, f"{directory} has {free / 2**20:.1f} MiB free but one checkpoint of this "
                                      f"run takes {need_bytes / 2**20:.1f} MiB; free space or pass another --workdir")


def _os_error(code: int, message: str, cls=OSError) -> OSError:
    """An OSError carrying `code` whose text is just `message` (no '[Errno n]' prefix)."""
    err = cls(message)
    err.errno = code
    return err


@contextlib.contextmanager
def lock_workdir(workdir: pathlib.Path):
    """Hold an exclusive `flock` on `workdir/.lock` (holding 'pid N on host H') while training.

    A second writer is refused with the holder's PID and host. The kernel drops the lock when its
    holder dies (even by SIGKILL), so a lock file left behind by a dead run is taken over.
    """
    import fcntl
    import socket

    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / ".lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown holder"
        os.close(fd)
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise _os_error(e.errno, f"cannot lock {path}: {e.strerror}") from e
        raise _os_error(errno.EBUSY, f"workdir {workdir} is in use by another `flagdit train` ({holder}, lock {path}); "
                                     "wait for it to finish or pass another --workdir", WorkdirLocked) from None
    previous = os.pread(fd, 4096, 0).decode(errors="replace").strip()
    if previous:
        logging.info("taking over %s from a run that is gone (%s)", path, previous)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode(), 0)
    try:
        yield path
    finally:
        os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def write_config(workdir: pathlib.Path, config) -> None:
    """The run's config as JSON beside the checkpoints (what `flagdit sample/eval` read back)."""
    workdir.mkdir(parents=True, exist_ok=True)
    tmp = workdir / "config.json.tmp"
    tmp.write_text(config.to_json_best_effort(indent=1))
    tmp.replace(workdir / "config.json")  # never a half-written config


def read_config(workdir: str | pathlib.Path):
    import ml_collections

    workdir = pathlib.Path(workdir)
    path = workdir / "config.json"
    if not workdir.is_dir():
        raise FileNotFoundError(f"--workdir {workdir}: no such directory (train first: flagdit train --config ... "
                                f"--workdir {workdir})")
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: {workdir} is not a training workdir (run `flagdit train` "
                                "with it first)")
    def tuples(v):  # JSON has no tuples; the configs write sequences as tuples (and CLI overrides need them)
        if isinstance(v, dict):
            return {k: tuples(x) for k, x in v.items()}
        return tuple(tuples(x) for x in v) if isinstance(v, list) else v

    try:
        return ml_collections.ConfigDict(tuples(json.loads(path.read_text())))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a readable run config ({e})") from e


class MetricWriter:
    """Scalars to TensorBoard event files (tensorboardX), `metrics.jsonl` and the console."""

    def __init__(self, workdir: pathlib.Path):
        from tensorboardX import SummaryWriter

        self.tb = SummaryWriter(str(workdir / "tb"))
        self.jsonl = open(workdir / "metrics.jsonl", "a")

    def write(self, step: int, scalars: dict) -> None:
        for k, v in scalars.items():
            self.tb.add_scalar(k, v, step)
        self.jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        self.jsonl.flush()
        print(f"step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in scalars.items()), flush=True)

    def close(self) -> None:
        self.tb.close()
        self.jsonl.close()
