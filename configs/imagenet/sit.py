"""SiT-XL/2 on ImageNet 256x256 latents: the flow-matching baseline the Lumina papers compare against
(REFERENCE.md §7; SiT `train.py`, `train_utils.py`, `models.py: SiT_XL_2` @947f95bd).

Exact: the DiT-XL/2 network (1152 x 28, 16 heads, patch 2, sin-cos APE, adaLN-Zero, learned-sigma
output channels unused by the loss; `flagdit_jax/models/dit.py`, preset `dit-xl-2`, 675M), the
linear path with velocity prediction and uniform t on [0, 1] (SiT's defaults: Linear / velocity /
no loss weight / train_eps 0), AdamW lr 1e-4 constant, weight decay 0, default betas, global
batch 256, EMA 0.9999, label dropout 0.1, fp32 (SiT's train.py has no autocast), data-parallel
(DDP) over all devices, the same latents as configs/imagenet/flagdit.py (ADM centre crop + flip,
sd-vae-ft-ema posterior sample x0.18215). SiT trains 1400 epochs of 5,005 steps (~7M steps; the
paper's SiT-XL/2 FID 2.06 is at 7M).
Not exact: SiT does not clip gradients; `config.optim.grad_clip` must be a finite number, so it is
1e9 here (a global-norm clip that never binds). SiT feeds t in [0, 1] to the timestep embedder, as
our DiT does.

    flagdit train --config configs/imagenet/sit.py --workdir runs/sit_xl2 \
        --config.data.options.data_dir=/data/imagenet_latents
"""

import importlib.util
import pathlib

import ml_collections

from flagdit_jax.models import registry


def _flagdit_base():
    """configs/imagenet/flagdit.py: the shared ImageNet latent data (and encode) sections."""
    spec = importlib.util.spec_from_file_location("flagdit_imagenet_config",
                                                  pathlib.Path(__file__).with_name("flagdit.py"))
    base = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(base)
    return base.get_config("600m")


def get_config(arg: str = ""):
    if arg not in ("", "xl2"):
        raise ValueError(f"configs/imagenet/sit.py:{arg}: the only size is SiT-XL/2 (no argument, or 'xl2')")
    c = _flagdit_base()
    c.total_steps = 7_000_000  # SiT: --epochs 1400 at 1.28M / 256 = 5,005 steps per epoch
    c.global_batch = 256
    c.grad_accum_steps = 1
    c.task = "class_label"

    p = registry.PRESETS["dit-xl-2"]
    c.model = ml_collections.ConfigDict(dict(
        preset="dit-xl-2", dim=p.dim, n_layers=p.n_layers, n_heads=p.n_heads, patch_size=p.patch_size,
        input_size=p.input_size, in_channels=4, num_classes=1000, class_dropout_prob=0.1, dtype="float32",
        remat="none", attention="auto", scan_layers=False, sequence_parallel="ulysses"))

    c.flow = ml_collections.ConfigDict(dict(path="linear", time_sampler="uniform", prediction="velocity"))
    c.optim = ml_collections.ConfigDict(dict(lr=1e-4, b1=0.9, b2=0.999, weight_decay=0.0, grad_clip=1e9,
                                             warmup_steps=0, schedule="constant"))
    c.ema_decay = 0.9999
    c.mesh = ml_collections.ConfigDict(dict(shape=(-1, 1, 1, 1), num_devices=-1))  # DDP: data parallel
    c.checkpoint = ml_collections.ConfigDict(dict(every_steps=50_000, keep=3, async_save=True))
    c.log_every_steps = 100
    # SiT sample.py ODE defaults: dopri5 (atol 1e-6, rtol 1e-3), cfg 4.0 on the first 3 latent channels
    # (models.py forward_with_cfg). The paper's FID 2.06 uses the SDE sampler (sample_ddp.py SDE, 250
    # steps) at cfg 1.5: --config.sample.method=sde --config.sample.cfg_scale=1.5.
    c.sample = ml_collections.ConfigDict(dict(method="dopri5", num_steps=250, cfg_scale=4.0, cfg_channels=3,
                                              per_class=1, use_ema=True))
    return c
