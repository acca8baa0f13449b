"""One folder holding every component of a text-to-image pipeline: read it, write it, export a run to it.

Layout (diffusers' pipeline folders use the same component names):

    pipeline.json       {"pipeline": "LuminaNextPipeline" | "FlagDiTPipeline", "train_image_size": px}
    transformer/        ours (model.json + params/, `checkpoint.save_params`) or a diffusers
                        LuminaNextDiT2DModel folder (config.json + *.safetensors)
    vae/                a diffusers AutoencoderKL folder (SD / SDXL / the project's own)
    text_encoder/       a transformers folder (config.json + model.safetensors, tokenizer.json)
    tokenizer/          optional: tokenizer.json, when it is not in text_encoder/ (diffusers' layout)

A diffusers Lumina pipeline folder (model_index.json, no pipeline.json) loads as a
`LuminaNextPipeline` trained at 1024 px. Nothing here imports torch.
"""

from __future__ import annotations

import json
import pathlib
import shutil

PIPELINE_JSON = "pipeline.json"
PIPELINES = ("LuminaNextPipeline", "FlagDiTPipeline")


def load_transformer(folder: str | pathlib.Path, *, scan_layers: bool | None = None):
    """`transformer/` -> (Flax module, params): ours (model.json) or diffusers' (config.json).
    scan_layers: None = the folder's block layout (per layer for diffusers'); True / False builds
    the model with scanned / per-layer blocks and converts the params to match."""
    from flagdit_jax import checkpoint
    from flagdit_jax.models import registry

    folder = pathlib.Path(folder)
    if (folder / "model.json").is_file():
        params, cfg = checkpoint.load_params(folder, scan_layers=scan_layers)
    elif (folder / "config.json").is_file():
        from flagdit_jax.convert import diffusers

        if scan_layers is not None and not isinstance(scan_layers, bool):
            raise ValueError(f"scan_layers={scan_layers!r}; expected None, True or False")
        params, cfg = diffusers.load_diffusers(folder, **({} if scan_layers is None else dict(scan_layers=scan_layers)))
    else:
        raise FileNotFoundError(f"{folder}: no model.json (flagdit_jax params) or config.json (diffusers "
                                "LuminaNextDiT2DModel); not a transformer folder")
    return registry.build(cfg), params


def load_components(directory: str | pathlib.Path, *, scan_layers: bool | None = None) -> dict:
    """Every component of a pipeline folder: {'pipeline', 'model', 'params', 'vae', 'text_encoder',
    'train_image_size'}; vae / text_encoder are None when their folders are absent. `scan_layers`:
    the transformer's block layout (`load_transformer`)."""
    from flagdit_jax.autoencoder.convert import load_vae
    from flagdit_jax.text.encoder import load_text_encoder

    root = pathlib.Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such pipeline folder")
    if (root / PIPELINE_JSON).is_file():
        meta = json.loads((root / PIPELINE_JSON).read_text())
    elif (root / "model_index.json").is_file():  # a diffusers Lumina pipeline folder
        meta = {"pipeline": "LuminaNextPipeline", "train_image_size": 1024}
    else:
        raise FileNotFoundError(f"{root}: neither {PIPELINE_JSON} nor model_index.json; not a pipeline folder")
    if meta.get("pipeline") not in PIPELINES:
        raise ValueError(f"{root / PIPELINE_JSON}: pipeline={meta.get('pipeline')!r}; expected one of {PIPELINES}")
    model, params = load_transformer(root / "transformer", scan_layers=scan_layers)
    vae = load_vae(root / "vae") if (root / "vae").is_dir() else None
    text_encoder = None
    if (root / "text_encoder").is_dir():
        tok = root / "tokenizer" if not (root / "text_encoder" / "tokenizer.json").is_file() else None
        text_encoder = load_text_encoder(root / "text_encoder", tokenizer_path=tok)
    return dict(pipeline=meta["pipeline"], model=model, params=params, vae=vae, text_encoder=text_encoder,
                train_image_size=int(meta["train_image_size"]))


def load_pipeline(directory: str | pathlib.Path, *, scan_layers: bool | None = None, **kwargs):
    """A ready pipeline from one folder: `load_pipeline(d)(prompt, height, width, ...)`; kwargs override
    the pipeline's fields (e.g. train_image_size); `scan_layers` as `load_transformer`."""
    from flagdit_jax import pipeline

    comp = load_components(directory, scan_layers=scan_layers)
    cls = getattr(pipeline, comp.pop("pipeline"))
    return cls(**{**comp, **kwargs})


def save_pipeline(directory: str | pathlib.Path, *, params, cfg, vae_folder, text_encoder_folder,
                  train_image_size: int, tokenizer_folder=None, overwrite: bool = False) -> pathlib.Path:
    """Write a pipeline folder: the transformer's params (ours), copies of the VAE and text-encoder
    folders (and the tokenizer's when it lives apart). Refuses a non-empty folder unless `overwrite`."""
    from flagdit_jax import checkpoint

    root = pathlib.Path(directory).absolute()
    if root.exists() and any(root.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{root} exists and is not empty (pass overwrite=True / --overwrite)")
        shutil.rmtree(root)
    sources = {"vae": vae_folder, "text_encoder": text_encoder_folder, "tokenizer": tokenizer_folder}
    for name, src in sources.items():
        if src is not None and not pathlib.Path(src).is_dir():
            raise FileNotFoundError(f"{name} folder {src}: no such directory")
    root.mkdir(parents=True)
    checkpoint.save_params(root / "transformer", params, cfg)
    for name, src in sources.items():
        if src is not None:
            shutil.copytree(src, root / name, ignore=shutil.ignore_patterns("__pycache__", "*.py", "*.pyc"))
    kind = "LuminaNextPipeline" if cfg.kind == "nextdit" else "FlagDiTPipeline"
    (root / PIPELINE_JSON).write_text(json.dumps({"pipeline": kind, "train_image_size": int(train_image_size)},
                                                 indent=1))
    return root


def pipeline_from_run(config, workdir):
    """The pipeline of a text-to-image training run (EMA params, the config's VAE and text encoder)
    without writing a folder; train_image_size as `export_run`."""
    from flagdit_jax import encoders, pipeline, sample

    if not config.get("text_encoder") or not config.get("vae"):
        raise ValueError("a pipeline needs a text-to-image run (config.text_encoder and config.vae)")
    params, s, _ = sample.load_params(config, workdir, use_ema=True)
    vae = encoders.load_vae(config)
    cls = pipeline.LuminaNextPipeline if s.model_cfg.kind == "nextdit" else pipeline.FlagDiTPipeline
    return cls(model=s.model, params=params, vae=vae, text_encoder=encoders.load_text_encoder(config),
               train_image_size=config.data.image_size * vae.downsample)


def export_run(config, workdir, output, *, overwrite: bool = False) -> pathlib.Path:
    """A text-to-image training run (EMA params + its config's VAE and text encoder) -> a pipeline folder.
    train_image_size = the run's square sample size in pixels (`config.data.image_size` x VAE factor)."""
    from flagdit_jax import encoders, sample

    if not config.get("text_encoder") or not config.get("vae"):
        raise ValueError("flagdit export needs a text-to-image run (config.text_encoder and config.vae)")
    params, s, _ = sample.load_params(config, workdir, use_ema=True)
    vae = encoders.load_vae(config)
    return save_pipeline(output, params=params, cfg=s.model_cfg, vae_folder=str(config.vae.path),
                         text_encoder_folder=encoders.text_encoder_path(config),
                         train_image_size=config.data.image_size * vae.downsample, overwrite=overwrite)
