"""The ImageNet pipeline end to end on a tiny tfds dataset built here (no downloads): ADM centre crops
-> a tiny random Flax KL-VAE -> FDL2 moment shards (`latents.encode_latents`, `flagdit encode`) ->
`LatentSource` with the flip and posterior sample drawn at read time; the reference-batch crops."""

import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from conftest import load_config
from flagdit_jax.autoencoder import VAE, AutoencoderKLConfig, init_params
from flagdit_jax.data import imagenet, latents, pipeline

BUILDER = "flagdit_tiny_imagenet"
SIZE = 16  # crop side; the tiny VAE halves it: latents [8, 8, 4]
TRAIN_SHAPES = [(40, 90), (70, 33), (16, 16), (50, 50), (33, 100), (64, 48), (20, 31)]  # (H, W)


def _jpeg_or_png(arr: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def _builder_class():
    import tensorflow_datasets as tfds

    class FlagditTinyImagenet(tfds.core.GeneratorBasedBuilder):
        """ImageNet's features (image + 1000-way label) over a handful of varied-size JPEGs and PNGs."""

        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(encoding_format="jpeg"),
                "label": tfds.features.ClassLabel(num_classes=1000)}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(TRAIN_SHAPES, 0),
                    "validation": self._generate_examples([(30, 30), (24, 60)], 1)}

        def _generate_examples(self, shapes, seed):
            rng = np.random.default_rng(seed)
            for i, (h, w) in enumerate(shapes):
                # Smooth images (JPEG-friendly) with a left-right asymmetry, so flips matter.
                yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
                arr = np.stack([np.sin(4 * xx + i) * yy, xx ** 2, np.cos(3 * yy) * (1 - xx)], -1)
                arr = (127.5 * (arr + 1) + rng.normal(0, 4, arr.shape)).clip(0, 255).astype(np.uint8)
                yield i, {"image": _jpeg_or_png(arr, "PNG" if i % 2 else "JPEG"), "label": int(rng.integers(1000))}

    return FlagditTinyImagenet


@pytest.fixture(scope="session")
def tiny_tfds(tmp_path_factory):
    """A prepared tiny ImageNet-like tfds dataset in ArrayRecord format -> its data_dir."""
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    _builder_class()(data_dir=data_dir, file_format="array_record").download_and_prepare()
    return data_dir


@pytest.fixture(scope="session")
def tiny_vae():
    cfg = AutoencoderKLConfig(block_out_channels=(8, 16), norm_num_groups=4, latent_channels=4, layers_per_block=1)
    return VAE(init_params(cfg, seed=3), cfg)


@pytest.fixture(scope="session")
def source(tiny_tfds):
    return imagenet.ImageNetSource("train", image_size=SIZE, random_flip=False, data_dir=tiny_tfds, builder=BUILDER)


@pytest.fixture(scope="session")
def encoded(tmp_path_factory, source, tiny_vae):
    """One single-process encode: 3 shards, batch 4 (8 rows: split over the 8 fake devices)."""
    prefix = str(tmp_path_factory.mktemp("lat") / "train")
    files = latents.encode_latents(source, tiny_vae, prefix, num_shards=3, batch_size=4, process_index=0,
                                   process_count=1, vae_name="tiny", progress=False)
    return prefix, files


def _records(files):
    from array_record.python.array_record_module import ArrayRecordReader

    out = []
    for f in files:
        reader = ArrayRecordReader(f)
        out += [latents.decode_record(r) for r in reader.read_all()]
        reader.close()
    return out


def _raw_crops(tiny_tfds, split="train"):
    """Centre crops straight from tfds + center_crop_arr (not through ImageNetSource)."""
    import tensorflow_datasets as tfds

    raw = tfds.data_source(BUILDER, split=split, data_dir=tiny_tfds)
    crops = [imagenet.center_crop_arr(Image.fromarray(np.asarray(raw[i]["image"])), SIZE) for i in range(len(raw))]
    return np.stack(crops), np.array([int(raw[i]["label"]) for i in range(len(raw))])


