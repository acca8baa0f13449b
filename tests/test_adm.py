"""The ADM evaluation suite (eval/adm.py) against analytic answers and the PyTorch reference implementations
(pytorch-fid's calculate_frechet_distance, torch-fidelity's Inception Score and precision / recall), the
reference-batch .npz round trip, and sharded 50K-style sampling (eval/sample_batch.py)."""

import contextlib
import importlib
import sys
import types

import numpy as np
import pytest

from flagdit_jax.eval import adm, fid


@contextlib.contextmanager
def _without_torchvision():
    """Import the reference functions without torchvision (not installed; both packages import it at module
    level but the functions used here need only torch and scipy): stub `torchvision` and
    `pytorch_fid.inception` (the network, unused here) and, for torch-fidelity, the
    package without its __init__ (which loads every feature extractor) and a stub `torch_fidelity.utils`.
    The stubs are removed again so that nothing else sees them."""
    import importlib.util

    added = []

    def stub(name, **attrs):
        if name not in sys.modules:
            m = types.ModuleType(name)
            m.__dict__.update(attrs)
            sys.modules[name] = m
            added.append(name)

    stub("torchvision", __version__="0.0")
    stub("torchvision.transforms")
    # The network module subclasses torchvision's Inception at import; fid_score reads one class attribute.
    stub("pytorch_fid.inception", InceptionV3=types.SimpleNamespace(BLOCK_INDEX_BY_DIM={2048: 3}))
    spec = importlib.util.find_spec("torch_fidelity")
    if spec is None:
        pytest.skip("torch-fidelity not installed (pip install --no-deps torch-fidelity)")
    stub("torch_fidelity", __path__=list(spec.submodule_search_locations))
    stub("torch_fidelity.utils", **{n: None for n in ("extract_featuresdict_from_input_id_cached",
                                                    "create_feature_extractor", "resolve_feature_extractor",
                                                    "resolve_feature_layer_for_metric")})
    try:
        yield
    finally:
        for name in added:
            sys.modules.pop(name, None)


@pytest.fixture(scope="session")
def refs():
    pytest.importorskip("torch")
    pytest.importorskip("pytorch_fid")
    with _without_torchvision():
        fid_score = importlib.import_module("pytorch_fid.fid_score")
        isc = importlib.import_module("torch_fidelity.metric_isc")
        prc = importlib.import_module("torch_fidelity.metric_prc")
    for name in ("pytorch_fid.fid_score", "torch_fidelity.metric_isc",
                 "torch_fidelity.metric_prc", "torch_fidelity.helpers", "torch_fidelity.defaults",
                 "torch_fidelity.deprecations"):
        sys.modules.pop(name, None)  # they were imported against the stubs
    return types.SimpleNamespace(fid=fid_score.calculate_frechet_distance, isc=isc.isc_features_to_metric,
                                 prc=prc.calculate_precision_recall_full)


def _feats(rng, n, d=(48, 40, 30), shift=0.0):
    """Correlated random 'Inception' features: pool [n, d0], spatial [n, d1], logits_unbiased [n, d2]."""
    out = {}
    for key, dim in zip(("pool", "spatial", "logits_unbiased"), d):
        mix = rng.normal(size=(dim, dim)) / np.sqrt(dim)
        out[key] = (rng.normal(size=(n, dim)) @ mix + shift).astype(np.float32)
    out["logits_unbiased"] *= 3.0
    return out


# --------------------------------------------------------------------------- analytic / invariants

def test_fid_of_a_set_with_itself_is_zero_and_pr_is_one():
    rng = np.random.default_rng(0)
    f = _feats(rng, 200)
    with_stats = adm.Reference(*fid.statistics(f["pool"]), *fid.statistics(f["spatial"]), pool=f["pool"])
    out = adm.evaluate(f, with_stats, metrics=("fid", "sfid", "precision", "recall"))
    scale = np.trace(with_stats.sigma)
    assert out["fid"] < 1e-6 * scale and out["sfid"] < 1e-6 * np.trace(with_stats.sigma_s)
    assert out["precision"] == 1.0 and out["recall"] == 1.0


