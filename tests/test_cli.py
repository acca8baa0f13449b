"""`flagdit convert` round trip (golden state dict -> Orbax -> model output) and `flagdit demo` smoke."""

import argparse
import json
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from flagdit_jax import checkpoint, cli, tokens as tok
from flagdit_jax.convert import official
from flagdit_jax.models import registry

from conftest import GOLDEN_DIR as GOLDEN, assert_parity


def _golden(name):
    meta = json.loads((GOLDEN / f"{name}.json").read_text())
    npz = np.load(GOLDEN / f"{name}.npz")
    return meta, npz, {k: npz[k] for k in meta["npz"]["params"]}


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_convert_round_trip_reproduces_official_output(tmp_path, fmt):
    meta, npz, sd = _golden("flagdit_imagenet")
    if fmt == "safetensors":
        src = tmp_path / "model.safetensors"
        save_file(sd, str(src))
    else:
        src = tmp_path / "consolidated.00-of-01.pth"
        torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, src)
    (tmp_path / "args.json").write_text(json.dumps(meta["config"]))
    out = tmp_path / "ckpt"
    scan = fmt == "pth"  # one of the two conversions writes the scanned layout (stacked `layers`)
    assert cli.main(["convert", "--checkpoint", str(src), "--config-json", str(tmp_path / "args.json"),
                     "--output", str(out)] + ["--scan-layers"] * scan) == 0
    params, cfg = checkpoint.load_params(out)
    assert cfg.scan_layers == scan and ("layers" in params) == scan and ("layers_0" in params) != scan
    x = npz["input.forward.x"]
    packed = tok.pack(jnp.asarray(x.transpose(0, 2, 3, 1))[:, None], cfg.patch_size, nextline=False)
    y = registry.build(cfg).apply({"params": params}, packed, jnp.asarray(npz["input.forward.t"]),
                                  y=jnp.asarray(npz["input.forward.y"]))
    got = np.asarray(tok.unpack(y, packed))[:, 0].transpose(0, 3, 1, 2)
    assert_parity(got, npz["output.forward"])
    # A second conversion into the same directory is refused rather than overwriting it.
    with pytest.raises(SystemExit, match="exists and is not empty"):
        cli.main(["convert", "--checkpoint", str(src), "--config-json", str(tmp_path / "args.json"),
                  "--output", str(out)])


def test_convert_refuses_wrong_preset(tmp_path, capsys):
    _, _, sd = _golden("lumina_t2i")
    src = tmp_path / "m.safetensors"
    save_file(sd, str(src))
    # Reported as one `error:` line (exit 1), not a traceback; --debug raises the CheckpointMismatch.
    assert cli.main(["convert", "--checkpoint", str(src), "--preset", "flagdit-tiny",
                     "--output", str(tmp_path / "o")]) == 1
    assert "shape mismatches" in capsys.readouterr().err
    with pytest.raises(official.CheckpointMismatch, match="shape mismatches"):
        cli.main(["convert", "--checkpoint", str(src), "--preset", "flagdit-tiny", "--output", str(tmp_path / "o"),
                  "--debug"])
    assert not (tmp_path / "o").exists()


def test_config_from_model_args_namespace(tmp_path):
    """The official training scripts save an argparse.Namespace as model_args.pth."""
    ns = argparse.Namespace(model="DiT_Llama_5B_patch2", qk_norm=True, image_size=1024, lr=1e-4)
    torch.save(ns, tmp_path / "model_args.pth")
    args = official.load_torch_file(str(tmp_path / "model_args.pth"))
    sd = {"layers.0.attention.wk_y.weight": np.empty((3072, 4096), np.float32),
          "layers.0.attention.wk.weight": np.empty((3072, 3072), np.float32)}
    cfg = official.config_from_official(args, sd)
    assert cfg == registry.get_config("lumina-t2i-5b")
    with pytest.raises(ValueError, match="unknown official model 'DiT_Llama_9B_patch2'"):
        official.config_from_official({"model": "DiT_Llama_9B_patch2"})


@pytest.mark.slow
def test_presets_command(capsys):
    assert cli.main(["presets"]) == 0
    out = capsys.readouterr().out
    assert "flagdit-7b" in out and "7,293,819,936" in out


