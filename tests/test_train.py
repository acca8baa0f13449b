"""Training system: sharded step parity, config validation, resume, loss falls."""

import json
import os
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from conftest import load_config, sigkill_after_checkpoint
from flagdit_jax import cli, train

ROOT = pathlib.Path(__file__).resolve().parents[1]


def tiny_config(**kw):
    small = {"model.dim": 32, "model.n_layers": 2, "model.n_heads": 4, "model.n_kv_heads": 2, "global_batch": 16,
             "log_every_steps": 10}
    return load_config(ROOT / "configs" / "default.py", **{**small, **kw})


def run_steps(config, batches):
    s, init_boxed = train.setup(config)
    state = train.init_state(s, init_boxed)
    step = train.make_train_step(s)
    losses = []
    with jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules):
        for elements in batches:
            state, m = step(state, train.global_batch(s, train.pack_batch(s, elements)))
            losses.append(float(m["loss"]))
    return state, losses


@pytest.fixture(scope="module")
def batches():
    rng = np.random.default_rng(0)
    return [[dict(image=rng.uniform(-1, 1, (32, 32, 1)).astype(np.float32), label=np.int32(rng.integers(0, 10)))
             for _ in range(16)] for _ in range(2)]


@pytest.fixture(scope="module")
def single_device(batches):
    return run_steps(tiny_config(**{"mesh.shape": (1, 1, 1, 1), "mesh.num_devices": 1}), batches)


@pytest.mark.parametrize("shape", [(8, 1, 1, 1), pytest.param((2, 4, 1, 1), marks=pytest.mark.slow),
                                   pytest.param((4, 1, 1, 2), marks=pytest.mark.slow),
                                   pytest.param((1, 2, 1, 4), marks=pytest.mark.slow)],
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


@pytest.mark.slow  # default-suite time budget
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
        ("--config.sample.method=foo", r"config.sample.method='foo'; expected one of .*'dopri5', 'sde'"),
        ("--config.task=uvit", r"config.task='uvit'; expected one of \('class_label', 'caption', 'joint', 'unconditional'\)"),
        ("--config.task=joint", r"config.task='joint' needs paired data with 'text' tokens"),
        ("--config.task=caption", r"config.task='caption' needs captioned data"),
    ],
)
def test_bad_config_exits_before_any_work(tmp_path, override, match):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "keep.txt").write_text("untouched")
    with pytest.raises(SystemExit, match=match):
        cli.main(["train", "--config", str(ROOT / "configs" / "default.py"), "--workdir", str(workdir), override])
    assert sorted(p.name for p in workdir.iterdir()) == ["keep.txt"]


# --- end to end: resume, corrupt checkpoints, multi-host, learning ----------------------------------

TINY = ["--config.model.dim=32", "--config.model.n_layers=2", "--config.model.n_heads=4",
        "--config.global_batch=16", "--config.log_every_steps=5", "--config.checkpoint.every_steps=5",
        "--config.checkpoint.keep=10"]
ONE_DEVICE = ["--config.mesh.shape=(1,1,1,1)", "--config.mesh.num_devices=1"]


def train_cmd(workdir, *extra):
    return [sys.executable, "-m", "flagdit_jax.cli", "train", "--config", str(ROOT / "configs" / "default.py"),
            "--workdir", str(workdir), *TINY, *extra]


def final_state(workdir, extra=()):
    """(step, params, ema_params) of the latest checkpoint, read back through the CLI's config."""
    from flagdit_jax import checkpoint, sample

    config = checkpoint.read_config(workdir)
    for item in extra:
        k, v = item[len("--config."):].split("=")
        node = config
        *parents, leaf = k.split(".")
        for p_ in parents:
            node = node[p_]
        node[leaf] = type(node[leaf])(eval(v)) if not isinstance(node[leaf], str) else v
    params, _, step = sample.load_params(config, workdir, use_ema=False)
    ema, _, _ = sample.load_params(config, workdir, use_ema=True)
    return step, params, ema


def assert_trees_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("full")
    subprocess.run(train_cmd(workdir, *ONE_DEVICE, "--config.total_steps=40"), check=True, cwd=ROOT,
                   capture_output=True)
    return workdir


