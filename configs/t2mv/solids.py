"""Tiny text-to-multi-view run on rendered 3-D solids (2 CPU cores; `data/multiview.py`).

Each record is one solid (cube, pyramid, prism, octahedron, L block) in one of four colours seen by a
camera turning about the vertical axis: 4 views 90 degrees apart as 4 frames, captioned
"<bos> a <colour> <solid>" (fixed word embeddings). The eval split also holds 8-view records, so
`flagdit sample` / `flagdit eval` draw more views than were trained.

    flagdit train --config configs/t2mv/solids.py --workdir runs/t2mv          # Next-DiT, 3-D RoPE (view, row, col)
    flagdit train --config configs/t2mv/solids.py:flag --workdir runs/t2mv_flag  # Flag-DiT, [nextline] / [nextframe]
    flagdit sample --workdir runs/t2mv     # strip + turntable GIF per view count
    flagdit eval --workdir runs/t2mv       # solid / colour / cross-view consistency (eval/multiview_eval.py)
"""

import ml_collections

_MODELS = {
    # Lumina-Next: rope_axes 3 = 3-D RoPE over (view, row, col); head_dim 24 divisible by 2 * 3.
    "next": dict(preset="lumina-next-tiny", dim=96, n_layers=4, n_heads=4, n_kv_heads=2, rope_axes=3),
    # Lumina-T2I: 1-D RoPE, [nextline] after every patch row, [nextframe] after every view.
    "flag": dict(preset="lumina-t2i-tiny", dim=96, n_layers=4, n_heads=4, n_kv_heads=2, nextframe=True),
}


def get_config(arg="next"):
    if arg not in _MODELS:
        raise ValueError(f"configs/t2mv/solids.py:{arg}; expected one of {sorted(_MODELS)}")
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = 2800
    c.global_batch = 32
    c.grad_accum_steps = 1
    c.task = "caption"
    c.caption_dropout = 0.1

    c.model = ml_collections.ConfigDict(dict(
        _MODELS[arg], patch_size=4, in_channels=3, cap_feat_dim=32, multiple_of=128, dtype="float32",
        remat="none", attention="auto", scan_layers=False, sequence_parallel="ulysses"))

    # One view count in training -> one token-length bucket (data-derived: buckets=()).
    c.data = ml_collections.ConfigDict(dict(
        name="multiview", image_size=16, channels=3, worker_count=0, buckets=(),
        options=ml_collections.ConfigDict(dict(size=16, views=(4,), eval_views=(4, 8), num_records=4000,
                                               eval_records=400, elevation=25.0, cap_dim=32, cap_len=4))))

    c.flow = ml_collections.ConfigDict(dict(path="linear", time_sampler="lognorm", prediction="velocity"))
    c.optim = ml_collections.ConfigDict(dict(lr=2e-3, b1=0.9, b2=0.999, weight_decay=0.0, grad_clip=2.0,
                                             warmup_steps=0, schedule="constant"))
    c.ema_decay = 0.995
    c.mesh = ml_collections.ConfigDict(dict(shape=(-1, 1, 1, 1), num_devices=-1))
    c.checkpoint = ml_collections.ConfigDict(dict(every_steps=1000, keep=2, async_save=True))
    c.log_every_steps = 100
    c.sample = ml_collections.ConfigDict(dict(method="heun", num_steps=20, cfg_scale=2.0, shift=1.0, per_class=8,
                                              use_ema=True))
    # num_samples per view count of the eval split (4 and 8 views).
    c.eval = ml_collections.ConfigDict(dict(num_samples=100, batch=100))
    return c
