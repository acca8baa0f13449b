"""flagdit_jax.data: MNIST split, grain pipeline (determinism, process sharding, exact resume through
Orbax), ImageNet via tfds mock data (ADM centre crop, flips), ArrayRecord latents, input errors."""

import numpy as np
import pytest
from PIL import Image

import grain
from flagdit_jax import data
from flagdit_jax.data import imagenet, latents, mnist, pipeline


def _take(it, k):
    return [next(it) for _ in range(k)]


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])  # bitwise for floats too


@pytest.fixture(scope="module")
def mnist_train():
    return data.get_source("mnist", "train")


@pytest.fixture(scope="module")
def mnist_eval():
    return data.get_source("mnist", "eval")


# ---------------------------------------------------------------- MNIST

def test_mnist_split_sizes_disjoint_balanced(mnist_train, mnist_eval):
    tr, ev = mnist.split_indices("train"), mnist.split_indices("eval")
    assert len(tr) == len(mnist_train) == 4500 and len(ev) == len(mnist_eval) == 500
    assert not set(tr) & set(ev) and len(set(tr) | set(ev)) == 5000
    np.testing.assert_array_equal(np.bincount(mnist_train.labels), [450] * 10)
    np.testing.assert_array_equal(np.bincount(mnist_eval.labels), [50] * 10)
    x, y = mnist.load_split("eval")  # fixed split: same arrays every call
    np.testing.assert_array_equal(x, mnist_eval.images)
    np.testing.assert_array_equal(y, mnist_eval.labels)
    assert x.shape == (500, 32, 32, 1) and x.dtype == np.float32 and y.dtype == np.int32
    assert x.min() == -1.0 and x.max() == 1.0
    assert np.all(x[:, :2] == -1) and np.all(x[:, :, -2:] == -1)  # the 2-pixel padding is background
    e = mnist_train[7]
    assert e["image"].shape == (32, 32, 1) and e["label"].dtype == np.int32


# ---------------------------------------------------------------- pipeline

def test_iterator_deterministic_from_seed(mnist_train):
    kw = dict(global_batch=16, process_index=0, process_count=1)
    a = _take(data.make_iterator(mnist_train, seed=3, **kw), 3)
    b = _take(data.make_iterator(mnist_train, seed=3, read_threads=0, **kw), 3)
    c = _take(data.make_iterator(mnist_train, seed=4, **kw), 3)
    _assert_batches_equal(a, b)
    assert a[0]["image"].shape == (16, 32, 32, 1) and a[0]["label"].shape == (16,)
    assert a[0]["image"].dtype == np.float32 and a[0]["label"].dtype == np.int32
    assert not np.array_equal(a[0]["image"], c[0]["image"])


def test_epochs_cover_source_and_reshuffle(mnist_eval):
    it = data.make_iterator(mnist_eval, global_batch=100, seed=0, num_epochs=2, process_index=0, process_count=1,
                            return_index=True)
    idx = [b["index"] for b in it]  # finite: 2 epochs x 5 steps, then StopIteration
    assert len(idx) == 10
    e0, e1 = np.concatenate(idx[:5]), np.concatenate(idx[5:])
    np.testing.assert_array_equal(np.sort(e0), np.arange(500))
    np.testing.assert_array_equal(np.sort(e1), np.arange(500))
    assert not np.array_equal(e0, e1)  # each epoch has its own order
    seq = next(data.make_iterator(mnist_eval, global_batch=10, seed=0, shuffle=False, process_index=0,
                                  process_count=1, return_index=True))
    np.testing.assert_array_equal(seq["index"], np.arange(10))


def test_process_sharding_partitions_the_global_batch(mnist_train):
    kw = dict(global_batch=8, seed=1, return_index=True)
    single = _take(data.make_iterator(mnist_train, process_index=0, process_count=1, **kw), 6)
    p0 = _take(data.make_iterator(mnist_train, process_index=0, process_count=2, **kw), 6)
    p1 = _take(data.make_iterator(mnist_train, process_index=1, process_count=2, **kw), 6)
    for s, a, b in zip(single, p0, p1):
        assert a["image"].shape == (4, 32, 32, 1) and b["label"].shape == (4,)
        assert not set(a["index"]) & set(b["index"])
        assert set(a["index"]) | set(b["index"]) == set(s["index"])
        # Process p holds the contiguous block p of the single-process batch (where
        # jax.make_array_from_process_local_data puts it in the global array).
        for key in s:
            np.testing.assert_array_equal(s[key][:4], a[key])
            np.testing.assert_array_equal(s[key][4:], b[key])


def test_finite_epochs_same_step_count_on_every_process(mnist_eval):
    # 500 examples, global batch 12 -> 41 steps on both processes (the last 8 examples dropped).
    for p in range(2):
        it = data.make_iterator(mnist_eval, global_batch=12, seed=0, num_epochs=1, process_index=p, process_count=2)
        assert sum(1 for _ in it) == 41


