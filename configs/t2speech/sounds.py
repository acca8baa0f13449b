"""Tiny text-to-audio runs on spectrograms of sounds made by code (2 CPU cores; Lumina-T2Speech's
treatment in miniature: a spectrogram is a one-frame, one-channel image, no VAE).

Sounds (`data/sounds.py`): tones at a named pitch, rising / falling chirps, 2 / 3 / 4 beats and
two-note chords, as 32-bin log spectrograms of 24 or 32 frames (0.38 / 0.51 s at 8 kHz) in one run
(two token-length buckets). `flagdit eval` reads pitch, sweep and beats off the samples
(`eval/audio_eval.py`) at the trained widths and at 48 and 64 frames (duration extrapolation).

    flagdit train --config configs/t2speech/sounds.py --workdir runs/t2speech          # Next-DiT, 2-D RoPE
    flagdit train --config configs/t2speech/sounds.py:flag --workdir runs/t2speech_flag  # Flag-DiT, [nextline]
    flagdit sample --workdir runs/t2speech && flagdit eval --workdir runs/t2speech
"""

import ml_collections

# Token lengths at patch 4 (H = 32 bins -> 8 patch rows): Next-DiT 48 / 64 for W = 24 / 32;
# Flag-DiT with [nextline] after every patch row 56 / 72.
_MODELS = {
    # Next-DiT: 2-D RoPE over (row, col) = (frequency, time), [PAD] only.
    "next": dict(preset="lumina-next-tiny", dim=96, n_layers=4, n_heads=4, n_kv_heads=2),
    # Flag-DiT (Lumina-T2X): [nextline] after every patch row (one frame: no [nextframe]).
    "flag": dict(preset="lumina-t2i-tiny", dim=96, n_layers=4, n_heads=4, n_kv_heads=2),
}
_BUCKETS = {"next": (48, 64), "flag": (56, 72)}


def get_config(arg="next"):
    if arg not in _MODELS:
        raise ValueError(f"configs/t2speech/sounds.py:{arg}; expected one of {sorted(_MODELS)}")
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = 2400  # ~4.2 steps/s on 2 shared CPU cores (measured): ~10 min
    c.global_batch = 32
    c.grad_accum_steps = 1
    c.task = "caption"
    c.caption_dropout = 0.1  # the official T2X trainers drop captions to "" w.p. 0.1

    c.model = ml_collections.ConfigDict(dict(
        _MODELS[arg], patch_size=4, in_channels=1, cap_feat_dim=32, multiple_of=128, dtype="float32", remat="none",
        attention="auto", scan_layers=False, sequence_parallel="ulysses"))

    # data.image_size is the sampling size of square grids; training sizes come from the data (32 x W).
    c.data = ml_collections.ConfigDict(dict(
        name="sounds", image_size=32, channels=1, worker_count=0, buckets=_BUCKETS[arg],
        options=ml_collections.ConfigDict(dict(widths=(24, 32), cap_dim=32, cap_len=6))))

    c.flow = ml_collections.ConfigDict(dict(path="linear", time_sampler="lognorm", prediction="velocity"))
    c.optim = ml_collections.ConfigDict(dict(lr=2e-3, b1=0.9, b2=0.999, weight_decay=0.0, grad_clip=2.0,
                                             warmup_steps=0, schedule="constant"))
    c.ema_decay = 0.995
    c.mesh = ml_collections.ConfigDict(dict(shape=(-1, 1, 1, 1), num_devices=-1))
    c.checkpoint = ml_collections.ConfigDict(dict(every_steps=500, keep=3, async_save=True))
    c.log_every_steps = 100
    c.sample = ml_collections.ConfigDict(dict(method="heun", num_steps=20, cfg_scale=2.0, shift=1.0, per_class=8,
                                              use_ema=True))
    # per_class samples of each of the 11 sound classes at every trained width and at long_widths.
    c.eval = ml_collections.ConfigDict(dict(per_class=8, long_widths=(48, 64), batch=88))
    return c