@pytest.mark.slow
def test_sigkill_resume_is_bitwise_identical(tmp_path, uninterrupted):
    workdir = tmp_path / "killed"
    cmd = train_cmd(workdir, *ONE_DEVICE, "--config.total_steps=40")
    sigkill_after_checkpoint(cmd, workdir, 10, 40, cwd=ROOT, timeout=300)
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True)
    step, params, ema = final_state(workdir, ONE_DEVICE)
    ref_step, ref_params, ref_ema = final_state(uninterrupted, ONE_DEVICE)
    assert step == ref_step == 40
    assert_trees_equal(params, ref_params)
    assert_trees_equal(ema, ref_ema)


@pytest.mark.slow
def test_corrupt_latest_checkpoint_falls_back_with_warning(tmp_path, uninterrupted, caplog):
    import shutil

    from flagdit_jax import checkpoint

    workdir = tmp_path / "corrupt"
    shutil.copytree(uninterrupted, workdir)
    # Keep checkpoints up to 40, then damage 40: truncate every file of its train state.
    for f in (workdir / "checkpoints" / "40" / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(f.read_bytes()[: max(0, f.stat().st_size // 3)])
    config = checkpoint.read_config(workdir)
    config.mesh.shape, config.mesh.num_devices = (1, 1, 1, 1), 1
    with caplog.at_level("WARNING"):
        state = train.train(config, workdir)  # restores 35, retrains 35 -> 40
    assert any("checkpoints/40" in r.getMessage() and "unreadable" in r.getMessage() for r in caplog.records)
    _, ref_params, _ = final_state(uninterrupted, ONE_DEVICE)
    assert int(state.step) == 40
    assert_trees_equal(state.params, ref_params)


@pytest.mark.slow
def test_two_process_jax_distributed_matches_single_process(tmp_path):
    """Two processes on 127.0.0.1 (one CPU device each) vs one process with two devices."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
               JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
               JAX_NUM_PROCESSES="2")
    extra = ["--config.total_steps=6", "--config.mesh.shape=(2,1,1,1)"]
    procs = [subprocess.Popen(train_cmd(tmp_path / "multi", *extra), cwd=ROOT, env=dict(env, JAX_PROCESS_ID=str(i)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(2)]
    outs = [p.communicate(timeout=600)[0].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][-3000:] + outs[1][-3000:]
    single_env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    subprocess.run(train_cmd(tmp_path / "single", *extra), cwd=ROOT, env=single_env, check=True, capture_output=True)
    a = [json.loads(l) for l in (tmp_path / "multi" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(l) for l in (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in a] == [r["step"] for r in b] == [5, 6]
    np.testing.assert_allclose([r["loss"] for r in a], [r["loss"] for r in b], rtol=1e-5)
    np.testing.assert_allclose([r["grad_norm"] for r in a], [r["grad_norm"] for r in b], rtol=1e-5)


@pytest.mark.slow
def test_restore_onto_a_different_mesh(tmp_path):
    from flagdit_jax import checkpoint, sample

    config = tiny_config(**{"total_steps": 5, "mesh.shape": (8, 1, 1, 1), "checkpoint.async_save": False})
    state = train.train(config, tmp_path)
    config = checkpoint.read_config(tmp_path)
    config.mesh.shape = (2, 4, 1, 1)
    params, _, step = sample.load_params(config, tmp_path, use_ema=False)
    assert step == 5
    assert_trees_equal(params, state.params)
    w1 = params["layers_0"]["feed_forward"]["w1"]["kernel"]
    assert w1.sharding.spec == P("fsdp", "tensor") and w1.addressable_shards[0].data.shape[0] == 32 // 4


@pytest.mark.slow
def test_sampling_reads_only_the_params_tree(tmp_path):
    """Weights restore from a checkpoint whose optimizer state has another structure (another optimizer)."""
    import optax
    import orbax.checkpoint as ocp

    from flagdit_jax import checkpoint, sample

    config = tiny_config(**{"total_steps": 3, "checkpoint.async_save": False})
    state = train.train(config, tmp_path / "run")
    other = state.replace(opt_state=optax.sgd(0.1, momentum=0.9).init(state.params))
    assert jax.tree.structure(other.opt_state) != jax.tree.structure(state.opt_state)
    mngr = checkpoint.make_manager(tmp_path / "other" / "checkpoints", every_steps=1, keep=1, async_save=False)
    mngr.save(7, args=ocp.args.Composite(state=ocp.args.StandardSave(other)))
    mngr.close()
    ema, _, step = sample.load_params(config, tmp_path / "other", use_ema=True)
    assert step == 7
    assert_trees_equal(ema, state.ema_params)


@pytest.mark.slow
def test_preemption_saves_and_stops(tmp_path, monkeypatch):
    import orbax.checkpoint as ocp

    monkeypatch.setattr(ocp.CheckpointManager, "reached_preemption", lambda self, step: step == 7)
    config = tiny_config(**{"total_steps": 20, "checkpoint.every_steps": 5})
    state = train.train(config, tmp_path)
    assert int(state.step) == 7
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [5, 7]


@pytest.mark.slow
def test_training_lowers_the_loss_and_samples_approach_the_data(tmp_path):
    from flagdit_jax import sample
    from flagdit_jax.data import mnist

    config = tiny_config(**{"total_steps": 300, "model.dim": 64, "log_every_steps": 25})
    train.train(config, tmp_path)
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    first, last = rows[0]["loss"], np.mean([r["loss"] for r in rows[-3:]])
    print(f"loss at step {rows[0]['step']}: {first:.3f}; mean of the last 3 logs: {last:.3f}")
    assert last < 0.5 * first

    params, s, _ = sample.load_params(config, tmp_path, use_ema=False)  # EMA 0.999 still ~ init at 300 steps
    labels = np.arange(20) % 10
    images = sample.generate_images(config, params, s, labels, seed=0)
    real = mnist.load_split("train")[0].reshape(4500, -1)
    noise = np.clip(np.random.default_rng(0).normal(size=images.shape), -1, 1)

    def nearest_rms(x):
        d = ((x.reshape(len(x), 1, -1) - real[None]) ** 2).mean(-1)
        return float(np.sqrt(d.min(1)).mean())

    ours, baseline = nearest_rms(images), nearest_rms(noise)
    print(f"RMS distance to the nearest real digit: samples {ours:.3f}, noise {baseline:.3f}")
    assert ours < 0.7 * baseline


@pytest.mark.slow  # default-suite time budget
@pytest.mark.parametrize("overrides", [{"model.dtype": "bfloat16"}, {"model.remat": "full"}, {"model.remat": "dots"}],
                         ids=["bf16-compute", "remat-full", "remat-dots"])
def test_mixed_precision_and_remat(overrides, batches, single_device):
    """bf16 compute keeps fp32 master weights and optimizer state and tracks the fp32 loss;
    rematerialisation changes memory, not results."""
    state, losses = run_steps(tiny_config(**{"mesh.shape": (1, 1, 1, 1), "mesh.num_devices": 1, **overrides}), batches)
    ref_state, ref_losses = single_device
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.opt_state) if hasattr(x, "dtype")
               and jnp.issubdtype(x.dtype, jnp.floating))
    if "model.dtype" in overrides:
        np.testing.assert_allclose(losses, ref_losses, rtol=3e-2)
    else:
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
        for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6)


@pytest.mark.slow
def test_init_from_a_previous_stage(tmp_path):
    """A fresh run seeded by `config.init_from` (the T2I stages 256 -> 512 -> 1024) starts from the
    previous run's params and EMA, or from a parameter checkpoint; its own optimizer and step start fresh."""
    from flagdit_jax import checkpoint

    first = train.train(tiny_config(**{"total_steps": 2, "checkpoint.async_save": False}), tmp_path / "stage1")
    config = tiny_config(**{"total_steps": 1, "init_from": str(tmp_path / "stage1")})
    s, init_boxed = train.setup(config)
    train.check_init_from(config, tmp_path / "stage2")
    state = train.init_from(s, train.init_state(s, init_boxed), config.init_from)
    assert_trees_equal(state.params, first.params)
    assert_trees_equal(state.ema_params, first.ema_params)
    assert int(state.step) == 0
    checkpoint.save_params(tmp_path / "converted", first.ema_params, s.model_cfg)
    state = train.init_from(s, train.init_state(s, init_boxed), str(tmp_path / "converted"))
    assert_trees_equal(state.params, first.ema_params)
    with pytest.raises(ValueError, match="config.init_from"):
        train.check_init_from(tiny_config(**{"init_from": str(tmp_path / "nothing")}), tmp_path / "x")
