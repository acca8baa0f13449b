"""The Flax AutoencoderKL against diffusers' PyTorch one (both directions through diffusers folders),
the posterior / scaling conventions, the folder loader's errors, and the MNIST autoencoder trainer."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_parity, load_config

from flagdit_jax.autoencoder import (VAE, AutoencoderKLConfig, config_from_diffusers, init_params, load_vae,
                                     params_from_diffusers, params_to_diffusers, save_folder)
from flagdit_jax.autoencoder import train as ae_train
from flagdit_jax.convert.official import CheckpointMismatch

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = dict(in_channels=3, out_channels=2, block_out_channels=(8, 16), norm_num_groups=4, latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
# (layers_per_block, use_quant_conv, use_post_quant_conv, mid_block_add_attention, scaling, shift)
CASES = {"quant-2layers": (2, True, True, True, 0.18215, None),
         "noquant-sd3-scale": (1, False, False, True, 1.5305, 0.0609),
         "noattn-postquant-only": (1, False, True, False, 0.13025, None)}


def _randomise(model, seed):
    """Every tensor non-trivial: norm weights around 1, everything else (biases, norm biases too) N(0, 0.2)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            is_norm_weight = p.ndim == 1 and "norm" in name and name.endswith("weight")
            p.copy_(1.0 + 0.2 * noise if is_norm_weight else 0.2 * noise)
    return model.eval()


def _nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


_CASE_CACHE = {}


def _torch_case(name, tmp_path_factory):
    """A random diffusers AutoencoderKL saved with save_pretrained, its outputs on a fixed input, and its
    folder (built once per case per session)."""
    if name in _CASE_CACHE:
        return _CASE_CACHE[name]
    layers, quant, post, attn, scale, shift = CASES[name]
    m = _randomise(diffusers.AutoencoderKL(**TINY, layers_per_block=layers, use_quant_conv=quant,
                                           use_post_quant_conv=post, mid_block_add_attention=attn,
                                           scaling_factor=scale, shift_factor=shift), seed=len(name))
    folder = tmp_path_factory.mktemp(name)
    m.save_pretrained(folder)
    x = torch.randn(2, 3, 16, 24, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        post_ = m.encode(x).latent_dist
        dec = m.decode(post_.mean).sample
    _CASE_CACHE[name] = dict(folder=folder, x=_nhwc(x), mean=_nhwc(post_.mean), logvar=_nhwc(post_.logvar),
                             decoded=_nhwc(dec), scale=scale, shift=shift)
    return _CASE_CACHE[name]


@pytest.fixture(params=[pytest.param(name, marks=[pytest.mark.slow] if "noattn" in name else []) for name in CASES])
def torch_case(request, tmp_path_factory):
    return _torch_case(request.param, tmp_path_factory)


@pytest.fixture
def sd3_case(tmp_path_factory):
    """The case with a shift factor (SD3's convention)."""
    return _torch_case("noquant-sd3-scale", tmp_path_factory)


def test_parity_with_diffusers(torch_case):
    vae = load_vae(torch_case["folder"])
    assert vae.downsample == 2 and vae.scaling_factor == pytest.approx(torch_case["scale"])
    mean, logvar = vae.posterior(torch_case["x"])
    assert_parity(mean, torch_case["mean"], err_msg="posterior mean")
    assert_parity(logvar, torch_case["logvar"], err_msg="posterior logvar")
    assert_parity(vae.decode(torch_case["mean"]), torch_case["decoded"], err_msg="decode")
    # diffusers users scale as (z - shift) * scale; the pipeline undoes it before decode.
    shift = torch_case["shift"] or 0.0
    scaled = vae.encode(torch_case["x"])
    assert_parity(scaled, (torch_case["mean"] - shift) * torch_case["scale"], err_msg="scaled latents")
    assert_parity(vae.decode(scaled / vae.scaling_factor + vae.shift_factor), torch_case["decoded"],
                  err_msg="decode of un-scaled latents")


def test_our_folder_loads_in_diffusers(tmp_path):
    cfg = AutoencoderKLConfig(in_channels=1, out_channels=1, block_out_channels=(8, 8, 16), layers_per_block=1,
                              latent_channels=4, norm_num_groups=4, scaling_factor=0.77, shift_factor=0.05,
                              use_quant_conv=True, use_post_quant_conv=False)
    params = init_params(cfg, seed=3)
    rng = np.random.default_rng(4)  # perturb every leaf: no zero bias, no unit norm scale
    params = jax.tree.map(lambda a: np.asarray(a) + 0.2 * rng.standard_normal(a.shape, np.float32), params)
    folder = save_folder(tmp_path / "vae", params, cfg)
    m = diffusers.AutoencoderKL.from_pretrained(folder).eval()
    assert m.config.scaling_factor == pytest.approx(0.77) and m.config.shift_factor == pytest.approx(0.05)
    assert not m.config.use_post_quant_conv and m.post_quant_conv is None
    x = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 1)).astype(np.float32)
    with torch.no_grad():
        post = m.encode(torch.from_numpy(x.transpose(0, 3, 1, 2))).latent_dist
        dec = m.decode(post.mean).sample
    vae = VAE(params, cfg)
    mean, logvar = vae.posterior(x)
    assert_parity(mean, _nhwc(post.mean))
    assert_parity(logvar, _nhwc(post.logvar))
    assert_parity(vae.decode(mean), _nhwc(dec))
    # and back: our loader reads the same numbers
    again = load_vae(folder)
    assert again.config == cfg
    jax.tree.map(np.testing.assert_array_equal, again.params, params)


