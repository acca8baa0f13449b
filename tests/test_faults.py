"""Fault injection: what a machine suffers (kills, signals, corrupt or unwritable storage, a full
disk, NaNs, a second writer) never costs a good checkpoint, and the run says what happened.

Fast tests train in-process for a few steps of the tiny config; the `slow` ones run the CLI in
subprocesses (SIGKILL at 5 points, SIGTERM from outside) and compare the final bits with an
uninterrupted run.
"""

import errno
import os
import pathlib
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from flagdit_jax import checkpoint, cli, train
from test_train import ONE_DEVICE, ROOT, assert_trees_equal, final_state, tiny_config, train_cmd


def one_device(**kw):
    return tiny_config(**{"mesh.shape": (1, 1, 1, 1), "mesh.num_devices": 1, "checkpoint.every_steps": 5,
                          "checkpoint.keep": 10, "total_steps": 10, **kw})


def steps_in(workdir) -> list[int]:
    return sorted(int(p.name) for p in (pathlib.Path(workdir) / "checkpoints").iterdir() if p.name.isdigit())


def restore(workdir, config):
    """(step, state) restore_latest gives for `workdir` (no training, no step compile)."""
    s, _ = train.setup(config)
    it = train.make_data_iterator(s, train.make_source(config))
    mngr = checkpoint.make_manager(pathlib.Path(workdir) / "checkpoints", every_steps=5, keep=10)
    try:
        state = checkpoint.restore_latest(mngr, s.abstract_state, it)
    finally:
        mngr.close()
    return int(state.step), state


@pytest.fixture(scope="module")
def run10(tmp_path_factory):
    """A finished 10-step run (checkpoints 5 and 10) and the states of both, read back intact."""
    workdir = tmp_path_factory.mktemp("run10")
    train.train(one_device(), workdir)
    assert steps_in(workdir) == [5, 10]
    five = tmp_path_factory.mktemp("five")
    shutil.copytree(workdir, five, dirs_exist_ok=True)
    shutil.rmtree(five / "checkpoints" / "10")
    return workdir, restore(workdir, one_device())[1], restore(five, one_device())[1]


def _damage(step_dir: pathlib.Path, how: str) -> None:
    files = sorted(f for f in (step_dir / "state").rglob("*") if f.is_file() and f.stat().st_size > 64
                   and "/d/" in str(f))  # the array data files
    if how == "truncated":
        for f in files:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
    elif how == "deleted":
        shutil.rmtree(step_dir / "state")
    elif how == "bitflip":  # one bit in the middle of the largest data file: still a valid file
        f = max(files, key=lambda f: f.stat().st_size)
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0x10
        f.write_bytes(bytes(data))
    elif how == "garbage":
        shutil.rmtree(step_dir)
        step_dir.mkdir()
        (step_dir / "_CHECKPOINT_METADATA").write_bytes(os.urandom(300))
        (step_dir / "state").mkdir()
        (step_dir / "state" / "manifest.ocdbt").write_bytes(os.urandom(1000))
    elif how == "metadata":  # the step's metadata (with the checksum) replaced by random bytes
        (step_dir / "_CHECKPOINT_METADATA").write_bytes(os.urandom(300))


# bitflip / garbage run with the slow tests (the default suite's time); truncated, deleted and metadata stay.
@pytest.mark.parametrize("how", ["truncated", "deleted", pytest.param("bitflip", marks=pytest.mark.slow),
                                 pytest.param("garbage", marks=pytest.mark.slow), "metadata"])
def test_damaged_newest_checkpoint_restores_the_previous_one(tmp_path, run10, how, caplog):
    src, _, state5 = run10
    workdir = tmp_path / how
    shutil.copytree(src, workdir)
    _damage(workdir / "checkpoints" / "10", how)
    with caplog.at_level("WARNING"):
        step, state = restore(workdir, one_device())
    assert step == 5
    assert_trees_equal(state, state5)
    assert any("checkpoints/10" in r.getMessage() and "unreadable" in r.getMessage() for r in caplog.records)
    # Nothing good deleted: 5 kept, the damaged 10 moved aside for inspection.
    names = sorted(p.name for p in (workdir / "checkpoints").iterdir())
    assert "5" in names and any(n.startswith("10.unreadable-") for n in names), names


