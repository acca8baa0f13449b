"""The embedded default with a Next-DiT backbone (class-conditional, 2-D RoPE, sandwich norms):
same data, optimiser and budget as configs/default.py, for Next-DiT's resolution-extrapolation
experiment (experiments/extrapolation.py trains at 32x32 and samples at 64x64).

    flagdit train --config configs/next/mnist.py --workdir runs/next_mnist
"""

import importlib.util
import pathlib

_DEFAULT = pathlib.Path(__file__).resolve().parents[1] / "default.py"


def get_config(arg=None):
    spec = importlib.util.spec_from_file_location("flagdit_default_config", _DEFAULT)
    default = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(default)
    c = default.get_config()
    # Next-DiT ImageNet layout (parameter-free pre-norms, final adaLN with shift); head_dim 32 % 4 == 0.
    c.model.preset = "nextdit-tiny"  # the other model fields (n_kv_heads=None: full MHA) come from the default
    return c
