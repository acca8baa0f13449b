"""Ahead-of-time compile report and MFU: the peak table, the MFU arithmetic, analytic model FLOPs
against XLA's own count, and the train loop's AOT executable (same result as the jitted step, one
compile per bucket, MFU logged only where a peak is known)."""

import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_config
from flagdit_jax import aot, hardware, train
from flagdit_jax.models import registry

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_peak_table_and_mfu_arithmetic():
    assert hardware.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert hardware.peak_flops("NVIDIA H100 PCIe") == 756e12  # the PCIe card is not the SXM one
    assert hardware.peak_flops("NVIDIA H200", "float32") == 494.5e12
    assert hardware.peak_flops("TPU v5 lite") == 197e12
    # 100 TFLOP per step at 2 steps/s on 4 v4 chips (275 TFLOP/s each): 200 / 1100.
    assert hardware.mfu(100e12, 2.0, "TPU v4", 4) == pytest.approx(200 / 1100)
    assert hardware.mfu(1e12, 1.0, "cpu", 1) is None
    assert hardware.peak_flops("Some Future Accelerator") is None
    assert "MFU omitted" in hardware.describe_peak("cpu", "float32")
    with pytest.raises(ValueError, match="dtype='int8'"):
        hardware.peak_flops("TPU v4", "int8")
    with pytest.raises(ValueError, match="num_devices=0"):
        hardware.mfu(1.0, 1.0, "TPU v4", 0)


def _step_report(cfg, batch, size):
    """(AOT report, analytic FLOPs) of value_and_grad of a flow loss through `cfg`'s model."""
    model = registry.build(cfg)
    packed, t, kw = registry.example_inputs(cfg, batch=batch, size=size, cap_len=8)
    params = nn.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), packed, t, **kw))["params"])

    def loss(p, tokens):
        out = model.apply({"params": p}, packed.replace(tokens=tokens), t, **kw)
        return jnp.mean((out - tokens) ** 2)

    step = jax.jit(jax.value_and_grad(loss))
    _, report = aot.compile_with_report(step, params, packed.tokens)
    cap = kw["cap_feats"].shape[1] if "cap_feats" in kw else 0
    flops = aot.model_flops(cfg, params, batch=batch, seq_len=packed.tokens.shape[1], cap_len=cap)
    return report, flops


@pytest.fixture(scope="module")
def reports():
    small = dict(dim=128, n_layers=1, n_heads=4)
    flag = registry.get_config("flagdit-bench-small", **small)
    nxt = registry.get_config("lumina-next-tiny", **small)
    return {"flag2": lambda: _step_report(flag, 2, 8), "flag4": lambda: _step_report(flag, 4, 8),
            "next2": lambda: _step_report(nxt, 2, 8)}


@pytest.fixture(scope="module")
def report_of(reports):
    """Compiles each model's step on first use (the slow tests' ones only when they run)."""
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = reports[name]()
        return cache[name]

    return get


@pytest.mark.parametrize("name", ["flag2", pytest.param("next2", marks=pytest.mark.slow)])
def test_analytic_flops_match_xla_cost_analysis(report_of, name):
    report, flops = report_of(name)
    assert not report.has_loops
    # XLA also counts element-wise work (norms, softmax, RoPE) that the analytic count leaves out.
    assert 0.9 < report.hlo_flops_per_device / flops < 1.2, (report.hlo_flops_per_device, flops)
    assert report.compile_seconds > 0 and report.argument_bytes > 0 and report.output_bytes > 0


@pytest.mark.slow
def test_flops_scale_linearly_with_batch(report_of):
    (r2, f2), (r4, f4) = report_of("flag2"), report_of("flag4")
    assert f4 == pytest.approx(2 * f2)
    assert r4.hlo_flops_per_device / r2.hlo_flops_per_device == pytest.approx(2.0, rel=0.03)


def test_scanned_loops_are_flagged():
    x = jnp.ones((32, 32))
    _, rep = aot.compile_with_report(jax.jit(lambda x: jax.lax.scan(lambda c, _: (c @ x, None), x, None,
                                                                     length=4)[0]), x)
    assert rep.has_loops  # XLA counts the body once: the report says so instead of a silent 4x error
    assert rep.hlo_flops_per_device == pytest.approx(2 * 32**3, rel=0.01)
    with pytest.raises(ValueError, match="seq_len=0"):
        aot.model_flops(registry.get_config("nextdit-tiny"), {}, batch=1, seq_len=0)


def _fake_setup_and_step():
    """A stand-in Setup (one-device mesh, a tiny Next-DiT config) and a cheap jitted step over a
    TrainState whose params have that model's shapes: the loop's AOT bookkeeping without a
    model compile."""
    import types

    cfg = registry.get_config("lumina-next-tiny")
    params = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), nn.unbox(registry.abstract_params(cfg)))
    state = train.TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params, opt_state=(),
                             rng=jnp.zeros((2,), jnp.uint32))
    s = types.SimpleNamespace(mesh=jax.make_mesh((1,), ("data",), devices=jax.devices()[:1]), model_cfg=cfg)
    step_fn = jax.jit(lambda st, b: (st.replace(step=st.step + 1), {"loss": jnp.mean(b["tokens"])}))
    return s, state, step_fn


