"""Per-device memory of a sequence-parallel forward + backward (models/sequence_parallel.py).

Compiles (does not run) the gradient of a Flag-DiT's mean-squared output at a long token length
on fake CPU devices, once on one device and once per scheme over a mesh with a `sequence` axis,
and prints XLA's per-device `memory_analysis()` (temporaries, arguments) with ratios to the
single-device program.

  python experiments/bench/sequence_parallel_memory.py --size 128 --devices 8
  python experiments/bench/sequence_parallel_memory.py --size 256 --attention blockwise

Measured (2 layers, dim 128, 8 heads, 8 fake CPU devices), temporaries MiB per device:
  4,096 tokens, 'xla':        one device 2174.1, ulysses 269.5 (0.124), ring 87.5 (0.040)
  4,096 tokens, 'blockwise':  one device  196.8, ulysses  21.8 (0.111), ring 81.9 (0.416)
  16,384 tokens, 'blockwise': one device  787.7, ulysses  95.1 (0.121), ring 181.3 (0.230)
The ring's extra is one chunk's tiles for all heads at once (constant in L) plus the k/v chunk
each scan step keeps for autodiff (L * D per device in all); a ring with its own backward that
passes k/v round again would drop the latter.
"""

import argparse
import os

p = argparse.ArgumentParser()
p.add_argument("--size", type=int, default=128, help="latent side (patch 2: size/2 * (size/2 + 1) tokens)")
p.add_argument("--devices", type=int, default=8, help="the sequence axis size")
p.add_argument("--dim", type=int, default=128)
p.add_argument("--heads", type=int, default=8)
p.add_argument("--layers", type=int, default=2)
p.add_argument("--attention", default="xla")
args = p.parse_args()
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import dataclasses  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from flagdit_jax import sharding, tokens as tok  # noqa: E402
from flagdit_jax.models import registry  # noqa: E402


def main():
    base = dataclasses.replace(registry.get_config("flagdit-tiny"), dim=args.dim, n_heads=args.heads,
                               n_kv_heads=args.heads, n_layers=args.layers, attention=args.attention)
    packed = tok.pack_for(base, jnp.zeros((1, 1, args.size, args.size, base.in_channels)))
    length = packed.tokens.shape[1]
    t, y = jnp.full((1,), 0.5), jnp.zeros((1,), jnp.int32)
    params = jax.eval_shape(lambda: nn.unbox(registry.build(base).init(jax.random.key(0), packed, t, y=y)["params"]))
    print(f"Flag-DiT dim {args.dim}, {args.layers} layers, {args.heads} heads, {length} tokens, batch 1, fp32, "
          f"attention={args.attention}; gradient of the forward, compiled only")

    def compiled_memory(cfg, shape, devices):
        model = registry.build(cfg)
        loss = lambda p, x: jnp.mean(jnp.square(model.apply({"params": p}, packed.replace(tokens=x), t, y=y)))
        mesh = sharding.make_mesh(shape, devices=devices)
        with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
            c = jax.jit(jax.grad(loss)).lower(params, packed.tokens).compile()
        m = c.memory_analysis()
        return m.temp_size_in_bytes, m.argument_size_in_bytes

    rows = [("one device", compiled_memory(base, (1, 1, 1, 1), jax.devices()[:1]))]
    for method in ("ulysses", "ring"):
        cfg = dataclasses.replace(base, sequence_parallel=method)
        rows.append((f"{method}, sequence={args.devices}", compiled_memory(cfg, (1, 1, args.devices, 1), None)))
    ref = rows[0][1][0]
    print(f"{'program':<22}{'temp MiB/device':>17}{'args MiB/device':>17}{'temp ratio':>12}")
    for name, (temp, arg) in rows:
        print(f"{name:<22}{temp / 2**20:>17.1f}{arg / 2**20:>17.2f}{temp / ref:>12.3f}")


if __name__ == "__main__":
    main()
