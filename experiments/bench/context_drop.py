"""Context drop speed-up (Lumina-Next, REFERENCE.md §4): forward time of a Next-DiT T2I with
self-attention keys/values average-pooled r x r, and a whole time-aware sampling run.

Measured side by side in one process; prints seconds and ratios. Random weights: this measures
speed only (quality effects are for a trained model).

    python experiments/bench/context_drop.py [--side 128 --dim 256 --layers 4 --heads 4 --iters 3]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from flagdit_jax import tokens as tok
from flagdit_jax.flow import samplers
from flagdit_jax.models import registry
from flagdit_jax.models.common import InferenceOptions


def timeit(fn, iters):
    jax.block_until_ready(fn())  # compile + warm-up
    best = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        best.append(time.perf_counter() - t0)
    return float(np.median(best))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--side", type=int, default=128, help="latent side; tokens = (side/2)^2")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4, help="Euler steps of the sampling comparison")
    ap.add_argument("--iters", type=int, default=3)
    args = ap.parse_args()
    cfg = registry.get_config("lumina-next-tiny", dim=args.dim, n_layers=args.layers, n_heads=args.heads,
                              n_kv_heads=args.heads // 2)
    model = registry.build(cfg)
    packed = tok.pack_for(cfg, jnp.asarray(np.random.default_rng(0).standard_normal((1, 1, args.side, args.side, 4)),
                                           jnp.float32))
    kw = dict(cap_feats=jnp.ones((1, 8, cfg.cap_feat_dim)), cap_mask=jnp.ones((1, 8), bool))
    params = model.init(jax.random.key(0), packed, jnp.zeros(1), **kw)["params"]
    L = packed.tokens.shape[1]
    print(f"Next-DiT dim {args.dim}, {args.layers} layers, {args.heads} heads, {L} tokens, batch 1, "
          f"{jax.devices()[0].platform}")

    fwd = jax.jit(lambda p, x, t, r: model.apply({"params": p}, x, t, **kw, options=InferenceOptions(context_drop=r)),
                  static_argnums=3)
    base = None
    for r in (1, 2, 4):
        sec = timeit(lambda: fwd(params, packed, jnp.full((1,), 0.1), r), args.iters)
        base = base or sec
        print(f"forward, context_drop r={r} (keys {L // r // r:>5}): {sec:.3f} s   speed-up {base / sec:.2f}x")

    def run(r, until):
        def v(x, t):
            return model.apply({"params": params}, packed.replace(tokens=x), jnp.full((1,), t), **kw,
                               options=InferenceOptions(context_drop=r, context_drop_until=until))
        return samplers.sample_ode(v, packed.tokens, method="euler", num_steps=args.steps)

    full = jax.jit(lambda: run(1, None))
    timed = jax.jit(lambda: run(2, 0.5))
    s_full, s_timed = timeit(full, args.iters), timeit(timed, args.iters)
    print(f"sampling {args.steps} Euler steps: no drop {s_full:.3f} s, time-aware r=2 while t<0.5 {s_timed:.3f} s  "
          f"speed-up {s_full / s_timed:.2f}x")


if __name__ == "__main__":
    main()
