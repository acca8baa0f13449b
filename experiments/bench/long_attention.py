"""Peak memory and time of ONE Flag-DiT block, forward + backward (grad wrt params and input), at
4K-128K tokens: the memory-linear 'blockwise' attention that attention='auto' picks for long
sequences vs the full-score 'xla' path (capped, it is quadratic).

Each (implementation, length) runs in a fresh subprocess, batch 1, fp32, no key mask:
- `xla_temp_MB`: XLA's `compiled.memory_analysis().temp_size_in_bytes` (ahead of time);
- `rss_MB`: peak RSS of the worker (resource.getrusage ru_maxrss) minus the peak RSS of an idle
  worker (same imports and block parameters, no step), so it counts what the step adds;
- `run_s`: one execution of the compiled step (median of 3 below 64K tokens); `compile_s`.
Writes experiments/results/long_attention.json (after every point) and a PNG plot.

    python experiments/bench/long_attention.py [--tokens 4096,16384,65536,131072] [--dim 64 --heads 4]
        [--xla-max 8192]   # 'xla' only up to this length (16K fwd+bwd needs > 15 GB RSS)
    python experiments/bench/long_attention.py --plot-only   # PNG from the JSON
    python experiments/bench/long_attention.py --tiles --tokens 1024,2048,8192 [--batch 1 --heads 4 --kv-heads 2
        --head-dim 16]   # attention alone, fwd+bwd: 'xla' vs blockwise tile sizes, alternated in one process
"""

from __future__ import annotations

import argparse
import json
import pathlib
import resource
import subprocess
import sys
import time

RESULTS = pathlib.Path(__file__).resolve().parents[1] / "results"


