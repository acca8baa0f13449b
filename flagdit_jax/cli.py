"""`flagdit` command line.

    flagdit train --config configs/default.py --workdir runs/default [--config.total_steps=20]
    flagdit sample --workdir runs/default [--config.sample.cfg_scale=3]
    flagdit eval --workdir runs/default
    flagdit sample --workdir runs/fdit600m --num_samples 50000 --output samples/   # ADM .npz shards, all hosts
    flagdit reference --images VIRTUAL_imagenet256_labeled.npz --inception pt_inception.pth --output ref.npz
    flagdit eval --workdir runs/fdit600m --samples samples/ --reference ref.npz --inception pt_inception.pth
    flagdit autoencoder --config configs/autoencoder/mnist.py --workdir runs/autoencoder
    flagdit encode --config configs/t2i/mnist.py:next            # VAE latents + caption embeddings, once
    flagdit sample --workdir runs/t2i_next --prompt "a small seven in the top left of a square canvas"
    flagdit export --workdir runs/t2i_next --output pipes/t2i_next   # one folder: transformer, vae, text encoder
    flagdit convert --checkpoint consolidated.00-of-01.pth --model-args model_args.pth --output ckpt/
    flagdit convert --diffusers Lumina-Next-SFT-diffusers/transformer --output ckpt/
    flagdit presets                             # the preset table with parameter counts
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import pathlib
import sys


def _user_errors(fn):
    """Report a subcommand's user errors (a bad file, value or option: ValueError, OSError, ImportError)
    as one `error:` line on stderr and exit status 1 instead of a traceback; `--debug` re-raises."""

    @functools.wraps(fn)
    def wrapped(args) -> int:
        try:
            return fn(args)
        except (ValueError, OSError, ImportError) as e:
            if getattr(args, "debug", False):
                raise
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
            more = " (rerun with --debug for the full message)" if len(lines) > 1 else ""
            print(f"error: {lines[0]}{more}", file=sys.stderr)
            return 1

    return wrapped


def _input_file(option: str, path: str) -> str:
    p = pathlib.Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{option} {path}: " + ("not a regular file" if p.exists() else "no such file"))
    return path


@_user_errors
def _convert(args) -> int:
    from flagdit_jax import checkpoint
    from flagdit_jax.convert import official
    from flagdit_jax.models import registry

    out = pathlib.Path(args.output)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise SystemExit(f"error: --output {out} exists and is not empty (pass --overwrite to replace it)")
    sources = [args.model_args is not None, args.config_json is not None, args.preset is not None]
    if (args.checkpoint is None) == (args.diffusers is None):
        raise SystemExit("error: give exactly one of --checkpoint (official) and --diffusers (diffusers folder)")
    if args.diffusers is not None:
        if any(sources):
            raise SystemExit("error: --diffusers reads its config.json; drop --model-args / --config-json / --preset")
        from flagdit_jax.convert import diffusers

        state_dict, config = diffusers.read_diffusers_folder(args.diffusers)
        cfg = diffusers.config_from_diffusers(config)
        params = diffusers.params_from_diffusers(state_dict, cfg)
    else:
        if sum(sources) != 1:
            raise SystemExit("error: give exactly one of --model-args, --config-json, --preset")
        # Cheap checks first: a bad preset or a missing / refused model_args.pth fails before the
        # (possibly many-GB) checkpoint is read.
        try:
            cfg = registry.get_config(args.preset) if args.preset else None
        except ValueError as e:
            raise ValueError(f"--preset: {e}") from e
        _input_file("--checkpoint", args.checkpoint)
        if args.model_args:
            model_args = official.load_model_args(_input_file("--model-args", args.model_args))
        elif args.config_json:
            try:
                model_args = json.loads(pathlib.Path(_input_file("--config-json", args.config_json)).read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"--config-json {args.config_json}: not valid JSON ({e})") from e
        state_dict = official.load_state_dict(args.checkpoint)
        if cfg is None:
            try:
                cfg = official.config_from_official(model_args, state_dict)
            except ValueError as e:  # name the file the arguments came from
                src = f"--model-args {args.model_args}" if args.model_args else f"--config-json {args.config_json}"
                raise ValueError(f"{src}: {e}") from e
        params = official.params_from_state_dict(state_dict, cfg)
    if args.scan_layers:  # one stacked `layers` subtree (ModelConfig.scan_layers)
        cfg = dataclasses.replace(cfg, scan_layers=True)
        params = registry.params_for(params, cfg)
    checkpoint.save_params(out, params, cfg, overwrite=args.overwrite)
    n = sum(v.size for v in __import__("jax").tree.leaves(params))
    print(f"converted {len(state_dict)} tensors ({n:,} parameters) -> {out.absolute()}")
    return 0


@_user_errors
def _reference(args) -> int:
    from flagdit_jax import evaluate

    evaluate.run_reference(_input_file("--images", args.images) if not pathlib.Path(args.images).is_dir()
                           else args.images, args.output, _input_file("--inception", args.inception),
                           keep_images=args.keep_images)
    return 0


def _presets(args) -> int:
    from flagdit_jax.models import registry

    print(registry.preset_table())
    return 0


def _config_command(command: str, argv: list[str]) -> int:
    """train / sample / eval: ml-collections config flags (`--config path.py[:arg]`, `--config.key=value`).

    The config is validated before any compile or I/O; sample and eval read the run's config back
    from the workdir (overrides still apply). User errors (a bad key or value, a missing or foreign
    workdir, a checkpoint that does not fit, a stopped run) end as one `error:` line and exit
    status 1; `--debug` shows the traceback instead.
    """
    from flagdit_jax import checkpoint

    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    try:
        return _run_config_command(command, argv)
    except (ValueError, OSError, ImportError, checkpoint.TrainingStopped) as e:
        if debug:
            raise
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
        more = " (rerun with --debug for the full message)" if len(lines) > 2 else ""
        raise SystemExit("error: " + "\n  ".join(lines[:2]) + more) from None


def _unknown_key(config, argv: list[str]) -> str | None:
    """'unknown config key ...; known keys at this level: ...' for the first override naming a key
    that `config` lacks, else None."""
    import ml_collections

    for a in argv:
        if not a.startswith("--config."):
            continue
        parts = a[len("--config."):].split("=", 1)[0].split(".")
        node = config
        for i, part in enumerate(parts):
            if not isinstance(node, (ml_collections.ConfigDict, dict)) or part not in node:
                here = ".".join(["config", *parts[:i]])
                known = ", ".join(sorted(node.keys())) if isinstance(node, (ml_collections.ConfigDict, dict)) else \
                    f"none ({here} is {type(node).__name__} {node!r})"
                return f"unknown config key {'.'.join(['config', *parts[:i + 1]])!r}; known keys at {here}: {known}"
            node = node[part]
    return None


# Commands that read `--config FILE[:arg]` (the others read the run's config back from --workdir).
FILE_CONFIG_COMMANDS = ("train", "encode", "autoencoder")
CONFIG_COMMANDS = ("train", "sample", "eval", "encode", "autoencoder", "export")


def _run_config_command(command: str, argv: list[str]) -> int:
    from absl import flags
    from ml_collections import config_flags

    def parse(args):
        fv = flags.FlagValues()
        full_argv = [f"flagdit {command}"] + args  # config_flags reads overrides from here, not sys.argv
        flags.DEFINE_string("workdir", None, "run directory (checkpoints, metrics, samples)", flag_values=fv)
        if command == "sample":
            flags.DEFINE_multi_string("prompt", [], "text-to-image: sample these prompts (repeat the flag)",
                                      flag_values=fv)
            flags.DEFINE_string("output", None, "PNG to write (default: in the workdir)", flag_values=fv)
            flags.DEFINE_string("size", None, "with --prompt: HxW pixels, e.g. 32x64", flag_values=fv)
            flags.DEFINE_integer("num_samples", None, "write this many class-conditional samples as ADM-format "
                                 ".npz shards in the --output folder (every device and host samples)", flag_values=fv)
            flags.DEFINE_integer("batch", None, "with --num_samples: global samples per chunk "
                                 "(default config.eval.batch)", flag_values=fv)
            flags.DEFINE_enum("labels", "cyclic", ["cyclic", "random"], "with --num_samples: class of sample i "
                              "(i mod classes, or uniform from the seed as ADM / DiT)", flag_values=fv)
        if command == "eval":
            flags.DEFINE_string("samples", None, "ADM suite: sample shards folder (flagdit sample --num_samples) "
                                "or an .npz with arr_0", flag_values=fv)
            flags.DEFINE_string("reference", None, "ADM suite: reference batch .npz (flagdit reference, or ADM's "
                                "VIRTUAL_*.npz)", flag_values=fv)
            flags.DEFINE_string("inception", None, "ADM suite: Inception-v3 weights (pytorch-fid's "
                                "pt_inception-2015-12-05-6726825d.pth)", flag_values=fv)
        if command in ("encode", "export"):
            flags.DEFINE_bool("overwrite", False, "replace existing output", flag_values=fv)
        if command == "export":
            flags.DEFINE_string("output", None, "pipeline folder to write", flag_values=fv)
        if command in FILE_CONFIG_COMMANDS:
            config_flags.DEFINE_config_file("config", None, "config file (configs/*.py[:arg])", flag_values=fv,
                                            lock_config=True, sys_argv=full_argv)
        else:
            config_flags.DEFINE_config_dict("config", checkpoint.read_config(workdir), flag_values=fv,
                                            lock_config=True, sys_argv=full_argv)
        fv(full_argv)
        return fv

    workdir = next((a.split("=", 1)[1] for a in argv if a.startswith("--workdir=")), None)
    if workdir is None and "--workdir" in argv and argv.index("--workdir") + 1 < len(argv):
        workdir = argv[argv.index("--workdir") + 1]
    from flagdit_jax import checkpoint

    if command not in FILE_CONFIG_COMMANDS and workdir is None:
        raise SystemExit(f"error: flagdit {command} needs --workdir")
    config_file = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if config_file is None and "--config" in argv and argv.index("--config") + 1 < len(argv):
        config_file = argv[argv.index("--config") + 1]
    if command in FILE_CONFIG_COMMANDS and config_file and not pathlib.Path(config_file.split(":", 1)[0]).is_file():
        raise SystemExit(f"error: --config {config_file}: no such file (expected a config such as configs/default.py)")
    try:
        fv = parse(argv)
    except (KeyError, AttributeError) as e:  # an override naming a key the config lacks
        try:
            base = parse([a for a in argv if not a.startswith("--config.")]).config
        except Exception:  # noqa: BLE001 - report the original error below
            base = None
        msg = _unknown_key(base, argv) if base is not None else None
        raise SystemExit(f"error: {msg or e}") from e
    except (flags.Error, ValueError, TypeError) as e:
        raise SystemExit(f"error: {e}") from e
    if not fv.workdir and command != "encode":
        raise SystemExit(f"error: flagdit {command} needs --workdir")
    if fv.config is None:
        raise SystemExit(f"error: flagdit {command} needs --config (e.g. configs/default.py)")
    config = fv.config
    if command == "autoencoder":
        from flagdit_jax.autoencoder import train as ae_train

        try:
            ae_train.validate(config)
        except ValueError as e:
            raise SystemExit(f"error: {e}") from e
        ae_train.train_autoencoder(config, fv.workdir)
        return 0
    from flagdit_jax import train as train_lib

    if command in ("train", "encode") or (command == "sample" and fv.num_samples):
        train_lib.maybe_initialize_distributed()  # before anything asks jax for its devices
    try:
        train_lib.validate(config)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from e
    if command == "train":
        train_lib.train(config, fv.workdir)
    elif command == "encode":
        from flagdit_jax import encoders

        for split, files in encoders.encode_cache(config, overwrite=fv.overwrite).items():
            print(f"{split}: wrote {len(files)} shard(s) under {encoders.cache_prefix(config, split)}")
    elif command == "export":
        from flagdit_jax import pretrained

        if not fv.output:
            raise SystemExit("error: flagdit export needs --output (the pipeline folder to write)")
        out = pretrained.export_run(config, fv.workdir, fv.output, overwrite=fv.overwrite)
        print(f"wrote {out} (load it with LuminaNextPipeline.from_pretrained / FlagDiTPipeline.from_pretrained)")
    elif command == "sample":
        from flagdit_jax import sample

        if fv.num_samples:
            from flagdit_jax.eval import sample_batch

            if not fv.output:
                raise SystemExit("error: --num_samples needs --output (the folder for the .npz shards)")
            path = sample_batch.write_samples(config, fv.workdir, fv.num_samples, fv.output, batch=fv.batch,
                                              labels=fv.labels)
            print(f"wrote {path}")
        elif fv.prompt:
            size = None
            if fv.size:
                try:
                    size = tuple(int(v) for v in fv.size.lower().split("x"))
                    assert len(size) == 2 and min(size) > 0
                except (ValueError, AssertionError):
                    raise SystemExit(f"error: --size={fv.size!r}; expected HxW in pixels, e.g. 32x64") from None
            sample.sample_prompts(config, fv.workdir, fv.prompt, size=size, out=fv.output)
        else:
            sample.sample_grid(config, fv.workdir, out=fv.output)
    else:
        from flagdit_jax import evaluate

        adm_flags = {"--samples": fv.samples, "--reference": fv.reference, "--inception": fv.inception}
        if any(adm_flags.values()):
            missing = [k for k, v in adm_flags.items() if not v]
            if missing:
                raise SystemExit(f"error: the ADM suite needs --samples, --reference and --inception; missing "
                                 f"{', '.join(missing)}")
            evaluate.run_adm(config, fv.samples, fv.reference, fv.inception)
        else:
            evaluate.run(config, fv.workdir)
    return 0


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected HxW in pixels, e.g. 32x64") from None
    if h <= 0 or w <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: sizes must be positive")
    return h, w


def _load_pipe(args):
    """--pipeline FOLDER (one folder, `flagdit export`) or --workdir RUN (a T2I training run)."""
    from flagdit_jax import pretrained

    if (args.pipeline is None) == (args.workdir is None):
        raise SystemExit("error: give exactly one of --pipeline (a pipeline folder) and --workdir (a T2I run)")
    if args.pipeline is not None:
        return pretrained.load_pipeline(args.pipeline)
    from flagdit_jax import checkpoint

    return pretrained.pipeline_from_run(checkpoint.read_config(args.workdir), args.workdir)


def _sampling_kw(args) -> dict:
    kw = dict(height=args.size[0], width=args.size[1]) if args.size else {}
    if args.steps is not None:
        kw["num_inference_steps"] = args.steps
    if args.guidance is not None:
        kw["guidance_scale"] = args.guidance
    return kw


@_user_errors
def _application(args) -> int:
    from flagdit_jax.applications import compositional, editing, extrapolation, style

    pipe = _load_pipe(args)
    kw = _sampling_kw(args)
    if args.command == "style":
        path = style.run_style(pipe, args.prompt, args.output, seed=args.seed, **kw)
    elif args.command == "compose":
        if (args.grid is None) == (not args.box):
            raise SystemExit("error: give --grid HxW or one --box per prompt")
        height, width = kw.pop("height", pipe.train_image_size), kw.pop("width", pipe.train_image_size)
        if args.grid is not None:
            boxes = compositional.grid_boxes(*args.grid, height, width)
        else:
            boxes = [tuple(int(v) for v in b.split(",")) for b in args.box]
        if len(boxes) != len(args.prompt):
            raise SystemExit(f"error: {len(args.prompt)} prompts for {len(boxes)} regions (one prompt per region)")
        path = compositional.run_compositional(pipe, args.prompt, boxes, args.output, height=height, width=width,
                                               seed=args.seed, **kw)
    elif args.command == "edit":
        if len(args.prompt) != 1 or args.source_prompt is None:
            raise SystemExit("error: flagdit edit takes one --prompt (the edit) and --source-prompt (the source "
                             "image is sampled from it)")
        src_size = args.source_size or (pipe.train_image_size, pipe.train_image_size)
        source = pipe([args.source_prompt] * 2, src_size[0], src_size[1], seed=args.seed, output_type="latent",
                      **{k: v for k, v in kw.items() if k not in ("height", "width")})
        path = editing.run_edit(pipe, args.prompt[0], args.output, source=source, strengths=tuple(args.strength or (0.4, 0.6, 0.8)),
                                seed=args.seed + 1, normalize=args.normalize, **kw)
    else:
        path, names = extrapolation.run_extrapolation(pipe, args.prompt, args.output, seed=args.seed,
                                                      sizes=args.sizes or None,
                                                      **{k: v for k, v in kw.items() if k not in ("height", "width")})
        print("rows: " + ", ".join(names))
    print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="flagdit", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    for name in CONFIG_COMMANDS:  # parsed with ml-collections config flags (see above)
        sub.add_parser(name, help=f"{name} (--config FILE --workdir DIR --config.key=value [--debug])",
                       add_help=False)

    c = sub.add_parser("convert", help="official Lumina-T2X checkpoint (.pth / .safetensors) or diffusers "
                                       "LuminaNextDiT2DModel folder -> Orbax checkpoint")
    c.add_argument("--checkpoint", help="official state dict: .pth/.pt (needs torch) or .safetensors")
    c.add_argument("--diffusers", help="diffusers LuminaNextDiT2DModel folder (config.json + "
                                       "diffusion_pytorch_model.safetensors), or a pipeline folder with transformer/")
    c.add_argument("--model-args", help="the official model_args.pth saved beside the checkpoint")
    c.add_argument("--config-json", help="JSON of DiT_Llama constructor arguments (dim, n_layers, n_heads, ...)")
    c.add_argument("--preset", help="one of our preset names instead of official arguments")
    c.add_argument("--output", required=True, help="output directory (params/ + model.json)")
    c.add_argument("--overwrite", action="store_true")
    c.add_argument("--scan-layers", action="store_true",
                   help="write the blocks as one stacked `layers` subtree (a scan_layers model)")
    c.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    c.set_defaults(fn=_convert)

    helps = {"style": "style-consistent batch: every image shares the first one's keys/values",
             "compose": "compositional generation: one prompt per region (--grid HxW or --box t,l,b,r each)",
             "edit": "high-resolution editing: a source image re-solved from lambda with a new prompt",
             "extrapolate": "resolution extrapolation: each technique (NTK, shift, proportional attention, ...) "
                            "at larger sizes"}
    for name, text in helps.items():
        a = sub.add_parser(name, help=text)
        a.add_argument("--pipeline", help="a pipeline folder (flagdit export, or a diffusers Lumina folder)")
        a.add_argument("--workdir", help="or a text-to-image training run")
        a.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
        a.add_argument("--output", required=True, help="PNG to write")
        a.add_argument("--size", type=_size, help="HxW pixels (default: the training size)")
        a.add_argument("--steps", type=int, help="num_inference_steps (default: the pipeline's official one)")
        a.add_argument("--guidance", type=float, help="guidance scale (default 4)")
        a.add_argument("--seed", type=int, default=0)
        a.add_argument("--debug", action="store_true", help="show the full traceback on errors")
        if name == "compose":
            a.add_argument("--grid", type=_size, help="HxW equal regions, numbered row by row")
            a.add_argument("--box", action="append", help="top,left,bottom,right in pixels (one per prompt)")
        if name == "edit":
            a.add_argument("--source-prompt", help="the source image is sampled from this prompt")
            a.add_argument("--source-size", type=_size, help="HxW of the source (default: the training size); "
                                                             "--size larger than it edits at high resolution")
            a.add_argument("--strength", type=float, action="append", default=None,
                           help="fraction of the grid re-solved (repeat; default 0.4, 0.6, 0.8)")
            a.add_argument("--normalize", default="none", choices=("none", "source"),
                           help="'source': match the source latent's per-channel mean/std (style edits)")
        if name == "extrapolate":
            a.add_argument("--sizes", type=_size, action="append", help="HxW sizes to try (repeat)")
        a.set_defaults(fn=_application)

    r = sub.add_parser("reference", help="ADM-format reference batch (mu, sigma, mu_s, sigma_s + features) "
                                         "from uint8 images")
    r.add_argument("--images", required=True, help=".npz with arr_0 [N, H, W, 3] uint8 (ADM's VIRTUAL_*.npz, "
                                                   "imagenet.reference_images crops) or a sample shards folder")
    r.add_argument("--inception", required=True, help="Inception-v3 weights (pytorch-fid's .pth)")
    r.add_argument("--output", required=True, help="the .npz to write")
    r.add_argument("--keep-images", action="store_true", help="store the images too (arr_0)")
    r.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    r.set_defaults(fn=_reference)

    p = sub.add_parser("presets", help="print the preset table")
    p.set_defaults(fn=_presets)

    return ap


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in CONFIG_COMMANDS:
        return _config_command(argv[0], argv[1:])
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
