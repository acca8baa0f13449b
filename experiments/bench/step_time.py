"""Step-time benchmark: "bench-small" Flag-DiT in JAX vs diffusers' Lumina-Next in PyTorch.

bench-small: width 384, 12 layers, 6 heads, 32x32x4 latents (256 tokens), batch 8, 1000
classes, fp32. Times (median after warm-up) one train step (forward + flow-matching loss +
backward + AdamW + global-norm clip 2.0) and one forward, then diffusers'
`LuminaNextDiT2DModel` at the matched size (8 caption tokens of width 384) in the same run.

    python experiments/bench/step_time.py [--threads 2] [--iters 10]

The issue's reference figures for the official PyTorch Flag-DiT on this machine class (eager):
2.06 s per train step, 0.66 s per forward.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time


def parse():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="CPU threads for XLA and torch")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--preset", default="flagdit-bench-small")
    ap.add_argument("--attention", default=None, help="override attention implementation (xla|cudnn|splash)")
    ap.add_argument("--dtype", default=None, help="compute dtype override (float32|bfloat16)")
    ap.add_argument("--no-torch", action="store_true", help="skip the diffusers side")
    return ap.parse_args()


def median_time(fn, iters, warmup):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_jax(args):
    import jax
    import jax.numpy as jnp
    import optax

    from flagdit_jax import tokens as tok
    from flagdit_jax.flow import losses
    from flagdit_jax.models import registry

    overrides = {k: v for k, v in (("attention", args.attention), ("dtype", args.dtype)) if v}
    cfg = registry.get_config(args.preset, **overrides)
    model = registry.build(cfg)
    key = jax.random.key(0)
    frames = jax.random.normal(key, (args.batch, 1, 32, 32, cfg.in_channels))
    packed = tok.pack_for(cfg, frames)
    y = jnp.arange(args.batch, dtype=jnp.int32) % 1000
    t = jnp.full((args.batch,), 0.5)
    params = model.init({"params": key, "dropout": key}, packed, t, y=y)["params"]
    tx = optax.chain(optax.clip_by_global_norm(2.0), optax.adamw(5e-4, weight_decay=0.0))
    opt_state = tx.init(params)

    def loss_fn(p, batch_tokens, labels, k):
        k_drop, k_loss = jax.random.split(k)

        def model_fn(x_t, t_):
            return model.apply({"params": p}, packed.replace(tokens=x_t), t_, y=labels, train=True,
                               rngs={"dropout": k_drop})

        loss, _ = losses.sample_and_loss(model_fn, batch_tokens, k_loss, time_sampler="lognorm")
        return loss

    @jax.jit
    def train_step(p, o, batch_tokens, labels, k):
        loss, grads = jax.value_and_grad(loss_fn)(p, batch_tokens, labels, k)
        updates, o = tx.update(grads, o, p)
        return optax.apply_updates(p, updates), o, loss

    @jax.jit
    def forward(p, batch_tokens, t_, labels):
        return model.apply({"params": p}, packed.replace(tokens=batch_tokens), t_, y=labels)

    state = {"p": params, "o": opt_state}

    def run_train():
        state["p"], state["o"], loss = train_step(state["p"], state["o"], packed.tokens, y, key)
        loss.block_until_ready()

    def run_fwd():
        forward(state["p"], packed.tokens, t, y).block_until_ready()

    compiled = train_step.lower(params, opt_state, packed.tokens, y, key).compile()
    flops = compiled.cost_analysis().get("flops", float("nan")) if compiled.cost_analysis() else float("nan")
    return dict(
        train=median_time(run_train, args.iters, args.warmup),
        forward=median_time(run_fwd, args.iters, args.warmup),
        params=registry.count_params(cfg),
        flops=flops,
        device=str(jax.devices()[0]),
    )


def bench_diffusers(args):
    import torch
    from diffusers import LuminaNextDiT2DModel
    from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = LuminaNextDiT2DModel(sample_size=32, patch_size=2, in_channels=4, hidden_size=384, num_layers=12,
                                 num_attention_heads=6, num_kv_heads=6, cross_attention_dim=384).eval()
    b = args.batch
    x = torch.randn(b, 4, 32, 32)
    t = torch.full((b,), 0.5)
    cap = torch.randn(b, 8, 384)
    cap_mask = torch.ones(b, 8, dtype=torch.bool)
    rope = get_2d_rotary_pos_embed_lumina(384 // 6, 384, 384)

    def fwd():
        with torch.no_grad():
            model(x, t, cap, cap_mask, rope, cross_attention_kwargs={}, return_dict=False)

    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.0)

    def train():
        model.train()
        out = model(x, t, cap, cap_mask, rope, cross_attention_kwargs={}, return_dict=False)[0]
        loss = ((out[:, :4] - x) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
        opt.step()
        model.eval()

    return dict(
        forward=median_time(fwd, args.iters, args.warmup),
        train=median_time(train, args.iters, args.warmup),
        params=sum(p.numel() for p in model.parameters()),
    )


def main():
    args = parse()
    # XLA's CPU client uses every core it sees; this machine class has 2 (`nproc`).
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    j = bench_jax(args)
    print(f"[jax] {args.preset} batch {args.batch}, 256 tokens, {j['params'] / 1e6:.1f}M params on {j['device']}")
    print(f"[jax] train step  {j['train']:.3f} s   (XLA cost analysis: {j['flops'] / 1e9:.1f} GFLOP/step)")
    print(f"[jax] forward     {j['forward']:.3f} s")
    print(f"[ref] official PyTorch Flag-DiT (issue figure, same machine class): train 2.06 s, forward 0.66 s")
    print(f"[ratio] train official/jax {2.06 / j['train']:.2f}x, forward official/jax {0.66 / j['forward']:.2f}x")
    if not args.no_torch:
        d = bench_diffusers(args)
        print(f"[diffusers] LuminaNextDiT2DModel matched size ({d['params'] / 1e6:.1f}M params), torch "
              f"{args.threads} threads")
        print(f"[diffusers] train step {d['train']:.3f} s, forward {d['forward']:.3f} s")
        print(f"[ratio] diffusers/jax: train {d['train'] / j['train']:.2f}x, forward {d['forward'] / j['forward']:.2f}x")


if __name__ == "__main__":
    main()