def worker(args):
    import dataclasses

    import jax
    import jax.numpy as jnp
    import numpy as np

    from flagdit_jax.models import attention as A
    from flagdit_jax.models import layers as L
    from flagdit_jax.models import registry
    from flagdit_jax.models.flag_dit import FlagDiTBlock

    cfg = dataclasses.replace(registry.get_config("flagdit-tiny"), dim=args.dim, n_heads=args.heads,
                              n_kv_heads=args.kv_heads or args.heads, n_layers=1, attention=args.impl)
    block = FlagDiTBlock(cfg)
    n = args.tokens
    x = jax.random.normal(jax.random.key(0), (1, n, cfg.dim), jnp.float32)
    c = jax.random.normal(jax.random.key(1), (1, min(cfg.dim, 1024)), jnp.float32)
    angles = L.rope_angles(jnp.arange(n)[None], cfg.head_dim)
    params = jax.jit(block.init)(jax.random.key(2), x[:, :8], c, angles[:, :8], None)["params"]
    if args.idle:
        print(json.dumps({"rss_idle_MB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
        return

    def loss(p, x):
        return jnp.sum(block.apply({"params": p}, x, c, angles, None) ** 2)

    step = jax.jit(jax.grad(loss, (0, 1)))
    t0 = time.perf_counter()
    compiled = step.lower(params, x).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    times = []
    for _ in range(3 if n < 65536 else 1):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(params, x))
        times.append(time.perf_counter() - t0)
    resolved = args.impl if args.impl != "auto" else A.resolve_implementation(
        q_len=n, k_len=n, head_dim=cfg.head_dim, dtype=jnp.float32)
    print(json.dumps({
        "impl": args.impl, "resolved": resolved, "tokens": n, "compile_s": compile_s,
        "run_s": float(np.median(times)), "xla_temp_MB": mem.temp_size_in_bytes / 2**20,
        "xla_args_MB": mem.argument_size_in_bytes / 2**20, "xla_out_MB": mem.output_size_in_bytes / 2**20,
        "rss_peak_MB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }))


def tiles(args):
    """Attention alone (fwd + bwd): 'xla' (up to --xla-max) and blockwise tiles, alternated in one
    process (best of --iters), time ratios to the first candidate."""
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np

    from flagdit_jax.models import attention as A

    rng = np.random.default_rng(0)
    hkv = args.kv_heads or args.heads
    for n in [int(t) for t in args.tokens.split(",")]:
        q = jnp.asarray(rng.standard_normal((args.batch, args.heads, n, args.head_dim), np.float32))
        k, v = (jnp.asarray(rng.standard_normal((args.batch, hkv, n, args.head_dim), np.float32)) for _ in "kv")
        cands = {"xla": functools.partial(A.dot_product_attention, implementation="xla")} if n <= args.xla_max else {}
        for bq, bk in ((512, 512), (1024, 512), (1024, 1024), (2048, 512)):
            cands[f"{bq}x{bk}"] = functools.partial(A.blockwise_attention, block_q=bq, block_k=bk)
        fns = {name: jax.jit(jax.grad(lambda q, k, v, f=f: jnp.sum(f(q, k, v) ** 2), (0, 1, 2)))
               for name, f in cands.items()}
        for f in fns.values():
            jax.block_until_ready(f(q, k, v))
        best = {name: float("inf") for name in fns}
        for _ in range(args.iters):
            for name, f in fns.items():
                t0 = time.perf_counter()
                jax.block_until_ready(f(q, k, v))
                best[name] = min(best[name], time.perf_counter() - t0)
        base = next(iter(best.values()))
        print(f"{n:>7} tokens: " + "  ".join(f"{name} {t:.3f}s ({t / base:.2f}x)" for name, t in best.items()),
              flush=True)


def run_worker(args, impl, tokens, idle=False):
    cmd = [sys.executable, __file__, "--worker", "--impl", impl, "--tokens", str(tokens), "--dim", str(args.dim),
           "--heads", str(args.heads), "--kv-heads", str(args.kv_heads)] + (["--idle"] if idle else [])
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode:
        return {"impl": impl, "tokens": tokens, "error": proc.stderr.strip().splitlines()[-1:], "rc": proc.returncode}
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["wall_s"] = time.perf_counter() - t0
    return out


def plot(data, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG (pip install matplotlib, then --plot-only)")
        return
    fig, (ax_m, ax_t) = plt.subplots(1, 2, figsize=(11, 4.2))
    for impl, color, marker in (("auto", "tab:blue", "o"), ("xla", "tab:red", "s")):
        pts = sorted((r for r in data["points"] if r["impl"] == impl and "error" not in r), key=lambda r: r["tokens"])
        if not pts:
            continue
        t = [r["tokens"] for r in pts]
        name = "auto (blockwise)" if impl == "auto" else "xla (full scores)"
        ax_m.plot(t, [r["rss_MB"] for r in pts], "-", color=color, marker=marker, label=f"{name}: peak RSS - idle")
        ax_m.plot(t, [r["xla_temp_MB"] for r in pts], ":", color=color, marker=marker, label=f"{name}: XLA temp")
        ax_t.plot(t, [r["run_s"] for r in pts], "-", color=color, marker=marker, label=name)
    for ax, ylabel in ((ax_m, "MB"), (ax_t, "seconds (fwd + bwd)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    cfg = data["config"]
    fig.suptitle(f"One Flag-DiT block fwd+bwd, width {cfg['dim']}, {cfg['heads']} heads, batch 1, fp32, CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="4096,16384,65536,131072")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=0, help="0: as many as query heads")
    ap.add_argument("--xla-max", type=int, default=8192, help="run 'xla' only up to this many tokens")
    ap.add_argument("--json", default=str(RESULTS / "long_attention.json"))
    ap.add_argument("--plot-only", action="store_true")
    ap.add_argument("--tiles", action="store_true", help="attention alone: xla vs blockwise tile sizes")
    ap.add_argument("--batch", type=int, default=1, help="--tiles only")
    ap.add_argument("--head-dim", type=int, default=16, help="--tiles only")
    ap.add_argument("--iters", type=int, default=3, help="--tiles only")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--idle", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--impl", default="auto", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        args.tokens = int(args.tokens)
        return worker(args)
    if args.tiles:
        return tiles(args)
    json_path = pathlib.Path(args.json)
    if args.plot_only:
        return plot(json.loads(json_path.read_text()), json_path.with_suffix(".png"))

    lengths = [int(t) for t in args.tokens.split(",")]
    if any(t <= 0 for t in lengths):
        raise ValueError(f"--tokens must be positive integers, got {args.tokens!r}")
    idle = run_worker(args, "auto", 256, idle=True)["rss_idle_MB"]
    data = {"config": {"dim": args.dim, "heads": args.heads, "kv_heads": args.kv_heads or args.heads},
            "rss_idle_MB": idle, "points": []}
    jobs = [(impl, t) for t in lengths for impl in ("xla", "auto") if impl == "auto" or t <= args.xla_max]
    print(f"idle worker peak RSS {idle:.0f} MB")
    print(f"{'impl':<6}{'->':<11}{'tokens':>8}{'run s':>9}{'compile s':>11}{'RSS-idle MB':>13}{'XLA temp MB':>13}")
    t_all = time.perf_counter()
    for impl, t in jobs:
        r = run_worker(args, impl, t)
        if "error" not in r:
            r["rss_MB"] = r["rss_peak_MB"] - idle
            print(f"{impl:<6}{r['resolved']:<11}{t:>8}{r['run_s']:>9.2f}{r['compile_s']:>11.2f}{r['rss_MB']:>13.0f}"
                  f"{r['xla_temp_MB']:>13.0f}", flush=True)
        else:
            print(f"{impl:<6}{'':<11}{t:>8}  failed (rc {r['rc']}): {r['error']}", flush=True)
        data["points"].append(r)
        json_path.write_text(json.dumps(data, indent=1))
    data["total_wall_s"] = time.perf_counter() - t_all
    auto = {r["tokens"]: r for r in data["points"] if r["impl"] == "auto" and "error" not in r}
    if 16384 in auto and 131072 in auto:
        for key in ("rss_MB", "xla_temp_MB"):
            ratio = auto[131072][key] / auto[16384][key]
            data[f"ratio_128k_16k_{key}"] = ratio
            print(f"peak(128K) / peak(16K), {key}: {ratio:.2f}x (linear: 8x, quadratic: 64x)")
    json_path.write_text(json.dumps(data, indent=1))
    print(f"total wall {data['total_wall_s']:.0f} s; wrote {json_path}")
    plot(data, json_path.with_suffix(".png"))


if __name__ == "__main__":
    main()
