"""flagdit_jax.eval: FID formula, the MNIST feature classifier and its cache, baselines, input checks.

One short (300-step) classifier training is shared by the whole module through a cached workdir,
which is also what the caching tests check.
"""

import json
import time

import numpy as np
import pytest

from flagdit_jax.eval import classifier as clf
from flagdit_jax.eval import fid
from flagdit_jax.eval import mnist_eval

TEST_STEPS = 300
METHODS = ["eigh"] + (["scipy"] if fid._sl is not None else [])


# ---------------------------------------------------------------- FID formula

@pytest.mark.parametrize("method", METHODS + ["auto"])
def test_frechet_distance_analytic_diagonal(method):
    rng = np.random.default_rng(0)
    d = 16
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
    got = fid.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2), method=method)
    np.testing.assert_allclose(got, want, rtol=1e-9)


@pytest.mark.parametrize("method", METHODS)
def test_frechet_distance_zero_and_symmetric(method):
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(400, 8)), rng.normal(size=(300, 8)) @ rng.normal(size=(8, 8)) + 0.5
    mu1, s1 = fid.statistics(a)
    mu2, s2 = fid.statistics(b)
    assert mu1.dtype == s1.dtype == np.float64 and s1.shape == (8, 8)
    assert fid.frechet_distance(mu1, s1, mu1, s1, method=method) == pytest.approx(0.0, abs=1e-9)
    d12 = fid.frechet_distance(mu1, s1, mu2, s2, method=method)
    d21 = fid.frechet_distance(mu2, s2, mu1, s1, method=method)
    assert d12 > 1.0
    np.testing.assert_allclose(d12, d21, rtol=1e-8)


@pytest.mark.skipif(fid._sl is None, reason="scipy not installed")
def test_scipy_and_eigh_agree_full_and_rank_deficient():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(200, 32)), rng.normal(size=(200, 32)) * 1.5 + 0.2
    b_low = rng.normal(size=(20, 32))  # N < D: rank-deficient covariance (like class-mean images)
    for x, y in ((a, b), (a, b_low)):
        got_s = fid.fid_from_features(x, y, method="scipy")
        got_e = fid.fid_from_features(x, y, method="eigh")
        np.testing.assert_allclose(got_s, got_e, rtol=1e-6)


def test_fid_bad_input():
    with pytest.raises(ValueError, match="covariances"):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))
    with pytest.raises(ValueError, match="equal D"):
        fid.fid_from_features(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="N=1"):
        fid.statistics(np.zeros((1, 3)))
    with pytest.raises(ValueError, match="'bogus'"):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(3), method="bogus")


