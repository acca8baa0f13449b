"""Test set-up: 8 fake CPU devices for sharding tests, set before jax is imported."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")



import pathlib  # noqa: E402

# Golden outputs of the official PyTorch models (see ../shared/golden/README.md).
GOLDEN_DIR = pathlib.Path(
    os.environ.get("FLAGDIT_GOLDEN_DIR", pathlib.Path(__file__).resolve().parents[2] / "shared" / "golden")
)
