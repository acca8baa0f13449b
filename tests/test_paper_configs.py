"""experiments/paper_configs.py and the DiT-XL/2 / SiT-XL/2 baseline configs: every paper config
loads and validates on the 8 fake devices, its parameter count is REFERENCE.md §2's, and (slow) the
script's AOT-compile path, its FLOP count and its driver run on a tiny override of one config."""

import importlib.util
import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from flagdit_jax import train
from flagdit_jax.models import registry

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("paper_configs", ROOT / "experiments" / "paper_configs.py")
pc = importlib.util.module_from_spec(_spec)
sys.modules["paper_configs"] = pc  # dataclasses look their module up while the file executes
_spec.loader.exec_module(pc)

# REFERENCE.md §2 as written there (the paper / official-code counts), independent of registry.py.
REFERENCE_MD = {"flagdit-600m": 0.61e9, "flagdit-3b": 4.24e9, "flagdit-7b": 7.29e9, "nextdit-600m": 0.56e9,
                "nextdit-2b": 1.76e9, "nextdit-3b": 4.04e9, "nextdit-7b": 7.03e9, "dit-xl-2": 675e6,
                "sit-xl-2": 675e6, "lumina-t2i-5b-256": 5.05e9, "lumina-t2i-5b-512": 5.05e9,
                "lumina-t2i-5b-1024": 5.05e9, "lumina-next-2b": 1.63e9}
TINY = {"model.dim": 64, "model.n_layers": 2, "model.n_heads": 4, "global_batch": 16}

# Issue #14 rows: the papers' video / multi-view shapes (nominal "2B", known second-hand) and the released
# audio models (counted from the official FlagDiTv2 constructor). name -> (reference, relative tolerance,
# tokens per sample, global batch, mesh on 8 devices).
MODALITY = {
    "lumina-t2v-2b-512": (2e9, 0.1, 32 * (32 * 33 + 1), 1024, (1, 8, 1, 1)),
    "lumina-t2v-2b-720p": (2e9, 0.1, 131_072, 128, (1, 1, 8, 1)),
    "lumina-t2mv-2b-256": (2e9, 0.1, 12 * (16 * 17 + 1), 64, (1, 8, 1, 1)),
    "lumina-t2mv-2b-512": (2e9, 0.1, 12 * (32 * 33 + 1), 16, (1, 2, 4, 1)),
    "lumina-t2audio": (197_940_244, 1e-5, 256, 64, (1, 8, 1, 1)),
    "lumina-t2music": (197_940_244, 1e-5, 256, 64, (1, 8, 1, 1)),
}


def test_the_script_covers_every_paper_config():
    assert set(pc.PAPER_CONFIGS) == set(REFERENCE_MD) | set(MODALITY)
    for name, c in pc.PAPER_CONFIGS.items():
        if name in MODALITY:
            assert c.reference_params == MODALITY[name][0] and c.reference_source and not c.reference_key, name
            continue
        assert registry.REFERENCE_PARAMS[c.reference_key] == REFERENCE_MD[name], name
        assert c.reference() == REFERENCE_MD[name]
    with pytest.raises(ValueError, match="exactly one of"):
        pc.PaperConfig("configs/t2v/lumina_t2v.py", "512", "flagdit-3b", "both", reference_params=2e9)
    with pytest.raises(ValueError, match="unknown paper config"):
        pc.load_config("flagdit-2b")
    with pytest.raises(ValueError, match="not paper configs"):
        pc.parse(["--only", "flagdit-600m,nope"])
    with pytest.raises(ValueError, match="--devices"):
        pc.parse(["--devices", "8,x"])


@pytest.mark.parametrize("name", list(REFERENCE_MD))
def test_paper_config_loads_validates_and_counts_reference_params(name):
    c = pc.load_config(name, {"model.scan_layers": True})  # same count, a faster eval_shape
    train.validate(c)  # on the 8 fake devices
    cfg = train.model_config(c)
    assert abs(registry.count_params(cfg) / REFERENCE_MD[name] - 1) < 0.01, name  # REFERENCE.md rounds to 3 digits
    ddp = name.startswith(("dit", "sit"))
    assert train.mesh_shape(c) == ((8, 1, 1, 1) if ddp else (1, 8, 1, 1))  # DDP vs the reference's FSDP
    expected_len = {"lumina-t2i-5b-256": 288, "lumina-t2i-5b-512": 1088, "lumina-t2i-5b-1024": 4224,
                    "lumina-next-2b": 4096}.get(name, 256)  # official max_seq_len; ImageNet 16x16 patches
    assert pc.seq_len(c, cfg) == expected_len


