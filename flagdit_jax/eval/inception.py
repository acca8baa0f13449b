"""Inception-v3 feature network of the ADM evaluator / FID, in Flax (NHWC, fp32).

The network is the 2015 TensorFlow Inception graph (`classify_image_graph_def.pb`, which the ADM
evaluator `openai/guided-diffusion evaluations/evaluator.py` runs) as ported to PyTorch by
pytorch-fid (`pytorch_fid/inception.py`: `fid_inception_v3`, FIDInceptionA/C/E_1/E_2) and
torch-fidelity (`torch_fidelity/feature_extractor_inceptionv3.py`, the same graph): torchvision's
Inception3 layout, BatchNorm eps 1e-3, the 3x3 average pools of the A / C / E blocks exclude the
zero padding (TF's avg pool), the last E block pools with a max pool, and a 1008-way classifier.

    feats = InceptionFeatures("pt_inception-2015-12-05-6726825d.pth")
    out = feats(images)      # images uint8 [N, H, W, 3]
    out["pool"]              # [N, 2048] pool_3 (FID, precision / recall)
    out["spatial"]           # [N, 2023] mixed_6/conv[..., :7] flattened (sFID)
    out["logits"]            # [N, 1008] fc with bias
    out["logits_unbiased"]   # [N, 1008] fc without bias (ADM's Inception Score: softmax/logits/MatMul)

`spatial`: ADM takes `mixed_6/conv:0` (the TF graph names the 17x17 blocks mixed_3..mixed_7 =
torchvision's Mixed_6a..Mixed_6e, and `mixed_6/conv` is the scope of the first 1x1 branch of
Mixed_6d, torch-fidelity's `util_convert_inception_weights` maps it to `Mixed_6d.branch1x1`; the
tensor named by the scope is its output after batchnorm and ReLU), keeps channels `[..., :7]` and
reshapes the NHWC [N, 17, 17, 7] map to [N, -1], i.e. the flat order is (row, column, channel)
with the channel fastest; ours is the same.
"""

from __future__ import annotations

import functools
import math
import pathlib
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

INPUT_SIZE = 299
NUM_CLASSES = 1008
SPATIAL_CHANNELS = 7  # ADM: mixed_6/conv[..., :7] -> 17 * 17 * 7 = 2023 features
RESIZE_MODES = ("tf1", "pytorch")
FEATURE_DIMS = {"pool": 2048, "spatial": 17 * 17 * SPATIAL_CHANNELS, "logits": NUM_CLASSES,
                "logits_unbiased": NUM_CLASSES}

# fp32 convolutions / matmuls on every backend (TPU and GPU would otherwise use bf16 / TF32 passes).
_PRECISION = lax.Precision.HIGHEST


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


