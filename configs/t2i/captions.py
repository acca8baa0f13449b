"""Tiny text-to-image runs on captioned MNIST of mixed sizes and durations (2 CPU cores).

Captions are fixed random word embeddings made by code (`data/captioned.py`); the text-to-image
issue replaces them with real MiniLM captions. Four latent sizes in one run -- square 32x32, wide
32x48, tall 48x32 and two-frame 32x32 clips -- in two token-length buckets, so training exercises
[PAD], [nextline] / [nextframe] (Flag-DiT) and 3-D RoPE (Next-DiT).

    flagdit train --config configs/t2i/captions.py:next --workdir runs/t2i_next   # Lumina-Next T2I
    flagdit train --config configs/t2i/captions.py:flag --workdir runs/t2i_flag   # Lumina-T2I (Flag-DiT)
    flagdit sample --workdir runs/t2i_next
"""

import ml_collections

# Token lengths at patch 4 (data/buckets.py): Next-DiT 64 / 96 / 96 / 128 -> buckets (96, 128);
# Flag-DiT with [nextline] and [nextframe] 73 / 105 / 109 / 146 -> buckets (112, 148).
_MODELS = {
    # Lumina-Next T2I: [PAD] only, sandwich norms; rope_axes 3 tells the frames of a clip apart
    # (head_dim 24 is divisible by 2 * 3).
    "next": dict(preset="lumina-next-tiny", dim=96, n_layers=4, n_heads=4, n_kv_heads=2, rope_axes=3),
    # Lumina-T2I: [nextline] after every patch row, [nextframe] after every frame.
    "flag": dict(preset="lumina-t2i-tiny", dim=96, n_layers=4, n_heads=4, n_kv_heads=2, nextframe=True),
}
_BUCKETS = {"next": (96, 128), "flag": (112, 148)}


def get_config(arg="next"):
    if arg not in _MODELS:
        raise ValueError(f"configs/t2i/captions.py:{arg}; expected one of {sorted(_MODELS)}")
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = 2000
    c.global_batch = 32
    c.grad_accum_steps = 1
    c.task = "caption"
    c.caption_dropout = 0.1  # the official T2I trainers drop captions to "" w.p. 0.1

    c.model = ml_collections.ConfigDict(dict(
        _MODELS[arg], patch_size=4, in_channels=1, cap_feat_dim=32, multiple_of=128, dtype="float32", remat="none",
        attention="auto", scan_layers=False, sequence_parallel="ulysses"))

    # data.image_size is the sampling size of square grids; training sizes come from the data.
    c.data = ml_collections.ConfigDict(dict(
        name="mnist_captions", image_size=32, channels=1, worker_count=0, buckets=_BUCKETS[arg],
        options=ml_collections.ConfigDict(dict(cap_dim=32, cap_len=8))))

    c.flow = ml_collections.ConfigDict(dict(path="linear", time_sampler="lognorm", prediction="velocity"))
    c.optim = ml_collections.ConfigDict(dict(lr=2e-3, b1=0.9, b2=0.999, weight_decay=0.0, grad_clip=2.0,
                                             warmup_steps=0, schedule="constant"))
    c.ema_decay = 0.995
    c.mesh = ml_collections.ConfigDict(dict(shape=(-1, 1, 1, 1), num_devices=-1))
    c.checkpoint = ml_collections.ConfigDict(dict(every_steps=500, keep=3, async_save=True))
    c.log_every_steps = 100
    c.sample = ml_collections.ConfigDict(dict(method="heun", num_steps=20, cfg_scale=2.0, shift=1.0, per_class=8,
                                              use_ema=True))
    c.eval = ml_collections.ConfigDict(dict(num_samples=500, batch=250, classifier_steps=800))
    return c