def test_bitflip_is_detected_by_the_checksum_alone(run10):
    """Orbax reads a bit-flipped data file without complaint; the saved fingerprint catches it."""
    _, state10, _ = run10
    fp, bad = checkpoint.fingerprint(state10)
    assert not bad
    leaf = state10.params["final_layer"]["linear"]["kernel"]
    flipped = np.asarray(leaf).copy()
    flipped.view(np.uint32).flat[3] ^= 1 << 7
    fp2, _ = checkpoint.fingerprint(state10.replace(params={**state10.params, "final_layer": {
        **state10.params["final_layer"], "linear": {**state10.params["final_layer"]["linear"],
                                                   "kernel": jax.numpy.asarray(flipped)}}}))
    assert [k for k in fp if fp[k] != fp2[k]] == ["params/final_layer/linear/kernel"]


@pytest.mark.slow
def test_sigterm_finishes_the_step_saves_and_returns(tmp_path, monkeypatch, caplog):
    """In-process (the bit-identical resume after SIGTERM is the slow subprocess test below)."""
    real_global_batch = train.global_batch
    calls = []

    def global_batch(s, local):  # SIGTERM arrives while step 7 is being prepared
        calls.append(1)
        if len(calls) == 7:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_global_batch(s, local)

    monkeypatch.setattr(train, "global_batch", global_batch)
    before = signal.getsignal(signal.SIGTERM)
    with caplog.at_level("WARNING"):
        state = train.train(one_device(), tmp_path)
    assert int(state.step) == 7 and steps_in(tmp_path) == [5, 7]
    assert any("SIGTERM at step 7: saved checkpoint 7" in r.getMessage() for r in caplog.records)
    assert signal.getsignal(signal.SIGTERM) is before  # handler restored
    step, restored = restore(tmp_path, one_device())
    assert step == 7
    assert_trees_equal(restored, state)


def test_nan_stops_naming_the_step_and_keeps_good_checkpoints(tmp_path, run10):
    src, _, state5 = run10
    shutil.copytree(src, tmp_path / "run")
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "run" / "checkpoints").rglob("*")}
    with pytest.raises(checkpoint.TrainingStopped) as e:  # resume a good run with a learning rate that diverges
        train.train(one_device(**{"total_steps": 30, "optim.lr": 1e30}), tmp_path / "run")
    msg = str(e.value)
    assert re.match(r"non-finite (loss|grad_norm|parameters).* at step 1[12] \(batch of source records \[\d+, \d+, ",
                    msg), msg
    assert "last checkpoint: step 10" in msg and len(msg.splitlines()) == 1, msg
    assert steps_in(tmp_path / "run") == [5, 10]  # nothing non-finite saved, nothing rotated out
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "run" / "checkpoints").rglob("*")} == before


def test_nonfinite_state_is_never_saved(tmp_path, run10):
    _, state10, _ = run10
    mngr = checkpoint.make_manager(tmp_path, every_steps=1, keep=3, async_save=False)
    bad = state10.replace(ema_params=jax.tree.map(lambda x: x * np.nan, state10.ema_params))
    with pytest.raises(checkpoint.TrainingStopped, match=r"step 11: non-finite values in ema_params/"):
        checkpoint.save(mngr, 11, bad, None, force=True)
    assert mngr.all_steps() == []
    mngr.close()


def test_second_writer_is_refused_and_a_dead_holder_is_stale(tmp_path):
    import socket

    workdir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import pathlib, sys, time\n"
        "from flagdit_jax import checkpoint\n"
        f"with checkpoint.lock_workdir(pathlib.Path({str(workdir)!r})):\n"
        "    print('locked', flush=True)\n"
        "    time.sleep(600)\n")], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(SystemExit) as e:
            cli.main(["train", "--config", str(ROOT / "configs" / "default.py"), "--workdir", str(workdir),
                      "--config.total_steps=5"])
        msg = str(e.value.code)
        assert f"pid {holder.pid} on host {socket.gethostname()}" in msg and "in use" in msg, msg
        assert not (workdir / "checkpoints").exists() and not (workdir / "config.json").exists()
    finally:
        holder.kill()  # SIGKILL: no cleanup runs, the lock file keeps the dead holder's PID
        holder.wait()
    assert f"pid {holder.pid}" in (workdir / ".lock").read_text()
    with checkpoint.lock_workdir(workdir):  # the kernel dropped the flock with the process
        assert f"pid {os.getpid()}" in (workdir / ".lock").read_text()


