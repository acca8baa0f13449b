"""Training tasks and mixed-size buckets: class labels and captions through one loop."""

import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flagdit_jax import tasks, tokens as tok, train
from flagdit_jax.data import buckets
from flagdit_jax.data.captioned import CaptionedMnistSource
from flagdit_jax.flow import losses
from conftest import load_config, sigkill_after_checkpoint

ROOT = pathlib.Path(__file__).resolve().parents[1]


def t2i_config(arg, **kw):
    small = {"model.dim": 48, "model.n_layers": 2, "model.n_heads": 2, "model.n_kv_heads": 1,  # head_dim 24: 3-D RoPE
             "global_batch": 8, "mesh.shape": (1, 1, 1, 1), "mesh.num_devices": 1}
    return load_config(ROOT / "configs" / "t2i" / "captions.py", arg, **{**small, **kw})


@pytest.fixture(scope="module")
def source():
    return CaptionedMnistSource("train")


@pytest.fixture(scope="module", params=["next", pytest.param("flag", marks=pytest.mark.slow)])
def built(request, source):
    """(config, Setup, params) of a tiny captioned Next-DiT / Flag-DiT."""
    config = t2i_config(request.param)
    s, init_boxed = train.setup(config, source)
    return config, s, train.init_state(s, init_boxed).params


# --- buckets --------------------------------------------------------------------------------------