def _batch(b, n, cap=4):
    return {"tokens": jnp.ones((b, n, 16)), "cond": {"cap_feats": jnp.ones((b, cap, 32)),
                                                     "cap_mask": jnp.ones((b, cap), bool)}}


def test_aot_steps_compile_once_per_bucket_and_log_mfu(capsys):
    s, state, step_fn = _fake_setup_and_step()
    steps = train._AotSteps(s, step_fn)
    for n in (16, 16, 32, 16):  # two buckets
        state, m = steps(state, _batch(2, n))
    assert int(state.step) == 4 and float(m["loss"]) == 1.0
    assert len(steps.compiled) == 2 and step_fn._cache_size() == 0  # one AOT compile per bucket, no jit
    text = capsys.readouterr().out  # the start-up report is printed beside the metric lines
    assert text.count("compiled in") == 2 and "memory per device" in text and "GFLOP per device" in text
    assert "MFU omitted" in text  # CPU: no peak
    f16, f32 = (aot.model_flops(s.model_cfg, state.params, batch=2, seq_len=n, cap_len=4) for n in (16, 32))
    out = steps.throughput(2.0)
    assert out["flops_per_sec"] == pytest.approx((3 * f16 + f32) / 2.0)
    assert "mfu" not in out
    steps.kind = "TPU v4"  # a kind with a peak: MFU = model FLOPs/s over 275 TFLOP/s
    steps.window_flops = 550e12
    assert steps.throughput(1.0)["mfu"] == pytest.approx(2.0)


@pytest.mark.slow
def test_train_loop_runs_the_aot_executable(capsys):
    cfg = load_config(ROOT / "configs" / "default.py", **{
        "model.dim": 32, "model.n_layers": 1, "model.n_heads": 4, "model.n_kv_heads": 2, "global_batch": 8,
        "mesh.shape": (1, 1, 1, 1), "mesh.num_devices": 1})
    s, init_boxed = train.setup(cfg)
    state0 = train.init_state(s, init_boxed)
    rng = np.random.default_rng(0)
    elements = [dict(image=rng.uniform(-1, 1, (32, 32, 1)).astype(np.float32), label=np.int32(i)) for i in range(8)]
    step_fn = train.make_train_step(s)
    with jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules):
        steps = train._AotSteps(s, step_fn)
        batch = train.global_batch(s, train.pack_batch(s, elements))
        state, m = steps(state0, batch)
        state, m2 = steps(state, train.global_batch(s, train.pack_batch(s, elements)))
    assert len(steps.compiled) == 1 and step_fn._cache_size() == 0  # one compile in all: the AOT one
    assert int(state.step) == 2 and np.isfinite(float(m["loss"])) and np.isfinite(float(m2["loss"]))
    text = capsys.readouterr().out
    assert "compiled in" in text and "memory per device" in text and "GFLOP per device" in text
    assert "MFU omitted" in text  # CPU: no peak
    out = steps.throughput(2.0)
    assert out["flops_per_sec"] == pytest.approx(2 * next(iter(steps.flops.values())) / 2.0)
    assert "mfu" not in out
    steps.kind = "TPU v4"  # a kind with a peak: MFU = FLOPs/s over 275 TFLOP/s
    steps.window_flops = 550e12
    assert steps.throughput(1.0)["mfu"] == pytest.approx(2.0)


@pytest.mark.slow
def test_benchmark_scripts_compare_the_same_function(tmp_path):
    """vs_diffusers builds both models from one config with equal parameter counts and the same
    weights (forward and the CFG sampling loop agree); mfu.py --smoke runs the real train step."""
    import importlib.util

    torch = pytest.importorskip("torch")
    pytest.importorskip("diffusers")

    def load(name):
        spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / "bench" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    threads = torch.get_num_threads()
    try:
        r = load("vs_diffusers").main(["--size", "tiny", "--iters", "1", "--warmup", "0", "--sample-iters", "1",
                                       "--sample-steps", "3", "--json", str(tmp_path / "vd.json")])
    finally:
        torch.set_num_threads(threads)
    assert r["params_ours"] == r["params_diffusers_distinct"]
    assert r["forward_max_abs_diff"] < 1e-4 and r["sample_max_abs_diff"] < 1e-4
    assert all(r[k]["ours"] > 0 and r[k]["diffusers"] > 0 for k in ("train", "forward", "sample"))
    m = load("mfu").main(["--smoke", "--json", str(tmp_path / "mfu.json")])
    assert m["steps_per_sec"] > 0 and m["model_flops_per_step"] > 0 and m["mfu"] is None  # CPU: no peak