def test_iterator_state_round_trip(mnist_train):
    kw = dict(global_batch=8, seed=5, process_index=1, process_count=2, return_index=True)
    it = data.make_iterator(mnist_train, **kw)
    _take(it, 5)
    state = it.get_state()
    expected = _take(it, 3)
    fresh = data.make_iterator(mnist_train, **kw)
    fresh.set_state(state)
    _assert_batches_equal(_take(fresh, 3), expected)


def test_iterator_state_through_orbax(mnist_train, tmp_path):
    import orbax.checkpoint as ocp

    kw = dict(global_batch=8, seed=2, process_index=0, process_count=1)
    it = data.make_iterator(mnist_train, **kw)
    _take(it, 5)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it),
                                             meta=ocp.args.JsonSave({"step": 5})))
        mngr.wait_until_finished()
    expected = _take(it, 3)
    fresh = data.make_iterator(mnist_train, **kw)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        assert mngr.latest_step() == 5
        restored = mngr.restore(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh),
                                                           meta=ocp.args.JsonRestore()))
    assert restored["data"] is fresh and restored["meta"] == {"step": 5}
    _assert_batches_equal(_take(fresh, 3), expected)



@pytest.mark.slow
def test_worker_processes_give_the_same_batches_and_resume(mnist_train):
    kw = dict(global_batch=8, seed=0, process_index=0, process_count=1, return_index=True)
    want = _take(data.make_iterator(mnist_train, **kw), 6)
    it = data.make_iterator(mnist_train, worker_count=2, **kw)
    try:
        got = [{k: np.array(v) for k, v in b.items()} for b in _take(it, 4)]  # copy out of shared memory
        state = it.get_state()
    finally:
        it.close()
    _assert_batches_equal(got, want[:4])
    it = data.make_iterator(mnist_train, worker_count=2, **kw)
    try:
        it.set_state(state)
        got = [{k: np.array(v) for k, v in b.items()} for b in _take(it, 2)]
    finally:
        it.close()
    _assert_batches_equal(got, want[4:])

# ---------------------------------------------------------------- ImageNet (tfds mock data)

@pytest.fixture(scope="module")
def mock_imagenet():
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=6):
        yield


def test_imagenet_source_shape_and_range(mock_imagenet):
    src = data.get_source("imagenet", "train")
    assert len(src) == 6
    for i in (0, 5):
        e = src[i]
        assert e["image"].shape == (256, 256, 3) and e["image"].dtype == np.float32
        assert -1.0 <= e["image"].min() and e["image"].max() <= 1.0
        assert e["label"].dtype == np.int32 and 0 <= e["label"] < 1000
    assert data.get_source("imagenet", "eval", image_size=32)[0]["image"].shape == (32, 32, 3)


