"""The VAE: diffusers' AutoencoderKL in Flax (`kl`), diffusers folders <-> params (`convert`), and
the project's own small MNIST autoencoder (`train`).

    vae = load_vae("path/to/sdxl-vae")            # or a pipeline folder with vae/, or ours
    z = vae.encode(images)                        # scaled latents (z - shift) * scale
    images = vae.decode(z / vae.scaling_factor + vae.shift_factor)
"""

from flagdit_jax.autoencoder.convert import (init_params, load_vae, params_from_diffusers, params_to_diffusers,
                                             read_folder, save_folder)
from flagdit_jax.autoencoder.kl import (VAE, AutoencoderKL, AutoencoderKLConfig, config_from_diffusers,
                                        config_to_diffusers, kl_divergence, sample_posterior)

__all__ = [
    "VAE", "AutoencoderKL", "AutoencoderKLConfig", "config_from_diffusers", "config_to_diffusers", "init_params",
    "kl_divergence", "load_vae", "params_from_diffusers", "params_to_diffusers", "read_folder", "sample_posterior",
    "save_folder",
]
