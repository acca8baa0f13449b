"""Training system: sharded step parity, config validation, resume, loss falls."""

import importlib.util
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from flagdit_jax import cli, train

ROOT = pathlib.Path(__file__).resolve().parents[1]


def default_config():
    spec = importlib.util.spec_from_file_location("default_config", ROOT / "configs" / "default.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def tiny_config(**kw):
    c = default_config()
    c.model.dim, c.model.n_layers, c.model.n_heads, c.model.n_kv_heads = 32, 2, 4, 2
    c.global_batch = 16
    c.log_every_steps = 10
    for k, v in kw.items():
        node = c
        *parents, leaf = k.split(".")
        for p_ in parents:
            node = node[p_]
        node[leaf] = v
    return c


def run_steps(config, batches):
    s, init_boxed = train.setup(config)
    state = train.init_state(s, init_boxed)
    step = train.make_train_step(s)
    losses = []
    with jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules):
        for b in batches:
            state, m = step(state, train.global_batch(s, b))
            losses.append(float(m["loss"]))
    return state, losses


@pytest.fixture(scope="module")
def batches():
    rng = np.random.default_rng(0)
    return [dict(image=rng.uniform(-1, 1, (16, 32, 32, 1)).astype(np.float32),
                 label=rng.integers(0, 10, 16).astype(np.int32)) for _ in range(2)]


@pytest.fixture(scope="module")
def single_device(batches):
    return run_steps(tiny_config(**{"mesh.shape": (1, 1, 1, 1), "mesh.num_devices": 1}), batches)


@pytest.mark.parametrize("shape", [(8, 1, 1, 1), (2, 4, 1, 1), (4, 1, 1, 2), (1, 2, 1, 4)],
                         ids=["data8", "fsdp2x4", "data4-tensor2", "fsdp2-tensor4"])
def test_sharded_train_step_matches_single_device(shape, batches, single_device):
    ref_state, ref_losses = single_device
    state, losses = run_steps(tiny_config(**{"mesh.shape": shape}), batches)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6)
    wq = state.params["layers_0"]["attention"]["wq"]["kernel"]
    fsdp, tensor = shape[1], shape[3]
    assert wq.sharding.spec == P("fsdp", "tensor")
    assert wq.addressable_shards[0].data.shape == (32 // fsdp, 32 // tensor)
    mu = state.opt_state[1][0].mu["layers_0"]["feed_forward"]["w1"]["kernel"]  # optimizer state sharded alike
    assert mu.sharding.spec == P("fsdp", "tensor")


def test_grad_accumulation_matches_full_batch(batches, single_device):
    """Noise, times and dropout are drawn per global batch, so 2 micro-batches == the full batch."""
    state, losses = run_steps(tiny_config(**{"mesh.shape": (1, 1, 1, 1), "mesh.num_devices": 1,
                                             "grad_accum_steps": 2}), batches)
    ref_state, ref_losses = single_device
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6)


@pytest.mark.parametrize(
    "override, match",
    [
        ("--config.mesh.shape=(3,1,1,1)", r"config.mesh.shape=\(3, 1, 1, 1\) needs 3 devices but 8 are available"),
        ("--config.global_batch=12", r"config.global_batch=12 .*divisible by the data axes data\*fsdp=8"),
        ("--config.nonexistent_key=1", "nonexistent_key"),
        ("--config.model.n_heads=3", "n_heads=3 must divide dim=128"),
    ],
)
def test_bad_config_exits_before_any_work(tmp_path, override, match):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "keep.txt").write_text("untouched")
    with pytest.raises(SystemExit, match=match):
        cli.main(["train", "--config", str(ROOT / "configs" / "default.py"), "--workdir", str(workdir), override])
    assert sorted(p.name for p in workdir.iterdir()) == ["keep.txt"]