def test_sample_is_mean_plus_std_eps(sd3_case):
    """encode(sample=True) = (mean + exp(logvar / 2) * eps - shift) * scale with eps = normal(rng)."""
    vae = load_vae(sd3_case["folder"])
    mean, logvar = vae.posterior(sd3_case["x"])
    rng = jax.random.key(7)
    eps = np.asarray(jax.random.normal(rng, mean.shape))
    assert 0.8 < eps.std() < 1.2
    std = np.exp(0.5 * np.asarray(logvar))
    assert np.all((std > 0.05) & (std < 20))  # random weights: a real spread, so eps is visible in the sample
    expected = (np.asarray(mean) + std * eps - sd3_case["shift"]) * sd3_case["scale"]
    np.testing.assert_allclose(vae.encode(sd3_case["x"], sample=True, rng=rng), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(AssertionError):  # and a sample is not the mean
        np.testing.assert_allclose(vae.encode(sd3_case["x"], sample=True, rng=rng), vae.encode(sd3_case["x"]),
                                   atol=1e-3)


def test_deprecated_attention_names_load():
    """Old checkpoints name the mid-block attention query/key/value/proj_attn, some as 1x1 convs."""
    cfg = AutoencoderKLConfig(in_channels=1, out_channels=1, block_out_channels=(8,), norm_num_groups=4)
    sd = params_to_diffusers(init_params(cfg), cfg)
    old = {}
    for k, v in sd.items():
        for new, dep in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            if f"attentions.0.{new}." in k:
                k = k.replace(f".{new}.", f".{dep}.")
                v = v[:, :, None, None] if v.ndim == 2 else v
        old[k] = v
    assert any(".query." in k for k in old)
    back = params_to_diffusers(params_from_diffusers(old, cfg), cfg)
    assert back.keys() == sd.keys()
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k])


