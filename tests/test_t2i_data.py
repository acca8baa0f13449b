"""Text-to-image data: the embedded MNIST layouts, user image-text folders, the caption cache."""

import json
import re

import numpy as np
import pytest

from flagdit_jax.data import buckets, encoded, mnist_t2i, pipeline
from flagdit_jax.data.image_text import ImageTextFolder
from flagdit_jax.data.mnist_t2i import MnistT2I


# --- fakes with the encoders' protocols ---------------------------------------------------------

class FakeVAE:
    """Deterministic 'encoder': 4x4 average pooling to 4 channels (channel k = pooled mean * (k+1)
    + mean of the colour channels), scaled by `scaling_factor`."""

    scaling_factor, shift_factor, downsample, name = 0.5, 0.0, 4, "fake-vae"

    def __init__(self):
        self.calls = []

    def encode(self, images, *, sample=False, rng=None):
        images = np.asarray(images, np.float32)
        self.calls.append(images.shape)
        b, h, w, c = images.shape
        pooled = images.reshape(b, h // 4, 4, w // 4, 4, c).mean((2, 4))  # [b, h/4, w/4, c]
        z = np.concatenate([pooled.mean(-1, keepdims=True) * (k + 1) + pooled[..., :1] for k in range(4)], -1)
        if sample:
            import jax

            z = z + 0.01 * np.asarray(jax.random.normal(rng, z.shape))
        return (z - self.shift_factor) * self.scaling_factor


class FakeText:
    """Deterministic 'text encoder': one token per word plus BOS, each token's features a fixed
    function of the word (crc32-seeded); right-padded to the batch's longest caption."""

    name, dim = "fake-text", 6

    def word_vec(self, word):
        import zlib

        return np.random.default_rng(zlib.crc32(word.encode())).standard_normal(self.dim).astype(np.float32) * 3

    def tokens(self, caption):
        return ["<bos>"] + caption.split()

    def __call__(self, prompts):
        toks = [self.tokens(p) for p in prompts]
        s = max(len(t) for t in toks)
        feats = np.full((len(prompts), s, self.dim), 7.0, np.float32)  # junk at pads: masked anyway
        mask = np.zeros((len(prompts), s), bool)
        for i, t in enumerate(toks):
            feats[i, : len(t)] = np.stack([self.word_vec(w) for w in t])
            mask[i, : len(t)] = True
        return feats, mask


# --- MnistT2I ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mnist_src():
    return MnistT2I("eval", seed=3, repeats=2)


def _words(caption):
    return set(re.findall(r"[a-z]+", caption))


def test_mnist_t2i_ink_in_box_and_caption_matches(mnist_src):
    canvases, captions = set(), set()
    for i in range(0, len(mnist_src), 11):  # ~90 records
        e = mnist_src[i]
        img, (y0, x0, side) = e["image"][..., 0], e["box"].tolist()
        h, w = img.shape
        ink = img > -0.9
        outside = ink.copy()
        outside[y0:y0 + side, x0:x0 + side] = False
        assert ink.any() and not outside.any(), f"record {i}: ink outside its box {e['box']}"
        ys, xs = np.nonzero(ink)
        cy, cx = ys.mean() / h, xs.mean() / w  # centre of the ink, as a fraction of the canvas
        words = _words(e["caption"])
        # The caption's words, checked against the canvas and the ink (not against the tables).
        canvas = {"square": (32, 32), "wide": (32, 64), "tall": (64, 32)}
        assert [canvas[c] for c in canvas if c in words] == [(h, w)]
        assert (("small" in words), ("large" in words)) == ((side == 16), (side == 28))
        extent = max(ys.max() - ys.min(), xs.max() - xs.min()) + 1  # MNIST ink spans ~20/28 of the digit box
        assert (extent < 14) == (side == 16), (i, extent, side)
        assert ("left" in words) == (cx < 0.4) and ("right" in words) == (cx > 0.6)
        assert ("top" in words) == (cy < 0.4) and ("bottom" in words) == (cy > 0.6)
        if "centre" in words:
            assert 0.3 < cx < 0.7 and 0.3 < cy < 0.7
        digit = mnist_t2i.DIGIT_WORDS[int(e["label"])]
        assert digit in words or str(int(e["label"])) in e["caption"]
        assert e["box"].tolist() == list(mnist_t2i.box_for(e["size"], e["position"], e["canvas"]))
        canvases.add((h, w))
        captions.add(re.sub(r"\b(\d|zero|one|two|three|four|five|six|seven|eight|nine)\b", "D", e["caption"]))
    assert canvases == {(32, 32), (32, 64), (64, 32)}
    assert len(captions) > 20  # phrasings x layouts vary


def test_mnist_t2i_deterministic_and_tables(mnist_src):
    again = MnistT2I("eval", seed=3, repeats=2)
    other = MnistT2I("eval", seed=4, repeats=2)
    assert len(mnist_src) == 2 * 500
    for i in (0, 7, 999):
        a, b = mnist_src[i], again[i]
        assert a["caption"] == b["caption"] and np.array_equal(a["image"], b["image"])
    assert any(mnist_src[i]["caption"] != other[i]["caption"] for i in range(10))
    assert mnist_src[3]["label"] == mnist_src[503]["label"]  # record i uses digit i % n
    assert len(mnist_t2i.layouts()) == 18 and len(mnist_t2i.TEMPLATES) >= 4
    assert mnist_t2i.caption_for(7, 0, 0, 0, 0) == "a small handwritten seven in the top left corner of a square canvas"
    assert mnist_t2i.box_for(1, 2, 1) == (2, 64 - 2 - 28, 28)  # large, right, wide
    with pytest.raises(ValueError, match="position=0"):
        mnist_t2i.box_for(1, 0, 0)  # a large digit cannot sit in a square's corner
    with pytest.raises(ValueError, match="canvas=3"):
        mnist_t2i.caption_for(1, 0, 0, 3)
    with pytest.raises(ValueError, match="repeats"):
        MnistT2I("eval", repeats=0)
    via_config = pipeline.get_source("mnist_t2i", "eval", seed=3, repeats=2)
    assert via_config[5]["caption"] == mnist_src[5]["caption"]
    assert "mnist_t2i" in pipeline.SOURCES and "mnist_t2i" not in pipeline.CAPTIONED_SOURCES  # raw: no embeddings


# --- ImageTextFolder ----------------------------------------------------------------------------

def _png(path, w, h, colour):
    from PIL import Image

    Image.new("RGB", (w, h), colour).save(path)


@pytest.fixture()
def pairs(tmp_path):
    sizes = {"a": (200, 100, (255, 0, 0)), "b": (60, 180, (0, 255, 0)), "c": (120, 120, (0, 0, 255))}
    folder = tmp_path / "folder"
    folder.mkdir()
    for stem, (w, h, colour) in sizes.items():
        _png(folder / f"{stem}.png", w, h, colour)
        (folder / f"{stem}.txt").write_text(f"  a picture {stem}\n")
    manifest = tmp_path / "m.jsonl"
    rows = [{"image": "folder/a.png", "caption": "first"}, {"path": str(folder / "b.png"), "prompt": "second"},
            {"image": "folder/c.png", "text": "third"}]
    manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return folder, manifest, sizes


def _rem(w, h, cw, ch):
    return min(cw / w, ch / h) / max(cw / w, ch / h)


def test_image_text_folder_and_manifest(pairs):
    folder, manifest, sizes = pairs
    src = ImageTextFolder(folder, image_size=64, crop_patch=16)
    official = [(wp * 16, hp * 16) for wp in range(1, 17) for hp in range(1, 17)
                if wp * hp <= 16 and max(wp, hp) / min(wp, hp) <= 4]
    assert set(src.crops) <= set(official) and (64, 64) in src.crops and (128, 32) in src.crops
    assert len(src) == 3 and [src[i]["caption"] for i in range(3)] == ["a picture a", "a picture b", "a picture c"]
    for i, (w, h, colour) in enumerate(sizes.values()):
        e = src[i]
        ch, cw, c = e["image"].shape
        assert (cw, ch) in src.crops and c == 3 and e["orig_size"].tolist() == [h, w]
        top4 = sorted(_rem(w, h, *s) for s in src.crops)[-4:]
        assert _rem(w, h, cw, ch) >= top4[0]  # among the 4 best-fitting crops
        np.testing.assert_allclose(e["image"], np.broadcast_to(np.array(colour) / 127.5 - 1, e["image"].shape),
                                   atol=1e-6)
        assert np.array_equal(e["image"], ImageTextFolder(folder, image_size=64, crop_patch=16)[i]["image"])
    closest = ImageTextFolder(folder, image_size=64, crop_patch=16, random_top_k=1)
    for i, (w, h, _) in enumerate(sizes.values()):
        ch, cw, _ = closest[i]["image"].shape
        assert _rem(w, h, cw, ch) == max(_rem(w, h, *s) for s in src.crops)
    m = pipeline.get_source("image_text", path=str(manifest), image_size=64, crop_patch=16)
    assert [m[i]["caption"] for i in range(3)] == ["first", "second", "third"]
    assert np.array_equal(m[0]["image"], src[0]["image"])  # same record index and seed, same crop


def test_image_text_crop_keeps_the_middle(tmp_path):
    """A wide image, left third black, middle white, right third black: the centre crop of a square
    keeps the white middle; offset='random' is deterministic per record."""
    from PIL import Image

    a = np.zeros((64, 192, 3), np.uint8)
    a[:, 64:128] = 255
    Image.fromarray(a).save(tmp_path / "x.png")
    (tmp_path / "x.txt").write_text("x")
    e = ImageTextFolder(tmp_path, image_size=64, crop_patch=64)[0]  # one crop size: 64x64
    assert e["image"].shape == (64, 64, 3) and e["image"][:, 8:56].min() > 0.9
    rand = [ImageTextFolder(tmp_path, image_size=64, crop_patch=64, offset="random", seed=s)[0]["image"]
            for s in range(6)]
    assert np.array_equal(rand[5], ImageTextFolder(tmp_path, image_size=64, crop_patch=64, offset="random",
                                                   seed=5)[0]["image"])
    assert any(not np.array_equal(r, e["image"]) for r in rand)  # offsets drawn over [0, 128]


def test_image_text_errors(tmp_path, pairs):
    folder, manifest, _ = pairs
    (folder / "d.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="d.png has no caption file"):
        ImageTextFolder(folder)
    (folder / "d.txt").write_text("broken")
    with pytest.raises(ValueError, match="cannot read image .*d.png"):
        ImageTextFolder(folder)[3]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "folder/a.png", "caption": "ok"}\n{"image": "folder/b.png"}\n')
    with pytest.raises(ValueError, match="bad.jsonl line 2 .*no caption"):
        ImageTextFolder(bad)
    bad.write_text("{oops\n")
    with pytest.raises(ValueError, match="line 1 is not valid JSON"):
        ImageTextFolder(bad)
    with pytest.raises(ValueError, match="neither a folder"):
        ImageTextFolder(tmp_path / "nothing.txt")
    with pytest.raises(ValueError, match="offset"):
        ImageTextFolder(folder, offset="left")
    with pytest.raises(ValueError, match="needs path="):
        pipeline.get_source("image_text")
    with pytest.raises(ValueError, match="path_prefix= or data_dir="):
        pipeline.get_source("encoded", "train")


# --- the cache ----------------------------------------------------------------------------------

class Subset:
    """The first records of a source (keeps the cache test small)."""

    def __init__(self, src, idx):
        self.src, self.idx = src, list(idx)

    def __len__(self):
        return len(self.idx)

    def __getitem__(self, i):
        return self.src[self.idx[i]]


@pytest.fixture(scope="module")
def cache(tmp_path_factory, mnist_src):
    raw = Subset(mnist_src, range(0, 1000, 25))  # 40 records, all three canvases
    vae, text = FakeVAE(), FakeText()
    prefix = str(tmp_path_factory.mktemp("enc") / "train")
    files = encoded.encode_dataset(raw, vae, text, prefix, num_shards=3, batch_size=4, progress=False)
    return raw, vae, text, prefix, files


def test_cache_round_trip(cache):
    raw, vae, text, prefix, files = cache
    assert len(files) == 3
    assert max(s[0] for s in vae.calls) == 4  # batches of up to batch_size records
    src = encoded.EncodedSource(prefix)
    longest = max(len(text.tokens(raw[i]["caption"])) for i in range(len(raw)))
    assert len(src) == len(raw) and src.cap_len == longest and src.cap_dim == FakeText.dim
    shapes = []
    for i in range(len(raw)):
        r, e = raw[i], src[i]
        z = vae.encode(r["image"][None])[0]
        np.testing.assert_array_equal(e["frames"], z[None])
        feats, mask = text([r["caption"]])
        n = int(mask.sum())
        np.testing.assert_allclose(e["cap_feats"][:n], feats[0, :n], rtol=2**-11)  # stored as float16
        assert e["cap_mask"].tolist() == [True] * n + [False] * (src.cap_len - n)
        assert not e["cap_feats"][n:].any()
        for k in ("label", "size", "position", "canvas", "box"):
            assert e[k].shape == r[k].shape and e[k].dtype == r[k].dtype and np.array_equal(e[k], r[k])
        assert src.caption(i) == r["caption"]
        shapes.append((1, *z.shape[:2]))
    np.testing.assert_array_equal(src.frame_shapes(), shapes)
    null_feats, null_mask = text([""])
    null = src.null_caption()
    np.testing.assert_array_equal(null["cap_feats"][:1], null_feats[0])  # exact: kept at float32
    assert null["cap_mask"].tolist() == [True] + [False] * (src.cap_len - 1) and not null["cap_feats"][1:].any()
    side = json.load(open(encoded.sidecar_path(prefix)))
    assert side["vae"]["name"] == "fake-vae" and side["latent_scale"] == 0.5 and side["cap_dtype"] == "float16"
    assert encoded.EncodedSource(prefix, cap_len=16)[0]["cap_feats"].shape == (16, FakeText.dim)


def test_cache_batches_one_size(cache):
    _, vae, *_ = cache
    # every encoder call got one stacked [B, H, W, C] array (one size), and all three sizes occurred
    assert {s[1:3] for s in vae.calls} == {(32, 32), (32, 64), (64, 32)}


def test_cache_through_bucketed_iterator(cache):
    from flagdit_jax import tasks, tokens as tok
    from flagdit_jax.models import registry

    *_, prefix, _ = cache
    src = pipeline.get_source("encoded", path_prefix=prefix)
    assert "encoded" in pipeline.CAPTIONED_SOURCES
    cfg = registry.get_config("lumina-next-tiny", patch_size=2, in_channels=4)
    null = src.null_caption()
    task = tasks.Caption(null_feats=null["cap_feats"], null_mask=null["cap_mask"])
    it, lengths = buckets.make_bucketed_iterator(src, cfg, global_batch=4, seed=0, collate=task.collate,
                                                 num_epochs=1, read_threads=0, prefetch_batches=0)
    expect = {tok.seq_len((1, h, w), *tok.layout_of(cfg)) for h, w in ((8, 8), (8, 16), (16, 8))}
    assert set(lengths) == expect  # one bucket per latent size (different token counts with [nextline])
    seen = 0
    for batch in it:
        shapes = {tuple(s) for s in src.frame_shapes()[batch["index"]].tolist()}
        lens = {tok.seq_len(s, *tok.layout_of(cfg)) for s in shapes}
        assert len(lens) == 1 and batch["tokens"].shape[1] in lengths
        assert batch["cond"]["cap_feats"].shape == (4, src.cap_len, src.cap_dim)
        seen += 1
    assert seen >= 5


def test_cache_refuses_overwrite_and_bad_encoders(cache, tmp_path):
    raw, vae, text, prefix, _ = cache
    with pytest.raises(FileExistsError, match="overwrite=True"):
        encoded.encode_dataset(raw, vae, text, prefix, num_shards=3, progress=False)
    small = Subset(raw, range(6))
    p = str(tmp_path / "again")
    encoded.encode_dataset(small, vae, text, p, num_shards=2, progress=False)
    encoded.encode_dataset(small, vae, text, p, num_shards=1, overwrite=True, progress=False)
    assert len(encoded.EncodedSource(p).files) == 1  # the old 2-shard files are gone

    class LeftPadded(FakeText):
        def __call__(self, prompts):
            f, m = super().__call__(prompts)
            return f, m[:, ::-1]

    with pytest.raises(ValueError, match="right-padded"):
        encoded.encode_dataset(small, vae, LeftPadded(), str(tmp_path / "lp"), progress=False)

    class Huge(FakeText):
        def __call__(self, prompts):
            f, m = super().__call__(prompts)
            return f * (1e6 if prompts != [""] else 1), m

    with pytest.raises(ValueError, match="cap_dtype='float32'"):
        encoded.encode_dataset(small, vae, Huge(), str(tmp_path / "huge"), progress=False)
    encoded.encode_dataset(small, vae, Huge(), str(tmp_path / "huge32"), cap_dtype="float32", progress=False)
    with pytest.raises(ValueError, match="shard_range"):
        encoded.encode_dataset(small, vae, text, str(tmp_path / "r"), num_shards=2, shard_range=(1, 3))
    with pytest.raises(FileNotFoundError, match="sidecar"):
        encoded.EncodedSource(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="magic"):
        encoded.decode_record(b"\0" * 16)


def test_cache_written_per_host_ranges(cache, tmp_path):
    """Two 'hosts' writing shard ranges (0, 2) and (2, 3) give the same cache as one call."""
    raw, vae, text, prefix, _ = cache
    p = str(tmp_path / "hosts")
    encoded.encode_dataset(raw, vae, text, p, num_shards=3, batch_size=4, shard_range=(2, 3), progress=False)
    with pytest.raises(FileNotFoundError):
        encoded.EncodedSource(p)  # no sidecar yet: host 0 has not finished
    encoded.encode_dataset(raw, vae, text, p, num_shards=3, batch_size=4, shard_range=(0, 2), progress=False)
    a, b = encoded.EncodedSource(prefix), encoded.EncodedSource(p)
    np.testing.assert_array_equal(a.frame_shapes(), b.frame_shapes())
    for i in (0, 17, 39):
        np.testing.assert_array_equal(a[i]["frames"], b[i]["frames"])
        np.testing.assert_array_equal(a[i]["cap_feats"], b[i]["cap_feats"])


def test_cache_sample_posterior(tmp_path, mnist_src):
    raw = Subset(mnist_src, range(4))
    vae, text = FakeVAE(), FakeText()
    p1, p2 = str(tmp_path / "s1"), str(tmp_path / "s2")
    encoded.encode_dataset(raw, vae, text, p1, sample_posterior=True, seed=1, progress=False)
    encoded.encode_dataset(raw, vae, text, p2, sample_posterior=True, seed=1, progress=False)
    a, b = encoded.EncodedSource(p1)[0]["frames"], encoded.EncodedSource(p2)[0]["frames"]
    mean = vae.encode(raw[0]["image"][None])[None, 0]
    np.testing.assert_array_equal(a, b)
    assert 0 < np.abs(a - mean).max() < 0.1


def test_cache_rare_size_does_not_hold_back_the_shard(tmp_path):
    """Record 0 is the only wide image: its part-filled batch is encoded once 8 x batch_size results
    wait behind it, and the records still come back in order."""

    class Raw:
        def __len__(self):
            return 30

        def __getitem__(self, i):
            shape = (8, 16, 1) if i == 0 else (8, 8, 1)
            return {"image": np.full(shape, i / 30, np.float32), "caption": f"record {i}", "label": np.int32(i)}

    vae = FakeVAE()
    encoded.encode_dataset(Raw(), vae, FakeText(), str(tmp_path / "rare"), batch_size=2, progress=False)
    assert vae.calls.index((1, 8, 16, 1)) == 9  # after 9 full batches: 18 results > 16 waited behind record 0
    src = encoded.EncodedSource(str(tmp_path / "rare"))
    assert [int(src[i]["label"]) for i in range(30)] == list(range(30))
    assert src.frame_shapes()[:2].tolist() == [[1, 2, 4], [1, 2, 2]]
    assert json.load(open(encoded.sidecar_path(str(tmp_path / "rare"))))["max_cap_len"] == 3