def _gradient(h, w):
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([xx * 255 // (w - 1), yy * 255 // (h - 1), (xx + yy) % 256], -1).astype(np.uint8)


def test_center_crop_matches_direct_computation():
    # 300 x 600 (H x W): no halving (300 < 512); bicubic to 256 x 512; keep columns 128..383.
    arr = _gradient(300, 600)
    want = np.asarray(Image.fromarray(arr).resize((512, 256), resample=Image.BICUBIC))[:, 128:384]
    np.testing.assert_array_equal(imagenet.center_crop_arr(Image.fromarray(arr), 256), want)
    # Portrait 1200 x 600: one BOX halving (600 >= 512) to 600 x 300, bicubic to 512 x 256, rows 128..383.
    arr = _gradient(1200, 600)
    half = Image.fromarray(arr).resize((300, 600), resample=Image.BOX)
    want = np.asarray(half.resize((256, 512), resample=Image.BICUBIC))[128:384]
    np.testing.assert_array_equal(imagenet.center_crop_arr(Image.fromarray(arr), 256), want)
    # The crop is the centre: outer quarters red/blue, middle half green -> a green crop.
    arr = np.zeros((300, 600, 3), np.uint8)
    arr[:, :150, 0] = arr[:, 450:, 2] = arr[:, 150:450, 1] = 255
    crop = imagenet.center_crop_arr(Image.fromarray(arr), 256)
    assert crop.shape == (256, 256, 3)
    assert np.all(crop[:, 2:-2, 1] == 255) and np.all(crop[:, 2:-2, [0, 2]] == 0)


def test_imagenet_flip_deterministic(mock_imagenet):
    src = data.get_source("imagenet", "train", image_size=32)
    n = len(src)
    kw = dict(global_batch=n, num_epochs=4, process_index=0, process_count=1, return_index=True)
    a, b = list(data.make_iterator(src, seed=7, **kw)), list(data.make_iterator(src, seed=7, **kw))
    _assert_batches_equal(a, b)
    assert len(a) == 4
    _, aug_seed = np.random.SeedSequence(7).generate_state(2)
    flips = []
    for epoch, batch in enumerate(a):
        for img, r in zip(batch["image"], batch["index"]):
            plain = src[r]["image"]
            flipped = np.random.default_rng((int(aug_seed), epoch * n + int(r))).random() < 0.5
            np.testing.assert_array_equal(img, plain[:, ::-1] if flipped else plain)
            flips.append(flipped)
    assert any(flips) and not all(flips)
    no_flip = data.get_source("imagenet", "train", image_size=32, random_flip=False)
    batch = next(data.make_iterator(no_flip, seed=7, **kw))
    for img, r in zip(batch["image"], batch["index"]):
        np.testing.assert_array_equal(img, no_flip[r]["image"])


# ---------------------------------------------------------------- latents

def test_latents_array_record_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    z = rng.standard_normal((10, 4, 4, 3)).astype(np.float32)
    y = rng.integers(0, 1000, 10)
    files = data.write_latents(str(tmp_path / "train"), z, y, num_shards=3)
    assert [f.rsplit("/", 1)[1] for f in files] == [f"train-{i:05d}-of-00003.array_record" for i in range(3)]
    src = data.LatentSource(str(tmp_path / "train"), scale=0.5)
    assert len(src) == 10 and src.files == files
    for i in range(10):
        e = src[i]
        assert e["image"].dtype == np.float32 and e["label"].dtype == np.int32
        np.testing.assert_array_equal(e["image"], z[i] * np.float32(0.5))
        assert e["label"] == y[i]
    by_dir = data.get_source("latents", "train", data_dir=str(tmp_path))
    assert by_dir.scale == data.SD_VAE_SCALE
    batch = next(data.make_iterator(by_dir, global_batch=4, seed=0, process_index=0, process_count=1,
                                    return_index=True))
    np.testing.assert_array_equal(batch["image"], z[batch["index"]] * np.float32(data.SD_VAE_SCALE))
    np.testing.assert_array_equal(batch["label"], y[batch["index"]])
    with pytest.raises(FileExistsError):
        data.write_latents(str(tmp_path / "train"), z, y)
    data.write_latents(str(tmp_path / "train"), z[:2].astype(np.float16), y[:2], overwrite=True)
    src = data.LatentSource(str(tmp_path / "train"), scale=1.0)
    assert len(src) == 2 and len(src.files) == 1  # stale 3-shard files removed
    np.testing.assert_array_equal(src[1]["image"], z[1].astype(np.float16).astype(np.float32))


# ---------------------------------------------------------------- bad input

def test_bad_inputs(mnist_eval, tmp_path):
    with pytest.raises(ValueError, match="'test'"):
        data.get_source("mnist", "test")
    with pytest.raises(ValueError, match="'cifar10'"):
        data.get_source("cifar10")
    with pytest.raises(ValueError, match="'val'"):
        data.get_source("imagenet", "val")
    with pytest.raises(ValueError, match="image_size"):
        data.get_source("imagenet", "train", image_size=0)
    with pytest.raises(ValueError, match="path_prefix"):
        data.get_source("latents", "train")
    with pytest.raises(FileNotFoundError):
        data.get_source("latents", "train", data_dir=str(tmp_path))
    kw = dict(seed=0, process_index=0, process_count=1)
    bad = [
        (dict(kw, global_batch=10, process_count=3), "not divisible by process_count 3"),
        (dict(kw, global_batch=8, process_index=2, process_count=2), "process_index 2"),
        (dict(kw, global_batch=0), "global_batch 0"),
        (dict(kw, global_batch=8, seed=-1), "seed -1"),
        (dict(kw, global_batch=8, num_epochs=0), "num_epochs 0"),
        (dict(kw, global_batch=8, worker_count=-1), "worker_count -1"),
        (dict(kw, global_batch=501, num_epochs=1), "no full global batch of 501"),
    ]
    for kwargs, msg in bad:
        with pytest.raises(ValueError, match=msg):
            data.make_iterator(mnist_eval, **kwargs)
    z = np.zeros((4, 2, 2, 1), np.float32)
    with pytest.raises(ValueError, match="expected \\[N, h, w, c\\]"):
        data.write_latents(str(tmp_path / "x"), z[0], np.zeros(4, int))
    with pytest.raises(ValueError, match="labels shape"):
        data.write_latents(str(tmp_path / "x"), z, np.zeros(3, int))
    with pytest.raises(ValueError, match="num_shards 5"):
        data.write_latents(str(tmp_path / "x"), z, np.zeros(4, int), num_shards=5)
    with pytest.raises(ValueError, match="magic"):
        latents.decode_record(b"\0" * 32)
    assert pipeline.SOURCES == ("mnist", "mnist_captions", "imagenet", "latents", "mnist_t2i", "image_text", "encoded",
                                "mnist_joint", "moving_mnist", "multiview", "sounds")
    for name in pipeline.MODALITY_SOURCES:  # every registered modality source imports and builds
        assert len(pipeline.get_source(name, "eval")) > 0
