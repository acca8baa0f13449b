"""Lumina-Next-T2I 2B (Next-DiT + Gemma-2B + SDXL VAE) at 1024 px (REFERENCE.md §2-§5, Lumina-Next
column; LT `lumina_next_t2i/train.py`, `models/model.py: NextDiT_2B_GQA_patch2`).

Recipe: 2304 x 24 Next-DiT, 32 heads with 8 KV heads (GQA), sandwich RMSNorms, 2-D RoPE; captions are
Gemma-2B's penultimate hidden states (2048 wide, <= 256 tokens, padded to a multiple of 8);
variable aspect-ratio crops of a 1024 px budget in SDXL-VAE latents (x0.13025), [PAD] only; AdamW
lr 1e-4 constant, global batch 256 (the trainer's default: the scripts are not released), clip 2.0,
EMA 0.9999, uniform t (the trainer's default), captions dropped to "" w.p. 0.1, bf16 + FSDP.
`:512` / `:256` give the same model on smaller budgets.

    flagdit encode --config configs/t2i/lumina_next.py --config.encode.options.path=/data/pairs.jsonl \
        --config.text_encoder.path=/ckpt/gemma-2b --config.vae.path=/ckpt/sdxl-vae --config.data.options.data_dir=/data/next_1024
    flagdit train --config configs/t2i/lumina_next.py --workdir runs/lumina_next --config.data.options.data_dir=/data/next_1024
"""

import ml_collections

from flagdit_jax.models import registry

SIZES = (256, 512, 1024)
_MAX_SEQ_LEN = {256: 256, 512: 1024, 1024: 4096}  # [PAD] only: (size / 16)^2 patch tokens at most


def get_config(arg="1024"):
    size = int(arg) if str(arg).isdigit() else None
    if size not in SIZES:
        raise ValueError(f"configs/t2i/lumina_next.py:{arg}; the image size must be one of {SIZES} (pixels)")
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = 100_000  # [UNVERIFIED]: no released script gives a step count
    c.global_batch = 256
    c.grad_accum_steps = 1
    c.task = "caption"
    c.caption_dropout = 0.1
    c.init_from = ""

    c.text_encoder = ml_collections.ConfigDict(dict(path="", kind="gemma", dtype="bfloat16"))  # gemma-2b folder
    c.vae = ml_collections.ConfigDict(dict(path=""))  # SDXL VAE diffusers folder
    c.encode = ml_collections.ConfigDict(dict(
        source="image_text", options=ml_collections.ConfigDict(dict(path="", image_size=size, crop_patch=16)),
        splits=("train",), num_shards=256, batch_size=32, sample_posterior=False))

    p = registry.PRESETS["lumina-next-2b"]
    c.model = ml_collections.ConfigDict(dict(
        preset="lumina-next-2b", dim=p.dim, n_layers=p.n_layers, n_heads=p.n_heads, n_kv_heads=p.n_kv_heads,
        patch_size=2, in_channels=4, cap_feat_dim=2048, dtype="bfloat16", remat="dots",
        attention="auto", scan_layers=False, sequence_parallel="ulysses"))

    c.data = ml_collections.ConfigDict(dict(
        name="encoded", image_size=size // 8, channels=4, worker_count=4, buckets=(_MAX_SEQ_LEN[size],),
        options=ml_collections.ConfigDict(dict(data_dir=""))))

    c.flow = ml_collections.ConfigDict(dict(path="linear", time_sampler="uniform", prediction="velocity"))
    c.optim = ml_collections.ConfigDict(dict(lr=1e-4, b1=0.9, b2=0.999, weight_decay=0.0, grad_clip=2.0,
                                             warmup_steps=0, schedule="constant"))
    c.ema_decay = 0.9999
    c.mesh = ml_collections.ConfigDict(dict(shape=(1, -1, 1, 1), num_devices=-1))
    c.checkpoint = ml_collections.ConfigDict(dict(every_steps=2_000, keep=3, async_save=True))
    c.log_every_steps = 100
    # LT lumina_next_t2i/demo.py: midpoint, 30 grid points, shift 4, guidance 4 (time-aware RoPE past 1024 px
    # is the pipeline's job, LuminaNextPipeline).
    c.sample = ml_collections.ConfigDict(dict(method="midpoint", num_steps=30, cfg_scale=4.0, shift=4.0, per_class=4,
                                              use_ema=True))
    return c
