"""Class-conditional Flag-DiT on ImageNet 256x256, in SD-VAE latent space (REFERENCE.md §3, ImageNet column).

The reference recipe: 32x32x4 latents (sd-vae-ft-ema, x0.18215), patch 2, logit-normal t, AdamW lr 5e-4
constant (betas 0.9/0.999, no weight decay), global batch 256, clip 2.0, EMA 0.9999, label dropout 0.1,
bf16 compute with fp32 master weights. Latents are pre-encoded ArrayRecord shards, files
`{data_dir}/train-NNNNN-of-NNNNN.array_record`, written once by `flagdit encode` (posterior moments of
the crop and its mirror: flip and posterior sample are drawn at read time) or by `data.latents.write_latents`.

    flagdit encode --config configs/imagenet/flagdit.py:600m --config.vae.path=/models/sd-vae-ft-ema \
        --config.encode.options.data_dir=/data/tfds --config.data.options.data_dir=/data/imagenet_latents

    flagdit train --config configs/imagenet/flagdit.py:600m --workdir runs/fdit600m \
        --config.data.options.data_dir=/data/imagenet_latents
    # size: 600m | 3b (4.24B params, REFERENCE.md §2) | 7b; a pod: --config.mesh.shape='(1,-1,1,1)' is FSDP.
"""

import ml_collections

from flagdit_jax.models import registry

SIZES = ("600m", "3b", "7b")


def get_config(arg: str = "600m"):
    if arg not in SIZES:
        raise ValueError(f"configs/imagenet/flagdit.py:{arg}: size must be one of {SIZES}")
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = 900_000  # the README's FID is reported at 900K steps (REFERENCE.md §7)
    c.global_batch = 256
    c.grad_accum_steps = 1
    c.task = "class_label"  # flagdit_jax/tasks.py: labels -> null class w.p. model.class_dropout_prob

    preset = registry.PRESETS[f"flagdit-{arg}"]
    c.model = ml_collections.ConfigDict(dict(
        preset=f"flagdit-{arg}", dim=preset.dim, n_layers=preset.n_layers, n_heads=preset.n_heads,
        patch_size=2, in_channels=4, num_classes=1000, class_dropout_prob=0.1, dtype="bfloat16", remat="dots",
        attention="auto", scan_layers=False, sequence_parallel="ulysses"))

    c.data = ml_collections.ConfigDict(dict(
        name="latents", image_size=32, channels=4, worker_count=4,
        # random_flip / sample_posterior: drawn per (seed, epoch, record) from `flagdit encode`'s moment shards
        # (ignored for mean-only files from write_latents).
        options=ml_collections.ConfigDict(dict(data_dir="", scale=0.18215, random_flip=True, sample_posterior=True))))
    # `flagdit encode` (flagdit_jax/encoders.py: encode_imagenet): tfds ImageNet (prepared with
    # --file_format=array_record) -> ADM centre crop 256 -> sd-vae-ft-ema posterior of the crop and of
    # its mirror -> {data.options.data_dir}/{split}-NNNNN-of-NNNNN.array_record; training draws the
    # flip and the posterior sample per (seed, epoch, record), as the reference does on the fly.
    c.vae = ml_collections.ConfigDict(dict(path=""))  # diffusers folder of stabilityai/sd-vae-ft-ema
    c.encode = ml_collections.ConfigDict(dict(
        source="imagenet", splits=("train",), image_size=256, num_shards=1024, batch_size=128, dtype="float16",
        read_threads=16, options=ml_collections.ConfigDict(dict(data_dir="", builder="imagenet2012"))))

    c.flow = ml_collections.ConfigDict(dict(path="linear", time_sampler="lognorm", prediction="velocity"))
    c.optim = ml_collections.ConfigDict(dict(lr=5e-4, b1=0.9, b2=0.999, weight_decay=0.0, grad_clip=2.0,
                                             warmup_steps=0, schedule="constant"))
    c.ema_decay = 0.9999

    # FSDP over every device (the reference trains with PyTorch FSDP).
    c.mesh = ml_collections.ConfigDict(dict(shape=(1, -1, 1, 1), num_devices=-1))
    c.checkpoint = ml_collections.ConfigDict(dict(every_steps=5_000, keep=3, async_save=True))
    c.log_every_steps = 100

    # SiT / ImageNet sample.py defaults: dopri5 (atol 1e-6, rtol 1e-3), cfg 4.0 on the first 3 latent channels.
    c.sample = ml_collections.ConfigDict(dict(method="dopri5", num_steps=250, cfg_scale=4.0, cfg_channels=3,
                                              per_class=1, use_ema=True))
    return c
