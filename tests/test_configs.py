"""The shipped experiment configs: they validate on a pod-like mesh, build the preset's size, and the
ImageNet latent recipe runs end to end (train -> sample) on ArrayRecord latents the test writes."""

import importlib.util
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from flagdit_jax import train
from flagdit_jax.data import latents
from flagdit_jax.models import registry

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_config(rel: str, arg=None):
    spec = importlib.util.spec_from_file_location("cfg", ROOT / rel)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg) if arg is not None else mod.get_config()


@pytest.mark.parametrize("arch,size", [("flagdit", "600m"), ("flagdit", "3b"), ("flagdit", "7b"), ("nextdit", "600m"),
                                       ("nextdit", "2b"), ("nextdit", "3b"), ("nextdit", "7b")])
def test_imagenet_config_is_the_reference_recipe(arch, size):
    c = load_config(f"configs/imagenet/{arch}.py", size)
    c.data.options.data_dir = "/unused"
    train.validate(c)  # 8 fake devices: FSDP (1, 8, 1, 1)
    assert train.mesh_shape(c) == (1, 8, 1, 1)
    cfg = train.model_config(c)
    n = registry.count_params(cfg)
    assert abs(n / registry.REFERENCE_PARAMS[f"{arch}-{size}"] - 1) < 0.01
    assert type(cfg).__name__ == ("NextDiTConfig" if arch == "nextdit" else "FlagDiTConfig")
    assert (c.flow.time_sampler, c.optim.lr, c.global_batch, c.ema_decay, c.optim.grad_clip) == \
        ("lognorm", 5e-4, 256, 0.9999, 2.0)


def test_imagenet_config_names_missing_latents():
    c = load_config("configs/imagenet/flagdit.py", "600m")
    with pytest.raises(ValueError, match="config.data.options.data_dir"):
        train.validate(c)
    with pytest.raises(ValueError, match="size must be one of"):
        load_config("configs/imagenet/flagdit.py", "5b")


