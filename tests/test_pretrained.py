"""A text-to-image pipeline from one folder: ours (pipeline.json + transformer/ params) and diffusers'
layout (model_index.json, diffusers LuminaNextDiT2DModel transformer/, tokenizer/ beside text_encoder/)
load the same components and sample the same images as the pipeline built by hand."""

import json

import flax.linen as nn
import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

from flagdit_jax import pipeline, pretrained
from flagdit_jax.autoencoder import convert as vae_convert, kl
from flagdit_jax.convert import diffusers as dconv
from flagdit_jax.models import registry
from flagdit_jax.text import minilm_path
from flagdit_jax.text.encoder import load_text_encoder


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("parts")
    cfg = registry.get_config("lumina-next-tiny", cap_feat_dim=384, in_channels=4)
    # Every weight random (zero-inits included), so no layer is an identity.
    leaves, tree = jax.tree.flatten(nn.unbox(registry.abstract_params(cfg)))
    keys = jax.random.split(jax.random.key(3), len(leaves))
    params = jax.tree.unflatten(tree, [np.asarray(0.1 * jax.random.normal(k, a.shape)) for k, a in zip(keys, leaves)])
    vcfg = kl.AutoencoderKLConfig(in_channels=1, out_channels=1, block_out_channels=(8, 8), latent_channels=4,
                                  norm_num_groups=4, scaling_factor=0.5)
    vae_dir = vae_convert.save_folder(root / "vae", vae_convert.init_params(vcfg, seed=1), vcfg)
    return dict(cfg=cfg, params=params, vae_dir=vae_dir, text_dir=minilm_path())


def _images(pipe):
    return pipe(["a small seven in the top left corner of a square canvas", "a large two"], height=16, width=32,
                num_inference_steps=3, seed=0, output_type="np")


@pytest.mark.slow
def test_pipeline_folder_round_trip(parts, tmp_path):
    model = registry.build(parts["cfg"])
    ref = pipeline.LuminaNextPipeline(model=model, params=parts["params"], vae=vae_convert.load_vae(parts["vae_dir"]),
                                      text_encoder=load_text_encoder(parts["text_dir"]), train_image_size=16)
    want = _images(ref)
    assert want.shape == (2, 16, 32, 1) and np.isfinite(want).all()

    ours = pretrained.save_pipeline(tmp_path / "ours", params=parts["params"], cfg=parts["cfg"],
                                    vae_folder=parts["vae_dir"], text_encoder_folder=parts["text_dir"],
                                    train_image_size=16)
    np.testing.assert_allclose(_images(pipeline.LuminaNextPipeline.from_pretrained(ours)), want, atol=1e-5)
    np.testing.assert_allclose(_images(pretrained.load_pipeline(ours)), want, atol=1e-5)
    with pytest.raises(FileExistsError, match="not empty"):
        pretrained.save_pipeline(ours, params=parts["params"], cfg=parts["cfg"], vae_folder=parts["vae_dir"],
                                 text_encoder_folder=parts["text_dir"], train_image_size=16)

    # Every application runs from the folder through the CLI and writes its PNG.
    from PIL import Image

    from flagdit_jax import cli

    for args in (["style", "--prompt", "a seven", "--prompt", "a two"],
                 ["compose", "--grid", "1x2", "--size", "16x32", "--prompt", "a five", "--prompt", "a three"],
                 ["edit", "--prompt", "a two", "--source-prompt", "a seven", "--size", "32x32", "--strength", "0.6"],
                 ["extrapolate", "--prompt", "a seven", "--sizes", "32x32"]):
        out = tmp_path / f"{args[0]}.png"
        assert cli.main([*args, "--pipeline", str(ours), "--output", str(out), "--steps", "3"]) == 0
        assert Image.open(out).size[0] > 16

    # diffusers' layout: transformer as a LuminaNextDiT2DModel folder, the tokenizer in its own folder.
    theirs = tmp_path / "theirs"
    (theirs / "transformer").mkdir(parents=True)
    save_file(dconv.params_to_diffusers(parts["params"], parts["cfg"]),
              str(theirs / "transformer" / "diffusion_pytorch_model.safetensors"))
    (theirs / "transformer" / "config.json").write_text(json.dumps(dconv.config_to_diffusers(parts["cfg"])))
    import shutil

    shutil.copytree(parts["vae_dir"], theirs / "vae")
    shutil.copytree(parts["text_dir"], theirs / "text_encoder", ignore=shutil.ignore_patterns("tokenizer.json"))
    (theirs / "tokenizer").mkdir()
    shutil.copy(parts["text_dir"] / "tokenizer.json", theirs / "tokenizer" / "tokenizer.json")
    (theirs / "model_index.json").write_text(json.dumps({"_class_name": "LuminaPipeline"}))
    got = _images(pretrained.load_pipeline(theirs, train_image_size=16))
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_bad_pipeline_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such pipeline folder"):
        pretrained.load_components(tmp_path / "nothing")
    (tmp_path / "x").mkdir()
    with pytest.raises(FileNotFoundError, match="pipeline.json"):
        pretrained.load_components(tmp_path / "x")
    (tmp_path / "x" / "pipeline.json").write_text(json.dumps({"pipeline": "Other", "train_image_size": 8}))
    with pytest.raises(ValueError, match="pipeline='Other'"):
        pretrained.load_components(tmp_path / "x")
