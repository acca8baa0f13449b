"""Ahead-of-time compile of a jitted step with a start-up report: compile time, XLA's per-device
memory analysis, XLA's FLOP count, and the analytic model FLOPs that MFU uses.

Two FLOP counts, because neither alone is right everywhere:
- `hlo_flops`: `compiled.cost_analysis()["flops"]`, per device, everything XLA runs (remat
  recompute and element-wise ops included). XLA's HloCostAnalysis counts a while-loop body ONCE
  (checked: a 4-step `lax.scan` of a matmul reports one matmul), so with scanned layers or
  gradient accumulation it undercounts by the trip count.
- `model_flops`: the analytic count of the matmuls and attention products of one forward +
  backward (3 x forward, PaLM appendix B's MFU convention), whole batch, all devices; the same
  whether layers are scanned, rematerialised or sharded. The train loop's `mfu` uses this one.
tests/test_aot.py checks that the two agree on an unscanned model.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any

import flax.linen as nn
import flax.traverse_util

log = logging.getLogger("flagdit_jax.aot")

# Kernels applied once per sample (conditioning path) or once per caption token, by path part;
# every other kernel multiplies each image token. Embedding tables are look-ups (no FLOPs).
_PER_SAMPLE = ("adaLN_modulation", "t_embedder", "y_embedder")
_PER_CAPTION_TOKEN = ("cap_embedder", "wk_y", "wv_y")


@dataclasses.dataclass(frozen=True)
class CompileReport:
    """What `compile_with_report` measured (bytes per device; FLOPs see the module docstring)."""

    compile_seconds: float
    argument_bytes: int
    output_bytes: int
    temp_bytes: int
    alias_bytes: int
    code_bytes: int
    hlo_flops_per_device: float  # nan when the backend gives no cost analysis
    has_loops: bool  # the compiled step keeps while loops (hlo_flops counts their bodies once)

    @property
    def peak_bytes(self) -> int:
        """Arguments + outputs + temporaries - donated (aliased) buffers: the step's live bytes."""
        return self.argument_bytes + self.output_bytes + self.temp_bytes - self.alias_bytes

    def lines(self) -> list[str]:
        f = _fmt_bytes
        loops = " (the step keeps while loops: each body counted once)" if self.has_loops else ""
        return [f"compiled in {self.compile_seconds:.1f} s",
                f"memory per device: arguments {f(self.argument_bytes)}, outputs {f(self.output_bytes)}, "
                f"temporaries {f(self.temp_bytes)}, aliased (donated) {f(self.alias_bytes)}, generated code "
                f"{f(self.code_bytes)}; total live {f(self.peak_bytes)}",
                f"XLA cost analysis: {self.hlo_flops_per_device / 1e9:.2f} GFLOP per device per step{loops}"]


def _fmt_bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def compile_with_report(jitted, *abstract_args) -> tuple[Any, CompileReport]:
    """`jitted.lower(*abstract_args).compile()` (args: arrays or `jax.ShapeDtypeStruct`s with
    shardings) and its report. The executable runs only arguments of exactly these shapes,
    dtypes and shardings."""
    t0 = time.perf_counter()
    compiled = jitted.lower(*abstract_args).compile()
    seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    get = (lambda k: int(getattr(mem, k, 0) or 0)) if mem is not None else (lambda k: 0)
    cost = compiled.cost_analysis() or {}
    if isinstance(cost, (list, tuple)):  # older jax: one dict per executable
        cost = cost[0] if cost else {}
    try:
        has_loops = " while(" in compiled.as_text()
    except Exception as e:  # noqa: BLE001 - text is a diagnostic only; say so and go on
        log.info("compiled HLO text unavailable (%s); loop detection skipped", e)
        has_loops = False
    return compiled, CompileReport(
        compile_seconds=seconds, argument_bytes=get("argument_size_in_bytes"),
        output_bytes=get("output_size_in_bytes"), temp_bytes=get("temp_size_in_bytes"),
        alias_bytes=get("alias_size_in_bytes"), code_bytes=get("generated_code_size_in_bytes"),
        hlo_flops_per_device=float(cost.get("flops", math.nan)), has_loops=has_loops)


def model_flops(cfg, params, *, batch: int, seq_len: int, cap_len: int = 0, train: bool = True) -> float:
    """Analytic FLOPs of one step of the model over `batch` samples of `seq_len` tokens (padding
    included: the hardware computes it) and `cap_len` caption tokens: 2 x kernel size per token that
    the kernel multiplies, plus per layer QK^T and PV (2 x 2 x S x S x heads x head_dim) and, with
    captions, the same against the caption keys. `train` counts forward + backward (3x forward).

    `params`: the model's parameter tree (arrays, ShapeDtypeStructs or boxed; scanned layers work,
    their leading layer axis multiplies in). Element-wise work (norms, RoPE, softmax) is left out.
    """
    if batch < 1 or seq_len < 1 or cap_len < 0:
        raise ValueError(f"batch={batch}, seq_len={seq_len}, cap_len={cap_len}; expected batch, seq_len >= 1 and "
                         "cap_len >= 0")
    flat = flax.traverse_util.flatten_dict(nn.unbox(params), sep="/")
    per_token = per_sample = per_cap = 0
    for path, leaf in flat.items():
        if not path.endswith("kernel"):
            continue
        size = math.prod(leaf.shape)
        parts = path.split("/")
        if any(p in parts for p in _PER_CAPTION_TOKEN):
            per_cap += size
        elif any(p in parts for p in _PER_SAMPLE):
            per_sample += size
        else:
            per_token += size
    width = cfg.n_heads * (cfg.dim // cfg.n_heads)
    attn = 4 * seq_len * seq_len * width * cfg.n_layers  # QK^T and PV, per sample
    cross = 4 * seq_len * cap_len * width * cfg.n_layers if cap_len and per_cap else 0
    fwd = batch * (2 * per_token * seq_len + 2 * per_sample + 2 * per_cap * cap_len + attn + cross)
    return float(3 * fwd if train else fwd)
