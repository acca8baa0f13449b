"""Training throughput and MFU of the real train step (`train.make_train_step`: task draws, flow
loss, AdamW + clip, EMA, finiteness flag) on whatever accelerator is present (issue #12, item 5).

    python experiments/bench/mfu.py                      # Flag-DiT-600M, 256 px (32x32x4 latents, 256 tokens)
    python experiments/bench/mfu.py --case nextdit-2b-1024   # Next-DiT 2B, 1024 px (128x128 latents, 4096 tokens)
    python experiments/bench/mfu.py --smoke              # tiny, CPU-sized: checks the script end to end

bf16 compute with float32 parameters and optimizer state, attention 'auto' (cuDNN flash on GPU,
splash on TPU, per `models/attention.py`), data parallel over all local devices (mesh (-1,1,1,1);
`--fsdp` shards parameters instead). Synthetic latents and labels: the data pipeline is not timed.
MFU = analytic model FLOPs per step (`aot.model_flops`, forward + backward) x steps/s / (peak of
the device kind x devices) (`hardware`); XLA's own FLOP count and the per-device memory analysis
of the compiled step are printed too. On kinds without a known peak (CPU) MFU is not printed.
Results go to experiments/results/mfu_<case>_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]
CASES = {
    # name: (preset, latent side, batch per device, extra model fields)
    "flagdit-600m-256": ("flagdit-600m", 32, 64, {}),
    "nextdit-2b-1024": ("nextdit-2b", 128, 2, {"remat": "full"}),
    "smoke": ("flagdit-tiny", 8, 2, {"dim": 32, "n_layers": 1, "n_heads": 4}),
}


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", choices=sorted(CASES), default="flagdit-600m-256")
    ap.add_argument("--smoke", action="store_true", help="the tiny 'smoke' case, 3 steps (CPU)")
    ap.add_argument("--batch-per-device", type=int, default=None, help="default: the case's")
    ap.add_argument("--steps", type=int, default=20, help="timed steps (after --warmup)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--attention", default="auto")
    ap.add_argument("--remat", default=None, help="override the case's remat policy")
    ap.add_argument("--fsdp", action="store_true", help="mesh (1,-1,1,1): parameters sharded over devices")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.smoke:
        args.case, args.steps, args.warmup = "smoke", min(args.steps, 3), min(args.warmup, 1)
    for k in ("steps", "warmup"):
        if getattr(args, k) < (1 if k == "steps" else 0):
            raise ValueError(f"--{k}={getattr(args, k)} is too small")
    return args


def make_config(args, n_devices: int):
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import load_config  # the dotted-override loader the tests and docs use

    preset, side, per_device, extra = CASES[args.case]
    per_device = args.batch_per_device or per_device
    fields = dict(preset=preset, in_channels=4, patch_size=2, num_classes=1000, n_kv_heads=None, multiple_of=256,
                  dtype=args.dtype, attention=args.attention, remat=args.remat or extra.get("remat", "none"),
                  **{k: v for k, v in extra.items() if k != "remat"})
    overrides = {"model." + k: v for k, v in fields.items()}
    overrides.update({"data.image_size": side, "data.channels": 4, "global_batch": per_device * n_devices,
                      "mesh.shape": (1, -1, 1, 1) if args.fsdp else (-1, 1, 1, 1), "ema_decay": 0.9999,
                      "optim.lr": 1e-4})
    return load_config(ROOT / "configs" / "default.py", **overrides), side


def main(argv=None):
    args = parse(argv)
    import flax.linen as nn
    import jax
    import numpy as np

    sys.path.insert(0, str(ROOT))
    from flagdit_jax import hardware, train

    handler = logging.StreamHandler(sys.stdout)  # the start-up compile report of train._AotSteps
    handler.setFormatter(logging.Formatter("%(message)s"))
    logging.getLogger("flagdit_jax").addHandler(handler)
    logging.getLogger("flagdit_jax").setLevel(logging.INFO)
    logging.getLogger("flagdit_jax").propagate = False
    devices = jax.devices()
    config, side = make_config(args, len(devices))
    s, init_boxed = train.setup(config)
    kind = devices[0].device_kind
    print(f"{args.case}: {s.model_cfg}")
    print(f"{len(devices)} x {kind}; global batch {config.global_batch}; {(side // 2) ** 2} tokens per image")
    state = train.init_state(s, init_boxed)
    rng = np.random.default_rng(0)
    elements = [dict(image=rng.standard_normal((side, side, 4)).astype(np.float32), label=np.int32(i % 1000))
                for i in range(config.global_batch)]
    local = train.pack_batch(s, elements)
    with jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules):
        batch = train.global_batch(s, local)
        steps = train._AotSteps(s, train.make_train_step(s))
        state, m = steps(state, batch)  # AOT compile + report, then one step
        for _ in range(args.warmup):
            state, m = steps(state, batch)
        jax.block_until_ready(m)
        flops = steps.window_flops / (1 + args.warmup)
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            state, m = steps(state, batch)
            jax.block_until_ready(m)
            times.append(time.perf_counter() - t0)
    dt = statistics.median(times)
    util = hardware.mfu(flops, 1.0 / dt, kind, len(devices), args.dtype)
    out = dict(case=args.case, preset=CASES[args.case][0], device_kind=kind, devices=len(devices),
               global_batch=config.global_batch, tokens_per_image=(side // 2) ** 2, dtype=args.dtype,
               attention=args.attention, remat=s.model_cfg.remat, step_seconds=dt, steps_per_sec=1.0 / dt,
               images_per_sec=config.global_batch / dt, images_per_sec_per_device=config.global_batch / dt / len(devices),
               model_flops_per_step=flops, tflops_per_sec_per_device=flops / dt / len(devices) / 1e12, mfu=util,
               peak_flops=hardware.peak_flops(kind, args.dtype), loss=float(m["loss"]))
    print(f"step {dt * 1e3:.1f} ms (median of {args.steps}); {out['images_per_sec']:.1f} images/s "
          f"({out['images_per_sec_per_device']:.1f} per device); {out['tflops_per_sec_per_device']:.2f} model TFLOP/s "
          f"per device; MFU " + (f"{util:.1%}" if util is not None else "n/a (" + hardware.describe_peak(
              kind, args.dtype) + ")"))
    path = pathlib.Path(args.json or ROOT / "experiments" / "results" /
                        f"mfu_{args.case}_{kind.replace(' ', '_').replace('/', '_')}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")
    return out


if __name__ == "__main__":
    main()
