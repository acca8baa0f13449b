"""`flagdit convert` never runs code from a checkpoint, and reports user errors in a line or two.

A `.pth` is a pickle: loading one with `torch.load(weights_only=False)` runs whatever it names. The
payloads here create a marker file when unpickled unsafely (the first test proves they do), so a
marker left behind by `flagdit convert` would mean the hole is open again.
"""

import argparse
import json
import pickle

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from flagdit_jax import checkpoint, cli
from flagdit_jax.convert import official

from conftest import GOLDEN_DIR as GOLDEN


class _Payload:
    """Unpickles as `exec(code)`: creates `marker` (stands for any side effect an attacker wants)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def _golden_flagdit():
    meta = json.loads((GOLDEN / "flagdit_imagenet.json").read_text())
    npz = np.load(GOLDEN / "flagdit_imagenet.npz")
    return meta["config"], {k: npz[k] for k in meta["npz"]["params"]}


@pytest.fixture
def good(tmp_path):
    """A valid official checkpoint (.safetensors) and its constructor arguments (--config-json)."""
    config, sd = _golden_flagdit()
    ckpt, cfg_json = tmp_path / "good.safetensors", tmp_path / "args.json"
    save_file(sd, str(ckpt))
    cfg_json.write_text(json.dumps(config))
    return {"config": config, "sd": sd, "checkpoint": ckpt, "config_json": cfg_json}


def _save_evil(path, marker, kind, *, as_model_args):
    """A .pth carrying the payload: inside a state dict of real tensors or inside a model_args Namespace."""
    if as_model_args:
        obj = argparse.Namespace(model="DiT_Llama_600M_patch2", qk_norm=True, payload=_Payload(marker))
    else:
        obj = {"x_embedder.weight": torch.zeros(64, 16), "x_embedder.bias": torch.zeros(64), "extra": _Payload(marker)}
    if kind == "zip":
        torch.save(obj, path)
    elif kind == "legacy":  # torch < 1.6 format: a bare pickle stream
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    else:  # a plain pickle, no torch framing
        with open(path, "wb") as f:
            pickle.dump(obj, f)


def _assert_one_clean_error(rc, err, *names):
    assert rc != 0
    assert "Traceback" not in err
    assert 1 <= len(err.strip().splitlines()) <= 2, err
    for name in names:
        assert str(name) in err, (name, err)


@pytest.mark.parametrize("kind", ["zip", "legacy", "pickle"])
def test_payload_runs_when_unpickled_unsafely(tmp_path, kind):
    """Control: the payload is live, so its marker staying absent below means nothing ran."""
    marker, path = tmp_path / "PWNED", tmp_path / "evil.pth"
    _save_evil(path, marker, kind, as_model_args=False)
    assert not marker.exists()
    if kind == "pickle":
        with open(path, "rb") as f:
            pickle.load(f)
    else:
        torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("kind", ["zip", "legacy", "pickle"])
@pytest.mark.parametrize("option", ["--checkpoint", "--model-args"])
def test_convert_refuses_pickle_payload_without_running_it(tmp_path, capsys, good, option, kind):
    marker, evil, out = tmp_path / "PWNED", tmp_path / "evil.pth", tmp_path / "out"
    _save_evil(evil, marker, kind, as_model_args=option == "--model-args")
    if option == "--checkpoint":
        argv = ["--checkpoint", str(evil), "--config-json", str(good["config_json"])]
    else:
        argv = ["--checkpoint", str(good["checkpoint"]), "--model-args", str(evil)]
    rc = cli.main(["convert", *argv, "--output", str(out)])
    err = capsys.readouterr().err
    assert not marker.exists(), "the pickle payload ran"
    _assert_one_clean_error(rc, err, evil)
    if kind != "pickle":  # torch.save files name the refused global; a bare pickle is refused as unreadable
        assert "non-tensor objects (exec)" in err and "unsafe" in err and "safetensors" in err
    assert not out.exists()


def test_unsafe_error_is_typed_and_debug_shows_the_traceback(tmp_path, good):
    marker, evil = tmp_path / "PWNED", tmp_path / "evil.pth"
    _save_evil(evil, marker, "zip", as_model_args=False)
    with pytest.raises(official.UnsafeCheckpoint, match="refused as unsafe"):
        official.load_state_dict(str(evil))
    with pytest.raises(official.UnsafeCheckpoint):
        cli.main(["convert", "--checkpoint", str(evil), "--config-json", str(good["config_json"]),
                  "--output", str(tmp_path / "out"), "--debug"])
    assert not marker.exists()


def test_official_model_args_namespace_still_converts(tmp_path, good):
    """A real model_args.pth: the training script's argparse.Namespace saved with torch.save."""
    ns = argparse.Namespace(
        **good["config"],  # the tiny golden model's constructor sizes (official files name `model` instead)
        data_path="/data/imagenet", results_dir="results", image_size=256, max_steps=100_000, global_batch_size=256,
        vae="ema", data_parallel="fsdp", precision="bf16", grad_precision=None, local_diffusers_model_root=None,
        lr=1e-4, auto_resume=True, resume=None, init_from=None, grad_clip=2.0, wd=0.0, snr_type="uniform",
        betas=[0.9, 0.95],
    )
    torch.save(ns, tmp_path / "model_args.pth")
    pth = tmp_path / "consolidated.00-of-01.pth"
    torch.save({k: torch.from_numpy(v) for k, v in good["sd"].items()}, pth)
    out = tmp_path / "ckpt"
    assert cli.main(["convert", "--checkpoint", str(pth), "--model-args", str(tmp_path / "model_args.pth"),
                     "--output", str(out)]) == 0
    params, cfg = checkpoint.load_params(out)
    assert cfg == official.config_from_official(good["config"], good["sd"])
    np.testing.assert_array_equal(params["final_layer"]["linear"]["bias"], good["sd"]["final_layer.linear.bias"])
    assert official.load_model_args(str(tmp_path / "model_args.pth"))["betas"] == [0.9, 0.95]


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


