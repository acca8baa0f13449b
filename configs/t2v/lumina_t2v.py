"""Lumina-T2V (Flag-DiT 2B, text-to-video): the paper's two stages as configs, for paper-scale
validation (`experiments/paper_configs.py`: parameters, FLOPs, sharded compile on fake devices).

No T2V code was released (LT = Alpha-VLLM/Lumina-T2X @1c606962: no video model, data or script; issue
#22 "we are organizing our video generation code"), so everything here comes from the paper as read
second-hand, or is inferred. Tags: [2nd] = a secondary summary of arXiv 2405.05945 (notes on the
paper found in a public repository, not the PDF itself); [LT] = read from the official code; [INFERRED] =
derived by us from the tagged facts; [UNVERIFIED] = a guess with no source.

Recipe:
- Model [2nd]: a 2B Flag-DiT, chosen over the 5B because video sequences reach ~10^5 - 10^6 tokens; the
  paper gives no width / depth. [INFERRED] 2304 x 24 layers x 32 heads: every "2B" constructor in LT
  has that shape (`Next-DiT-ImageNet/models/models.py` and, before commit fb2e469 renamed it,
  `lumina_next_t2i/models/model.py: DiT_Llama_2B_patch2`); with the cross-attention below it counts
  2.10B. [nextline] after every patch row and [nextframe] after every frame (the paper's Fig. 2; LT
  issue #24), 1-D RoPE over the flat index, QK-norm, zero-init gated cross-attention (as Lumina-T2I).
- Text encoder [2nd]: CLIP-L/G. [UNVERIFIED] read here as SDXL's pair: CLIP-L (768) and OpenCLIP bigG
  (1280) penultimate states concatenated, 2048 wide, 77 tokens (`text_encoder.kind='clip'` is not one
  of `flagdit_jax.text`'s encoders: `flagdit encode` cannot run this config yet).
- Latents [2nd]: SD-1.5 VAE frame by frame (4 channels, /8; scale 0.18215 is SD-1.5's, [LT] none),
  patch 2.
- Data [2nd]: a 15M-clip subset of Panda-70M plus 40,000 Pexels videos (LT issue #24: "PandaHD, Webvid
  and Pexel").
- Stage 1 '512' [2nd]: fixed 512 x 512 x 32 frames ("~32K tokens"): 32 x (32 x 33 + 1) = 33,824 tokens
  [INFERRED from the layout]. Stage 2 '720p' [2nd]: any resolution and duration up to 128K tokens,
  720p shown: 1280 x 720 -> 160 x 90 latent -> 45 x (80 + 1) + 1 = 3,646 tokens a frame, 35 frames =
  127,610 tokens, bucket 131,072 = 128K [INFERRED].
- Global batch [2nd]: a loss figure compares 8 with 128 GPUs, batch 32 with 1024; 1024 is used for
  stage 1. Stage 2's batch is [UNVERIFIED]: 128 (one clip per GPU of the 128).
- Parallelism [2nd]: FSDP plus sequence parallelism for long sequences. Stage 1 here: FSDP over all
  devices (1, N, 1, 1); stage 2: FSDP x an 8-way sequence axis (1, N/8, 8, 1), Ulysses [UNVERIFIED:
  the axis size is ours, one 8-GPU node].
- Optimiser, times, EMA, precision, guidance: [UNVERIFIED] Lumina-T2I's (REFERENCE.md §3): AdamW lr
  1e-4 constant, no weight decay, clip 2.0, EMA 0.9999, uniform t, caption drop 0.1, bf16 compute with
  fp32 master weights; stage 2 starts from stage 1 (`init_from`). Step counts are not given.

    python experiments/paper_configs.py --only lumina-t2v-2b-512,lumina-t2v-2b-720p --devices 8,64

Training it for real would need (shared code, not here): a video source for `flagdit encode` (frames
through the VAE one by one, records [T, h, w, 4]), the CLIP text encoder, and `data.frame_shape` read
by the sampler. `data.frame_shape` = (T, H, W) of the latent clip, read by experiments/paper_configs.py.
"""

import ml_collections

from flagdit_jax.models import registry

STAGES = ("512", "720p")
# stage -> (latent frames T, latent H, latent W, token bucket, global batch, mesh)
_STAGE = {
    "512": (32, 64, 64, 33_824, 1024, (1, -1, 1, 1)),
    "720p": (35, 90, 160, 131_072, 128, (1, -1, 8, 1)),
}
CLIP_WIDTH, CLIP_TOKENS = 2048, 77  # [UNVERIFIED] SDXL-style CLIP-L + bigG concatenation


def get_config(arg="512"):
    if arg not in STAGES:
        raise ValueError(f"configs/t2v/lumina_t2v.py:{arg}; the stage must be one of {STAGES}")
    frames, h, w, bucket, batch, mesh = _STAGE[arg]
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = 100_000  # [UNVERIFIED]: not given
    c.global_batch = batch
    c.grad_accum_steps = 1
    c.task = "caption"
    c.caption_dropout = 0.1
    c.init_from = "" if arg == "512" else "runs/lumina_t2v_512"

    c.text_encoder = ml_collections.ConfigDict(dict(path="", kind="clip", max_length=CLIP_TOKENS, dtype="bfloat16"))
    c.vae = ml_collections.ConfigDict(dict(path="", scaling_factor=0.18215))  # SD-1.5 VAE folder

    p = registry.PRESETS["lumina-t2i-5b"]  # the Lumina-T2I Flag-DiT, resized to the 2B trunk
    c.model = ml_collections.ConfigDict(dict(
        preset="lumina-t2i-5b", dim=2304, n_layers=24, n_heads=p.n_heads, patch_size=2, in_channels=4,
        cap_feat_dim=CLIP_WIDTH, nextline=True, nextframe=True, dtype="bfloat16", remat="dots",
        attention="auto", scan_layers=False, sequence_parallel="ulysses"))

    c.data = ml_collections.ConfigDict(dict(
        name="encoded", image_size=h, channels=4, worker_count=4, buckets=(bucket,), frame_shape=(frames, h, w),
        options=ml_collections.ConfigDict(dict(data_dir=""))))

    c.flow = ml_collections.ConfigDict(dict(path="linear", time_sampler="uniform", prediction="velocity"))
    c.optim = ml_collections.ConfigDict(dict(lr=1e-4, b1=0.9, b2=0.999, weight_decay=0.0, grad_clip=2.0,
                                             warmup_steps=0, schedule="constant"))
    c.ema_decay = 0.9999
    c.mesh = ml_collections.ConfigDict(dict(shape=mesh, num_devices=-1))
    c.checkpoint = ml_collections.ConfigDict(dict(every_steps=2_000, keep=3, async_save=True))
    c.log_every_steps = 100
    # [UNVERIFIED] Lumina-T2I's demo settings (REFERENCE.md §4).
    c.sample = ml_collections.ConfigDict(dict(method="euler", num_steps=30, cfg_scale=4.0, shift=4.0, per_class=4,
                                              use_ema=True))
    return c
