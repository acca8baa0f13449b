"""Compile time of the flagdit-3b train step, per-layer blocks vs scanned blocks (`model.scan_layers`).

The step is the training loop's own (`train.setup` + `train.make_train_step` on
configs/imagenet/flagdit.py:3b: forward + flow-matching loss + backward + AdamW + EMA, bf16 compute,
remat 'dots'), at 256 px (32x32x4 latents, 256 tokens), lowered from abstract shapes
(`jax.ShapeDtypeStruct`: no weights are allocated) and compiled for one CPU device; it never runs.
The two variants alternate in one process (`--repeats` rounds), timing `.lower()` (trace + StableHLO)
and `.compile()` (XLA) separately, and the script prints the ratios and writes a JSON.

    python experiments/bench/compile_time.py [--preset 3b] [--batch 1] [--repeats 2] \
        [--out experiments/results/compile_time.json]
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # one CPU device (no --xla_force_host_platform_device_count)

import argparse  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]


def parse():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="3b", help="size of configs/imagenet/flagdit.py (600m | 3b | 7b)")
    ap.add_argument("--batch", type=int, default=1, help="global batch (one device)")
    ap.add_argument("--repeats", type=int, default=2, help="alternating rounds of (per-layer, scanned)")
    ap.add_argument("--remat", default=None, help="override the config's remat policy (none | full | dots)")
    ap.add_argument("--out", default=str(ROOT / "experiments/results/compile_time.json"))
    return ap.parse_args()


def make_config(args, scan: bool):
    import importlib.util

    spec = importlib.util.spec_from_file_location("flagdit_imagenet_config", ROOT / "configs/imagenet/flagdit.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config(args.preset)
    c.model.scan_layers = scan
    if args.remat:
        c.model.remat = args.remat
    c.global_batch = args.batch
    c.mesh.shape, c.mesh.num_devices = (1, 1, 1, 1), 1
    c.data.options.data_dir = "/nonexistent"  # never read: the step is compiled from abstract shapes
    return c


def abstract_batch(s):
    """The packed class-label batch of 256-px latents as ShapeDtypeStructs with the batch sharding
    (built from a zero host batch of the same layout: only its shapes and dtypes are kept)."""
    import jax
    import numpy as np

    from flagdit_jax import train

    size = s.config.data.image_size
    elements = [{"image": np.zeros((size, size, s.model_cfg.in_channels), np.float32), "label": 0}
                for _ in range(s.config.global_batch)]
    host = train.pack_batch(s, elements)
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype, sharding=s.batch_sharding),
                        host)


def measure(args, scan: bool) -> dict:
    """Build the step from scratch (a fresh trace, nothing cached) and time lower and compile."""
    import jax

    from flagdit_jax import train

    s, _ = train.setup(make_config(args, scan))
    step = train.make_train_step(s)
    batch = abstract_batch(s)
    t0 = time.perf_counter()
    lowered = step.lower(s.abstract_state, batch)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    mem = compiled.memory_analysis()
    n_params = sum(x.size for x in jax.tree.leaves(s.abstract_state.params))
    return dict(scan_layers=scan, lower_s=t1 - t0, compile_s=t2 - t1, total_s=t2 - t0,
                hlo_chars=len(lowered.as_text()), params=int(n_params),
                temp_bytes=int(getattr(mem, "temp_size_in_bytes", 0) or 0),
                argument_bytes=int(getattr(mem, "argument_size_in_bytes", 0) or 0))


def main():
    args = parse()
    import jax

    jax.config.update("jax_enable_compilation_cache", False)  # every compile is a cold one
    rows = []
    for r in range(args.repeats):
        for scan in (False, True):
            row = measure(args, scan)
            row["round"] = r
            rows.append(row)
            print(f"round {r} {'scanned  ' if scan else 'per-layer'}: lower {row['lower_s']:7.1f} s, compile "
                  f"{row['compile_s']:7.1f} s, total {row['total_s']:7.1f} s, StableHLO {row['hlo_chars'] / 1e6:.2f} M "
                  f"chars, temporaries {row['temp_bytes'] / 2**30:.2f} GiB", flush=True)
    med = {}
    for scan in (False, True):
        sel = [r for r in rows if r["scan_layers"] == scan]
        med[scan] = {k: statistics.median(r[k] for r in sel) for k in ("lower_s", "compile_s", "total_s")}
    ratio = {k: med[False][k] / med[True][k] for k in ("lower_s", "compile_s", "total_s")}
    print(f"median per-layer / scanned: lower {ratio['lower_s']:.2f}x, compile {ratio['compile_s']:.2f}x, "
          f"total {ratio['total_s']:.2f}x")
    cfg = make_config(args, False)
    out = dict(
        what=f"flagdit-{args.preset} train step (train.make_train_step: fwd + flow-matching loss + bwd + AdamW + EMA), "
             f"256 px class-conditional, batch {args.batch}, dtype {cfg.model.dtype}, remat {cfg.model.remat}, "
             "abstract shapes, one CPU device, lower() and compile() timed",
        command="python experiments/bench/compile_time.py " + " ".join(
            f"--{k} {v}" for k, v in vars(args).items() if k != "out" and v is not None),
        jax=jax.__version__, machine=f"{platform.machine()}, {os.cpu_count()} CPUs (shared, noisy)",
        rows=rows, median={"per_layer": med[False], "scanned": med[True]}, ratio_per_layer_over_scanned=ratio)
    path = pathlib.Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