def test_dit_and_sit_are_their_papers_recipes():
    for name in ("dit-xl-2", "sit-xl-2"):
        c = pc.load_config(name)
        cfg = train.model_config(c)
        assert type(cfg).__name__ == "DiTConfig"
        assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.patch_size, cfg.dtype) == (1152, 28, 16, 2, "float32")
        assert (c.optim.lr, c.optim.weight_decay, c.global_batch, c.ema_decay, cfg.class_dropout_prob) == \
            (1e-4, 0.0, 256, 0.9999, 0.1)
        assert c.data.name == "latents" and c.data.image_size == 32 and c.data.options.scale == 0.18215
    assert dict(pc.load_config("sit-xl-2").flow) == dict(path="linear", time_sampler="uniform", prediction="velocity")
    assert dict(pc.load_config("dit-xl-2").flow) == dict(path="vp", time_sampler="uniform", prediction="noise")
    # VP's beta range is DDPM's linear schedule (1e-4..0.02 over 1000 steps) in continuous time.
    from flagdit_jax.flow import paths

    vp = paths.get_path("vp")
    assert (vp.sigma_min, vp.sigma_max) == pytest.approx((1000 * 1e-4, 1000 * 0.02))
    for f in ("dit", "sit"):
        spec = importlib.util.spec_from_file_location("c", ROOT / f"configs/imagenet/{f}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        with pytest.raises(ValueError, match="the only size"):
            mod.get_config("l2")


@pytest.mark.slow
def test_compile_path_on_8_fake_devices_tiny():
    """The script's AOT compile of a tiny flagdit-600m: argument bytes are the per-device state
    shards plus the batch shard (not the replicated state); the XLA FLOP count covers the analytic matmul count."""
    row = pc.measure_compile("flagdit-600m", TINY)
    assert row["devices"] == 8 and row["mesh_shape"] == [1, 8, 1, 1] and row["attention"] == "xla"
    c = pc.load_config("flagdit-600m", dict(TINY, **{"model.scan_layers": True}))
    s = pc._setup(c)
    batch = pc.abstract_batch(s, 256)
    batch_bytes = sum(np.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(batch))
    state = sum(train.state_bytes(s.abstract_state).values())
    state += sum(np.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize
                 for a in (s.abstract_state.step, s.abstract_state.rng))
    # up to padding of unevenly split arrays (the 1001-row class table over 8 shards)
    assert row["argument_bytes"] == pytest.approx(state + batch_bytes, rel=0.01)
    assert row["total_bytes"] == row["argument_bytes"] + row["output_bytes"] + row["temp_bytes"] - row["alias_bytes"]
    f = pc.measure_flops("flagdit-600m", TINY)
    assert (f["global_batch"], f["seq_len"], f["tokens"]) == (16, 256, 16 * 256)
    assert f["params"] == registry.count_params(train.model_config(c))
    # matmuls are a subset of what XLA counts; element-wise work of a 64-wide model adds < 2x
    assert f["analytic_model_flops"] <= f["xla_flops_total"] < 2 * f["analytic_model_flops"]


@pytest.mark.slow
def test_script_end_to_end_resumes(tmp_path):
    out = tmp_path / "pc"
    cmd = [sys.executable, str(ROOT / "experiments" / "paper_configs.py"), "--devices", "8", "--only", "sit-xl-2",
           "--out", str(out), "--overrides", json.dumps(TINY)]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    doc = json.loads(out.with_suffix(".json").read_text())
    entry = doc["results"]["sit-xl-2"]
    assert entry["compile"]["8"]["mesh_shape"] == [8, 1, 1, 1] and entry["flops"]["reference_params"] == 675e6
    assert "| sit-xl-2 |" in out.with_suffix(".md").read_text()
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)  # resumes: nothing to do
    assert run.returncode == 0 and "fake devices:" not in run.stdout
    assert len(json.loads(out.with_suffix(".json").read_text())["runs"]) == 1  # a redraw is not a run


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dit", "sit"])
def test_baseline_configs_train_on_latents(tmp_path, name):
    """`flagdit train` runs configs/imagenet/{dit,sit}.py on ArrayRecord latents (tiny override), and
    `flagdit sample` samples both (DiT's noise prediction through its velocity on the VP path)."""
    from flagdit_jax.data import latents

    rng = np.random.default_rng(0)
    latents.write_latents(str(tmp_path / "lat" / "train"), rng.standard_normal((32, 8, 8, 4)).astype(np.float32),
                          rng.integers(0, 4, 32), num_shards=2)
    small = ["--config.model.dim=32", "--config.model.n_layers=2", "--config.model.n_heads=4",
             "--config.model.num_classes=4", "--config.model.input_size=8", "--config.data.image_size=8",
             "--config.data.worker_count=0", "--config.global_batch=8", "--config.total_steps=2",
             "--config.checkpoint.every_steps=2", f"--config.data.options.data_dir={tmp_path / 'lat'}",
             "--config.sample.method=euler" if name == "sit" else "--config.sample.num_steps=3",
             "--config.sample.num_steps=3"]
    cli = [sys.executable, "-m", "flagdit_jax.cli"]
    run = subprocess.run(cli + ["train", "--config", f"{ROOT}/configs/imagenet/{name}.py", "--workdir",
                                str(tmp_path / "w"), *small], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "w" / "checkpoints" / "2").exists()
    run = subprocess.run(cli + ["sample", "--workdir", str(tmp_path / "w")], capture_output=True, text=True,
                         cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    assert np.isfinite(np.load(tmp_path / "w" / "samples_2.npz")["latents"]).all()


def test_driver_keeps_an_interrupted_workers_rows(tmp_path, monkeypatch):
    """Rows a killed run's worker wrote (OUT.N.jsonl) are merged and not measured again; the tables
    show them."""
    row = dict(name="sit-xl-2", devices=8, mesh_shape=[8, 1, 1, 1], scan_layers=True, attention="xla",
               state_bytes_per_device=800, state_bytes_even_split=100.0, compile_s=1.0, argument_bytes=2**30,
               output_bytes=2**30, temp_bytes=2**31, alias_bytes=2**30, total_bytes=2**32,
               compiled_flops_per_device=1.0, compiled_has_loops=True, wall_s=1.0,
               flops=dict(params=674834720, reference_params=675e6, global_batch=256, seq_len=256, caption_len=0,
                          tokens=65536, xla_flops_total=3e17, six_n_t=2.65e17, ratio_to_6nt=1.13,
                          analytic_model_flops=2.9e17, dtype="float32", remat="none"))
    (tmp_path / "pc.8.jsonl").write_text(json.dumps(row) + "\n")
    monkeypatch.setattr(pc, "run_device_count", lambda *a, **k: pytest.fail("nothing should be re-measured"))
    doc = pc.main(["--devices", "8", "--only", "sit-xl-2", "--out", str(tmp_path / "pc")])
    assert doc["results"]["sit-xl-2"]["compile"]["8"]["total_bytes"] == 2**32
    assert not (tmp_path / "pc.8.jsonl").exists()
    md = (tmp_path / "pc.md").read_text()
    assert "| sit-xl-2 | SiT baseline (ImageNet 256) | 0.675B | 0.675B | 256 x 256 | 300.00 PF |" in md
    assert "(8, 1, 1, 1) xla | 8.00x | 1.00 / 1.00 / 2.00 / **4.00** |" in md


def _config_module(path: str):
    spec = importlib.util.spec_from_file_location("c", ROOT / path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_audio_reference_count_is_the_official_constructor():
    """configs/t2speech/lumina_t2speech.py: reference_params() (the FlagDiTv2 constructor, by hand) equals
    the script's constant, and our model is that count plus its one [PAD] vector (the official audio model
    has no [PAD]); both tasks share one trunk."""
    mod = _config_module("configs/t2speech/lumina_t2speech.py")
    assert mod.reference_params() == pc._AUDIO_PARAMS == MODALITY["lumina-t2audio"][0]
    c = pc.load_config("lumina-t2audio", {"model.scan_layers": True})
    cfg = train.model_config(c)
    assert registry.count_params(cfg) == mod.reference_params() + cfg.dim
    assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.patch_size, cfg.in_channels, cfg.cap_feat_dim) == \
        (768, 16, 32, 1, 20, 1024)
    assert not cfg.qk_norm and not cfg.learn_sigma and not cfg.nextline and cfg.ffn_hidden == 2048
    assert pc.caption_length(c) == 154 and pc.caption_length(pc.load_config("lumina-t2music")) == 77
    with pytest.raises(ValueError, match="expected one of"):
        mod.get_config("speech")


@pytest.mark.parametrize("name", list(MODALITY))
def test_modality_config_loads_validates_and_counts(name):
    ref, tol, length, batch, mesh = MODALITY[name]
    c = pc.load_config(name, {"model.scan_layers": True})
    train.validate(c)  # on the 8 fake devices
    cfg = train.model_config(c)
    assert abs(registry.count_params(cfg) / ref - 1) < tol, name
    assert pc.seq_len(c, cfg) == length and c.global_batch == batch and train.mesh_shape(c) == mesh
    if name.startswith(("lumina-t2v", "lumina-t2mv")):
        assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.nextline, cfg.nextframe) == (2304, 24, 32, True, True)
    # the sample the batch is built from packs to the bucket (T2V 720p: 35 frames under the 128K cap)
    from flagdit_jax import tokens as tok

    real = tok.seq_len(pc.frame_shape(c), *tok.layout_of(cfg))
    assert real <= length and (real == length or name == "lumina-t2v-2b-720p")
    if name == "lumina-t2v-2b-720p":
        assert pc.frame_shape(c) == (35, 90, 160) and real == 127_610 and 36 * real // 35 > length


