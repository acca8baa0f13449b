"""Input pipelines: the embedded MNIST default, tfds ImageNet, pre-encoded latents, grain iterators.

    from flagdit_jax import data
    src = data.get_source("mnist", "train")
    it = data.make_iterator(src, global_batch=32, seed=0)   # host-local batches, checkpointable
    batch = next(it)                                        # {'image': [32, 32, 32, 1], 'label': [32]}

Training reads packed, token-length-bucketed batches instead (`buckets.make_bucketed_iterator`,
used by `train.make_data_iterator`): mixed sizes and frame counts, one compile per bucket.

Heavy imports (tfds, array_record) happen only when the ImageNet or latents sources are built.
"""

from flagdit_jax.data.buckets import crop_buckets, crop_size_list, make_bucketed_iterator
from flagdit_jax.data.captioned import CaptionedMnistSource
from flagdit_jax.data.encoded import EncodedSource, encode_dataset
from flagdit_jax.data.image_text import ImageTextFolder
from flagdit_jax.data.imagenet import ImageNetSource, center_crop_arr, reference_images
from flagdit_jax.data.latents import SD_VAE_SCALE, LatentSource, encode_latents, write_latents
from flagdit_jax.data.mnist import MnistSource, load_split
from flagdit_jax.data.mnist_t2i import MnistT2I
from flagdit_jax.data.pipeline import SOURCES, get_source, make_dataset, make_iterator

__all__ = ["SOURCES", "SD_VAE_SCALE", "CaptionedMnistSource", "EncodedSource", "ImageNetSource", "ImageTextFolder",
           "LatentSource", "MnistSource", "MnistT2I", "encode_dataset", "encode_latents", "reference_images",
           "center_crop_arr", "crop_buckets", "crop_size_list", "get_source", "load_split", "make_bucketed_iterator",
           "make_dataset", "make_iterator", "write_latents"]
