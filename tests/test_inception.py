"""flagdit_jax.eval.inception against the PyTorch references of the FID Inception-v3 with random
weights (no downloads): torch-fidelity's `FeatureExtractorInceptionV3` (the network, all four
outputs, its TF1 resize) and pytorch-fid (`F.interpolate` resize + 2x - 1; its network when
torchvision imports). Default: preprocessing parity and bad input; slow: the full network."""

import importlib
import sys
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from flagdit_jax.eval import inception  # noqa: E402

def _torch_fidelity_module(name):
    """Import `torch_fidelity.<name>`. The package's __init__ imports torchvision (for its CLIP
    extractor), which a CPU-only torch cannot load from PyPI's CUDA wheels; the Inception modules
    themselves need only torch, so without torchvision the package is registered without its __init__."""
    if "torch_fidelity" not in sys.modules:
        tf_spec = importlib.util.find_spec("torch_fidelity")
        if tf_spec is None:
            pytest.skip("torch-fidelity is not installed (pip install --no-deps torch-fidelity)")
        if importlib.util.find_spec("torchvision") is None:
            pkg = types.ModuleType("torch_fidelity")
            pkg.__path__, pkg.__spec__ = list(tf_spec.submodule_search_locations), tf_spec
            sys.modules["torch_fidelity"] = pkg
    return importlib.import_module(f"torch_fidelity.{name}")


def _images(n, h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def _nchw(images):
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


def _close(actual, desired, rtol=1e-5, what=""):
    """|a - d| <= rtol * max|d|: the error bound scales with the reference's magnitude."""
    desired = np.asarray(desired, np.float64)
    scale = max(float(np.abs(desired).max()), 1e-30)
    err = float(np.abs(np.asarray(actual, np.float64) - desired).max())
    assert err <= rtol * scale, f"{what}: max |diff| {err:.3g} > {rtol:g} * max|ref| {scale:.3g}"


# ------------------------------------------------------------------------------------ default tests


@pytest.mark.parametrize("hw", [(256, 256), (64, 64), (512, 384), (17, 300)])
def test_tf1_resize_matches_torch_fidelity(hw):
    tfi = _torch_fidelity_module("interpolate_compat_tensorflow")
    imgs = _images(1, *hw, seed=hw[0])
    ref = tfi.interpolate_bilinear_2d_like_tensorflow1x(_nchw(imgs).float(), size=(299, 299), align_corners=False)
    ref = ((ref - 128) / 128).permute(0, 2, 3, 1).numpy()  # torch-fidelity's normalisation
    ours = np.asarray(inception.preprocess(imgs, resize="tf1"))
    assert ours.shape == (1, 299, 299, 3) and ours.dtype == np.float32
    _close(ours, ref, 1e-6, f"tf1 resize from {hw}")


@pytest.mark.parametrize("hw", [(256, 256), (64, 64), (512, 384), (17, 300)])
def test_pytorch_resize_matches_pytorch_fid(hw):
    # pytorch-fid's InceptionV3.forward on ToTensor() input (x / 255): resize_input then normalize_input.
    imgs = _images(1, *hw, seed=hw[1])
    x = _nchw(imgs).float() / 255.0
    ref = 2 * F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) - 1
    ours = np.asarray(inception.preprocess(imgs, resize="pytorch"))
    _close(ours, ref.permute(0, 2, 3, 1).numpy(), 1e-6, f"pytorch resize from {hw}")


def test_no_resampling_at_299():
    imgs = _images(1, 299, 299)
    x = imgs.astype(np.float32)
    np.testing.assert_array_equal(np.asarray(inception.preprocess(imgs, resize="tf1")), (x - 128) / 128)
    _close(inception.preprocess(imgs, resize="pytorch"), 2 * (x / 255) - 1, 1e-6, "pytorch at 299")


def test_float_input_equals_uint8():
    imgs = _images(1, 40, 50)
    for mode in inception.RESIZE_MODES:
        np.testing.assert_array_equal(np.asarray(inception.preprocess(imgs, resize=mode)),
                                      np.asarray(inception.preprocess(imgs.astype(np.float32), resize=mode)))


