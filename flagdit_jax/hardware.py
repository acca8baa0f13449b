"""Peak FLOP/s per accelerator kind and the model-FLOPs-utilisation (MFU) arithmetic.

MFU = FLOPs per step x steps per second / (peak FLOP/s per device x devices) (PaLM, Chowdhery et
al. 2022, appendix B). Peaks are the vendors' dense (no 2:4 sparsity) tensor-core / MXU figures:
NVIDIA H100 / H200 / A100 / L4 / L40S datasheets, Google Cloud TPU system-architecture pages
(v4, v5e, v5p, v6e). The float32 column is what XLA runs a float32 matmul at by default: TF32
tensor cores on NVIDIA (jax's default matmul precision), bf16 passes of the MXU on TPU (so the
bf16 peak). Kinds not listed (CPUs, unknown cards) have no peak: MFU is None, never a guess.
"""

from __future__ import annotations

import logging
from typing import Optional

log = logging.getLogger("flagdit_jax.hardware")

# (substring of `jax.Device.device_kind`, lower-case; bf16 dense peak; float32-default-precision peak).
# Order matters: the first match wins, so specific names come before their prefixes.
PEAK_FLOPS: tuple[tuple[str, float, float], ...] = (
    ("h200", 989e12, 494.5e12),  # H200 SXM: same SM count and clocks as H100 SXM
    ("gh200", 989e12, 494.5e12),
    ("h100 pcie", 756e12, 378e12),
    ("h100 nvl", 835e12, 417.5e12),
    ("h100", 989e12, 494.5e12),  # "NVIDIA H100 80GB HBM3" (SXM)
    ("b200", 2250e12, 1100e12),
    ("a100", 312e12, 156e12),  # "NVIDIA A100-SXM4-80GB", "...-40GB", PCIe: same dense peak
    ("l40s", 362e12, 183e12),
    ("l4", 121e12, 60e12),
    ("a10g", 125e12, 62.5e12),  # AWS A10G: 70 TF bf16 quoted by AWS at its lower clocks; NVIDIA A10 sheet
    ("tpu v6 lite", 918e12, 918e12),  # v6e (Trillium)
    ("tpu v6e", 918e12, 918e12),
    ("tpu v5 lite", 197e12, 197e12),  # v5e
    ("tpu v5e", 197e12, 197e12),
    ("tpu v5p", 459e12, 459e12),
    ("tpu v5", 459e12, 459e12),  # v5p reports "TPU v5"
    ("tpu v4", 275e12, 275e12),
    ("tpu v3", 123e12, 123e12),
)
DTYPES = ("bfloat16", "float32")


def peak_flops(device_kind: str, dtype: str = "bfloat16") -> Optional[float]:
    """Dense peak FLOP/s of one device of `device_kind` (e.g. "NVIDIA H100 80GB HBM3", "TPU v5
    lite") for matmuls in `dtype` ('bfloat16' or 'float32'; float16 counts as bfloat16); None for
    kinds not in `PEAK_FLOPS` (CPUs included)."""
    dtype = "bfloat16" if dtype in ("float16", "bf16", "fp16") else ("float32" if dtype in ("fp32", "f32")
                                                                      else dtype)
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}; expected one of {DTYPES}")
    kind = str(device_kind).lower()
    for key, bf16, f32 in PEAK_FLOPS:
        if key in kind:
            return bf16 if dtype == "bfloat16" else f32
    return None


def mfu(flops_per_step: float, steps_per_sec: float, device_kind: str, num_devices: int,
        dtype: str = "bfloat16") -> Optional[float]:
    """Model FLOPs utilisation in [0, 1]: `flops_per_step` (the whole step, all devices) x
    `steps_per_sec` / (peak of `device_kind` x `num_devices`); None when the kind has no peak."""
    if not num_devices >= 1:
        raise ValueError(f"num_devices={num_devices}; expected >= 1")
    if not (flops_per_step >= 0 and steps_per_sec >= 0):
        raise ValueError(f"flops_per_step={flops_per_step}, steps_per_sec={steps_per_sec}; expected both >= 0")
    peak = peak_flops(device_kind, dtype)
    if peak is None:
        return None
    return flops_per_step * steps_per_sec / (peak * num_devices)


def describe_peak(device_kind: str, dtype: str) -> str:
    """One log line: the peak used for MFU, or why MFU is omitted."""
    peak = peak_flops(device_kind, dtype)
    if peak is None:
        return (f"no peak FLOP/s known for device kind {device_kind!r} ({dtype}): MFU omitted "
                "(add it to flagdit_jax.hardware.PEAK_FLOPS)")
    return f"peak {peak / 1e12:.0f} TFLOP/s per {device_kind} device ({dtype} dense) for MFU"