def _make_unwritable(path: pathlib.Path):
    """chmod is no obstacle to root: use the immutable attribute there (chattr +i)."""
    if os.geteuid() != 0:
        path.chmod(0o555)
        return lambda: path.chmod(0o755)
    r = subprocess.run(["chattr", "+i", str(path)], capture_output=True)
    if r.returncode:
        pytest.skip(f"running as root and chattr +i failed ({r.stderr.decode().strip()}): no way to make a "
                    "directory unwritable here")
    return lambda: subprocess.run(["chattr", "-i", str(path)], check=True)


def test_read_only_checkpoint_dir_is_refused_before_compile(tmp_path, run10, monkeypatch):
    src, _, _ = run10
    shutil.copytree(src, tmp_path / "run")
    ckpts = tmp_path / "run" / "checkpoints"
    monkeypatch.setattr(train, "make_train_step", lambda s: pytest.fail("compiled despite a read-only dir"))
    monkeypatch.setattr(train, "init_state", lambda *a: pytest.fail("initialised despite a read-only dir"))
    undo = _make_unwritable(ckpts)
    try:
        with pytest.raises(SystemExit) as e:
            cli.main(["train", "--config", str(ROOT / "configs" / "default.py"), "--workdir", str(tmp_path / "run"),
                      "--config.model.dim=32", "--config.model.n_layers=2", "--config.model.n_heads=4",
                      "--config.global_batch=16", "--config.total_steps=20"])
    finally:
        undo()
    msg = str(e.value.code)
    assert msg.startswith(f"error: cannot write checkpoints to {ckpts}") and len(msg.splitlines()) == 1, msg
    assert steps_in(tmp_path / "run") == [5, 10]


