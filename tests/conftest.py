"""Test set-up: 8 fake CPU devices for sharding tests, set before jax is imported."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")



import pathlib  # noqa: E402

# Golden outputs of the official PyTorch models (see ../shared/golden/README.md).
GOLDEN_DIR = pathlib.Path(
    os.environ.get("FLAGDIT_GOLDEN_DIR", pathlib.Path(__file__).resolve().parents[2] / "shared" / "golden")
)


def assert_parity(actual, desired, *, eps: float = 4e-6, err_msg: str = "") -> None:
    """Deep-network parity at fp32 precision, scaled by the reference's magnitude.

    atol = eps * max(1, max|desired|): fp32 outputs of size ~5 through a few layers differ by
    ~1e-5 between CPUs (AVX-512 or not), so a fixed 1e-5 bound fails on some machines while
    4e-6 relative to the output's scale (~30 fp32 ulps) still catches any real mismatch.
    """
    import numpy as np

    desired = np.asarray(desired)
    scale = max(1.0, float(np.max(np.abs(desired)))) if desired.size else 1.0
    np.testing.assert_allclose(np.asarray(actual), desired, atol=eps * scale, rtol=0, err_msg=err_msg)


def load_config(path, arg=None, **overrides):
    """`get_config(arg)` of a config file, then dotted-key overrides (`**{"model.dim": 32}`)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(pathlib.Path(path).stem + "_config", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config() if arg is None else mod.get_config(arg)
    for key, value in overrides.items():
        node = c
        *parents, leaf = key.split(".")
        for name in parents:
            node = node[name]
        node[leaf] = value
    return c


def sigkill_after_checkpoint(cmd, workdir, step: int, total: int, *, cwd, timeout: float) -> list[int]:
    """Start `cmd` (a `flagdit train` run in `workdir`), SIGKILL it as soon as checkpoint `step` is
    committed (Orbax renames on commit), and return the saved steps (asserted to end before `total`)."""
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while not (workdir / "checkpoints" / str(step)).exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before it could be killed"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and max(saved) < total, f"killed too late: {saved}"
    return saved


class HashEncoder:
    """A deterministic stand-in text encoder (the `pipeline.TextEncoder` protocol): one fixed random
    vector per word, mask = word count (up to `max_len`)."""

    def __init__(self, dim=32, max_len=8):
        self.dim, self.max_len = dim, max_len

    def __call__(self, prompts):
        import zlib

        import numpy as np

        feats = np.zeros((len(prompts), self.max_len, self.dim), np.float32)
        mask = np.zeros((len(prompts), self.max_len), bool)
        for i, p in enumerate(prompts):
            for j, w in enumerate((p.split() or ["<empty>"])[: self.max_len]):
                feats[i, j] = np.random.default_rng(zlib.crc32(w.encode())).standard_normal(self.dim)
                mask[i, j] = True
        return feats, mask


class StubVAE:
    """A stand-in VAE (the `pipeline.VAE` protocol, downsample 2): decode = nearest-neighbour x2 of the
    first 3 latent channels squashed to [-1, 1]; encode = 2x2 mean pool of RGB, padded to 4 channels."""

    scaling_factor, shift_factor, downsample = 0.5, 0.0, 2

    def decode(self, z):
        import jax.numpy as jnp

        return jnp.tanh(jnp.repeat(jnp.repeat(z[..., :3], 2, 1), 2, 2))

    def encode(self, images):
        import jax.numpy as jnp

        b, h, w, _ = images.shape
        z = images.reshape(b, h // 2, 2, w // 2, 2, 3).mean((2, 4))
        return jnp.concatenate([z, z[..., :1]], -1) * self.scaling_factor
