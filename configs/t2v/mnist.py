"""Tiny text-to-video run on captioned moving MNIST (2 CPU cores, pixel space, no VAE).

Clips of 3 or 4 frames, 32x32, one 16-px digit sliding left / right / up / down, slowly (1 px per
frame) or fast (3 px); the caption names the digit, the direction and the speed as fixed random word
embeddings (`data/moving_mnist.py`). The two frame counts make two token-length buckets. `flagdit
eval` (`eval/video_eval.py`) reads direction, speed and digit off the samples at the trained lengths
and at 6 frames (duration extrapolation), beside the same reading of real clips.

    flagdit train --config configs/t2v/mnist.py --workdir runs/t2v             # Next-DiT, 3-D RoPE
    flagdit train --config configs/t2v/mnist.py:flag --workdir runs/t2v_flag   # Flag-DiT, [nextline] / [nextframe]
    flagdit sample --workdir runs/t2v && flagdit eval --workdir runs/t2v

`:latent` is the same Next-DiT in the latent space of the project's autoencoder (8 channels, 4x down:
a 32x32 frame is 8x8x8, patch 2 = 16 tokens per frame, as the pixel run's patch 8), as the video
papers train: `flagdit encode` puts every frame of every clip through the VAE once, and sampling /
eval decode the latent frames back to pixels.

    flagdit autoencoder --config configs/autoencoder/mnist.py --workdir runs/autoencoder   # runs/autoencoder/vae
    flagdit encode --config configs/t2v/mnist.py:latent                                     # -> runs/t2v_cache
    flagdit train --config configs/t2v/mnist.py:latent --workdir runs/t2v_latent
    flagdit eval --workdir runs/t2v_latent
"""

import ml_collections

# Sized by measurement (2 shared CPU cores, another run beside it): patch 4 (64 tokens per frame, 192 / 256
# per clip) trained at 0.9 steps/s; patch 8 (16 per frame: 48 / 64 per clip; the 16-px digit is 2x2
# patches) at ~4 steps/s, so 2,400 steps fit in ~10 min of training.

_MODELS = {
    # Lumina-Next: [PAD] only; rope_axes 3 rotates by (frame, row, col) (head_dim 24 divides by 2 * 3).
    "next": dict(preset="lumina-next-tiny", dim=96, n_layers=4, n_heads=4, n_kv_heads=2, rope_axes=3),
    # Lumina-T2I: 1-D RoPE over the flat index, [nextline] after every patch row, [nextframe] after every frame.
    "flag": dict(preset="lumina-t2i-tiny", dim=96, n_layers=4, n_heads=4, n_kv_heads=2, nextframe=True),
}


# The clips (pixels): both the pixel runs' data and what `flagdit encode` reads for :latent.
_CLIPS = dict(frames=(3, 4), canvas=32, digit_size=16, speeds=(1, 3), max_frames=6, cap_dim=32, cap_len=8)


def get_config(arg="next"):
    if arg == "latent":
        return _latent()
    if arg not in _MODELS:
        raise ValueError(f"configs/t2v/mnist.py:{arg}; expected one of {sorted(_MODELS) + ['latent']}")
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = 2400
    c.global_batch = 32
    c.grad_accum_steps = 1
    c.task = "caption"
    c.caption_dropout = 0.1

    c.model = ml_collections.ConfigDict(dict(
        _MODELS[arg], patch_size=8, in_channels=1, cap_feat_dim=32, multiple_of=128, dtype="float32", remat="none",
        attention="auto", scan_layers=False, sequence_parallel="ulysses"))

    # Buckets () = one per token length in the data (T=3 and T=4). image_size is unused by the caption
    # task's grids (they draw at the data's own sizes) but validated.
    c.data = ml_collections.ConfigDict(dict(
        name="moving_mnist", image_size=32, channels=1, worker_count=0, buckets=(),
        options=ml_collections.ConfigDict(_CLIPS)))

    c.flow = ml_collections.ConfigDict(dict(path="linear", time_sampler="lognorm", prediction="velocity"))
    c.optim = ml_collections.ConfigDict(dict(lr=2e-3, b1=0.9, b2=0.999, weight_decay=0.0, grad_clip=2.0,
                                             warmup_steps=0, schedule="constant"))
    c.ema_decay = 0.995
    c.mesh = ml_collections.ConfigDict(dict(shape=(-1, 1, 1, 1), num_devices=-1))
    c.checkpoint = ml_collections.ConfigDict(dict(every_steps=500, keep=3, async_save=True))
    c.log_every_steps = 100
    c.sample = ml_collections.ConfigDict(dict(method="heun", num_steps=20, cfg_scale=2.0, shift=1.0, per_class=8,
                                              use_ema=True))
    # frames: the trained lengths and a longer one (extrapolation; <= data.options.max_frames).
    c.eval = ml_collections.ConfigDict(dict(num_samples=96, batch=48, frames=(3, 4, 5, 6), classifier_steps=800))
    return c


def _latent():
    """Next-DiT (3-D RoPE) on VAE latents of the same clips: 8x8x8 per frame, patch 2."""
    c = get_config("next")
    # Steps and guidance: at the pixel run's 2,400 steps and guidance 2 the motion was learned but the digit
    # read 0.24; at 14,400 and guidance 4 it reads 0.78 / 0.84 at T = 3 / 4, the 0.83 / 0.81 of real clips
    # through the VAE (experiments/results/t2v/RESULTS.md).
    c.total_steps = 14400
    c.sample.cfg_scale = 4.0
    # The frozen encoders: the VAE once in `flagdit encode` and again to decode samples; the captions are
    # the source's own word embeddings ('source': MovingMnistSource.caption_encoder), as in the pixel run.
    c.text_encoder = ml_collections.ConfigDict(dict(path="source"))
    c.vae = ml_collections.ConfigDict(dict(path="runs/autoencoder/vae"))  # flagdit autoencoder --workdir runs/autoencoder
    c.encode = ml_collections.ConfigDict(dict(
        source="moving_mnist", options=ml_collections.ConfigDict(_CLIPS), splits=("train", "eval"),
        num_shards=4, batch_size=64, sample_posterior=False))
    c.model.update(patch_size=2, in_channels=8)
    # image_size: the latent side (32 px / 4); buckets () = one per frame count (48 and 64 tokens).
    c.data = ml_collections.ConfigDict(dict(
        name="encoded", image_size=8, channels=8, worker_count=0, buckets=(),
        options=ml_collections.ConfigDict(dict(data_dir="runs/t2v_cache"))))
    return c