# ---------------------------------------------------------------- classifier and cache

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(workdir, params, info, seconds) of a first `load_or_train`, which trains."""
    workdir = tmp_path_factory.mktemp("eval")
    t0 = time.perf_counter()
    params, info = clf.load_or_train(workdir, steps=TEST_STEPS, seed=0)
    return workdir, params, info, time.perf_counter() - t0


def test_digit_splits():
    x_tr, y_tr = clf.digits("train")
    x_ev, y_ev = clf.digits("eval")
    assert x_tr.shape == (4500, 32, 32, 1) and x_ev.shape == (500, 32, 32, 1) and x_ev.dtype == np.float32
    assert np.bincount(y_ev).tolist() == [50] * 10 and np.bincount(y_tr).tolist() == [450] * 10
    assert x_ev.min() == -1.0 and x_ev.max() == 1.0
    assert np.all(x_ev[:, :2] == -1.0) and np.all(x_ev[:, :, -2:] == -1.0)  # 2-px background pad
    # The classifier's held-out digits are exactly the generator's held-out digits.
    from flagdit_jax.data import mnist

    np.testing.assert_array_equal(x_ev, mnist.load_split("eval")[0])
    assert not set(mnist.split_indices("train")) & set(mnist.split_indices("eval"))


@pytest.mark.slow
def test_classifier_accuracy(trained):
    _, params, info, _ = trained
    assert not info["loaded"] and info["steps"] == TEST_STEPS
    assert info["heldout_accuracy"] > 0.90, info
    x_ev, y_ev = clf.digits("eval")
    assert clf.accuracy(params, x_ev, y_ev) == pytest.approx(info["heldout_accuracy"])
    lg, ft = clf.logits(params, x_ev[:7]), clf.features(params, x_ev[:7])
    assert lg.shape == (7, 10) and ft.shape == (7, clf.FEATURE_DIM)


@pytest.mark.slow
def test_load_or_train_reuses_cache(trained):
    workdir, params, info, train_s = trained
    assert (workdir / "feature_net" / "classifier.json").exists()
    t0 = time.perf_counter()
    params2, info2 = clf.load_or_train(workdir)  # steps=None: whatever is cached
    load_s = time.perf_counter() - t0
    assert info2["loaded"] and info2["heldout_accuracy"] == info["heldout_accuracy"]
    assert load_s < train_s / 3, (load_s, train_s)
    for a, b in zip(*(map(np.asarray, __import__("jax").tree.leaves(p)) for p in (params, params2))):
        np.testing.assert_array_equal(a, b)
    assert clf.load_or_train(workdir, steps=TEST_STEPS, seed=0)[1]["loaded"]


@pytest.mark.slow
def test_load_or_train_retrains_on_other_settings(tmp_path, monkeypatch):
    calls = []
    real = clf.train_classifier

    def spy(*args, **kwargs):
        calls.append(kwargs["steps"])
        return real(*args, **kwargs)

    monkeypatch.setattr(clf, "train_classifier", spy)
    assert not clf.load_or_train(tmp_path, steps=2)[1]["loaded"]
    assert clf.load_or_train(tmp_path)[1]["loaded"]
    assert not clf.load_or_train(tmp_path, steps=3)[1]["loaded"]  # explicit mismatch: replaced
    assert json.loads((tmp_path / "feature_net" / "classifier.json").read_text())["steps"] == 3
    assert calls == [2, 3]
    with pytest.raises(ValueError, match="steps"):
        clf.load_or_train(tmp_path, steps=0)


# ---------------------------------------------------------------- evaluate / baselines

@pytest.mark.slow
def test_real_digits_accuracy_and_shuffled_labels(trained):
    workdir = trained[0]
    x_ev, y_ev = clf.digits("eval")
    r = mnist_eval.evaluate(workdir, x_ev, y_ev)
    assert r["accuracy"] > 0.9 and r["n"] == 500 and r["n_reference"] == 500
    assert r["fid"] == pytest.approx(0.0, abs=1e-6)  # identical to the reference set
    assert all(v > 0.7 for v in r["per_class_accuracy"].values())
    shuffled = np.random.default_rng(0).permutation(y_ev)
    r_sh = mnist_eval.evaluate(workdir, x_ev, shuffled)
    assert 0.03 < r_sh["accuracy"] < 0.2
    # The samplers' single-frame layout [N, 1, 32, 32, 1] is accepted; absent classes -> None.
    r5 = mnist_eval.evaluate(workdir, x_ev[y_ev < 5][:, None], y_ev[y_ev < 5])
    assert r5["per_class_accuracy"]["9"] is None and r5["per_class_count"]["0"] == 50


@pytest.mark.slow
def test_baselines_order(trained, tmp_path):
    workdir = trained[0]
    b = mnist_eval.baselines(workdir, n=500, seed=0)
    floor, noise, mean = b["real_floor"]["fid"], b["noise"]["fid"], b["class_mean"]["fid"]
    assert 0 < floor < mean < noise, b
    assert floor < 0.2 * mean
    assert b["class_mean"]["accuracy"] >= 0.9  # right class, wrong distribution: why FID is needed
    assert b["real_floor"]["accuracy"] > 0.9 and b["noise"]["accuracy"] < 0.3
    path = mnist_eval.write_report(tmp_path / "sub" / "eval.json", b)
    assert json.loads(path.read_text())["real_floor"]["fid"] == pytest.approx(floor)


@pytest.mark.slow
def test_bad_input_raises(trained):
    workdir = trained[0]
    x_ev, y_ev = clf.digits("eval")
    with pytest.raises(ValueError, match=r"\[N, 32, 32, 1\].*\(10, 28, 28\)"):
        mnist_eval.evaluate(workdir, np.zeros((10, 28, 28)), np.zeros(10, int))
    with pytest.raises(ValueError, match=r"\(20,\).*\(19,\)"):
        mnist_eval.evaluate(workdir, x_ev[:20], y_ev[:19])
    with pytest.raises(ValueError, match=r"0\.\.9.*\[0, 10\]"):
        mnist_eval.evaluate(workdir, x_ev[:3], np.array([0, 1, 10]))
    with pytest.raises(ValueError, match="integers"):
        mnist_eval.evaluate(workdir, x_ev[:3], np.array([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="255"):
        mnist_eval.evaluate(workdir, (x_ev[:3] + 1) * 127.5, y_ev[:3])
    with pytest.raises(ValueError, match="non-finite"):
        mnist_eval.evaluate(workdir, np.full((3, 32, 32, 1), np.nan, np.float32), y_ev[:3])
    with pytest.raises(ValueError, match="N=1"):
        mnist_eval.evaluate(workdir, x_ev[:1], y_ev[:1])
    with pytest.raises(ValueError, match="4501"):
        mnist_eval.baselines(workdir, n=4501)
    with pytest.raises(ValueError, match="'test'"):
        clf.digits("test")