def test_crop_list_gives_the_official_max_seq_len():
    """REFERENCE.md: T2I max_seq_len 288 / 1088 / 4224 for 256 / 512 / 1024 px (SDXL VAE, patch 2, [nextline])."""
    from flagdit_jax.models import registry

    cfg = registry.get_config("lumina-t2i-5b")
    assert [buckets.crop_buckets(r, cfg) for r in (256, 512, 1024)] == [(288,), (1088,), (4224,)]
    crops = buckets.crop_size_list(64, 32)
    assert (256, 256) in crops and (512, 128) in crops and (128, 512) in crops
    assert all(max(w, h) / min(w, h) <= 4 and (w // 32) * (h // 32) <= 64 for w, h in crops)


def test_source_mixes_shapes_and_frame_counts(source):
    shapes = {tuple(s) for s in buckets.record_shapes(source).tolist()}
    assert len(shapes) >= 4 and {t for t, _, _ in shapes} == {1, 2}
    e = source[1]
    assert e["frames"].shape == (1, 32, 48, 1) and e["cap_mask"].sum() == 5
    assert source.null_caption()["cap_mask"].sum() == 1  # <bos> only


def _iterator(source, cfg, task, **kw):
    args = dict(global_batch=8, seed=3, collate=task.collate, buckets=(96, 128))
    args.update(kw)
    return buckets.make_bucketed_iterator(source, cfg, **args)


def test_bucketed_batches_are_static_deterministic_resumable_and_host_split(built, source):
    config, s, _ = built
    cfg, task = s.model_cfg, s.task
    lengths = tuple(config.data.buckets)
    it, got_lengths = _iterator(source, cfg, task, buckets=lengths)
    assert got_lengths == lengths
    first = [next(it) for _ in range(12)]
    seen = {b["tokens"].shape[1] for b in first}
    assert seen == set(lengths)  # both buckets occur, nothing else
    bucket_of, _ = buckets.assign_buckets(buckets.record_shapes(source), cfg, lengths)
    for b in first:
        assert len({lengths[k] for k in bucket_of[b["index"]]}) == 1  # one bucket per batch
        assert b["tokens"].shape[1] == lengths[bucket_of[b["index"][0]]]
    # Deterministic, and resumes exactly from a saved state.
    it2, _ = _iterator(source, cfg, task, buckets=lengths)
    for _ in range(5):
        next(it2)
    state = it2.get_state()
    it3, _ = _iterator(source, cfg, task, buckets=lengths)
    it3.set_state(state)
    for a, b in zip(first[5:], [next(it3) for _ in range(7)]):
        jax.tree.map(np.testing.assert_array_equal, a, b)
    # Two hosts: each reads its contiguous block of the same global batch.
    halves = [_iterator(source, cfg, task, buckets=lengths, process_index=p, process_count=2)[0] for p in range(2)]
    for ref in first[:3]:
        parts = [next(h) for h in halves]
        jax.tree.map(lambda a, *p: np.testing.assert_array_equal(a, np.concatenate(p)), ref, *parts)


def test_record_longer_than_every_bucket_is_named(source, built):
    _, s, _ = built
    with pytest.raises(ValueError, match=r"record \d+ of latent size \(\d, \d+, \d+\) needs 1\d\d tokens.*largest bucket 100"):
        _iterator(source, s.model_cfg, s.task, buckets=(100,))


# --- the task ---------------------------------------------------------------------------------------

def test_caption_dropout_uses_the_empty_caption(built, source):
    _, s, _ = built
    cond = s.task.collate([source[i] for i in range(4)])
    dropped = s.task.apply_dropout(jax.tree.map(jnp.asarray, cond), jnp.array([True, False, True, False]))
    null = source.null_caption()
    for i in range(4):
        want = null if i % 2 == 0 else source[i]
        np.testing.assert_array_equal(dropped["cap_feats"][i], want["cap_feats"])
        np.testing.assert_array_equal(dropped["cap_mask"][i], want["cap_mask"])


def test_class_label_dropout_uses_the_null_class():
    task = tasks.ClassLabel(num_classes=10)
    out = task.apply_dropout({"label": jnp.array([3, 4, 5])}, jnp.array([False, True, False]))
    np.testing.assert_array_equal(out["label"], [3, 10, 5])


def test_loss_ignores_special_tokens():
    """[nextline], [nextframe] and [PAD] never contribute; each sample is averaged over its own patches."""
    from flagdit_jax.models import registry

    cfg = registry.get_config("lumina-t2i-tiny", nextframe=True, in_channels=1)
    rng = np.random.default_rng(0)
    frames = [rng.normal(size=(2, 8, 8, 1)).astype(np.float32), rng.normal(size=(1, 8, 12, 1)).astype(np.float32)]
    packed = tok.as_packed(tok.pack_host(frames, cfg, 64), cfg)
    kinds = np.asarray(packed.kind)
    assert {tok.NEXTLINE, tok.NEXTFRAME, tok.PAD} <= set(kinds.ravel().tolist())
    x0 = jnp.asarray(rng.normal(size=packed.tokens.shape), jnp.float32)
    t = jnp.array([0.3, 0.7])
    task = tasks.ClassLabel(num_classes=10)
    mask = task.loss_mask(packed)

    def exact_at_patches(x_t, t_):
        u = packed.tokens - x0
        return jnp.where(mask[..., None], u + 0.1, 1e3)  # error 0.1 at patches, garbage elsewhere

    loss, per = losses.flow_matching_loss(exact_at_patches, packed.tokens, x0, t, mask=mask)
    np.testing.assert_allclose(per, [0.01, 0.01], rtol=1e-5)


@pytest.mark.slow
def test_padding_never_changes_a_real_tokens_loss(built, source):
    """Each sample's loss is the same packed alone at its own length and packed with others into a
    longer bucket (with other noise at the pads)."""
    config, s, params = built
    task, cfg = s.task, s.model_cfg
    elements = [source[i] for i in range(4)]  # 4 shapes, 2 frame counts
    rng = np.random.default_rng(1)
    t = rng.uniform(0.05, 0.95, 4).astype(np.float32)

    def per_sample(batch, x0, t_):
        packed = tok.as_packed(jax.tree.map(jnp.asarray, batch), cfg)
        kw = task.model_kwargs(jax.tree.map(jnp.asarray, batch["cond"]))

        def model_fn(x_t, tt):
            with jax.default_matmul_precision("highest"):
                return s.model.apply({"params": params}, packed.replace(tokens=x_t), tt, **kw)

        return np.asarray(losses.flow_matching_loss(model_fn, packed.tokens, jnp.asarray(x0), jnp.asarray(t_),
                                                    mask=task.loss_mask(packed))[1])

    alone = [train.pack_batch(s, [e]) for e in elements]
    noise = [rng.normal(size=b["tokens"].shape[1:]).astype(np.float32) for b in alone]
    ref = [per_sample(b, n[None], t[i:i + 1])[0] for i, (b, n) in enumerate(zip(alone, noise))]
    for length in (config.data.buckets[-1] + 8,):  # every sample padded
        batch = train.pack_batch(s, elements, pad_to=length)
        assert (batch["kind"] == tok.PAD).any(axis=1).all()
        x0 = rng.normal(size=batch["tokens"].shape).astype(np.float32)  # other noise at the pads
        for i, n in enumerate(noise):
            x0[i, : len(n)] = n
        np.testing.assert_allclose(per_sample(batch, x0, t), ref, rtol=2e-5, err_msg=f"bucket {length}")


@pytest.mark.slow  # default-suite time budget
def test_mixed_shapes_train_with_one_compile_per_bucket(built, source):
    """A few steps on >= 3 shapes and 2 frame counts; the jitted step compiles once per bucket."""
    config, s, _ = built
    state = train.init_state(s, train.setup(config, source)[1])
    step = train.make_train_step(s)
    it = train.make_data_iterator(s, source)
    seen, losses_ = [], []
    with jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules):
        while len(seen) < 4 or set(seen) != set(config.data.buckets):
            assert len(seen) < 30, f"30 batches and still only buckets {sorted(set(seen))}"
            local = next(it)
            seen.append(local["tokens"].shape[1])
            state, m = step(state, train.global_batch(s, local))
            losses_.append(float(m["loss"]))
    assert set(seen) == set(config.data.buckets)
    assert step._cache_size() == len(set(seen))
    assert np.isfinite(losses_).all() and int(state.step) == len(seen)


# --- end to end through the CLI -------------------------------------------------------------------

T2I_TINY = ["--config.model.dim=48", "--config.model.n_layers=2", "--config.model.n_heads=2",
            "--config.model.n_kv_heads=1", "--config.global_batch=8", "--config.log_every_steps=5",
            "--config.checkpoint.every_steps=5", "--config.checkpoint.keep=10", "--config.mesh.shape=(1,1,1,1)",
            "--config.mesh.num_devices=1"]


@pytest.mark.slow
@pytest.mark.parametrize("arg", ["next", "flag"])
def test_t2i_cli_trains_resumes_bitwise_after_sigkill_and_samples(tmp_path, arg):
    from flagdit_jax import checkpoint, sample

    def cmd(workdir):
        return [sys.executable, "-m", "flagdit_jax.cli", "train", "--config", f"{ROOT / 'configs/t2i/captions.py'}:{arg}",
                "--workdir", str(workdir), *T2I_TINY, "--config.total_steps=20"]

    subprocess.run(cmd(tmp_path / "full"), check=True, cwd=ROOT, capture_output=True)
    killed = tmp_path / "killed"
    sigkill_after_checkpoint(cmd(killed), killed, 10, 20, cwd=ROOT, timeout=600)
    subprocess.run(cmd(killed), check=True, cwd=ROOT, capture_output=True)
    states = []
    for w in (tmp_path / "full", killed):
        config = checkpoint.read_config(w)
        states.append(sample.load_params(config, w, use_ema=True))
    assert states[0][2] == states[1][2] == 20
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), states[0][0], states[1][0])
    out = subprocess.run([sys.executable, "-m", "flagdit_jax.cli", "sample", "--workdir", str(killed),
                          "--config.sample.per_class=2", "--config.sample.num_steps=4"],
                         check=True, cwd=ROOT, capture_output=True, text=True)
    pngs = sorted(p.name for p in killed.glob("samples_20_*.png"))
    assert pngs == ["samples_20_1x32x32.png", "samples_20_1x32x48.png", "samples_20_1x48x32.png",
                    "samples_20_2x32x32.png"], out.stdout


def test_data_buckets_round_up_to_the_sequence_axis(built, source):
    """With no configured buckets, each data length is rounded up to the sequence axis size (the extra
    tokens are [PAD]); configured buckets that do not divide are refused."""
    _, s, _ = built
    shapes = buckets.record_shapes(source)
    _, plain = buckets.assign_buckets(shapes, s.model_cfg, None)
    bucket_of, rounded = buckets.assign_buckets(shapes, s.model_cfg, None, length_multiple=7)
    assert all(n % 7 == 0 for n in rounded) and len(rounded) <= len(plain)
    lengths = np.array([tok.seq_len(tuple(x), *tok.layout_of(s.model_cfg)) for x in shapes.tolist()])
    assert np.all(-(-lengths // 7) * 7 == np.asarray(rounded)[bucket_of])  # the smallest multiple that holds it
    with pytest.raises(ValueError, match="multiples of 7"):
        buckets.assign_buckets(shapes, s.model_cfg, (96, 128), length_multiple=7)
