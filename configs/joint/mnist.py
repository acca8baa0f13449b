"""The embedded joint model: MNIST digits and their two-token text (digit word, stroke word) in one
sequence, each modality with its own time (UniDiffuser in flow-matching form, `models/joint.py`),
and the unconditional Flag-DiT its marginal is compared with (same trunk, data and steps).

    flagdit train --config configs/joint/mnist.py --workdir runs/joint          # the joint model
    flagdit train --config configs/joint/mnist.py:uncond --workdir runs/uncond  # the baseline
    flagdit sample --workdir runs/joint      # joint pairs, text -> image, image -> text, marginals, Gibbs
    flagdit eval --workdir runs/joint --config.eval.baseline_workdir=runs/uncond

The trunk is the embedded default's (width 128, 4 layers, patch 4: 64 image tokens + 8 [nextline])
plus 2 text tokens of width 16.
"""

import ml_collections

_TRUNK = dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=None, patch_size=4, in_channels=1, multiple_of=128,
              dtype="float32", remat="none", attention="auto", scan_layers=False, sequence_parallel="ulysses")


def get_config(arg="joint"):
    if arg not in ("joint", "uncond"):
        raise ValueError(f"configs/joint/mnist.py:{arg}; expected 'joint' or 'uncond'")
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = 6000
    c.global_batch = 32
    c.grad_accum_steps = 1
    if arg == "joint":
        c.task = "joint"
        c.model = ml_collections.ConfigDict(dict(_TRUNK, preset="joint-tiny", text_dim=16, text_len=2))
        c.data = ml_collections.ConfigDict(dict(name="mnist_joint", image_size=32, channels=1, worker_count=0,
                                                options=ml_collections.ConfigDict(dict(text_dim=16))))
    else:  # a one-class Flag-DiT: no condition, nothing dropped
        c.task = "unconditional"
        c.model = ml_collections.ConfigDict(dict(_TRUNK, preset="flagdit-tiny", num_classes=1,
                                                 class_dropout_prob=0.0))
        c.data = ml_collections.ConfigDict(dict(name="mnist", image_size=32, channels=1, worker_count=0))
    # Both modalities' times are drawn independently from this sampler (the issue: logit-normal).
    c.flow = ml_collections.ConfigDict(dict(path="linear", time_sampler="lognorm", prediction="velocity"))
    if arg == "joint":
        # ...except that each modality's time is set clean (t = 1, the other's condition) with probability
        # clean_prob and to pure noise (t = 0, the other's marginal) with noise_prob, independently per
        # modality (tasks.Joint), as (image, text) pairs. Logit-normal alone puts 0.2% of times above 0.95,
        # so the clean condition that text -> image and guidance sample at was hardly trained; the text's
        # endpoints (0.3 / 0.3) train the image's conditional and marginal, the image's (0.1 / 0.1) only
        # what image -> text needs (see the README's joint section).
        c.joint = ml_collections.ConfigDict(dict(clean_prob=(0.1, 0.3), noise_prob=(0.1, 0.3)))
    c.optim = ml_collections.ConfigDict(dict(lr=2e-3, b1=0.9, b2=0.999, weight_decay=0.0, grad_clip=2.0,
                                             warmup_steps=0, schedule="constant"))
    c.ema_decay = 0.995
    c.mesh = ml_collections.ConfigDict(dict(shape=(-1, 1, 1, 1), num_devices=-1))
    c.checkpoint = ml_collections.ConfigDict(dict(every_steps=500, keep=3, async_save=True))
    c.log_every_steps = 100
    # 6,000 steps with these endpoints: text -> image 0.888, image -> text 0.952, marginal FID 1.32x the
    # unconditional Flag-DiT's at 6,000 steps (N = 500; the README's joint section).
    # cfg_scale: guidance from the model's own marginal, v_marg + s (v_cond - v_marg) (UniDiffuser's
    # (1 + s') eps_c - s' eps_u with s = 1 + s'); 1 = none.
    c.sample = ml_collections.ConfigDict(dict(method="heun", num_steps=20, cfg_scale=4.0, shift=1.0, per_class=8,
                                              use_ema=True, gibbs_steps=4))
    c.eval = ml_collections.ConfigDict(dict(num_samples=500, batch=250, classifier_steps=800, baseline_workdir=""))
    return c