def test_fid_equals_the_gaussian_closed_form():
    # Closed form for commuting covariances: |mu1-mu2|^2 + sum (sqrt(a_i) - sqrt(b_i))^2 in a shared eigenbasis.
    rng = np.random.default_rng(1)
    d = 16
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    a, b = rng.uniform(0.5, 2.0, d), rng.uniform(0.5, 2.0, d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = (q * a) @ q.T, (q * b) @ q.T
    exact = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert fid.frechet_distance(mu1, s1, mu2, s2, method="scipy") == pytest.approx(exact, rel=1e-9)
    # And from samples: with N draws the statistics err by ~1/sqrt(N) relative, so FID by ~ d / N * scale.
    n = 20000
    x1 = rng.normal(size=(n, d)) * np.sqrt(a) @ q.T + mu1
    x2 = rng.normal(size=(n, d)) * np.sqrt(b) @ q.T + mu2
    ref = adm.Reference(*fid.statistics(x2), *fid.statistics(x2))
    got = adm.evaluate({"pool": x1, "spatial": x1}, ref, metrics=("fid",))["fid"]
    assert abs(got - exact) < 6 * (np.sqrt(exact * 4 / n) * np.max(np.sqrt(b)) + 2 * d / n * np.max(a + b))


def test_inception_score_of_uniform_and_one_hot_predictions():
    # Identical predictions: IS = 1. One confident distinct class per sample over K classes: IS = K.
    k = 10
    assert adm.inception_score(np.zeros((50, k))) == pytest.approx(1.0, abs=1e-12)
    logits = np.full((k, k), -1e3) + np.eye(k) * 1e3
    assert adm.inception_score(logits, split_size=k) == pytest.approx(k, rel=1e-9)


def test_precision_recall_against_brute_force_and_blocks():
    """ADM's definition written out with full distance matrices (radius = 4th smallest distance in the own set,
    self included; `<=`), against the blocked, padded JAX version with an odd block size."""
    rng = np.random.default_rng(2)
    ref, smp = rng.normal(size=(90, 8)), rng.normal(size=(70, 8)) * 1.3 + 0.4

    def d2(u, v):
        return ((u[:, None] - v[None]) ** 2).sum(-1)

    r_ref, r_smp = np.sort(d2(ref, ref), 1)[:, 3], np.sort(d2(smp, smp), 1)[:, 3]
    prec = np.mean((d2(smp, ref) <= r_ref[None]).any(1))
    rec = np.mean((d2(ref, smp) <= r_smp[None]).any(1))
    assert 0.2 < prec < 0.99 and 0.2 < rec < 0.99  # not degenerate
    np.testing.assert_allclose(adm.manifold_radii(ref, block=32), r_ref, rtol=1e-5)
    assert adm.precision_recall(ref, smp, block=32) == pytest.approx((prec, rec), abs=1e-12)
    assert adm.precision_recall(ref, smp) == pytest.approx((prec, rec), abs=1e-12)
    # ADM's fp16 distances (emulated) move at most a few points across ball boundaries.
    assert adm.precision_recall(ref, smp, block=32, half=True) == pytest.approx((prec, rec), abs=0.05)


# --------------------------------------------------------------------------------- PyTorch parity

@pytest.mark.filterwarnings("ignore:The `disp` argument is deprecated")
def test_fid_sfid_is_pr_match_the_pytorch_references(refs):
    import torch

    rng = np.random.default_rng(3)
    s, r = _feats(rng, 300), _feats(rng, 260, shift=0.3)
    ref = adm.Reference(*fid.statistics(r["pool"]), *fid.statistics(r["spatial"]), pool=r["pool"])
    out = adm.evaluate(s, ref, split_size=100)
    want_fid = refs.fid(*fid.statistics(s["pool"]), ref.mu, ref.sigma)
    want_sfid = refs.fid(*fid.statistics(s["spatial"]), ref.mu_s, ref.sigma_s)
    # ADM's splits of 100 consecutive samples = torch-fidelity's 3 splits of N // 3 without shuffling.
    want_is = refs.isc(torch.from_numpy(s["logits_unbiased"]), splits=3, shuffle=False)["inception_score_mean"]
    # torch-fidelity: features_1 = generated, features_2 = real; same k-NN (k=3, self counted) and `<=`.
    want_p, want_r = refs.prc(torch.from_numpy(s["pool"]), torch.from_numpy(r["pool"]), 3, 10000)
    assert out["fid"] > 1.0 and out["is"] > 1.5
    assert out["fid"] == pytest.approx(want_fid, rel=1e-4)
    assert out["sfid"] == pytest.approx(want_sfid, rel=1e-4)
    assert adm.evaluate(s, ref, metrics=("fid",), fid_method="eigh")["fid"] == pytest.approx(want_fid, rel=1e-4)
    assert out["is"] == pytest.approx(want_is, rel=1e-4)
    # Equal counts: torch-fidelity takes the mean in float32.
    assert (out["precision"], out["recall"]) == pytest.approx((want_p, want_r), abs=1e-6)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:The `disp` argument is deprecated")
def test_wider_parity_with_the_pytorch_references(refs):
    """2,500 samples: IS on 1008 logits with ADM's split rule at split_size=500 (= 5 torch-fidelity splits),
    P/R on 2048-wide features over 1,000-row blocks (padding, several blocks), FID on 512-wide features
    (scipy's sqrtm of a 2048^2 matrix takes ~100 s on the shared 2-core machine; same code at every width)."""
    import torch

    rng = np.random.default_rng(4)
    s, r = _feats(rng, 2500, (2048, 512, 1008)), _feats(rng, 2600, (2048, 512, 8), shift=0.05)
    # (Pool statistics unused: FID is not asked for.)
    ref = adm.Reference(np.zeros(2048), np.eye(2048), *fid.statistics(r["spatial"]), pool=r["pool"])
    out = adm.evaluate(s, ref, metrics=("sfid", "is", "precision", "recall"), split_size=500, block=1000)
    assert out["sfid"] == pytest.approx(refs.fid(*fid.statistics(s["spatial"]), ref.mu_s, ref.sigma_s), rel=1e-4)
    want_is = refs.isc(torch.from_numpy(s["logits_unbiased"]), splits=5, shuffle=False)["inception_score_mean"]
    assert out["is"] == pytest.approx(want_is, rel=1e-4)
    want = refs.prc(torch.from_numpy(s["pool"]), torch.from_numpy(r["pool"]), 3, 1000)
    assert 0.02 < out["precision"] < 0.999 and 0.02 < out["recall"] < 0.999, (out, want)
    assert (out["precision"], out["recall"]) == pytest.approx(want, abs=1e-6)


# ------------------------------------------------------------------------------- reference batches

def test_reference_round_trip_and_adm_style_files(tmp_path):
    rng = np.random.default_rng(5)
    f = _feats(rng, 40)
    images = rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8)
    path = adm.write_reference(tmp_path / "ref.npz", f, images)
    got = adm.read_reference(path)
    mu, sigma = fid.statistics(f["pool"])
    np.testing.assert_array_equal(got.mu, mu)
    np.testing.assert_array_equal(got.sigma, sigma)
    np.testing.assert_array_equal(got.sigma_s, fid.statistics(f["spatial"])[1])
    for key in adm.FEATURE_KEYS:
        np.testing.assert_array_equal(getattr(got, key), f[key])
    with np.load(path, allow_pickle=False) as z:
        assert set(z.files) == {"arr_0", "mu", "sigma", "mu_s", "sigma_s", *adm.FEATURE_KEYS}
        np.testing.assert_array_equal(z["arr_0"], images)
    np.testing.assert_array_equal(np.concatenate(list(adm.iter_npz_batches(path, "arr_0", 7))), images)

    # ADM's VIRTUAL_*.npz: images and statistics only; the features come from the feature function.
    calls = []

    def feature_fn(x):
        calls.append(len(x))
        idx = x.reshape(len(x), -1)[:, 0].astype(int)  # a fake network: look the features up by first pixel
        lut = {int(images[i, 0, 0, 0]): i for i in range(len(images))}
        rows = [lut[i] for i in idx]
        return {k: f[k][rows] for k in adm.FEATURE_KEYS}

    np.savez(tmp_path / "virtual.npz", arr_0=images, mu=mu, sigma=sigma, mu_s=got.mu_s, sigma_s=got.sigma_s)
    if len(set(images[:, 0, 0, 0].tolist())) == len(images):
        v = adm.read_reference(tmp_path / "virtual.npz", feature_fn, batch=16)
        assert calls == [16, 16, 8]
        np.testing.assert_array_equal(v.pool, f["pool"])
    stats_only = adm.read_reference(tmp_path / "virtual.npz")  # no feature_fn: FID / sFID only
    assert stats_only.pool is None
    with pytest.raises(ValueError, match="precision / recall need"):
        adm.evaluate(f, stats_only)
    assert adm.evaluate(f, stats_only, metrics=("fid",))["fid"] < 1e-6 * np.trace(sigma)


