"""Multi-frame `flagdit encode`: moving-MNIST clips -> per-frame VAE latents + caption features -> the
'encoded' source, checked against the VAE's own encoding of each frame and the pixel source's captions."""

import copy
import importlib.util
import pathlib

import numpy as np
import pytest

from flagdit_jax import encoders
from flagdit_jax.autoencoder.convert import init_params
from flagdit_jax.autoencoder.kl import VAE, AutoencoderKLConfig
from flagdit_jax.data import encoded
from flagdit_jax.data import moving_mnist as mm

RECORDS = (0, 1, 4, 6)  # eval clips of 4, 4, 3, 3 frames: two per frame count


class _Subset:
    """Some records of a source (a handful of clips keeps the encode cheap)."""

    def __init__(self, source, records):
        self.source, self.records = source, records

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        return self.source[self.records[i]]


@pytest.fixture(scope="module")
def sources():
    """(raw, pixel): the same eval clips with text captions and with embedded ones (one MNIST load)."""
    raw = mm.MovingMnistSource("eval", raw=True)
    pixel = copy.copy(raw)
    pixel.raw = False
    return raw, pixel


@pytest.fixture(scope="module")
def vae():
    """A random tiny AutoencoderKL: 1 channel, 2x down, 4 latent channels (32x32 frame -> 16x16x4)."""
    cfg = AutoencoderKLConfig(in_channels=1, out_channels=1, block_out_channels=(8, 8), norm_num_groups=4,
                              latent_channels=4, layers_per_block=1, scaling_factor=0.5)
    return VAE(init_params(cfg, seed=1), cfg)


@pytest.fixture(scope="module")
def cache(tmp_path_factory, sources, vae):
    raw = sources[0]
    prefix = str(tmp_path_factory.mktemp("t2v_cache") / "eval")
    # batch 2: clips of equal T share a VAE call (B * T frames), so the [B, T] <-> frame order is exercised.
    encoded.encode_dataset(_Subset(raw, RECORDS), vae, raw.caption_encoder(), prefix, num_shards=2, batch_size=2,
                           progress=False)
    return encoded.EncodedSource(prefix)


def test_clip_cache_round_trips(cache, sources, vae):
    raw, pixel = sources
    counts = [raw.motion(r)["frames"] for r in RECORDS]
    assert counts == [4, 4, 3, 3]
    # Frame counts come back from the shards' .json (what bucketing by token length reads) and the records.
    np.testing.assert_array_equal(cache.frame_shapes(), [[t, 16, 16] for t in counts])
    # Reference: every pixel frame through the VAE in one call of its own (frames are independent).
    want = np.asarray(vae.encode(np.concatenate([raw.clip(r) for r in RECORDS])))
    want = np.split(want, np.cumsum(counts)[:-1])
    for i, (r, t) in enumerate(zip(RECORDS, counts)):
        rec = cache[i]
        assert rec["frames"].shape == (t, 16, 16, 4)
        np.testing.assert_allclose(rec["frames"], want[i], atol=1e-5)
        # Captions: the pixel run's word embeddings (stored as float16), the motion metadata kept.
        p = pixel[r]
        n = int(p["cap_mask"].sum())
        np.testing.assert_array_equal(rec["cap_mask"], np.arange(cache.cap_len) < n)
        np.testing.assert_allclose(rec["cap_feats"][:n], p["cap_feats"][:n], rtol=1e-3, atol=1e-3)
        assert (int(rec["label"]), int(rec["direction"]), int(rec["speed"])) == \
            (int(p["label"]), int(p["direction"]), int(p["speed"]))
        assert cache.caption(i) == raw.caption_text(r)
    null = cache.null_caption()
    k = int(pixel.null_caption()["cap_mask"].sum())
    np.testing.assert_array_equal(null["cap_feats"][:k], pixel.null_caption()["cap_feats"][:k])


def test_clip_cache_rejects_mixed_records(tmp_path, sources, vae):
    raw = sources[0]

    class Mixed(_Subset):
        def __getitem__(self, i):
            r = dict(self.source[self.records[i]])
            return r if i == 0 else {**{k: v for k, v in r.items() if k != "frames"}, "image": r["frames"][0]}

    with pytest.raises(ValueError, match="images or clips, not both"):
        encoded.encode_dataset(Mixed(raw, (0, 1)), vae, raw.caption_encoder(), str(tmp_path / "x"), batch_size=2,
                               progress=False)
    with pytest.raises(ValueError, match="expected a list of str"):
        raw.caption_encoder()("digit_1 moves left fast")


def test_latent_config_reads_clips_with_their_own_captions(sources, monkeypatch):
    from flagdit_jax.data import pipeline

    spec = importlib.util.spec_from_file_location(
        "t2v_config", pathlib.Path(__file__).parents[1] / "configs" / "t2v" / "mnist.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("latent")
    # encode reads the pixel run's clips (same options) in their raw form (caption text).
    monkeypatch.setattr(pipeline, "get_source", lambda name, split, **kw: (name, split, kw))
    assert encoders.raw_source(config, "eval") == ("moving_mnist", "eval",
                                                   {**dict(module.get_config("next").data.options), "raw": True})
    raw = sources[0]
    text = encoders.load_text_encoder(config, raw)
    feats, mask = text(["", raw.caption_text(3)])
    np.testing.assert_array_equal(feats[1], sources[1][3]["cap_feats"])
    np.testing.assert_array_equal(mask[0], sources[1].null_caption()["cap_mask"])


def test_latent_run_writes_its_samples_as_the_raw_source_does(cache, sources, tmp_path):
    """`flagdit sample` on a latent clip run: the encoded cache has no media form of its own, so the
    decoded frames go to the raw moving-MNIST source's `save_media` (a GIF per clip)."""
    from flagdit_jax import sample

    spec = importlib.util.spec_from_file_location(
        "t2v_config", pathlib.Path(__file__).parents[1] / "configs" / "t2v" / "mnist.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("latent")
    assert not hasattr(cache, "save_media")
    media = sample.media_source(config, cache)
    assert isinstance(media, mm.MovingMnistSource) and media.raw
    frames = np.random.default_rng(0).uniform(-1, 1, (2, 3, 32, 32, 1)).astype(np.float32)
    written = media.save_media(tmp_path / "samples", frames)
    assert written and all(p.suffix == ".gif" and p.stat().st_size > 0 for p in written)
    assert sample.media_source(module.get_config("next"), sources[1]) is sources[1]  # pixels: its own
    plain = module.get_config("next")
    plain.data.name = "mnist"
    assert sample.media_source(plain, object()) is None
