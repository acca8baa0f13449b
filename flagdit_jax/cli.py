"""`flagdit` command line: `demo` (the main job for now), `convert`, `presets`.

    flagdit demo --workdir runs/demo            # train a tiny Flag-DiT on the embedded MNIST, sample
    flagdit convert --checkpoint consolidated.00-of-01.pth --model-args model_args.pth --output ckpt/
    flagdit presets                             # the preset table with parameter counts
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys


def _convert(args) -> int:
    from flagdit_jax import checkpoint
    from flagdit_jax.convert import official
    from flagdit_jax.models import registry

    out = pathlib.Path(args.output)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise SystemExit(f"error: --output {out} exists and is not empty (pass --overwrite to replace it)")
    sources = [args.model_args is not None, args.config_json is not None, args.preset is not None]
    if sum(sources) != 1:
        raise SystemExit("error: give exactly one of --model-args, --config-json, --preset")
    state_dict = official.load_state_dict(args.checkpoint)
    if args.preset:
        cfg = registry.get_config(args.preset)
    else:
        model_args = (official.load_torch_file(args.model_args) if args.model_args
                      else json.loads(pathlib.Path(args.config_json).read_text()))
        cfg = official.config_from_official(model_args, state_dict)
    params = official.params_from_state_dict(state_dict, cfg)
    checkpoint.save_params(out, params, cfg, overwrite=args.overwrite)
    n = sum(v.size for v in __import__("jax").tree.leaves(params))
    print(f"converted {len(state_dict)} tensors ({n:,} parameters) -> {out.absolute()}")
    return 0


def _presets(args) -> int:
    from flagdit_jax.models import registry

    print(registry.preset_table())
    return 0


def _demo(args) -> int:
    from flagdit_jax import demo

    demo.run(pathlib.Path(args.workdir), steps=args.steps, seed=args.seed, cfg_scale=args.cfg_scale)
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="flagdit", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)

    c = sub.add_parser("convert", help="official Lumina-T2X checkpoint (.pth / .safetensors) -> Orbax checkpoint")
    c.add_argument("--checkpoint", required=True, help="state dict: .pth/.pt (needs torch) or .safetensors")
    c.add_argument("--model-args", help="the official model_args.pth saved beside the checkpoint")
    c.add_argument("--config-json", help="JSON of DiT_Llama constructor arguments (dim, n_layers, n_heads, ...)")
    c.add_argument("--preset", help="one of our preset names instead of official arguments")
    c.add_argument("--output", required=True, help="output directory (params/ + model.json)")
    c.add_argument("--overwrite", action="store_true")
    c.set_defaults(fn=_convert)

    p = sub.add_parser("presets", help="print the preset table")
    p.set_defaults(fn=_presets)

    d = sub.add_parser("demo", help="train a tiny class-conditional Flag-DiT on the embedded MNIST and sample")
    d.add_argument("--workdir", required=True)
    d.add_argument("--steps", type=int, default=1500)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--cfg-scale", type=float, default=2.0)
    d.set_defaults(fn=_demo)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
