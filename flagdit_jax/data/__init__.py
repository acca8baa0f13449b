"""Input pipelines: the embedded MNIST default, tfds ImageNet, pre-encoded latents, grain iterators.

    from flagdit_jax import data
    src = data.get_source("mnist", "train")
    it = data.make_iterator(src, global_batch=32, seed=0)   # host-local batches, checkpointable
    batch = next(it)                                        # {'image': [32, 32, 32, 1], 'label': [32]}

Heavy imports (tfds, array_record) happen only when the ImageNet or latents sources are used.
"""

from flagdit_jax.data.latents import SD_VAE_SCALE, LatentSource, write_latents
from flagdit_jax.data.mnist import MnistSource, load_split
from flagdit_jax.data.pipeline import SOURCES, get_source, make_dataset, make_iterator


def __getattr__(name):
    # ImageNet pulls in tfds (slow import): load it on first use.
    if name in ("ImageNetSource", "center_crop_arr"):
        from flagdit_jax.data import imagenet

        return getattr(imagenet, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["SOURCES", "SD_VAE_SCALE", "ImageNetSource", "LatentSource", "MnistSource", "center_crop_arr",
           "get_source", "load_split", "make_dataset", "make_iterator", "write_latents"]