def test_bad_input():
    imgs = _images(1, 8, 8)
    with pytest.raises(ValueError, match="resize must be one of"):
        inception.preprocess(imgs, resize="bicubic")
    with pytest.raises(ValueError, match=r"\[N, H, W, 3\]"):
        inception.preprocess(imgs[..., :1])
    with pytest.raises(ValueError, match=r"\[N, H, W, 3\]"):
        inception.preprocess(imgs[0])
    with pytest.raises(ValueError, match="uint8 or float"):
        inception.preprocess(imgs.astype(np.int32))
    with pytest.raises(ValueError, match="not found"):
        inception.load_params("/nonexistent/pt_inception.pth")
    with pytest.raises(ValueError, match="resize must be one of"):
        inception.InceptionFeatures.from_params({}, resize="area")
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        inception.InceptionFeatures.from_params({}, batch_size=0)
    with pytest.raises(ValueError, match="'params' and 'batch_stats'"):
        inception.InceptionFeatures.from_params({"params": {}})


def test_state_dict_errors_name_the_keys():
    shapes = inception.expected_shapes()
    assert len(shapes) == 94 * 5 + 2 and shapes["fc.weight"] == (1008, 2048)
    assert shapes["Mixed_6d.branch1x1.conv.weight"] == (192, 768, 1, 1)
    sd = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
    sd["Mixed_5b.branch1x1.bn.num_batches_tracked"] = np.zeros((), np.int64)  # ignored buffer
    del sd["Mixed_7c.branch_pool.bn.running_var"]
    sd["AuxLogits.fc.weight"] = np.zeros((1000, 768), np.float32)
    sd["fc.bias"] = np.zeros(1000, np.float32)
    with pytest.raises(ValueError) as e:
        inception.params_from_state_dict(sd)
    msg = str(e.value)
    assert "missing keys: ['Mixed_7c.branch_pool.bn.running_var']" in msg
    assert "unexpected keys: ['AuxLogits.fc.weight']" in msg
    assert "fc.bias: got (1000,), expected (1008,)" in msg
    assert "num_batches_tracked" not in msg


# ------------------------------------------------------------------------------- the full network


def random_state_dict(seed=0):
    """Random FID-Inception weights with O(1) activations: He-normal convs (ReLU gain), BN with
    positive running variances and small means, an fc of unit-scale logits."""
    rng = np.random.default_rng(seed)
    sd = {}
    for key, shape in inception.expected_shapes().items():
        if key.endswith("conv.weight"):
            fan_in = int(np.prod(shape[1:]))
            v = rng.normal(0, np.sqrt(2.0 / fan_in), shape)
        elif key.endswith("bn.weight"):
            v = rng.uniform(0.5, 1.5, shape)
        elif key.endswith("bn.bias"):
            v = rng.normal(0, 0.2, shape)
        elif key.endswith("running_mean"):
            v = rng.normal(0, 0.2, shape)
        elif key.endswith("running_var"):
            v = rng.uniform(0.5, 2.0, shape)
        elif key == "fc.weight":
            v = rng.normal(0, 1 / np.sqrt(shape[1]), shape)
        elif key == "fc.bias":
            v = rng.normal(0, 1.0, shape)
        else:
            raise AssertionError(key)
        sd[key] = torch.from_numpy(v.astype(np.float32))
    return sd


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "weights-inception-random.pth"
    sd = random_state_dict()
    torch.save(sd, path)
    return path, sd


def _torch_fidelity_outputs(path, images):
    """torch-fidelity's extractor on `path` (strict load_state_dict: checks our key names and shapes
    too) -> pool, spatial (forward hook on Mixed_6d.branch1x1, NHWC [..., :7] flattened), logits."""
    fe = _torch_fidelity_module("feature_extractor_inceptionv3")
    model = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased", "logits"],
                                           feature_extractor_weights_path=str(path))
    grabbed = {}
    hook = model.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: grabbed.__setitem__("x", o))
    with torch.no_grad():
        pool, unbiased, logits = model(_nchw(images))
    hook.remove()
    spatial = grabbed["x"].permute(0, 2, 3, 1)[..., :7].reshape(len(images), -1)
    return {"pool": pool.numpy(), "spatial": spatial.numpy(), "logits": logits.numpy(),
            "logits_unbiased": unbiased.numpy()}


