"""Our Next-DiT vs diffusers' `LuminaNextDiT2DModel` built from the SAME config, same weights,
timed side by side in one run (issue #12, item 5).

Both models come from one diffusers config (`convert.diffusers.config_from_diffusers`); diffusers'
weights are re-drawn at random (its zero-initialised gates / adaLN included, as
tests/test_diffusers.py does) and copied into ours (`params_from_diffusers`), so both compute the
same function: the script prints both parameter counts and the forward's max |ours - theirs|.

Timed (median of --iters after --warmup; ours and theirs alternate iteration by iteration so that
both see the same machine load):
  train    forward + flow-matching loss (lognorm t, x_t = t x1 + (1 - t) x0, target x1 - x0) +
           backward + global-norm clip 2.0 + AdamW, the same maths on both sides; torch eager
           (and torch.compile with --torch-compile, reported separately).
  forward  one no-grad forward of the batch.
  sample   `LuminaPipeline`'s denoising loop over the transformer (diffusers 0.3x
           pipeline_lumina.py: CFG batch doubling, 3-channel guidance, RoPE table per step,
           FlowMatchEulerDiscreteScheduler) vs our jitted Euler ODE sampler with the same doubling
           and 3-channel guidance (`samplers.guided_velocity_fn` + `sample_ode`): the same
           number of transformer calls at the same batch.

    python experiments/bench/vs_diffusers.py                  # bench-small: width 384, 12 layers
    python experiments/bench/vs_diffusers.py --size tiny --iters 2   # seconds, for a smoke test

Ratios are theirs / ours (> 1: ours faster). Results also go to --json.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import pathlib
import platform
import statistics
import sys
import time

SIZES = {
    # bench-small of the issue, as a Next-DiT T2I: width 384, 12 layers, 6 heads, 32x32x4 latents
    # (256 tokens), 384-wide caption features.
    "bench-small": dict(hidden_size=384, num_layers=12, num_attention_heads=6, num_kv_heads=6,
                        cross_attention_dim=384, sample_size=32),
    "tiny": dict(hidden_size=64, num_layers=2, num_attention_heads=4, num_kv_heads=2, cross_attention_dim=32,
                 sample_size=16),
}


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="bench-small")
    ap.add_argument("--batch", type=int, default=8, help="train / forward batch")
    ap.add_argument("--cap-len", type=int, default=8, help="caption tokens")
    ap.add_argument("--sample-batch", type=int, default=2, help="images per sampling run (x2 with CFG)")
    ap.add_argument("--sample-steps", type=int, default=10, help="denoising steps (transformer calls)")
    ap.add_argument("--guidance", type=float, default=4.0, help="CFG scale (LuminaPipeline's default 4.0)")
    ap.add_argument("--threads", type=int, default=2,
                    help="torch threads; XLA uses the process's cores, or one thread with --threads 1")
    ap.add_argument("--iters", type=int, default=7)
    ap.add_argument("--sample-iters", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--what", default="train,forward,sample", help="comma list of train, forward, sample")
    ap.add_argument("--torch-compile", action="store_true", help="also time torch.compile'd train / forward")
    ap.add_argument("--attention", default=None, help="our attention implementation override")
    ap.add_argument("--json", default=None, help="write the figures here (default: experiments/results/...)")
    args = ap.parse_args(argv)
    for k in ("batch", "cap_len", "sample_batch", "sample_steps", "threads", "iters", "sample_iters"):
        if getattr(args, k) < 1:
            raise ValueError(f"--{k.replace('_', '-')}={getattr(args, k)}; expected >= 1")
    bad = set(args.what.split(",")) - {"train", "forward", "sample"}
    if bad:
        raise ValueError(f"--what={args.what!r}: unknown {sorted(bad)}; expected train, forward, sample")
    return args


def randomize(model, seed: int = 0) -> None:
    """Every diffusers tensor re-drawn (norm scales near 1, linear weights ~ 1/sqrt(fan_in)); the
    cross-attention query copies the self-attention's, as our model shares one (test_diffusers.py)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if p.ndim == 2:
                p.copy_(r / math.sqrt(p.shape[1]))
            elif name.endswith(".weight"):
                p.copy_(1.0 + 0.1 * r)
            else:
                p.copy_(0.1 * r)
        for layer in model.layers:
            layer.attn2.to_q.weight.copy_(layer.attn1.to_q.weight)
            if layer.attn1.norm_q is not None:
                layer.attn2.norm_q.load_state_dict(layer.attn1.norm_q.state_dict())