@pytest.fixture
def small_fs(tmp_path):
    """A 4 MiB tmpfs (needs mount rights: root); None where mounting is not permitted."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode:
        yield None
        return
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.slow
def test_full_disk_during_async_save_stops_with_the_cause(tmp_path, small_fs, monkeypatch):
    """The filesystem fills up after checkpoint 5; the async save of 10 fails with ENOSPC and the run
    stops at the next step naming the cause, checkpoint 5 intact. Without mount rights the writer
    is made to raise ENOSPC instead (simulated)."""
    workdir = (small_fs or tmp_path) / "run"
    real_save = checkpoint.save

    def save(mngr, step, state, data_iter, *, force=False):
        if step == 10:
            mngr.wait_until_finished()  # checkpoint 5 is written
            if small_fs is not None:  # fill the filesystem: the next checkpoint cannot be written
                with open(small_fs / "filler", "wb", buffering=0) as f:  # unbuffered: close has nothing to flush
                    try:
                        while True:
                            f.write(b"\0" * 65536)
                            f.flush()
                    except OSError as e:
                        assert e.errno == errno.ENOSPC
            else:
                import orbax.checkpoint as ocp

                def no_space(*a, **k):
                    raise OSError(errno.ENOSPC, "No space left on device (simulated)")

                monkeypatch.setattr(ocp.CheckpointManager, "save", no_space)
        return real_save(mngr, step, state, data_iter, force=force)

    monkeypatch.setattr(checkpoint, "save", save)
    with pytest.raises(checkpoint.TrainingStopped) as e:
        train.train(one_device(total_steps=20), workdir)
    msg = str(e.value)
    assert "saving checkpoint step 10" in msg and "No space left on device" in msg, msg
    assert "last good checkpoint: step 5" in msg, msg
    if small_fs is not None:
        (small_fs / "filler").unlink()
    assert steps_in(workdir) == [5]
    step, _ = restore(workdir, one_device())
    assert step == 5


def test_memory_estimate_refuses_before_compile(tmp_path, monkeypatch):
    monkeypatch.setattr(train, "available_memory", lambda device: (100_000, "test budget"))
    monkeypatch.setattr(train, "init_state", lambda *a: pytest.fail("initialised despite the memory estimate"))
    with pytest.raises(ValueError, match=r"needs at least 0\.00 GiB per device .*parameters .*EMA .*optimizer "
                                         r"state .*gradients .*test budget"):
        train.train(one_device(), tmp_path)
    assert not (tmp_path / "checkpoints").exists() or steps_in(tmp_path) == []


@pytest.mark.slow
def test_7b_config_is_refused_with_figures(tmp_path):
    """The 7B preset's sizes on this machine: refused from the abstract state, no OOM kill."""
    from flagdit_jax.train import available_memory

    free, _ = available_memory(jax.devices()[0])
    r = subprocess.run([sys.executable, "-m", "flagdit_jax.cli", "train", "--config",
                        str(ROOT / "configs" / "default.py"), "--workdir", str(tmp_path), *ONE_DEVICE,
                        "--config.model.dim=4096", "--config.model.n_layers=32", "--config.model.n_heads=32",
                        "--config.model.multiple_of=256"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    if free is not None and free > 170 * 2**30:
        pytest.skip("this machine has the memory for a 7B state")
    assert r.returncode == 1
    assert "needs at least 163.01 GiB per device" in r.stderr and "parameters 27.17 GiB" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


# --- subprocess runs of the CLI: SIGKILL at 5 points, SIGTERM from outside ------------------------

TOTAL = 20


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("reference")
    subprocess.run(train_cmd(workdir, *ONE_DEVICE, f"--config.total_steps={TOTAL}"), check=True, cwd=ROOT,
                   capture_output=True)
    return final_state(workdir, ONE_DEVICE)


def _wait_for(proc, directory: pathlib.Path, pattern: str, timeout: float = 300) -> bool:
    """Poll until an entry of `directory` matches `pattern` (or the run ends)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            return False
        if directory.exists() and any(directory.glob(pattern)):
            return True
        time.sleep(0.005)
    raise AssertionError(f"nothing matched {directory / pattern} in {timeout} s")


# (what to wait for, then a random delay): between saves, as a save starts / during one (Orbax
# writes into '<step>.orbax-checkpoint-tmp-*' and renames on commit), during the final save.
_RNG = random.Random(10)
KILL_POINTS = [("5", _RNG.uniform(0.0, 0.5)), ("*orbax-checkpoint-tmp*", 0.0), ("10", _RNG.uniform(0.0, 0.5)),
               ("15*tmp*", _RNG.uniform(0.0, 0.02)), (f"{TOTAL}*tmp*", 0.0)]


@pytest.mark.slow
@pytest.mark.parametrize("point", range(len(KILL_POINTS)),
                         ids=[f"{p}+{d:.2f}s" for p, d in KILL_POINTS])
def test_sigkill_at_random_points_resumes_bit_identically(tmp_path, reference, point):
    pattern, delay = KILL_POINTS[point]
    workdir = tmp_path / "killed"
    cmd = train_cmd(workdir, *ONE_DEVICE, f"--config.total_steps={TOTAL}")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen = _wait_for(proc, workdir / "checkpoints", pattern)
    time.sleep(delay)
    killed = proc.poll() is None
    if killed:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert seen and killed, f"the run ended before the kill point {pattern}+{delay:.2f}s"
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True)  # resume (also takes over the dead lock)
    step, params, ema = final_state(workdir, ONE_DEVICE)
    ref_step, ref_params, ref_ema = reference
    assert step == ref_step == TOTAL
    assert_trees_equal(params, ref_params)
    assert_trees_equal(ema, ref_ema)


@pytest.mark.slow
def test_sigterm_from_outside_saves_exits_0_and_resumes_bit_identically(tmp_path, reference):
    workdir = tmp_path / "term"
    cmd = train_cmd(workdir, *ONE_DEVICE, f"--config.total_steps={TOTAL}")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert _wait_for(proc, workdir / "checkpoints", "5")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    stopped = [ln for ln in err.splitlines() if "SIGTERM at step" in ln]
    assert len(stopped) == 1 and "saved checkpoint" in stopped[0], err[-2000:]
    step = int(stopped[0].split("SIGTERM at step ")[1].split(":")[0])
    assert 5 <= step < TOTAL and step in steps_in(workdir)
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True)
    got = final_state(workdir, ONE_DEVICE)
    assert got[0] == reference[0] == TOTAL
    assert_trees_equal(got[1:], reference[1:])
