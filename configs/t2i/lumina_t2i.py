"""Lumina-T2I 5B (Flag-DiT + LLaMA-2-7B + SDXL VAE): the paper's three stages as configs
(REFERENCE.md §2-§3, T2I column; LT `lumina_t2i/exps/5B_bs512_lr1e-4_bf16_{256,512,1024}px_sdxlvae.sh`).

Recipe: 3072 x 32 Flag-DiT with cross-attention to LLaMA-2-7B's last hidden states (4096 wide, BOS+EOS,
<= 128 tokens), [nextline] + [PAD], variable aspect-ratio crops of a 256 / 512 / 1024 px budget in
SDXL-VAE latents (x0.13025), AdamW lr 1e-4 constant, no weight decay, global batch 512, clip 2.0,
EMA 0.9999, uniform t (the scripts pass no --snr_type), captions dropped to "" w.p. 0.1, bf16
compute with fp32 master weights, FSDP. Each stage starts from the previous stage's weights
(`init_from`). Token-length bucket = the official max_seq_len (288 / 1088 / 4224).

    flagdit encode --config configs/t2i/lumina_t2i.py:256 --config.encode.options.path=/data/pairs.jsonl \
        --config.text_encoder.path=/ckpt/Llama-2-7b-hf --config.vae.path=/ckpt/sdxl-vae \
        --config.data.options.data_dir=/data/t2i_256
    flagdit train --config configs/t2i/lumina_t2i.py:256 --workdir runs/t2i_256 --config.data.options.data_dir=/data/t2i_256 ...
    flagdit train --config configs/t2i/lumina_t2i.py:512 --workdir runs/t2i_512 --config.init_from=runs/t2i_256 ...
"""

import ml_collections

from flagdit_jax.models import registry

STAGES = (256, 512, 1024)
_MAX_SEQ_LEN = {256: 288, 512: 1088, 1024: 4224}  # LT lumina_t2i/train.py comment; data.buckets.crop_buckets


def get_config(arg="256"):
    stage = int(arg) if str(arg).isdigit() else None
    if stage not in STAGES:
        raise ValueError(f"configs/t2i/lumina_t2i.py:{arg}; the stage must be one of {STAGES} (pixels)")
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = 100_000  # [UNVERIFIED]: the scripts give no step count; the paper ~96 A100-days per stage
    c.global_batch = 512
    c.grad_accum_steps = 1
    c.task = "caption"
    c.caption_dropout = 0.1
    c.init_from = "" if stage == 256 else f"runs/lumina_t2i_{STAGES[STAGES.index(stage) - 1]}"

    c.text_encoder = ml_collections.ConfigDict(dict(path="", kind="llama", dtype="bfloat16"))  # Llama-2-7b folder
    c.vae = ml_collections.ConfigDict(dict(path=""))  # SDXL VAE diffusers folder (scaling_factor 0.13025)
    c.encode = ml_collections.ConfigDict(dict(
        source="image_text", options=ml_collections.ConfigDict(dict(path="", image_size=stage, crop_patch=16)),
        splits=("train",), num_shards=256, batch_size=32, sample_posterior=False))

    p = registry.PRESETS["lumina-t2i-5b"]
    c.model = ml_collections.ConfigDict(dict(
        preset="lumina-t2i-5b", dim=p.dim, n_layers=p.n_layers, n_heads=p.n_heads, patch_size=2, in_channels=4,
        cap_feat_dim=4096, dtype="bfloat16", remat="dots",
        attention="auto", scan_layers=False, sequence_parallel="ulysses"))

    c.data = ml_collections.ConfigDict(dict(
        name="encoded", image_size=stage // 8, channels=4, worker_count=4, buckets=(_MAX_SEQ_LEN[stage],),
        options=ml_collections.ConfigDict(dict(data_dir=""))))

    c.flow = ml_collections.ConfigDict(dict(path="linear", time_sampler="uniform", prediction="velocity"))
    c.optim = ml_collections.ConfigDict(dict(lr=1e-4, b1=0.9, b2=0.999, weight_decay=0.0, grad_clip=2.0,
                                             warmup_steps=0, schedule="constant"))
    c.ema_decay = 0.9999
    c.mesh = ml_collections.ConfigDict(dict(shape=(1, -1, 1, 1), num_devices=-1))  # FSDP, as the reference
    c.checkpoint = ml_collections.ConfigDict(dict(every_steps=2_000, keep=3, async_save=True))
    c.log_every_steps = 100
    # LT lumina_t2i/demo.py: euler, 30 grid points, time shift 4, guidance 4.
    c.sample = ml_collections.ConfigDict(dict(method="euler", num_steps=30, cfg_scale=4.0, shift=4.0, per_class=4,
                                              use_ema=True))
    return c