class BasicConv2d(nn.Module):
    """Conv (no bias) -> inference BatchNorm (eps 1e-3, stored running stats) -> ReLU; torchvision's
    `BasicConv2d`, with the same submodule names (`conv`, `bn`) so the weights map 1:1."""

    features: int
    kernel_size: Any
    stride: Any = 1
    padding: Any = 0

    @nn.compact
    def __call__(self, x):
        ph, pw = _pair(self.padding)
        x = nn.Conv(self.features, _pair(self.kernel_size), strides=_pair(self.stride),
                    padding=((ph, ph), (pw, pw)), use_bias=False, precision=_PRECISION, name="conv")(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
        return nn.relu(x)


def _avg_pool_3x3(x):
    # TF's average pool: the padded zeros are not counted (pytorch-fid's count_include_pad=False patch).
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_s2(x):
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class InceptionA(nn.Module):
    pool_features: int

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv2d(64, 1, name="branch1x1")(x)
        b5 = BasicConv2d(48, 1, name="branch5x5_1")(x)
        b5 = BasicConv2d(64, 5, padding=2, name="branch5x5_2")(b5)
        b3 = BasicConv2d(64, 1, name="branch3x3dbl_1")(x)
        b3 = BasicConv2d(96, 3, padding=1, name="branch3x3dbl_2")(b3)
        b3 = BasicConv2d(96, 3, padding=1, name="branch3x3dbl_3")(b3)
        bp = BasicConv2d(self.pool_features, 1, name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = BasicConv2d(384, 3, stride=2, name="branch3x3")(x)
        bd = BasicConv2d(64, 1, name="branch3x3dbl_1")(x)
        bd = BasicConv2d(96, 3, padding=1, name="branch3x3dbl_2")(bd)
        bd = BasicConv2d(96, 3, stride=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(nn.Module):
    channels_7x7: int

    @nn.compact
    def __call__(self, x, *, return_branch1x1: bool = False):
        c7 = self.channels_7x7
        b1 = BasicConv2d(192, 1, name="branch1x1")(x)
        b7 = BasicConv2d(c7, 1, name="branch7x7_1")(x)
        b7 = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = BasicConv2d(c7, 1, name="branch7x7dbl_1")(x)
        bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = BasicConv2d(192, 1, name="branch_pool")(_avg_pool_3x3(x))
        out = jnp.concatenate([b1, b7, bd, bp], axis=-1)
        return (out, b1) if return_branch1x1 else out


class InceptionD(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = BasicConv2d(192, 1, name="branch3x3_1")(x)
        b3 = BasicConv2d(320, 3, stride=2, name="branch3x3_2")(b3)
        b7 = BasicConv2d(192, 1, name="branch7x7x3_1")(x)
        b7 = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = BasicConv2d(192, 3, stride=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nn.Module):
    """pytorch-fid's FIDInceptionE_1 (`max_pool=False`: TF avg pool) / FIDInceptionE_2 (`max_pool=True`:
    the 2015 graph's last block pools with a 3x3 max pool, stride 1, pad 1)."""

    max_pool: bool = False

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv2d(320, 1, name="branch1x1")(x)
        b3 = BasicConv2d(384, 1, name="branch3x3_1")(x)
        b3 = jnp.concatenate([BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                              BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], axis=-1)
        bd = BasicConv2d(448, 1, name="branch3x3dbl_1")(x)
        bd = BasicConv2d(384, 3, padding=1, name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate([BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                              BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], axis=-1)
        if self.max_pool:
            pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))  # pads with -inf
        else:
            pooled = _avg_pool_3x3(x)
        bp = BasicConv2d(192, 1, name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class _Classifier(nn.Module):
    """The 1008-way fc layer, returning (x @ W, x @ W + b): ADM's Inception Score reads the graph's
    `softmax/logits/MatMul` (no bias), as torch-fidelity's 'logits_unbiased' does."""

    features: int

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        unbiased = jnp.dot(x, kernel, precision=_PRECISION)
        return unbiased, unbiased + bias


class InceptionV3(nn.Module):
    """The FID Inception-v3: `x` float32 [N, 299, 299, 3] already preprocessed (`preprocess`) ->
    {'pool' [N, 2048], 'spatial' [N, 2023], 'logits' [N, 1008], 'logits_unbiased' [N, 1008]}.

    Variables: {'params', 'batch_stats'} with torchvision's module names (`load_params`)."""

    @nn.compact
    def __call__(self, x):
        x = BasicConv2d(32, 3, stride=2, name="Conv2d_1a_3x3")(x)     # 149
        x = BasicConv2d(32, 3, name="Conv2d_2a_3x3")(x)               # 147
        x = BasicConv2d(64, 3, padding=1, name="Conv2d_2b_3x3")(x)    # 147
        x = _max_pool_3x3_s2(x)                                       # 73
        x = BasicConv2d(80, 1, name="Conv2d_3b_1x1")(x)               # 73
        x = BasicConv2d(192, 3, name="Conv2d_4a_3x3")(x)              # 71
        x = _max_pool_3x3_s2(x)                                       # 35
        x = InceptionA(32, name="Mixed_5b")(x)
        x = InceptionA(64, name="Mixed_5c")(x)
        x = InceptionA(64, name="Mixed_5d")(x)
        x = InceptionB(name="Mixed_6a")(x)                            # 17
        x = InceptionC(128, name="Mixed_6b")(x)
        x = InceptionC(160, name="Mixed_6c")(x)
        x, mixed_6_conv = InceptionC(160, name="Mixed_6d")(x, return_branch1x1=True)  # TF mixed_6/conv
        x = InceptionC(192, name="Mixed_6e")(x)
        x = InceptionD(name="Mixed_7a")(x)                            # 8
        x = InceptionE(max_pool=False, name="Mixed_7b")(x)
        x = InceptionE(max_pool=True, name="Mixed_7c")(x)
        pool = jnp.mean(x, axis=(1, 2))                               # pool_3, [N, 2048]
        unbiased, logits = _Classifier(NUM_CLASSES, name="fc")(pool)
        spatial = mixed_6_conv[..., :SPATIAL_CHANNELS].reshape(x.shape[0], -1)
        return {"pool": pool, "spatial": spatial, "logits": logits, "logits_unbiased": unbiased}


# --------------------------------------------------------------------------------------------------
# Preprocessing


def _resize_axis(x, axis: int, out: int, mode: str):
    """Bilinear resampling of one spatial axis of float32 `x` to `out` samples.

    'tf1': TF1 `ResizeBilinear(align_corners=False)` (no half-pixel centres): src = dst * in/out,
      as torch-fidelity's `interpolate_bilinear_2d_like_tensorflow1x` (its exact 'slow' path) computes it.
    'pytorch': `F.interpolate(mode='bilinear', align_corners=False)` (no antialias): src =
      (dst + 0.5) * in/out - 0.5, clamped at 0.
    Both: lo = floor(src), hi = min(lo + 1, in - 1), lambda = src - lo, each written in its reference's
    arithmetic form (a + (b - a) * lambda vs (1 - lambda) * a + lambda * b) to stay within a few ulps.
    """
    n_in = x.shape[axis]
    scale = np.float32(n_in / out)
    dst = np.arange(out, dtype=np.float32)
    if mode == "tf1":
        src = dst * scale
    else:
        # ATen's `scale * (dst + 0.5) - 0.5` in float32 is compiled as one fused multiply-add on
        # x86 (a single rounding; measured: plain float32 arithmetic is 1 ulp off for some dst), so
        # it is computed exactly in float64 and rounded once.
        exact = (dst.astype(np.float64) + 0.5) * np.float64(scale) - 0.5
        src = np.maximum(exact.astype(np.float32), np.float32(0))
    lo = np.floor(src).astype(np.int32)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = (src - lo.astype(np.float32)).astype(np.float32)
    shape = [1] * x.ndim
    shape[axis] = out
    a, b = jnp.take(x, lo, axis=axis), jnp.take(x, hi, axis=axis)
    frac = jnp.asarray(frac).reshape(shape)
    if mode == "tf1":
        return a + (b - a) * frac  # torch-fidelity's form
    return (1.0 - frac) * a + frac * b  # ATen's upsample_bilinear2d form: w0 * a + w1 * b


def _check_images(images) -> None:
    shape, dtype = getattr(images, "shape", None), getattr(images, "dtype", None)
    if shape is None or len(shape) != 4 or shape[-1] != 3:
        raise ValueError(f"images must be [N, H, W, 3] (NHWC RGB), got shape {shape}")
    if shape[1] < 1 or shape[2] < 1:
        raise ValueError(f"images must have positive height and width, got shape {shape}")
    if not (dtype == np.uint8 or jnp.issubdtype(dtype, jnp.floating)):
        raise ValueError(f"images must be uint8 or float in [0, 255], got dtype {dtype}")


def _check_resize(resize: str) -> None:
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")


def preprocess(images, *, resize: str = "tf1"):
    """uint8 (or float in [0, 255]) [N, H, W, 3] -> float32 [N, 299, 299, 3], the network's input.

    resize='tf1' (default; ADM's evaluator graph and torch-fidelity): TF1 legacy bilinear resize of
      the 0..255 values, then (x - 128) / 128.
    resize='pytorch' (pytorch-fid): x / 255, `F.interpolate` bilinear (align_corners=False), 2x - 1.
    Jittable; the resize is a fixed gather + lerp per axis (identity at 299x299)."""
    _check_resize(resize)
    _check_images(images)
    return _preprocess(images, resize)


@functools.partial(jax.jit, static_argnums=1)  # one compile per input shape when called eagerly
def _preprocess(images, resize: str):
    x = jnp.asarray(images).astype(jnp.float32)
    if resize == "pytorch":
        x = x / 255.0
    # width first, then height: the order of both references' lerps
    x = _resize_axis(_resize_axis(x, 2, INPUT_SIZE, resize), 1, INPUT_SIZE, resize)
    if resize == "tf1":
        return (x - 128.0) / 128.0
    return 2.0 * x - 1.0


# --------------------------------------------------------------------------------------------------
# Weights


@functools.lru_cache(maxsize=1)
def _abstract_variables():
    """The network's variables as shapes only (jax.eval_shape: no compute, ~1 s of tracing, cached)."""
    return jax.eval_shape(InceptionV3().init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32))


def expected_shapes() -> dict[str, tuple[int, ...]]:
    """torch state-dict key -> torch shape, for every tensor the network needs (no compute)."""
    variables = _abstract_variables()
    out = {}
    for torch_key, (collection, path, transpose) in _key_map(variables).items():
        leaf = variables[collection]
        for p in path:
            leaf = leaf[p]
        out[torch_key] = tuple(leaf.shape[i] for i in transpose) if transpose else tuple(leaf.shape)
    return out


# flax leaf name -> (torch suffix, collection, torch->flax transpose or None)
_LEAVES = {
    ("conv", "kernel"): ("conv.weight", "params", (2, 3, 1, 0)),   # torch [O, I, kh, kw] -> [kh, kw, I, O]
    ("bn", "scale"): ("bn.weight", "params", None),
    ("bn", "bias"): ("bn.bias", "params", None),
    ("bn", "mean"): ("bn.running_mean", "batch_stats", None),
    ("bn", "var"): ("bn.running_var", "batch_stats", None),
    ("fc", "kernel"): ("fc.weight", "params", (1, 0)),             # torch [out, in] -> [in, out]
    ("fc", "bias"): ("fc.bias", "params", None),
}


def _key_map(variables) -> dict[str, tuple[str, tuple[str, ...], tuple[int, ...] | None]]:
    """torch key -> (collection, flax path, transpose taking the flax array to the torch layout)."""
    out = {}
    for collection in ("params", "batch_stats"):
        for path, _ in jax.tree_util.tree_flatten_with_path(variables[collection])[0]:
            names = tuple(k.key for k in path)
            suffix, coll, perm = _LEAVES[names[-2:]]
            assert coll == collection, (names, collection)
            prefix = ".".join(names[:-2])
            torch_key = f"{prefix}.{suffix}" if prefix else suffix
            # the inverse of the torch->flax transpose takes flax back to torch's layout
            out[torch_key] = (collection, names, tuple(np.argsort(perm)) if perm else None)
    return out


# BatchNorm's step counter: a buffer with no effect at inference (present in torchvision-made files).
_IGNORED_SUFFIXES = (".num_batches_tracked",)


def params_from_state_dict(state_dict: Mapping[str, Any]) -> dict:
    """A pytorch-fid / torch-fidelity Inception state dict ({key: array}, torchvision key names,
    e.g. 'Mixed_6d.branch1x1.conv.weight', 'fc.weight'; torch tensors or numpy arrays) -> Flax
    variables {'params', 'batch_stats'} (float32), BN kept as inference BN with its running stats.

    Raises ValueError naming every missing key, unexpected key and shape mismatch."""
    variables = _abstract_variables()
    kmap = _key_map(variables)
    given = {k for k in state_dict if not k.endswith(_IGNORED_SUFFIXES)}
    missing, unexpected = sorted(set(kmap) - given), sorted(given - set(kmap))
    bad_shapes = []
    for key in sorted(set(kmap) & given):
        collection, path, perm = kmap[key]
        leaf = variables[collection]
        for p in path:
            leaf = leaf[p]
        want = tuple(leaf.shape[i] for i in perm) if perm else tuple(leaf.shape)
        got = tuple(state_dict[key].shape)
        if got != want:
            bad_shapes.append(f"{key}: got {got}, expected {want}")
    if missing or unexpected or bad_shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys: {missing[:10]}{' ...' if len(missing) > 10 else ''}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys: {unexpected[:10]}"
                         f"{' ...' if len(unexpected) > 10 else ''}")
        if bad_shapes:
            parts.append(f"{len(bad_shapes)} shape mismatches (torch layout): {bad_shapes[:10]}")
        raise ValueError("not a pytorch-fid / torch-fidelity Inception-v3 state dict: " + "; ".join(parts))
    out: dict = {"params": {}, "batch_stats": {}}
    for key, (collection, path, perm) in kmap.items():
        value = state_dict[key]
        value = value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
        value = np.asarray(value, np.float32)
        if perm:
            value = np.transpose(value, np.argsort(perm))  # torch layout -> flax layout
        node = out[collection]
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = jnp.asarray(value)
    return out


def _read_state_dict(path: pathlib.Path) -> dict:
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.numpy import load_file

        return load_file(str(path))
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"reading the torch weights file {path} needs PyTorch (pip install torch), or "
                          "convert it to .safetensors / .npz with the same keys") from e
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(sd, Mapping):
        raise ValueError(f"{path}: expected a state dict (a mapping of tensors), got {type(sd).__name__}")
    return dict(sd)


def load_params(path) -> dict:
    """Weights file -> Flax variables {'params', 'batch_stats'} of `InceptionV3`.

    Reads pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` and torch-fidelity's
    `weights-inception-2015-12-05-6726825d.pth` (both torch state dicts with torchvision's key
    names, so one mapping serves both; read with `torch.load(weights_only=True)`), or a
    `.safetensors` / `.npz` holding the same keys (torch layouts)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise ValueError(f"Inception weights file not found: {path}")
    return params_from_state_dict(_read_state_dict(path))


# --------------------------------------------------------------------------------------------------
# Batched, sharded feature extraction


class InceptionFeatures:
    """`images` uint8 (or float in [0, 255]) [N, H, W, 3] -> {'pool' [N, 2048], 'spatial' [N, 2023],
    'logits' [N, 1008], 'logits_unbiased' [N, 1008]} float32 numpy.

    Each batch of `batch_size` images (rounded up to a multiple of the local device count) is
    sharded over all local devices (a 1-D Mesh, NamedSharding on the batch axis); the last batch is
    padded and the padding dropped. One jit compile per (H, W, dtype) of the input."""

    def __init__(self, weights_path, *, resize: str = "tf1", batch_size: int = 200):
        self._setup(load_params(weights_path), resize, batch_size)

    @classmethod
    def from_params(cls, variables, *, resize: str = "tf1", batch_size: int = 200) -> "InceptionFeatures":
        """From Flax variables {'params', 'batch_stats'} (`load_params` / `params_from_state_dict`)."""
        self = cls.__new__(cls)
        self._setup(variables, resize, batch_size)
        return self

    def _setup(self, variables, resize: str, batch_size: int) -> None:
        _check_resize(resize)
        if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if set(variables) != {"params", "batch_stats"}:
            raise ValueError(f"variables must have exactly 'params' and 'batch_stats', got {sorted(variables)}")
        devices = np.array(jax.local_devices())
        self.mesh = Mesh(devices, ("batch",))
        self.resize = resize
        self.batch_size = int(math.ceil(batch_size / devices.size) * devices.size)
        self._data_sharding = NamedSharding(self.mesh, P("batch"))
        self.variables = jax.device_put(variables, NamedSharding(self.mesh, P()))  # replicated
        model = InceptionV3()

        def forward(variables, images):
            return model.apply(variables, preprocess(images, resize=resize))

        self._forward = jax.jit(forward, out_shardings=NamedSharding(self.mesh, P("batch")))

    def __call__(self, images) -> dict[str, np.ndarray]:
        _check_images(images)
        images = np.asarray(images)
        if images.dtype != np.uint8:
            images = images.astype(np.float32)
            if images.size and not (np.all(np.isfinite(images)) and images.min() >= 0 and images.max() <= 255):
                raise ValueError(f"float images must be finite and in [0, 255], got range "
                                 f"[{np.nanmin(images)}, {np.nanmax(images)}]")
        n, bs = images.shape[0], self.batch_size
        chunks: dict[str, list[np.ndarray]] = {k: [] for k in FEATURE_DIMS}

        def collect(out, real):
            for k in FEATURE_DIMS:
                chunks[k].append(np.asarray(out[k], np.float32)[:real])

        pending = None
        for start in range(0, n, bs):
            batch = images[start:start + bs]
            real = batch.shape[0]
            if real < bs:  # pad to the compiled batch shape
                batch = np.concatenate([batch, np.zeros((bs - real, *batch.shape[1:]), batch.dtype)])
            out = self._forward(self.variables, jax.device_put(batch, self._data_sharding))
            if pending is not None:  # fetch the previous batch while this one runs (one in flight)
                collect(*pending)
            pending = (out, real)
        if pending is not None:
            collect(*pending)
        return {k: (np.concatenate(v) if v else np.zeros((0, FEATURE_DIMS[k]), np.float32))
                for k, v in chunks.items()}