def test_reference_bad_files(tmp_path):
    rng = np.random.default_rng(6)
    np.savez(tmp_path / "partial.npz", mu=np.zeros(3), sigma=np.eye(3))
    with pytest.raises(ValueError, match="mu_s"):
        adm.read_reference(tmp_path / "partial.npz")
    np.savez(tmp_path / "shape.npz", mu=np.zeros(3), sigma=np.eye(4), mu_s=np.zeros(2), sigma_s=np.eye(2))
    with pytest.raises(ValueError, match="pool statistics"):
        adm.read_reference(tmp_path / "shape.npz")
    np.savez(tmp_path / "images.npz", arr_0=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="no feature_fn"):
        adm.read_reference(tmp_path / "images.npz")
    np.savez(tmp_path / "pickled.npz", pool=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="allow_pickle"):
        adm.read_reference(tmp_path / "pickled.npz")
    with pytest.raises(FileNotFoundError):
        adm.read_reference(tmp_path / "missing.npz")
    with pytest.raises(ValueError, match="lacks"):
        adm.write_reference(tmp_path / "x.npz", {"pool": rng.normal(size=(5, 3))})
    f = _feats(rng, 10)
    ref = adm.Reference(*fid.statistics(f["pool"]), *fid.statistics(f["spatial"]), pool=f["pool"])
    with pytest.raises(ValueError, match="width"):
        adm.evaluate({**f, "pool": f["pool"][:, :5]}, ref)
    with pytest.raises(ValueError, match="metrics"):
        adm.evaluate(f, ref, metrics=("kid",))