@pytest.mark.slow
def test_train_sample_eval_smoke(tmp_path):
    """The main job's three commands end to end at a few steps (the full run is in the README)."""
    cfg = str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "default.py")
    wd = str(tmp_path / "run")
    assert cli.main(["train", "--config", cfg, "--workdir", wd, "--config.total_steps=3",
                     "--config.model.dim=32", "--config.model.n_layers=1"]) == 0
    assert cli.main(["sample", "--workdir", wd, "--config.sample.num_steps=2", "--config.sample.per_class=1"]) == 0
    assert (tmp_path / "run" / "samples_3.png").stat().st_size > 0
    # SDE sampling (SiT's Euler–Maruyama) from the command line.
    assert cli.main(["sample", "--workdir", wd, "--config.sample.method=sde", "--config.sample.num_steps=3",
                     "--config.sample.per_class=1"]) == 0
    assert cli.main(["eval", "--workdir", wd, "--config.sample.num_steps=2", "--config.eval.num_samples=20",
                     "--config.eval.batch=20", "--config.eval.classifier_steps=20"]) == 0
    rep = json.loads((tmp_path / "run" / "eval_3.json").read_text())
    assert rep["generated"]["n"] == 20 and np.isfinite(rep["generated"]["fid"])
    assert {"real_floor", "noise", "class_mean"} <= set(rep["baselines"])


@pytest.mark.slow
def test_adm_suite_from_the_command_line(tmp_path, monkeypatch):
    """`flagdit sample --num_samples` -> `flagdit reference` -> `flagdit eval --samples --reference --inception`
    on a tiny run and a random Inception-v3 weights file: the reference made from the samples themselves gives
    FID = sFID ~ 0 and precision = recall = 1."""
    from flagdit_jax.eval import adm, inception

    rng = np.random.default_rng(0)
    weights = {}
    for key, shape in inception.expected_shapes().items():
        if key.endswith("running_var"):
            weights[key] = rng.uniform(0.5, 1.5, shape)
        elif key.endswith(("running_mean", "bias")):
            weights[key] = rng.normal(0, 0.1, shape)
        elif len(shape) == 1:  # BN scale
            weights[key] = rng.uniform(0.8, 1.2, shape)
        else:
            weights[key] = rng.normal(0, 1 / np.sqrt(np.prod(shape[1:])), shape)
    np.savez(tmp_path / "inception.npz", **{k: v.astype(np.float32) for k, v in weights.items()})
    # The eigen route of the Fréchet distance (same value as scipy's sqrtm, checked in test_fid): a 2048-wide
    # sqrtm takes minutes on 2 cores.
    real = adm.evaluate
    monkeypatch.setattr(adm, "evaluate", lambda *a, **k: real(*a, **dict(k, fid_method="eigh")))

    cfg = str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "default.py")
    wd, out = str(tmp_path / "run"), str(tmp_path / "samples")
    assert cli.main(["train", "--config", cfg, "--workdir", wd, "--config.total_steps=2",
                     "--config.model.dim=32", "--config.model.n_layers=1"]) == 0
    assert cli.main(["sample", "--workdir", wd, "--num_samples=16", "--batch=8", f"--output={out}",
                     "--config.sample.num_steps=2"]) == 0
    ref = str(tmp_path / "ref.npz")
    assert cli.main(["reference", "--images", out, "--inception", str(tmp_path / "inception.npz"),
                     "--output", ref]) == 0
    with pytest.raises(SystemExit, match="missing --inception"):
        cli.main(["eval", "--workdir", wd, f"--samples={out}", f"--reference={ref}"])
    assert cli.main(["eval", "--workdir", wd, f"--samples={out}", f"--reference={ref}",
                     f"--inception={tmp_path / 'inception.npz'}"]) == 0
    rep = json.loads((tmp_path / "samples" / "adm_eval.json").read_text())
    assert rep["num_samples"] == 16 and rep["fid"] < 1e-3 and rep["sfid"] < 1e-3
    # Identical sets: P = R = 1 up to float32 round-off of |u|^2 - 2u.v + |v|^2 against k-NN radii, which is
    # not negligible for these near-duplicate samples of a 2-step model (test_adm checks exact 1 on real spreads).
    pool = adm.read_reference(ref).pool
    assert (rep["precision"], rep["recall"]) == adm.precision_recall(pool, pool)
    assert min(rep["precision"], rep["recall"]) >= 0.9 and rep["is"] >= 1.0
    assert rep["is"] == pytest.approx(adm.inception_score(adm.read_reference(ref).logits_unbiased), rel=1e-6)
