"""Class-conditional Next-DiT on ImageNet 256x256 latents: the same recipe as
configs/imagenet/flagdit.py (REFERENCE.md §3 gives one ImageNet column for both backbones).

    flagdit train --config configs/imagenet/nextdit.py:2b --workdir runs/ndit2b \
        --config.data.options.data_dir=/data/imagenet_latents
    # size: 600m | 2b | 3b | 7b (0.56 / 1.76 / 4.04 / 7.03B params)
"""

import importlib.util
import pathlib

from flagdit_jax.models import registry

SIZES = ("600m", "2b", "3b", "7b")


def get_config(arg: str = "600m"):
    if arg not in SIZES:
        raise ValueError(f"configs/imagenet/nextdit.py:{arg}: size must be one of {SIZES}")
    spec = importlib.util.spec_from_file_location("flagdit_imagenet_config",
                                                  pathlib.Path(__file__).with_name("flagdit.py"))
    base = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(base)
    c = base.get_config("600m")
    preset = registry.PRESETS[f"nextdit-{arg}"]
    c.model.preset = f"nextdit-{arg}"
    c.model.dim, c.model.n_layers, c.model.n_heads = preset.dim, preset.n_layers, preset.n_heads
    return c