# --------------------------------------------------------------------------------- sharded sampling

def _tiny_setup(devices: int):
    """A tiny MNIST Flag-DiT on `devices` devices with random params (seeded, so equal on any mesh) pushed away
    from the zero-initialised output layers so that the samples depend on the labels."""
    import pathlib

    import jax

    from conftest import load_config
    from flagdit_jax import train

    root = pathlib.Path(__file__).resolve().parents[1]
    config = load_config(root / "configs" / "default.py", **{
        "model.dim": 32, "model.n_layers": 1, "model.n_heads": 2, "model.multiple_of": 32,
        "mesh.num_devices": devices, "global_batch": 8, "sample.method": "euler", "sample.num_steps": 2})
    s, init = train.setup(config)
    params = train.init_state(s, init).params
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    params = jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])
    return config, (params, s, 0)


@pytest.mark.slow
def test_sharded_samples_match_across_device_counts_and_resume(tmp_path, monkeypatch):
    from flagdit_jax.eval import sample_batch as sb

    config8, ps8 = _tiny_setup(8)
    config1, ps1 = _tiny_setup(1)
    n = 12
    # 8 devices, chunks of 8 (the last one padded); 1 device, chunks of 4.
    f8 = sb.write_samples(config8, None, n, tmp_path / "d8", batch=8, params_and_setup=ps8)
    f1 = sb.write_samples(config1, None, n, tmp_path / "d1", batch=4, params_and_setup=ps1)
    assert f8.name == "samples-00000-of-00001.npz" and not (tmp_path / "d8" / "parts" / f8.stem).exists()
    img8, lab8 = sb.load_samples(tmp_path / "d8")
    img1, lab1 = sb.load_samples(f1)
    assert img8.shape == (n, 32, 32, 3) and img8.dtype == np.uint8
    np.testing.assert_array_equal(img8[..., 0], img8[..., 2])  # grey repeated to 3 channels
    np.testing.assert_array_equal(lab8, np.arange(n) % 10)
    np.testing.assert_array_equal(lab1, lab8)
    # Same samples for the same indices (uint8 truncation may flip a value at a float boundary).
    diff = np.abs(img8.astype(int) - img1.astype(int))
    assert diff.max() <= 1 and np.mean(diff > 0) < 1e-3, (diff.max(), np.mean(diff > 0))
    assert np.std(img8.astype(float)) > 5 and np.abs(img8[0].astype(int) - img8[1].astype(int)).mean() > 2
    with np.load(f8, allow_pickle=False) as z:  # what ADM's evaluator reads
        assert set(z.files) == {"arr_0", "arr_1", "indices"}

    # Resume: the run dies after its first chunk; the rerun samples only the rest and gives the same shard.
    calls = []
    real_save = sb._save_part

    def dying_save(path, *a):
        calls.append(path.name)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        real_save(path, *a)

    monkeypatch.setattr(sb, "_save_part", dying_save)
    with pytest.raises(KeyboardInterrupt):
        sb.write_samples(config1, None, n, tmp_path / "r", batch=4, params_and_setup=ps1)
    calls.clear()
    monkeypatch.setattr(sb, "_save_part", lambda path, *a: (calls.append(path.name), real_save(path, *a)))
    sb.write_samples(config1, None, n, tmp_path / "r", batch=4, params_and_setup=ps1)
    assert calls == ["chunk-000001.npz", "chunk-000002.npz"]
    np.testing.assert_array_equal(sb.load_samples(tmp_path / "r")[0], img1)
    with pytest.raises(ValueError, match="finished run"):
        sb.write_samples(config1, None, n, tmp_path / "r", batch=4, params_and_setup=ps1)
    with pytest.raises(ValueError, match="multiple of the 8 devices"):
        sb.write_samples(config8, None, n, tmp_path / "x", batch=12, params_and_setup=ps8)


