"""DiT-XL/2 on ImageNet 256x256 latents, as a flow-matching config (REFERENCE.md §7; DiT `train.py`,
`diffusion/__init__.py: create_diffusion`, `models.py: DiT_XL_2` @ed81ce2).

DiT is a DDPM: 1000 discrete steps with the linear beta schedule 1e-4..0.02, epsilon prediction
with the simple MSE plus a variational-bound term for the learned variance (`learn_sigma=True`,
LossType.MSE + LEARNED_RANGE). Its flow analogue here is SiT's: the VP path (`flow/paths.py:
VPPath`, beta(s) = 0.1 + s (20 - 0.1), which is the continuous-time limit of exactly that schedule:
1000 x 1e-4 = 0.1, 1000 x 0.02 = 20), noise prediction, uniform t on [0, 1 - 1e-5], no loss
weight (DDPM's L_simple).

Exact: the network (the same DiT-XL/2 as configs/imagenet/sit.py), AdamW lr 1e-4 constant, weight
decay 0, global batch 256, EMA 0.9999, label dropout 0.1, fp32, DDP, the latents (ADM crop +
flip, sd-vae-ft-ema x0.18215), ~7M steps (1400 epochs; the paper's FID 2.27 is at 7M).
Flow analogues, not DiT itself: continuous t (DiT: 1000 integer steps, fed to the embedder as
integers; ours feeds t in [0, 1]); the VB term that trains DiT's variance channels is not
reproduced (the sigma channels exist, as in DiT, and get no gradient); DiT does not clip
gradients (grad_clip 1e9 never binds). Sampling: DiT's 250-step DDPM ancestral sampler is the
reverse VP SDE; the analogue is Euler–Maruyama with SBDM diffusion on the VP path, cfg 1.5 on
the first 3 channels (DiT's FID setting; its sample.py default is 4.0).

    flagdit train --config configs/imagenet/dit.py --workdir runs/dit_xl2 \
        --config.data.options.data_dir=/data/imagenet_latents
"""

import importlib.util
import pathlib

import ml_collections


def get_config(arg: str = ""):
    if arg not in ("", "xl2"):
        raise ValueError(f"configs/imagenet/dit.py:{arg}: the only size is DiT-XL/2 (no argument, or 'xl2')")
    spec = importlib.util.spec_from_file_location("sit_imagenet_config", pathlib.Path(__file__).with_name("sit.py"))
    base = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(base)
    c = base.get_config()
    c.flow = ml_collections.ConfigDict(dict(path="vp", time_sampler="uniform", prediction="noise"))
    c.sample = ml_collections.ConfigDict(dict(method="sde", num_steps=250, cfg_scale=1.5, cfg_channels=3,
                                              diffusion_form="SBDM", diffusion_norm=1.0, last_step="Mean",
                                              per_class=1, use_ema=True))
    return c
