"""Orbax checkpoints of model parameters plus the model config (all checkpoint code lives here).

A converted or trained model is a directory: `params/` (Orbax StandardCheckpointer) and
`model.json` (the backbone kind and its config fields, `models.registry.config_to_dict`), so
`load_params` can rebuild the model through the registry's kind table.
"""

from __future__ import annotations

import json
import logging
import pathlib
import time

import flax.linen as nn
import jax
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


def load_params(directory: str | pathlib.Path):
    """Returns `(params, cfg)` from a directory written by `save_params`."""
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
    return params, cfg


# ------------------------------------------------------------------------------------------------
# training checkpoints: train state + data iterator + config, via CheckpointManager
# ------------------------------------------------------------------------------------------------


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
    """Save the train state and the data iterator's position at `step` (async when configured)."""
    import grain

    return mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                   data=grain.checkpoint.CheckpointSave(data_iter)), force=force)


def restore_latest(mngr, abstract_state, data_iter):
    """Restore the newest readable checkpoint onto `abstract_state`'s shardings (any mesh).

    A checkpoint that fails to restore (truncated or corrupt files) is reported with a warning
    naming it, and the next older one is tried. Returns None when there is no checkpoint at all;
    raises if checkpoints exist but none can be read.
    """
    import grain

    steps = sorted(mngr.all_steps(), reverse=True)
    errors = []
    for step in steps:
        try:
            out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                             data=grain.checkpoint.CheckpointRestore(data_iter)))
        except Exception as e:  # noqa: BLE001 - reported, then the previous checkpoint is tried
            errors.append((step, e))
            logging.warning("checkpoint %s is unreadable (%s: %s); trying the previous one",
                            mngr.directory / str(step), type(e).__name__, e)
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
        raise RuntimeError(f"no readable checkpoint in {mngr.directory}: " +
                           "; ".join(f"step {s}: {type(e).__name__}: {e}" for s, e in errors)) from errors[0][1]
    return None


def write_config(workdir: pathlib.Path, config) -> None:
    """The run's config as JSON beside the checkpoints (what `flagdit sample/eval` read back)."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=1))


def read_config(workdir: str | pathlib.Path):
    import ml_collections

    path = pathlib.Path(workdir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: {workdir} is not a training workdir")
    return ml_collections.ConfigDict(json.loads(path.read_text()))


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