def test_load_samples_orders_shards_by_index(tmp_path):
    from flagdit_jax.eval import sample_batch as sb

    imgs = np.arange(6 * 2 * 2 * 3, dtype=np.uint8).reshape(6, 2, 2, 3)
    # Two processes holding interleaved rows, as a 2-host run with one device each writes them.
    for p, rows in enumerate(([0, 2, 4], [1, 3, 5])):
        np.savez(tmp_path / sb.shard_name(p, 2), arr_0=imgs[rows], arr_1=np.array(rows) % 10, indices=np.array(rows))
    got, labels = sb.load_samples(tmp_path)
    np.testing.assert_array_equal(got, imgs)
    np.testing.assert_array_equal(labels, np.arange(6))
    (tmp_path / sb.shard_name(1, 2)).unlink()
    with pytest.raises(ValueError, match="every process"):
        sb.load_samples(tmp_path)


def test_run_adm_and_run_reference_with_a_fake_network(tmp_path):
    """The `flagdit reference` / `flagdit eval` drivers end to end with a fake feature function (a fixed random
    projection of the pixels): a reference made from the samples themselves gives FID ~ 0, P = R = 1, and the
    report lands beside the samples."""
    import json

    from flagdit_jax import evaluate
    from flagdit_jax.eval import sample_batch as sb

    rng = np.random.default_rng(8)
    imgs = rng.integers(0, 256, (40, 4, 4, 3), dtype=np.uint8)
    w = {k: rng.normal(size=(48, d)) for k, d in (("pool", 12), ("spatial", 10), ("logits_unbiased", 6))}

    def fake(x):
        flat = x.reshape(len(x), -1).astype(np.float64) / 255.0
        return {k: (flat @ m).astype(np.float32) for k, m in w.items()}

    for p, rows in enumerate((np.arange(0, 40, 2), np.arange(1, 40, 2))):
        np.savez(tmp_path / sb.shard_name(p, 2), arr_0=imgs[rows], arr_1=rows % 10, indices=rows)
    ref = evaluate.run_reference(tmp_path, tmp_path / "ref.npz", feature_fn=fake, batch=16)
    rep = evaluate.run_adm(None, tmp_path, ref, feature_fn=fake, batch=16)
    assert rep["fid"] < 1e-6 and rep["sfid"] < 1e-6 and rep["precision"] == rep["recall"] == 1.0
    assert rep["is"] == pytest.approx(adm.inception_score(fake(imgs)["logits_unbiased"]), rel=1e-6)
    assert json.loads((tmp_path / "adm_eval.json").read_text())["num_samples"] == 40
    with pytest.raises(ValueError, match="Inception-v3 weights"):
        evaluate.run_adm(None, tmp_path, ref)