@pytest.mark.slow
def test_imagenet_recipe_trains_and_samples_on_latents(tmp_path):
    rng = np.random.default_rng(0)
    latents.write_latents(str(tmp_path / "lat" / "train"), rng.standard_normal((48, 8, 8, 4)).astype(np.float32),
                          rng.integers(0, 4, 48), num_shards=2)
    small = ["--config.model.dim=32", "--config.model.n_layers=2", "--config.model.n_heads=4",
             "--config.model.num_classes=4", "--config.data.image_size=8", "--config.data.worker_count=0",
             "--config.global_batch=8", "--config.total_steps=3", "--config.checkpoint.every_steps=3",
             f"--config.data.options.data_dir={tmp_path / 'lat'}", "--config.sample.method=euler",
             "--config.sample.num_steps=3"]
    cli = [sys.executable, "-m", "flagdit_jax.cli"]
    run = subprocess.run(cli + ["train", "--config", f"{ROOT}/configs/imagenet/flagdit.py:600m", "--workdir",
                                str(tmp_path / "w"), *small], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    run = subprocess.run(cli + ["sample", "--workdir", str(tmp_path / "w")], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    out = np.load(tmp_path / "w" / "samples_3.npz")
    assert out["latents"].shape == (4, 8, 8, 4) and np.isfinite(out["latents"]).all()
    np.testing.assert_array_equal(out["labels"], np.arange(4))


@pytest.mark.slow
def test_next_mnist_config_trains(tmp_path):
    """configs/next/mnist.py: the default run with a Next-DiT; a few steps give a finite, falling loss."""
    import json

    c = load_config("configs/next/mnist.py")
    assert train.model_config(c).kv_heads == c.model.n_heads == 4  # full MHA, as the default
    c.total_steps, c.log_every_steps, c.checkpoint.async_save = 40, 10, False
    c.model.dim, c.model.n_layers = 64, 2
    train.train(c, tmp_path)
    losses = [json.loads(l)["loss"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert np.isfinite(losses).all() and losses[-1] < losses[0]


@pytest.mark.parametrize("rel,arg,preset", [("configs/t2i/lumina_t2i.py", s, "lumina-t2i-5b") for s in ("256", "512", "1024")]
                         + [("configs/t2i/lumina_next.py", "1024", "lumina-next-2b")])
def test_t2i_paper_configs_are_the_reference_recipe(rel, arg, preset):
    from flagdit_jax.data import buckets

    c = load_config(rel, arg)
    with pytest.raises(ValueError, match="config.data.options.data_dir"):
        train.validate(c)  # the user's cache is required
    c.data.options.data_dir = "/unused"
    train.validate(c)
    cfg = train.model_config(c)
    assert abs(registry.count_params(cfg) / registry.REFERENCE_PARAMS[preset] - 1) < 0.01
    # The bucket is the official max_seq_len of the stage's crop list (288 / 1088 / 4224 for Lumina-T2I).
    assert c.data.buckets == buckets.crop_buckets(int(arg), cfg)
    assert (c.optim.lr, c.flow.time_sampler, c.ema_decay, c.caption_dropout, c.model.dtype) == \
        (1e-4, "uniform", 0.9999, 0.1, "bfloat16")
    lumina_t2i = preset == "lumina-t2i-5b"
    assert (c.global_batch, c.text_encoder.kind, cfg.cap_feat_dim) == \
        ((512, "llama", 4096) if lumina_t2i else (256, "gemma", 2048))
    if lumina_t2i:  # stages start from the previous stage's weights
        assert c.init_from == {"256": "", "512": "runs/lumina_t2i_256", "1024": "runs/lumina_t2i_512"}[arg]


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["next", "flag"])
def test_embedded_t2i_commands_end_to_end(tmp_path, arch):
    """The README's embedded text-to-image commands at toy length: flagdit autoencoder -> encode (real
    MiniLM captions) -> train (two buckets) -> sample --prompt -> eval -> export -> from_pretrained."""
    from PIL import Image

    from flagdit_jax import cli

    ae = ["--config.train.steps=3", "--config.train.batch=4", "--config.scaling.num_images=8",
          "--config.eval.classifier=False"]
    assert cli.main(["autoencoder", "--config", f"{ROOT}/configs/autoencoder/mnist.py", "--workdir",
                     str(tmp_path / "ae"), *ae]) == 0
    t2i = [f"--config.vae.path={tmp_path / 'ae' / 'vae'}", f"--config.data.options.data_dir={tmp_path / 'cache'}"]
    assert cli.main(["encode", "--config", f"{ROOT}/configs/t2i/mnist.py:{arch}", *t2i,
                     "--config.encode.options.repeats=1", "--config.encode.num_shards=2"]) == 0
    small = ["--config.total_steps=4", "--config.global_batch=8", "--config.model.n_layers=2",
             "--config.checkpoint.every_steps=4", "--config.log_every_steps=2", "--config.sample.num_steps=2"]
    run = tmp_path / "run"
    assert cli.main(["train", "--config", f"{ROOT}/configs/t2i/mnist.py:{arch}", "--workdir", str(run), *t2i,
                     *small]) == 0
    assert cli.main(["sample", "--workdir", str(run), "--size", "32x64", "--prompt", "a large seven on the left"]) == 0
    assert Image.open(run / "prompts_4.png").size == (4 * 64, 32)
    assert cli.main(["eval", "--workdir", str(run), "--config.eval.num_samples=60", "--config.eval.batch=20",
                     "--config.eval.classifier_steps=20"]) == 0
    import json

    rep = json.loads((run / "eval_4.json").read_text())
    assert rep["n"] == 60 and set(rep["by_canvas"]) == {"square", "wide", "tall"}
    assert rep["real_floor"]["position"] == 1.0  # real renders are where their captions say
    assert cli.main(["export", "--workdir", str(run), "--output", str(tmp_path / "pipe")]) == 0
    from flagdit_jax import pretrained

    pipe = pretrained.load_pipeline(tmp_path / "pipe")
    images = pipe("a small two in the top left corner of a square canvas", 32, 32, num_inference_steps=2,
                  output_type="np")
    assert images.shape == (1, 32, 32, 1) and np.isfinite(images).all()