def test_frame_shape_checks_and_abstract_batch_frames():
    """A config's frame_shape is the packed element (frames, [nextline] / [nextframe] layout), refused when it
    does not fit the bucket; a missing frame_shape is one square image_size frame."""
    c = pc.load_config("lumina-t2mv-2b-256", TINY)
    s = pc._setup(c)
    batch = pc.abstract_batch(s, pc.seq_len(c, s.model_cfg))
    assert batch["tokens"].shape == (16, 3276, 16) and batch["kind"].shape == (16, 3276)
    c.data.frame_shape = (13, 32, 32)
    with pytest.raises(ValueError, match="more than the bucket"):
        pc.abstract_batch(pc._setup(c), 3276)
    c.data.frame_shape = (12, 32)
    with pytest.raises(ValueError, match="frame_shape"):
        pc.frame_shape(c)
    assert pc.frame_shape(pc.load_config("flagdit-600m")) == (1, 32, 32)
    for path, bad in (("configs/t2v/lumina_t2v.py", "1080p"), ("configs/t2mv/lumina_t2mv.py", "1024")):
        with pytest.raises(ValueError, match="stage must be one of"):
            _config_module(path).get_config(bad)


@pytest.mark.slow
def test_compile_path_of_a_multiframe_config_tiny():
    """The script's AOT compile and FLOP count of a tiny T2MV override: the batch is 3 frames with [nextline] /
    [nextframe] packed to the bucket, the sequence-parallel mesh of the 512 stage compiles, and XLA's count
    covers the analytic matmul count."""
    tiny = dict(TINY, **{"model.cap_feat_dim": 32, "data.frame_shape": (3, 8, 8), "data.buckets": (64,),
                         "text_encoder.max_length": 8})
    row = pc.measure_compile("lumina-t2mv-2b-512", tiny)
    assert row["devices"] == 8 and row["mesh_shape"] == [1, 2, 4, 1] and row["attention"] == "xla"
    f = pc.measure_flops("lumina-t2mv-2b-512", tiny)
    assert (f["global_batch"], f["seq_len"], f["caption_len"], f["tokens"]) == (16, 64, 8, 16 * 64)
    assert f["reference_params"] == 2e9
    assert f["analytic_model_flops"] <= f["xla_flops_total"] < 2 * f["analytic_model_flops"]