@pytest.mark.slow
def test_network_matches_torch_fidelity(weights):
    """All four outputs vs torch-fidelity at fp32, from 64x64 images (TF1 resize inside both), through
    `load_params` on the saved .pth and the sharded `InceptionFeatures` (3 images padded to 8)."""
    path, _ = weights
    images = _images(3, 64, 64, seed=1)
    ref = _torch_fidelity_outputs(path, images)
    feats = inception.InceptionFeatures(path, resize="tf1", batch_size=8)
    out = feats(images)
    for k, dim in inception.FEATURE_DIMS.items():
        assert out[k].shape == (3, dim) and out[k].dtype == np.float32, (k, out[k].shape)
        assert 0.05 < np.abs(ref[k]).mean() < 50, f"{k}: random weights give degenerate activations"
        _close(out[k], ref[k], 2e-5, k)  # measured ~1e-6 of max|ref| here
    with pytest.raises(ValueError, match=r"in \[0, 255\]"):
        feats(images.astype(np.float32) * 2.0)
    # 9 images = two batches of 8, the second padded with 7: rows come back in order, padding dropped
    order = np.array([2, 0, 1, 1, 2, 0, 0, 1, 2])
    again = feats(images[order])
    for k in inception.FEATURE_DIMS:
        assert again[k].shape[0] == 9
        _close(again[k], out[k][order], 1e-6, f"{k}, two batches")


@pytest.mark.slow
def test_weight_file_formats_round_trip(weights, tmp_path):
    from safetensors.numpy import save_file

    path, sd = weights
    ref = inception.load_params(path)
    np_sd = {k: v.numpy() for k, v in sd.items()}
    save_file(np_sd, tmp_path / "w.safetensors")
    np.savez(tmp_path / "w.npz", **np_sd)
    leaves = jax_leaves(ref)
    for other in (tmp_path / "w.safetensors", tmp_path / "w.npz"):
        for a, b in zip(leaves, jax_leaves(inception.load_params(other))):
            np.testing.assert_array_equal(a, b)
    # torch layouts -> flax layouts
    np.testing.assert_array_equal(np.asarray(ref["params"]["fc"]["kernel"]), np_sd["fc.weight"].T)
    np.testing.assert_array_equal(np.asarray(ref["params"]["Mixed_6d"]["branch7x7_2"]["conv"]["kernel"]),
                                  np_sd["Mixed_6d.branch7x7_2.conv.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(np.asarray(ref["batch_stats"]["Conv2d_1a_3x3"]["bn"]["var"]),
                                  np_sd["Conv2d_1a_3x3.bn.running_var"])


def jax_leaves(tree):
    import jax

    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


@pytest.mark.slow
def test_pytorch_route_matches_pytorch_fid(weights, monkeypatch):
    """resize='pytorch' + the network vs pytorch-fid's InceptionV3 (pool_3) from 256x256 images.
    pytorch-fid builds on torchvision; where that cannot import (a CPU-only torch cannot load PyPI's
    CUDA torchvision wheel) this skips and the shared graph is covered by the torch-fidelity test."""
    try:
        pfid = importlib.import_module("pytorch_fid.inception")
    except ImportError as e:
        pytest.skip(f"pytorch-fid unavailable: {e}")
    path, sd = weights
    # fid_inception_v3 as is, its URL download replaced by our random state dict (strict load)
    monkeypatch.setattr(pfid, "load_state_dict_from_url", lambda *a, **k: sd)
    model = pfid.InceptionV3([pfid.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    images = _images(2, 256, 256, seed=2)
    with torch.no_grad():
        ref = model(_nchw(images).float() / 255.0)[0].reshape(2, -1).numpy()
    out = inception.InceptionFeatures.from_params(inception.params_from_state_dict(sd), resize="pytorch",
                                                  batch_size=8)(images)
    _close(out["pool"], ref, 2e-5, "pool (pytorch-fid)")