def test_records_are_the_posteriors_of_the_crop_and_its_mirror(encoded, tiny_tfds, tiny_vae):
    prefix, files = encoded
    crops, labels = _raw_crops(tiny_tfds)
    x = imagenet.to_float(crops)
    mean, logvar = (np.asarray(a) for a in tiny_vae.posterior(np.concatenate([x, x[:, :, ::-1]])))
    want = np.stack([np.stack([mean, np.exp(0.5 * logvar)], 1)[:7], np.stack([mean, np.exp(0.5 * logvar)], 1)[7:]], 1)
    recs = _records(files)
    got = np.stack([m for m, _ in recs])
    assert got.shape == (7, 2, 2, SIZE // 2, SIZE // 2, 4) and got.dtype == np.float16
    np.testing.assert_allclose(got.astype(np.float32), want, rtol=2e-3, atol=1e-3 * np.abs(want).max())
    np.testing.assert_array_equal([lab for _, lab in recs], labels)
    assert not np.allclose(want[:, 0, 0], want[:, 1, 0], atol=1e-3)  # the mirror is a different latent
    side = json.load(open(f"{prefix}.json"))
    assert (side["num_records"], side["num_shards"], side["image_shape"], side["latent_shape"], side["vae"]["name"],
            side["latent_scale"], side["dtype"]) == (7, 3, [SIZE, SIZE, 3], [SIZE // 2, SIZE // 2, 4], "tiny",
                                                     0.18215, "float16")
    assert all(os.path.isfile(latents.shard_meta_path(f)) for f in files)


def test_flip_and_posterior_sample_drawn_at_read_time(encoded, tiny_tfds):
    prefix, files = encoded
    source_dir = tiny_tfds
    src = latents.LatentSource(prefix)
    moments = np.stack([m for m, _ in _records(files)]).astype(np.float32)
    n = len(src)

    def epochs(seed):
        it = pipeline.make_iterator(src, global_batch=n, seed=seed, shuffle=False, num_epochs=3, process_index=0,
                                    process_count=1, read_threads=0)
        return [next(it) for _ in range(3)]

    a, b = epochs(0), epochs(0)
    assert "posterior" not in a[0]
    for x, y in zip(a, b):  # fixed by the seed
        np.testing.assert_array_equal(x["image"], y["image"])
    assert not np.allclose(a[0]["image"], a[1]["image"])  # new draws every epoch
    assert not np.allclose(a[0]["image"], epochs(1)[0]["image"])
    # Row r of epoch e is mean + std * eps of the crop or of its mirror, drawn from rng((aug_seed, e*n + r)):
    # first the flip, the same draw the pixel source (`ImageNetSource.augment`) makes, so both flip alike.
    aug_seed = int(np.random.SeedSequence(0).generate_state(2)[1])
    flipping = imagenet.ImageNetSource("train", image_size=SIZE, data_dir=source_dir, builder=BUILDER)
    flips = []
    for epoch in range(3):
        for r in range(n):
            i = epoch * n + r
            pixel = flipping.augment({"image": np.arange(2.0)[None, :, None]}, np.random.default_rng((aug_seed, i)))
            rng = np.random.default_rng((aug_seed, i))
            flipped = bool(rng.random() < 0.5)
            assert flipped == (pixel["image"][0, 0, 0] == 1)
            mean, std = moments[r, int(flipped)]
            want = (mean + std * rng.standard_normal(mean.shape, dtype=np.float32)) * latents.SD_VAE_SCALE
            np.testing.assert_allclose(a[epoch]["image"][r], want, rtol=1e-6, atol=1e-6)
            flips.append(flipped)
    assert 0 < sum(flips) < len(flips)
    # Without the draws: the centre crop's posterior mean, as a mean-only file would give.
    plain = latents.LatentSource(prefix, random_flip=False, sample_posterior=False)
    np.testing.assert_allclose(plain[2]["image"], moments[2, 0, 0] * latents.SD_VAE_SCALE, rtol=1e-6)
    assert set(plain[2]) == {"image", "label"}
    flip_only = latents.LatentSource(prefix, sample_posterior=False)
    out = flip_only.augment(flip_only[2], np.random.default_rng(5))
    assert any(np.allclose(out["image"], moments[2, f, 0] * latents.SD_VAE_SCALE, rtol=1e-6) for f in (0, 1))


def test_mean_only_files_still_read(tmp_path):
    z = np.random.default_rng(0).standard_normal((4, 2, 2, 4)).astype(np.float32)
    latents.write_latents(str(tmp_path / "train"), z, np.arange(4), num_shards=2)
    src = latents.LatentSource(str(tmp_path / "train"), scale=0.5)
    e = src.augment(src[1], np.random.default_rng(0))
    np.testing.assert_array_equal(e["image"], z[1] * 0.5)


def test_processes_cover_every_record_once_and_resume(tmp_path, encoded, source, tiny_vae):
    for shards in (1, 3, 7, 10):
        for count in (1, 2, 3, 8):
            ranges = [latents.process_shards(shards, i, count) for i in range(count)]
            assert [s for lo, hi in ranges for s in range(lo, hi)] == list(range(shards))
    calls = []

    class Counting:  # the VAE, counting the crops it encodes
        def __init__(self, vae):
            self.vae, self.scaling_factor, self.downsample, self.latent_channels = (
                vae, vae.scaling_factor, vae.downsample, vae.latent_channels)

        def posterior(self, x):
            calls.append(x.shape[0] // 2)
            return self.vae.posterior(x)

    prefix = str(tmp_path / "train")
    kw = dict(num_shards=3, batch_size=3, process_count=2, vae_name="tiny", progress=False)
    first = latents.encode_latents(source, Counting(tiny_vae), prefix, process_index=0, **kw)
    with pytest.raises(ValueError, match="incomplete"):  # process 1's shards are missing
        latents.LatentSource(prefix)
    second = latents.encode_latents(source, Counting(tiny_vae), prefix, process_index=1, **kw)
    assert [os.path.basename(f) for f in first + second] == [os.path.basename(f) for f in encoded[1]]
    # Unsharded batches of 3 give the records of the sharded batch-4 encode, every record once, in order.
    got, want = _records(first + second), _records(encoded[1])
    np.testing.assert_array_equal([lab for _, lab in got], [lab for _, lab in want])
    np.testing.assert_allclose(np.stack([m for m, _ in got]).astype(np.float32),
                               np.stack([m for m, _ in want]).astype(np.float32), rtol=2e-3, atol=2e-3)
    assert len(latents.LatentSource(prefix)) == 7
    # Interrupted: shard 1 renamed into place but its .json never written, and a stale tmp file.
    os.remove(latents.shard_meta_path(second[0]))
    open(second[0] + ".tmp999", "wb").close()
    with pytest.raises(FileNotFoundError, match="unfinished"):
        latents.LatentSource(prefix)
    stamps = {f: os.stat(f).st_mtime_ns for f in (first[0], second[1])}
    calls.clear()
    latents.encode_latents(source, Counting(tiny_vae), prefix, process_index=1, **kw)
    assert len(calls) == 1  # one batch: shard 1's 2 rows (array_split of 7 records in 3 shards: 3, 2, 2)
    assert {f: os.stat(f).st_mtime_ns for f in stamps} == stamps and not os.path.exists(second[0] + ".tmp999")
    np.testing.assert_array_equal(np.stack([m for m, _ in _records(first + second)]), np.stack([m for m, _ in got]))
    calls.clear()
    latents.encode_latents(source, Counting(tiny_vae), prefix, process_index=0, **kw)  # all done: nothing to do
    assert calls == []
    with pytest.raises(ValueError, match="dtype"):  # the sidecar is from another encode
        latents.encode_latents(source, tiny_vae, prefix, process_index=0, **{**kw, "dtype": "float32"})


def test_reference_images_are_seeded_centre_crops(tiny_tfds):
    crops, _ = _raw_crops(tiny_tfds)
    ref, idx = imagenet.reference_images("train", 4, image_size=SIZE, seed=1, data_dir=tiny_tfds, builder=BUILDER,
                                         return_indices=True)
    assert ref.shape == (4, SIZE, SIZE, 3) and ref.dtype == np.uint8
    assert len(set(idx.tolist())) == 4 and list(idx) == sorted(idx)
    np.testing.assert_array_equal(ref, crops[idx])
    np.testing.assert_array_equal(ref, imagenet.reference_images("train", 4, image_size=SIZE, seed=1,
                                                                 data_dir=tiny_tfds, builder=BUILDER))
    other = imagenet.reference_images("train", 4, image_size=SIZE, seed=2, data_dir=tiny_tfds, builder=BUILDER,
                                      return_indices=True)[1]
    assert list(other) != list(idx)
    with pytest.raises(ValueError, match="num=8"):
        imagenet.reference_images("train", 8, image_size=SIZE, data_dir=tiny_tfds, builder=BUILDER)


def test_bad_inputs(tmp_path, source, tiny_vae):
    with pytest.raises(ValueError, match="num_shards=8"):
        latents.encode_latents(source, tiny_vae, str(tmp_path / "x"), num_shards=8)
    with pytest.raises(ValueError, match="dtype='bfloat16'"):
        latents.encode_latents(source, tiny_vae, str(tmp_path / "x"), num_shards=2, dtype="bfloat16")
    with pytest.raises(ValueError, match="process_index=2"):
        latents.encode_latents(source, tiny_vae, str(tmp_path / "x"), num_shards=2, process_index=2, process_count=2)
    with pytest.raises(ValueError, match="moments shape"):
        latents.encode_moments_record(np.zeros((2, 3, 4, 4, 4)), 0)
    c = load_config("configs/imagenet/flagdit.py", "600m")
    c.data.options.data_dir = str(tmp_path / "lat")
    from flagdit_jax import encoders

    with pytest.raises(ValueError, match="config.vae.path is empty"):
        encoders.encode_cache(c)
    c.encode.splits = ("val",)
    with pytest.raises(ValueError, match="config.encode.splits"):
        encoders.encode_cache(c)


@pytest.mark.slow
def test_flagdit_encode_then_train(tmp_path, tiny_tfds, tiny_vae):
    """`flagdit encode` with the ImageNet config on the tiny data and a saved tiny VAE folder, then a
    2-step `flagdit train` on what it wrote."""
    import subprocess
    import sys

    from flagdit_jax.autoencoder import save_folder

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    save_folder(tmp_path / "vae", tiny_vae.params, tiny_vae.config)
    over = [f"--config.vae.path={tmp_path / 'vae'}", f"--config.encode.options.data_dir={tiny_tfds}",
            f"--config.encode.options.builder={BUILDER}", f"--config.encode.image_size={SIZE}",
            "--config.encode.num_shards=2", "--config.encode.batch_size=4", "--config.encode.splits=('train','eval')",
            f"--config.data.options.data_dir={tmp_path / 'lat'}"]
    cfg = f"{root}/configs/imagenet/flagdit.py:600m"
    run = subprocess.run([sys.executable, "-m", "flagdit_jax.cli", "encode", "--config", cfg, *over],
                         capture_output=True, text=True, cwd=root)  # tfds reads the prepared files by name
    assert run.returncode == 0, run.stderr[-3000:]
    assert "train: wrote 2 shard(s)" in run.stdout and "eval: wrote 2 shard(s)" in run.stdout
    src = pipeline.get_source("latents", "train", data_dir=str(tmp_path / "lat"))
    assert len(src) == 7 and src[0]["image"].shape == (SIZE // 2, SIZE // 2, 4)
    assert len(pipeline.get_source("latents", "eval", data_dir=str(tmp_path / "lat"))) == 2
    small = ["--config.model.dim=32", "--config.model.n_layers=2", "--config.model.n_heads=4",
             f"--config.data.image_size={SIZE // 2}", "--config.data.worker_count=0", "--config.global_batch=4",
             "--config.mesh.num_devices=1",
             "--config.total_steps=2", "--config.checkpoint.every_steps=2", "--config.checkpoint.async_save=False",
             "--config.log_every_steps=1", f"--config.data.options.data_dir={tmp_path / 'lat'}"]
    run = subprocess.run([sys.executable, "-m", "flagdit_jax.cli", "train", "--config", cfg, "--workdir",
                          str(tmp_path / "w"), *small], capture_output=True, text=True, cwd=root)
    assert run.returncode == 0, run.stderr[-3000:]
    losses = [json.loads(line)["loss"] for line in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and np.isfinite(losses).all()