def interleaved(fns: dict, iters: int, warmup: int) -> dict:
    """Median seconds of each callable, calling them in turn (a, b, a, b, ...) after `warmup`
    rounds, so that load from other processes hits all of them alike."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    times = {k: [] for k in fns}
    for _ in range(iters):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None):
    args = parse(argv)
    if args.threads == 1:  # XLA:CPU on one thread too (set before jax starts its client)
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false "
                                   "intra_op_parallelism_threads=1").strip()
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, LuminaNextDiT2DModel
    from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
    from flagdit_jax import tokens as tok
    from flagdit_jax.convert import diffusers as conv
    from flagdit_jax.flow import samplers
    from flagdit_jax.models import registry

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dkw = dict(patch_size=2, in_channels=4, learn_sigma=True, qk_norm=True, **SIZES[args.size])
    theirs = LuminaNextDiT2DModel(**dkw)
    randomize(theirs)
    theirs.eval()
    overrides = {"attention": args.attention} if args.attention else {}
    cfg = conv.config_from_diffusers(dict(theirs.config), **overrides)
    ours = registry.build(cfg)
    params = jax.tree.map(jnp.asarray, conv.params_from_diffusers(
        {k: v.detach().numpy().copy() for k, v in theirs.state_dict().items()}, cfg))
    n_ours = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
    n_theirs = sum(p.numel() for p in theirs.parameters())
    # diffusers stores the shared query twice (attn2.to_q / norm_q copy attn1's, convert/diffusers.py):
    dup = sum(p.numel() for n, p in theirs.named_parameters() if ".attn2.to_q." in n or ".attn2.norm_q." in n)
    hw, C, B, L = dkw["sample_size"], dkw["in_channels"], args.batch, args.cap_len
    print(f"config {args.size}: {json.dumps(dkw)}; batch {B}, {(hw // 2) ** 2} tokens, {L} caption tokens")
    print(f"parameters: ours {n_ours:,}; diffusers {n_theirs:,} of which {dup:,} are its stored copy of the shared "
          f"cross-attention query -> {n_theirs - dup:,} distinct ({'equal' if n_theirs - dup == n_ours else 'DIFFER'})")
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({os.cpu_count()} cores); torch {torch.__version__}"
          f" with {torch.get_num_threads()} threads; attention {cfg.attention}")
    # Other processes' load matters: torch's OpenMP workers spin at barriers and lose far more than
    # XLA's pool when the cores are oversubscribed, so ratios are only fair on an idle machine.
    load0 = os.getloadavg()
    print(f"load average at start: {load0[0]:.1f} (1 min), {load0[1]:.1f} (5 min) on {os.cpu_count()} cores")

    rng = np.random.default_rng(0)
    x_np = rng.standard_normal((B, C, hw, hw)).astype(np.float32)
    cap_np = rng.standard_normal((B, L, cfg.cap_feat_dim)).astype(np.float32)
    t_np = rng.uniform(0.05, 0.95, B).astype(np.float32)
    rope = get_2d_rotary_pos_embed_lumina(theirs.head_dim, 384, 384)
    x_t, cap_t, mask_t, t_t = (torch.from_numpy(x_np), torch.from_numpy(cap_np), torch.ones(B, L, dtype=torch.bool),
                               torch.from_numpy(t_np))
    x_j = jnp.asarray(x_np.transpose(0, 2, 3, 1))[:, None]  # [B, 1, H, W, C]
    cap_j, mask_j, t_j = jnp.asarray(cap_np), jnp.ones((B, L), bool), jnp.asarray(t_np)
    layout = tok.pack_for(cfg, x_j)

    def apply(p, tokens, t, cap, mask, lay=layout):
        return ours.apply({"params": p}, lay.replace(tokens=tokens), t, cap_feats=cap, cap_mask=mask)

    @jax.jit
    def forward(p, frames, t, cap, mask):
        return tok.unpack(apply(p, tok.pack_for(cfg, frames).tokens, t, cap, mask), layout)

    def torch_forward(model, x, t, cap, mask):
        with torch.no_grad():
            return model(x, t, cap, mask, rope, cross_attention_kwargs={}, return_dict=False)[0]

    ours_out = np.asarray(forward(params, x_j, t_j, cap_j, mask_j))[:, 0].transpose(0, 3, 1, 2)
    ref = torch_forward(theirs, x_t, t_t, cap_t, mask_t).numpy()[:, :C]
    diff = float(np.abs(ours_out - ref).max())
    print(f"forward sanity: max |ours - diffusers| = {diff:.2e} (max |diffusers| = {np.abs(ref).max():.2f})")
    results = dict(config=dkw, batch=B, cap_len=L, params_ours=n_ours, params_diffusers=n_theirs,
                   params_diffusers_distinct=n_theirs - dup, forward_max_abs_diff=diff, host=platform.node(),
                   cpu_count=os.cpu_count(), torch_threads=args.threads, attention=cfg.attention)
    what = args.what.split(",")
    lines = []

    if "train" in what:
        tx = optax.chain(optax.clip_by_global_norm(2.0), optax.adamw(1e-4, weight_decay=0.0))

        def loss_fn(p, frames, cap, mask, key):
            k_t, k_n = jax.random.split(key)
            x1 = tok.pack_for(cfg, frames).tokens
            x0 = jax.random.normal(k_n, x1.shape)
            t = jax.nn.sigmoid(jax.random.normal(k_t, (x1.shape[0],)))
            xt = t[:, None, None] * x1 + (1 - t[:, None, None]) * x0
            return jnp.mean((apply(p, xt, t, cap, mask) - (x1 - x0)) ** 2)

        @jax.jit
        def train_step(p, o, frames, cap, mask, key):
            loss, g = jax.value_and_grad(loss_fn)(p, frames, cap, mask, key)
            u, o = tx.update(g, o, p)
            return optax.apply_updates(p, u), o, loss

        st = {"p": params, "o": tx.init(params), "k": jax.random.key(1)}

        def ours_train():
            st["k"], k = jax.random.split(st["k"])
            st["p"], st["o"], loss = train_step(st["p"], st["o"], x_j, cap_j, mask_j, k)
            loss.block_until_ready()

        def torch_train_fn(model):
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)

            def step():
                model.train()
                t = torch.sigmoid(torch.randn(B))
                x0 = torch.randn_like(x_t)
                xt = t[:, None, None, None] * x_t + (1 - t[:, None, None, None]) * x0
                out = model(xt, t, cap_t, mask_t, rope, cross_attention_kwargs={}, return_dict=False)[0][:, :C]
                loss = ((out - (x_t - x0)) ** 2).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
                opt.step()
            return step

        # Train copies: the optimizer steps must not change the model that forward / sampling compare.
        fns = {"ours": ours_train, "diffusers": torch_train_fn(copy.deepcopy(theirs))}
        if args.torch_compile:
            compiled = copy.deepcopy(theirs)
            compiled.forward = torch.compile(compiled.forward)
            t0 = time.perf_counter()
            fns["diffusers+compile"] = torch_train_fn(compiled)
            fns["diffusers+compile"]()
            print(f"torch.compile train step: first call {time.perf_counter() - t0:.1f} s")
        r = interleaved(fns, args.iters, args.warmup)
        results["train"] = r
        lines.append(("train step", r))

    if "forward" in what:
        fns = {"ours": lambda: forward(params, x_j, t_j, cap_j, mask_j).block_until_ready(),
               "diffusers": lambda: torch_forward(theirs, x_t, t_t, cap_t, mask_t)}
        r = interleaved(fns, args.iters, args.warmup)
        results["forward"] = r
        lines.append(("forward", r))

    if "sample" in what:
        n, steps, scale = args.sample_batch, args.sample_steps, args.guidance
        cap_s, null_s = cap_np[:n], np.zeros((n, L, cfg.cap_feat_dim), np.float32)
        mask_s = np.ones((n, L), bool)
        noise = rng.standard_normal((n, C, hw, hw)).astype(np.float32)
        pair = tok.pack_for(cfg, jnp.zeros((2 * n, 1, hw, hw, C)))
        one = tok.pack_for(cfg, jnp.zeros((n, 1, hw, hw, C)))

        sched = FlowMatchEulerDiscreteScheduler()
        sched.set_timesteps(steps)
        # The scheduler's sigma grid (1 -> sigma_min, then 0) in our time t = 1 - sigma.
        grid = jnp.asarray(1.0 - sched.sigmas.numpy(), jnp.float32)

        @jax.jit
        def ours_sample(p, x0_frames, cap, null, mask):
            # The state is [n, L, p*p, C] (channels last, as sample.make_generator keeps it) so that
            # guidance reaches the first 3 latent channels of every patch pixel.
            def model_fn(x, t, c):
                return apply(p, x.reshape(x.shape[0], x.shape[1], -1), t, c[0], c[1], lay=pair).reshape(x.shape)

            v = samplers.guided_velocity_fn(model_fn, (cap, mask), (null, mask), scale, channels=3)
            x0 = tok.pack_for(cfg, x0_frames).tokens.reshape(n, -1, 4, C)
            x1 = samplers.sample_ode(v, x0, method="euler", t_grid=grid)
            return tok.unpack(x1.reshape(n, -1, 4 * C), one)

        if cfg.patch_size != 2:
            raise ValueError(f"the sampler reshape assumes patch_size 2, got {cfg.patch_size}")
        noise_j = jnp.asarray(noise.transpose(0, 2, 3, 1))[:, None]
        cap_pair, mask_pair = torch.from_numpy(np.concatenate([cap_s, null_s])), torch.ones(2 * n, L, dtype=torch.bool)

        def theirs_sample():
            """pipeline_lumina.py's denoising loop (scaling_factor 1: the pipeline's default size)."""
            sched.set_timesteps(steps)
            latents = torch.from_numpy(noise)
            with torch.no_grad():
                for t in sched.timesteps:
                    inp = torch.cat([latents] * 2)
                    cur = 1 - t[None].expand(inp.shape[0]) / sched.config.num_train_timesteps
                    rope_t = get_2d_rotary_pos_embed_lumina(theirs.head_dim, 384, 384, linear_factor=1.0,
                                                            ntk_factor=1.0)
                    pred = theirs(hidden_states=inp, timestep=cur, encoder_hidden_states=cap_pair,
                                  encoder_mask=mask_pair, image_rotary_emb=rope_t, cross_attention_kwargs={},
                                  return_dict=False)[0]
                    pred = pred.chunk(2, dim=1)[0]
                    eps, rest = pred[:, :3], pred[:, 3:]
                    c_eps, u_eps = torch.split(eps, len(eps) // 2, dim=0)
                    half = u_eps + scale * (c_eps - u_eps)
                    pred = torch.cat([torch.cat([half, half], dim=0), rest], dim=1).chunk(2, dim=0)[0]
                    latents = sched.step(-pred, t, latents, return_dict=False)[0]
            return latents

        ours_x = np.asarray(ours_sample(params, noise_j, cap_s, null_s, mask_s))[:, 0].transpose(0, 3, 1, 2)
        theirs_x = theirs_sample().numpy()
        sdiff = float(np.abs(ours_x - theirs_x).max())
        print(f"sampling sanity ({steps} Euler steps, CFG {scale} on 3 channels): max |ours - diffusers| = "
              f"{sdiff:.2e} (max |diffusers| = {np.abs(theirs_x).max():.2f})")
        results["sample_max_abs_diff"] = sdiff
        fns = {"ours": lambda: ours_sample(params, noise_j, cap_s, null_s, mask_s).block_until_ready(),
               "diffusers": theirs_sample}
        r = interleaved(fns, args.sample_iters, 1)
        results["sample"] = dict(r, images=n, steps=steps, guidance=scale)
        lines.append((f"sample ({n} images, {steps} steps, CFG)", r))

    print(f"\n{'':<34}{'ours':>9}{'diffusers':>11}   diffusers/ours")
    for name, r in lines:
        extra = "".join(f"   {k} {v:.3f} s ({v / r['ours']:.2f}x)" for k, v in r.items()
                        if k not in ("ours", "diffusers"))
        print(f"{name:<34}{r['ours']:>8.3f}s{r['diffusers']:>10.3f}s   {r['diffusers'] / r['ours']:.2f}x{extra}")
    load1 = os.getloadavg()
    print(f"load average at end: {load1[0]:.1f} (1 min), {load1[1]:.1f} (5 min)")
    results["load_average_start_end"] = [load0[0], load1[0]]
    out = pathlib.Path(args.json or pathlib.Path(__file__).resolve().parents[1] / "results" /
                       f"vs_diffusers_{args.size}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out}")
    return results


if __name__ == "__main__":
    main()
