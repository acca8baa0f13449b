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


@pytest.mark.slow  # 8-11 s on the shared 2 cores (setup + one compile of three small model graphs)
def test_make_solver_passes_inference_options_to_every_model_call():
    """`sample.make_solver(options=)` (twin c's RoPE-scaling rows) reaches the model: position interpolation
    changes the sample and a one-step Euler solve equals x0 + the direct `model.apply(..., options=)`
    velocity; an option the backbone lacks still raises (common.resolve_options)."""
    import jax
    import jax.numpy as jnp

    from conftest import load_config
    from flagdit_jax import sample, tokens as tok, train
    from flagdit_jax.models.common import InferenceOptions

    s, _ = train.setup(load_config(REPO / "configs" / "default.py", **{
        "model.dim": 32, "model.n_layers": 2, "model.n_heads": 4, "model.n_kv_heads": 2, "global_batch": 16,
        "mesh.shape": (1, 1, 1, 1), "mesh.num_devices": 1}))
    # Random weights, not the init: adaLN-Zero / the zero final layer give v = 0 whatever the positions.
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: jnp.asarray(0.2 * rng.standard_normal(a.shape), a.dtype), s.abstract_state.params)
    n, shape = 2, (1, 16, 16)
    cond = {"label": jnp.arange(n, dtype=jnp.int32)}
    pi = InferenceOptions(pi_factor=2.0)
    kw = dict(method="euler", num_steps=1, cfg_scale=1.0)  # one Euler step over [0, 1] with the conditional v
    solve_pi, state_shape = sample.make_solver(s, n, shape, options=pi, **kw)
    solve_none, _ = sample.make_solver(s, n, shape, **kw)
    layout = tok.pack_for(s.model_cfg, jnp.zeros((n, *shape, 1)))
    x0 = jax.random.normal(jax.random.key(2), state_shape)

    @jax.jit  # one compile for the three
    def run(params, x0):
        key = jax.random.key(3)
        v = s.model.apply({"params": params}, layout.replace(tokens=x0.reshape(x0.shape[:2] + (-1,))),
                          jnp.zeros((n,)), y=cond["label"], options=pi)
        direct = tok.unpack((x0 + v.reshape(x0.shape)).reshape(layout.tokens.shape), layout)
        return solve_pi(params, cond, x0, key), solve_none(params, cond, x0, key), direct

    out_pi, out_none, direct = map(np.asarray, run(params, x0))
    assert out_pi.shape == (n, *shape, 1)
    assert np.abs(out_pi - out_none).max() > 1e-3
    np.testing.assert_allclose(out_pi, direct, atol=1e-5)

    bad, _ = sample.make_solver(s, n, shape, options=InferenceOptions(context_drop=2), **kw)
    with pytest.raises(ValueError, match="Flag-DiT does not support the inference option.*context_drop=2"):
        jax.eval_shape(bad, params, cond, x0, jax.random.key(3))
    with pytest.raises(ValueError, match="options must be a models.common.InferenceOptions"):
        sample.make_solver(s, n, shape, options={"pi_factor": 2.0}, **kw)


def test_to_32_resizes_or_takes_the_central_crop(twins):
    x = np.zeros((1, 64, 64, 1), np.float32)
    x[:, 16:48, 16:48] = 1.0  # a bright central 32x32 square on a dark 64x64 canvas
    np.testing.assert_array_equal(twins.to_32(x, "crop"), np.ones((1, 32, 32, 1)))
    r = twins.to_32(x, "resize")
    assert r.shape == (1, 32, 32, 1) and r[0, 16, 16, 0] == pytest.approx(1) and r[0, 0, 0, 0] == pytest.approx(0)
    assert twins.to_32(x[:, :32, :32], "crop") is not None
    with pytest.raises(ValueError, match="fit='middle'"):
        twins.to_32(x, "middle")
    with pytest.raises(ValueError, match=r"shape \(1, 16, 16, 1\)"):
        twins.to_32(x[:, :16, :16], "crop")


def test_twin_c_report_reads_cached_cells_with_crop_and_scaling_rows(twins, tmp_path, monkeypatch):
    """With every cell cached, the twin c report needs no model: plain rows (resize + crop past 32) and
    the RoPE-scaling rows of the scaled arms, N per cell named in the caption when it differs."""
    pytest.importorskip("matplotlib")
    monkeypatch.setattr(twins, "real_floor", lambda root: {"fid": 1.0, "accuracy": 0.99})
    sampler = f"{twins.C_SAMPLER[0]}x{twins.C_SAMPLER[1]}"
    for i, (label, (run,)) in enumerate(twins.TWINS["c"]["arms"].items()):
        _fake_run(tmp_path, run.name, [40, 30, 20, 10])
        cells = {}
        for side in twins.SIDES:
            cells[f"plain|{side}|{sampler}|n{twins.N_EVAL}"] = dict(
                resize=dict(fid=100.0 + side + i, accuracy=0.5), crop=dict(fid=50.0 + side + i, accuracy=0.6),
                n=twins.N_EVAL, options={}, seconds=2.0)
            if side > 32:
                for how in (h for h in twins.C_SCALINGS if label in twins.scaled_arms(h)):
                    cells[f"{how}|{side}|{sampler}|n100"] = dict(resize=dict(fid=7.0, accuracy=0.8),
                                                                 crop=dict(fid=8.0, accuracy=0.9), n=100,
                                                                 options={}, seconds=1.0)
        (tmp_path / "runs" / run.name / "twin_c_cells.json").write_text(json.dumps(cells))
    data = twins.report("c", tmp_path, tmp_path / "out", command="cmd", c_scaled_n=100)
    md = (tmp_path / "out" / "twin_c.md").read_text()
    assert "| APE (SiT backbone) | plain | 132.00 | 148.00 | 98.00 | 164.00 | 114.00 | 0.500 | 0.500 | 0.600 |" in md
    assert "| 2-D RoPE (Next-DiT) | PI (pi_factor = s) | — | 7.00 | 8.00 | 7.00 | 8.00 | — | 0.800 | 0.900 |" in md
    assert "N = 100 samples per cell" in md
    assert set(data["arms"]["2-D RoPE (Next-DiT)"]["scalings"]) == set(twins.C_SCALINGS)
    assert data["arms"]["APE (SiT backbone)"]["scalings"] == {}
    flag = data["arms"]["1-D RoPE + [nextline] (Flag-DiT)"]["scalings"]  # no time-aware RoPE in Flag-DiT
    assert set(flag) == set(twins.C_SCALINGS) - set(twins.C_SCALING_ARMS) and len(flag) == 4
    assert (tmp_path / "out" / "twin_c.png").stat().st_size > 1000
