"""experiments/twins.py: the sweep's runs, configs, cluster commands, tables and plots."""

import importlib.util
import json
import pathlib
import sys

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def twins():
    spec = importlib.util.spec_from_file_location("twins", REPO / "experiments" / "twins.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["twins"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_every_run_builds_a_valid_config_that_differs_only_where_its_twin_says(twins):
    from flagdit_jax import train

    runs = twins.needed_runs(list(twins.TWINS))
    assert len({r.name for r in runs}) == len(runs)
    configs = {}
    for run in runs:
        assert twins.Run.parse(run.name) == run
        c = twins.run_config(run, steps=40)
        train.validate(c)
        assert (c.seed, c.total_steps, c.checkpoint.every_steps) == (run.seed, 40, 10)
        configs[run.name] = c
    # Twin d: the same model, only the time sampler differs; twin b's SiT vs DiT: only the objective.
    a, b = configs["flag-uniform-s0"], configs["flag-lognorm-s0"]
    assert a.model == b.model and a.flow.time_sampler == "uniform" and b.flow.time_sampler == "lognorm"
    sit, dit = configs["dit-uniform-s0"], configs["dit-vp_noise-s0"]
    assert sit.model == dit.model and (dit.flow.path, dit.flow.prediction) == ("vp", "noise")
    # The baseline is the embedded default's model and recipe.
    default = twins.run_config(twins.Run("flag", "lognorm", 0))
    spec = importlib.util.spec_from_file_location("default_cfg", REPO / "configs" / "default.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    d = mod.get_config()
    assert {k: default.model[k] for k in d.model} == dict(d.model) and default.flow == d.flow
    assert default.optim == d.optim and default.global_batch == d.global_batch


def test_bad_run_names_are_refused(twins):
    for name in ("flag-lognorm", "mystery-lognorm-s0", "flag-cosine-s0", "flag-lognorm-sX"):
        with pytest.raises(ValueError, match="run"):
            twins.Run.parse(name)


def test_commands_print_one_line_per_run_then_the_report(twins, capsys):
    twins.main(["commands", "--twins", "b,d", "--root", "/scratch/tw", "--steps", "500"])
    lines = capsys.readouterr().out.strip().splitlines()
    want = {r.name for r in twins.needed_runs(["b", "d"])}
    assert len(lines) == len(want) + 1 and "report --twins b,d" in lines[-1]
    assert {ln.split()[3] for ln in lines[:-1]} == want
    assert all(ln.endswith("--root /scratch/tw --steps 500") for ln in lines[:-1])


def _fake_run(root, name, fids, seconds=10.0, steps=(250, 500, 750, 1000)):
    d = root / "runs" / name
    d.mkdir(parents=True)
    curve = [dict(step=s, fid=f, accuracy=0.5) for s, f in zip(steps, fids)]
    rec = dict(run=name, steps=1000, params=123456, curve=curve, train_seconds=seconds, eval_seconds=1.0,
               sampler=dict(method="heun", num_steps=20, cfg_scale=2.3))
    (d / "twin.json").write_text(json.dumps(rec))


def test_curve_report_averages_seeds_and_writes_table_and_plot(twins, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    _fake_run(tmp_path, "flag-lognorm-s0", [40, 30, 20, 10])
    _fake_run(tmp_path, "next-lognorm-s0", [30, 20, 10, 5])
    _fake_run(tmp_path, "next-lognorm-s1", [32, 22, 12, 7])
    monkeypatch.setattr(twins, "real_floor", lambda root: {"fid": 1.0, "accuracy": 0.99})
    # The arms as this test writes them (TWINS itself grows seeds as sessions add runs).
    arms = {"f": {"Flag-DiT": "flag-lognorm-s0", "Next-DiT": "next-lognorm-s0 next-lognorm-s1"},
            "d": {"uniform t": "flag-uniform-s0", "logit-normal t": "flag-lognorm-s0"}}
    for t, a in arms.items():
        monkeypatch.setitem(twins.TWINS, t, dict(twins.TWINS[t], arms={k: twins._runs(v) for k, v in a.items()}))
    data = twins.report("f", tmp_path, tmp_path / "out", command="cmd")
    fid = np.asarray(data["arms"]["Next-DiT"]["fid"])
    assert fid.shape == (2, 4) and fid[:, -1].mean() == 6
    md = (tmp_path / "out" / "twin_f.md").read_text()
    assert "| Next-DiT | 0.12M | 2 | 31.00 ± 1.41 |" in md  # mean ± sample sd of (30, 32)
    assert "| Flag-DiT | 0.12M | 1 | 40.00 |" in md
    assert "cmd" in md and "wall time" in md
    assert (tmp_path / "out" / "twin_f.png").stat().st_size > 1000
    # Runs that scored different checkpoints are compared at the steps they share.
    _fake_run(tmp_path, "flag-uniform-s0", [50, 25], steps=(500, 1000))
    d = twins.report("d", tmp_path, tmp_path / "out")
    assert d["arms"]["logit-normal t"]["steps"] == [500, 1000] and d["arms"]["logit-normal t"]["fid"] == [[30, 10]]
    with pytest.raises(FileNotFoundError, match="flag_s-lognorm-s0"):
        twins.report("a", tmp_path, tmp_path / "out")
