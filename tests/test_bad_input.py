"""Bad input to every `flagdit` subcommand: one or two `error:` lines naming the file, key or
parameter, a non-zero exit, no traceback, and (for configs) no compile."""

import json
import os
import pathlib
import shutil

import jax
import pytest
from hypothesis import HealthCheck, assume, given, settings, strategies as st

from flagdit_jax import cli, train
from test_train import ROOT

DEFAULT = str(ROOT / "configs" / "default.py")
TINY = ["--config.model.dim=32", "--config.model.n_layers=1", "--config.global_batch=16",
        "--config.mesh.shape=(1,1,1,1)", "--config.mesh.num_devices=1"]


def run_cli(argv, capsys) -> tuple[int, str]:
    """(exit status, stderr) of `flagdit argv` run in-process."""
    try:
        code = cli.main(argv)
    except SystemExit as e:
        if isinstance(e.code, str):
            return 1, e.code
        code = e.code
    return code, capsys.readouterr().err


def assert_clear(code: int, err: str, *names: str) -> None:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert code not in (0, None), err
    assert 1 <= len(lines) <= 2 and lines[0].startswith("error:"), err
    assert "Traceback" not in err
    for name in names:
        assert name in err, (name, err)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-step run of the tiny default (config.json + checkpoint 2)."""
    wd = tmp_path_factory.mktemp("trained")
    assert cli.main(["train", "--config", DEFAULT, "--workdir", str(wd), "--config.total_steps=2", *TINY]) == 0
    return wd


TRAIN_CASES = [
    ("--config.optim.lr=-1", "config.optim.lr=-1.0"),
    ("--config.optim.lr=nan", "config.optim.lr=nan"),
    ("--config.optim.lr=inf", "config.optim.lr=inf"),
    ("--config.optim.grad_clip=-1", "config.optim.grad_clip=-1.0"),
    ("--config.optim.b2=1.0", "config.optim.b2=1.0"),
    ("--config.optim.weight_decay=-0.1", "config.optim.weight_decay"),
    ("--config.optim.warmup_steps=-5", "config.optim.warmup_steps=-5"),
    ("--config.seed=-1", "config.seed=-1"),
    ("--config.data.image_size=64", "config.data.image_size=64 but the 'mnist' records are 32x32"),
    ("--config.data.image_size=-32", "config.data.image_size=-32"),
    ("--config.sample.method=foo", "config.sample.method='foo'"),
    ("--config.sample.cfg_scale=inf", "config.sample.cfg_scale=inf"),
    ("--config.eval.num_samples=0", "config.eval.num_samples=0"),
    ("--config.flow.path=curved", "config.flow.path='curved'"),
    ("--config.foo=1", "unknown config key 'config.foo'; known keys at config: checkpoint, data,"),
    ("--config.optim.momentum=1", "unknown config key 'config.optim.momentum'; known keys at config.optim: b1, b2"),
    ("--config.total_steps=1.5", "--config.total_steps=1.5"),
]


@pytest.mark.parametrize("override, name", TRAIN_CASES, ids=[c[0][len("--config."):] for c in TRAIN_CASES])
def test_train_bad_config(tmp_path, capsys, monkeypatch, override, name):
    monkeypatch.setattr(train, "make_train_step", lambda s: pytest.fail("compiled a rejected config"))
    code, err = run_cli(["train", "--config", DEFAULT, "--workdir", str(tmp_path / "wd"), *TINY, override], capsys)
    assert_clear(code, err, name)
    assert not (tmp_path / "wd" / "checkpoints").exists()


def test_train_missing_config_file(tmp_path, capsys):
    code, err = run_cli(["train", "--config", str(tmp_path / "nope.py"), "--workdir", str(tmp_path)], capsys)
    assert_clear(code, err, "nope.py")


@pytest.mark.parametrize("command", ["sample", "eval"])
def test_missing_and_empty_workdir(tmp_path, capsys, command):
    code, err = run_cli([command, "--workdir", str(tmp_path / "missing")], capsys)
    assert_clear(code, err, str(tmp_path / "missing"), "no such directory")
    assert not (tmp_path / "missing").exists()
    (tmp_path / "empty").mkdir()
    code, err = run_cli([command, "--workdir", str(tmp_path / "empty")], capsys)
    assert_clear(code, err, str(tmp_path / "empty" / "config.json"), "not a training workdir")
    code, err = run_cli([command], capsys)
    assert_clear(code, err, "--workdir")


@pytest.mark.parametrize("command", ["sample", "eval"])
def test_workdir_without_checkpoints(tmp_path, trained, capsys, command):
    shutil.copy(trained / "config.json", tmp_path / "config.json")
    code, err = run_cli([command, "--workdir", str(tmp_path)], capsys)
    assert_clear(code, err, f"no checkpoint in {tmp_path / 'checkpoints'}")


@pytest.mark.parametrize("command", ["sample", "eval"])
def test_override_that_does_not_fit_the_checkpoint(trained, capsys, command):
    code, err = run_cli([command, "--workdir", str(trained), "--config.model.dim=64", "--config.model.multiple_of=64"],
                        capsys)
    assert_clear(code, err, "does not fit the config's model", "params/", "(32,", "(64,", "in the checkpoint")


def test_workdir_from_another_config(tmp_path, trained, capsys):
    """config.json of a 2-layer run beside the checkpoints of a 1-layer run."""
    shutil.copytree(trained, tmp_path / "wd")
    cfg = json.loads((trained / "config.json").read_text())
    cfg["model"]["n_layers"] = 2
    (tmp_path / "wd" / "config.json").write_text(json.dumps(cfg))
    code, err = run_cli(["sample", "--workdir", str(tmp_path / "wd")], capsys)
    assert_clear(code, err, "ema_params/layers_1/", "is not in the checkpoint")


def test_garbage_config_json(tmp_path, capsys):
    (tmp_path / "config.json").write_bytes(os.urandom(64))
    code, err = run_cli(["sample", "--workdir", str(tmp_path)], capsys)
    assert_clear(code, err, str(tmp_path / "config.json"))


def test_sample_bad_override(trained, capsys):
    code, err = run_cli(["sample", "--workdir", str(trained), "--config.sample.num_steps=0"], capsys)
    assert_clear(code, err, "config.sample.num_steps=0")
    code, err = run_cli(["eval", "--workdir", str(trained), "--config.sampel.method=heun"], capsys)
    assert_clear(code, err, "unknown config key 'config.sampel'")


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        cli.main(["sample", "--workdir", str(tmp_path / "missing"), "--debug"])


@pytest.mark.parametrize("case", ["missing", "random-bytes", "wrong-extension", "bad-preset", "no-source"])
def test_convert_bad_input(tmp_path, capsys, case):
    src = tmp_path / "model.safetensors"
    args = ["convert", "--checkpoint", str(src), "--preset", "flagdit-tiny", "--output", str(tmp_path / "out")]
    if case == "random-bytes":
        src.write_bytes(os.urandom(1000))
    elif case == "wrong-extension":
        src = tmp_path / "model.txt"
        src.write_text("hello")
        args[2] = str(src)
    elif case == "bad-preset":
        src.write_bytes(os.urandom(1000))
        args[4] = "flagdit-nope"
    elif case == "no-source":
        args = ["convert", "--output", str(tmp_path / "out")]
    code, err = run_cli(args, capsys)
    name = {"bad-preset": "flagdit-nope", "no-source": "--checkpoint"}.get(case, src.name)
    assert_clear(code, err, name)


# --- fuzz: every rejected config names its key before any compile ----------------------------------

POSITIVE_INTS = ["total_steps", "global_batch", "grad_accum_steps", "log_every_steps", "checkpoint.every_steps",
                 "checkpoint.keep", "sample.num_steps", "sample.per_class", "eval.num_samples", "eval.batch"]
NONNEG_INTS = ["seed", "optim.warmup_steps", "eval.classifier_steps", "data.worker_count"]
POSITIVE_FLOATS = ["optim.lr", "optim.grad_clip", "sample.shift"]
UNIT_FLOATS = ["optim.b1", "optim.b2", "ema_decay"]
NONNEG_FLOATS = ["optim.weight_decay", "sample.cfg_scale"]
NAMES = {"sample.method": None, "flow.path": None, "flow.prediction": None, "optim.schedule": None,
         "data.name": None, "task": None}
NUMERIC = POSITIVE_INTS + NONNEG_INTS + POSITIVE_FLOATS + UNIT_FLOATS + NONNEG_FLOATS
BAD_FLOAT = st.sampled_from([float("nan"), float("inf"), float("-inf")])
WORD = st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=10)


def _bad_value(key: str):
    if key in POSITIVE_INTS:
        return st.integers(max_value=0)
    if key in NONNEG_INTS:
        return st.integers(max_value=-1) | (st.integers(min_value=2**31 - 1, max_value=2**40) if key == "seed"
                                            else st.nothing())
    if key in POSITIVE_FLOATS:
        return st.floats(max_value=0.0, allow_nan=False) | BAD_FLOAT
    if key in UNIT_FLOATS:
        return st.floats(min_value=1.0, allow_infinity=False) | st.floats(max_value=-1e-9, allow_infinity=False) | BAD_FLOAT
    return st.floats(max_value=-1e-9, allow_infinity=False) | BAD_FLOAT  # NONNEG_FLOATS


bad_cases = st.one_of(
    st.sampled_from(NUMERIC).flatmap(lambda k: st.tuples(st.just(k), _bad_value(k).map(repr))),
    st.tuples(st.sampled_from(POSITIVE_INTS + NONNEG_INTS), st.sampled_from(["abc", "1.5", "[1]", "''"])),
    st.tuples(st.sampled_from(POSITIVE_FLOATS + UNIT_FLOATS), st.sampled_from(["abc", "(1,2)", "x1"])),
    st.tuples(st.sampled_from(sorted(NAMES)), WORD),
    st.tuples(st.sampled_from(["", "optim.", "model.", "sample.", "data.", "eval."]).flatmap(
        lambda level: WORD.map(lambda w: level + "zz" + w)), st.just("1")),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=bad_cases)
def test_fuzz_rejected_configs_name_their_key_before_any_compile(tmp_path, monkeypatch, capsys, case):
    key, value = case
    if key in NAMES:  # skip names that happen to be valid
        from flagdit_jax.data import pipeline
        from flagdit_jax.flow import samplers

        valid = {"sample.method": samplers.ODE_METHODS + ("sde",), "flow.path": ("linear", "gvp", "vp"),
                 "flow.prediction": ("velocity", "noise", "score"), "optim.schedule": ("constant", "cosine"),
                 "data.name": pipeline.SOURCES, "task": ("class_label", "caption")}[key]
        assume(value not in valid)

    def no_compile(*a, **k):
        raise AssertionError(f"compile reached for --config.{key}={value}")

    monkeypatch.setattr(jax, "jit", no_compile)
    monkeypatch.setattr(train, "make_train_step", no_compile)
    monkeypatch.setattr(train, "init_state", no_compile)
    wd = tmp_path / f"wd{abs(hash(case))}"
    code, err = run_cli(["train", "--config", DEFAULT, "--workdir", str(wd), f"--config.{key}={value}"], capsys)
    assert_clear(code, err, f"config.{key}")
    assert not (wd / "checkpoints").exists()


@pytest.mark.parametrize("overrides, names", [
    # 4 heads cannot be exchanged over 8 sequence shards by all-to-all (ring can: any head count)
    (["--config.mesh.shape=(1,1,8,1)", "--config.model.sequence_parallel=ulysses"], ["config.model", "heads"]),
    (["--config.mesh.shape=(1,1,4,1)", "--config.model.sequence_parallel=swap"], ["sequence_parallel='swap'"]),
], ids=["ulysses-heads", "unknown-scheme"])
def test_train_bad_sequence_parallel_config(tmp_path, capsys, monkeypatch, overrides, names):
    monkeypatch.setattr(train, "make_train_step", lambda s: pytest.fail("compiled a rejected config"))
    tiny = [a for a in TINY if not a.startswith("--config.mesh.")]
    code, err = run_cli(["train", "--config", DEFAULT, "--workdir", str(tmp_path / "wd"), *tiny, *overrides], capsys)
    assert_clear(code, err, *names)


def test_buckets_must_divide_over_the_sequence_axis():
    from conftest import load_config

    config = load_config(DEFAULT, **{"mesh.shape": (2, 1, 4, 1), "mesh.num_devices": -1})
    config.data.buckets = (64, 66)
    with pytest.raises(ValueError, match=r"config.data.buckets length 66 \(66\) must be divisible by the sequence"):
        train.validate(config)
    config.data.buckets = (64, 68)
    train.validate(config)