def test_bad_inputs(tmp_path, sd3_case):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_vae(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    (tmp_path / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"variant= one of \['fp16'\]"):
        load_vae(tmp_path)
    with pytest.raises(ValueError, match="down_block_types"):
        config_from_diffusers({"block_out_channels": [8, 16], "norm_num_groups": 4,
                               "down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]})
    with pytest.raises(ValueError, match="unknown AutoencoderKL config field"):
        config_from_diffusers({"block_out_channels": [8], "norm_num_groups": 4, "temporal": True})
    with pytest.raises(ValueError, match="norm_num_groups"):
        AutoencoderKLConfig(block_out_channels=(8, 12), norm_num_groups=8)
    cfg = AutoencoderKLConfig(in_channels=1, out_channels=1, block_out_channels=(8, 8), norm_num_groups=4)
    sd = params_to_diffusers(init_params(cfg), cfg)
    sd.pop("decoder.conv_out.bias")
    sd["encoder.conv_in.weight"] = sd["encoder.conv_in.weight"][:4]
    with pytest.raises(CheckpointMismatch, match=r"missing keys: decoder.conv_out.bias.*encoder.conv_in.weight"):
        params_from_diffusers(sd, cfg)
    vae = load_vae(sd3_case["folder"])
    with pytest.raises(ValueError, match=r"expected \[B, H, W, 3\] with H and W positive multiples of 2"):
        vae.encode(np.zeros((1, 15, 16, 3), np.float32))
    with pytest.raises(ValueError, match="needs rng"):
        vae.encode(sd3_case["x"], sample=True)
    with pytest.raises(ValueError, match=r"latents shape \(1, 4, 4\)"):
        vae.decode(np.zeros((1, 4, 4), np.float32))


# ------------------------------------------------------------------------------------------------
# the project's own autoencoder
# ------------------------------------------------------------------------------------------------

def _tiny_config(**overrides):
    base = {"model.block_out_channels": (8, 8), "model.norm_num_groups": 4, "data.canvases": ((16, 16),),
            "data.canvas_weights": (1,), "data.digit_size": (10, 16), "train.steps": 150, "train.batch": 8,
            "train.warmup_steps": 10, "train.log_every": 25, "scaling.num_images": 32, "eval.classifier": False}
    return load_config(ROOT / "configs/autoencoder/mnist.py", **{**base, **overrides})


def _save_and_reload(params, cfg, config, workdir, history=()):
    """save_trained -> load_vae; checks config.json and that the folder gives our outputs exactly."""
    path = ae_train.save_trained(params, cfg, config, workdir, history=history)
    report = json.loads((workdir / "autoencoder.json").read_text())
    saved = json.loads((path / "config.json").read_text())
    assert saved["_class_name"] == "AutoencoderKL" and saved["in_channels"] == 1 and saved["latent_channels"] == cfg.latent_channels
    assert saved["scaling_factor"] == pytest.approx(1.0 / report["latents"]["latent_std"])
    vae = load_vae(path)
    x = ae_train.canvases(jax.random.key(0), ae_train.digits("eval"), 32, (16, 16), (10, 16))
    ours = VAE(params, vae.config)
    z = vae.encode(x, sample=True, rng=jax.random.key(2))
    np.testing.assert_array_equal(z, ours.encode(x, sample=True, rng=jax.random.key(2)))
    np.testing.assert_array_equal(vae.decode(z), ours.decode(z))
    assert 0.7 < float(jnp.std(z)) < 1.4  # scaled latents have about unit std: what scaling_factor is for
    return report


@pytest.mark.slow
def test_saved_folder_loads_back(tmp_path):
    config = _tiny_config()
    cfg = ae_train.model_config(config)
    report = _save_and_reload(init_params(cfg, seed=5), cfg, config, tmp_path)
    assert report["latents"]["num_images"] == 32 and "reconstruction" not in report


@pytest.mark.slow
def test_trainer_lowers_loss(tmp_path):
    config = _tiny_config()
    params, cfg, history = ae_train.train(config, progress=False)
    assert history[-1]["step"] == config.train.steps
    assert history[-1]["rec"] < 0.6 * history[0]["rec"], history
    _save_and_reload(params, cfg, config, tmp_path, history)


def test_canvases_hold_one_resized_digit():
    pool = ae_train.digits("train")[:50]
    x = np.asarray(ae_train.canvases(jax.random.key(0), pool, 16, (32, 64), (16, 28)))
    assert x.shape == (16, 32, 64, 1) and x.min() >= -1 and x.max() <= 1
    for img in x[..., 0]:
        ys, xs = np.nonzero(img > -0.9)  # the digit's ink lies in a square of at most 28 px
        assert len(ys) > 0 and np.ptp(ys) < 28 and np.ptp(xs) < 28
        assert np.mean(img <= -0.99) > 0.6  # mostly background


def test_trainer_config_errors():
    with pytest.raises(ValueError, match="config.train.loss"):
        ae_train.validate(_tiny_config(**{"train.loss": "lpips"}))
    with pytest.raises(ValueError, match="canvas 16x21 must .* multiple of the downsample factor 2"):
        ae_train.validate(_tiny_config(**{"data.canvases": ((16, 21),)}))
    with pytest.raises(ValueError, match="grayscale"):
        ae_train.validate(_tiny_config(**{"model.in_channels": 3}))


@pytest.mark.slow
def test_train_autoencoder_end_to_end(tmp_path):
    """The whole entry point at a tiny size with the classifier check; diffusers loads what it saves."""
    config = _tiny_config(**{"train.steps": 60, "data.canvases": ((32, 32), (32, 64)), "data.canvas_weights": (1, 1),
                             "data.digit_size": (16, 28), "eval.classifier": True, "eval.classifier_steps": 100})
    path = ae_train.train_autoencoder(config, tmp_path)
    report = json.loads((tmp_path / "autoencoder.json").read_text())
    r = report["reconstruction"]
    assert r["n"] == 500 and 0 <= r["accuracy_reconstructed"] <= 1 and r["accuracy_original"] > 0.5
    m = diffusers.AutoencoderKL.from_pretrained(path)
    assert m.config.scaling_factor == pytest.approx(report["latents"]["scaling_factor"])
