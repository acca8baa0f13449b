"""Lumina-T2MV (Flag-DiT 2B, text-to-multi-view): the paper's two resolution stages as configs, for
paper-scale validation (`experiments/paper_configs.py`).

No multi-view code was released (LT = Alpha-VLLM/Lumina-T2X @1c606962 has none), so the recipe comes
from the paper as read second-hand. Tags: [2nd] = a secondary summary of arXiv 2405.05945 (notes on
the paper in a public repository, not the PDF); [LT] = official code; [INFERRED] = derived by us;
[UNVERIFIED] = a guess with no source.

Recipe:
- Model [2nd]: a 2B Flag-DiT (the main text; the same summary says an appendix figure used the 5B).
  [INFERRED] 2304 x 24 x 32 heads, LT's only "2B" shape (see configs/t2v/lumina_t2v.py); 2.10B with the
  cross-attention below. Views are frames: [nextline] after every patch row, [nextframe] after every
  view [2nd: the paper's pipeline treats the views as T]; no camera parameters are given to the model
  [2nd].
- Text encoder [2nd]: CLIP-L/G, [UNVERIFIED] read as SDXL's 2048-wide, 77-token pair; captions from
  Cap3D [2nd].
- Latents [2nd]: SD-1.5 VAE per view (4 channels, /8), patch 2.
- Data [2nd]: the LVIS subset of Objaverse (~40K objects), 12 views per object at 30 degrees elevation
  and azimuths evenly over 360, white background. (The same summary also says the 12 views were tiled
  Zero123++-style into one 3 x 4 grid image: 1024 x 768 at 256 px a view; such a grid would give 3,120
  or 3,136 tokens, by its orientation, instead of 3,276 here.)
- Stages [2nd]: 16 x A100-80G; '256': 12 views of 256 x 256, global batch 64, 100K iterations; '512':
  12 views of 512 x 512, batch 16, 180K iterations. Tokens [INFERRED]: 12 x (16 x 17 + 1) = 3,276 and
  12 x (32 x 33 + 1) = 12,684.
- Optimiser, times, EMA, precision, guidance: [UNVERIFIED] Lumina-T2I's (REFERENCE.md §3); stage '512'
  starts from '256' (`init_from`) [UNVERIFIED]. FSDP over all devices as the reference trains; at
  '512' the batch of 16 cannot split over 64 data shards, so that stage adds a 4-way sequence axis
  (1, N/4, 4, 1), Ulysses [UNVERIFIED: ours, so that the 64-device compile exists].

    python experiments/paper_configs.py --only lumina-t2mv-2b-256,lumina-t2mv-2b-512 --devices 8,64

Training it for real needs (shared code): a multi-view source for `flagdit encode` (records [12, h, w, 4])
and the CLIP text encoder. `data.frame_shape` = (views, H, W) of the latent, read by
experiments/paper_configs.py.
"""

import ml_collections

from flagdit_jax.models import registry

STAGES = (256, 512)
VIEWS = 12
# stage -> (token bucket, global batch, iterations, mesh): [2nd] except the token counts [INFERRED] and
# the meshes [UNVERIFIED]
_STAGE = {256: (3_276, 64, 100_000, (1, -1, 1, 1)), 512: (12_684, 16, 180_000, (1, -1, 4, 1))}
CLIP_WIDTH, CLIP_TOKENS = 2048, 77  # [UNVERIFIED] SDXL-style CLIP-L + bigG concatenation


def get_config(arg="256"):
    stage = int(arg) if str(arg).isdigit() else None
    if stage not in STAGES:
        raise ValueError(f"configs/t2mv/lumina_t2mv.py:{arg}; the stage must be one of {STAGES} (pixels a view)")
    bucket, batch, steps, mesh = _STAGE[stage]
    side = stage // 8
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = steps
    c.global_batch = batch
    c.grad_accum_steps = 1
    c.task = "caption"
    c.caption_dropout = 0.1
    c.init_from = "" if stage == 256 else "runs/lumina_t2mv_256"

    c.text_encoder = ml_collections.ConfigDict(dict(path="", kind="clip", max_length=CLIP_TOKENS, dtype="bfloat16"))
    c.vae = ml_collections.ConfigDict(dict(path="", scaling_factor=0.18215))  # SD-1.5 VAE folder

    p = registry.PRESETS["lumina-t2i-5b"]  # the Lumina-T2I Flag-DiT, resized to the 2B trunk
    c.model = ml_collections.ConfigDict(dict(
        preset="lumina-t2i-5b", dim=2304, n_layers=24, n_heads=p.n_heads, patch_size=2, in_channels=4,
        cap_feat_dim=CLIP_WIDTH, nextline=True, nextframe=True, dtype="bfloat16", remat="dots",
        attention="auto", scan_layers=False, sequence_parallel="ulysses"))

    c.data = ml_collections.ConfigDict(dict(
        name="encoded", image_size=side, channels=4, worker_count=4, buckets=(bucket,), frame_shape=(VIEWS, side, side),
        options=ml_collections.ConfigDict(dict(data_dir=""))))

    c.flow = ml_collections.ConfigDict(dict(path="linear", time_sampler="uniform", prediction="velocity"))
    c.optim = ml_collections.ConfigDict(dict(lr=1e-4, b1=0.9, b2=0.999, weight_decay=0.0, grad_clip=2.0,
                                             warmup_steps=0, schedule="constant"))
    c.ema_decay = 0.9999
    c.mesh = ml_collections.ConfigDict(dict(shape=mesh, num_devices=-1))
    c.checkpoint = ml_collections.ConfigDict(dict(every_steps=2_000, keep=3, async_save=True))
    c.log_every_steps = 100
    c.sample = ml_collections.ConfigDict(dict(method="euler", num_steps=30, cfg_scale=4.0, shift=4.0, per_class=4,
                                              use_ema=True))
    return c