RANDOM = np.random.default_rng(0).bytes(4096)


@pytest.mark.parametrize("case", ["missing checkpoint", "missing model-args", "random .pth", "random .safetensors",
                                  "random model-args", "wrong extension", "bad json", "state dict as model-args"])
def test_convert_user_errors_are_one_clean_line(tmp_path, capsys, good, case):
    ckpt, named = str(good["checkpoint"]), None
    extra = ["--config-json", str(good["config_json"])]
    if case == "missing checkpoint":
        ckpt = named = str(tmp_path / "nope.pth")
    elif case == "missing model-args":
        extra = ["--model-args", named := str(tmp_path / "model_args.pth")]
    elif case == "random .pth":
        ckpt = named = str(_write(tmp_path / "junk.pth", RANDOM))
    elif case == "random .safetensors":
        ckpt = named = str(_write(tmp_path / "junk.safetensors", RANDOM))
    elif case == "random model-args":
        extra = ["--model-args", named := str(_write(tmp_path / "model_args.pth", RANDOM))]
    elif case == "wrong extension":
        ckpt = named = str(_write(tmp_path / "model.ckpt", good["checkpoint"].read_bytes()))
    elif case == "bad json":
        extra = ["--config-json", named := str(_write(tmp_path / "args.json", b"{dim: 64"))]
    else:  # a state dict passed where the Namespace belongs
        torch.save({"w": torch.zeros(2)}, named := str(tmp_path / "weights.pth"))
        extra = ["--model-args", named]
    rc = cli.main(["convert", "--checkpoint", ckpt, *extra, "--output", str(tmp_path / "out")])
    _assert_one_clean_error(rc, capsys.readouterr().err, named)
    assert not (tmp_path / "out").exists()


def test_bad_preset_is_reported_before_the_checkpoint_is_read(tmp_path, capsys, good, monkeypatch):
    def must_not_read(path):
        raise AssertionError(f"read {path} before checking --preset")

    monkeypatch.setattr(official, "load_state_dict", must_not_read)
    rc = cli.main(["convert", "--checkpoint", str(good["checkpoint"]), "--preset", "flagdit-huge-typo",
                   "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    _assert_one_clean_error(rc, err, "--preset", "'flagdit-huge-typo'")
    assert "unknown preset" in err
