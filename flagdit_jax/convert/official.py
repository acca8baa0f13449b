"""Official Lumina-T2X checkpoints -> our configs and Flax params.

`config_from_official(args, state_dict)` maps the official constructor arguments (a dict, the
`argparse.Namespace` saved as `model_args.pth`, or the `config` block of a golden file) to a
`FlagDiTConfig` or `NextDiTConfig` (the registry's config class of the detected kind);
`params_from_state_dict(state_dict, cfg)` maps official keys (numpy arrays) to our parameter tree
and refuses a checkpoint whose keys or shapes do not match, naming the first few.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import warnings
from typing import Any, Callable, Mapping

import flax.linen as nn
import flax.traverse_util
import jax
import numpy as np

from flagdit_jax.models import registry
from flagdit_jax.models.common import LuminaConfig

# Official model constructors (LT `*/models/model.py: DiT_Llama_*_patch2`) -> trunk sizes.
OFFICIAL_MODELS = {
    "DiT_Llama_600M_patch2": dict(dim=1536, n_layers=16, n_heads=32, patch_size=2),
    "DiT_Llama_3B_patch2": dict(dim=3072, n_layers=32, n_heads=32, patch_size=2),
    "DiT_Llama_7B_patch2": dict(dim=4096, n_layers=32, n_heads=32, patch_size=2),
    "DiT_Llama_5B_patch2": dict(dim=3072, n_layers=32, n_heads=32, patch_size=2),
    "DiT_Llama_2B_patch2": dict(dim=2304, n_layers=24, n_heads=32, patch_size=2),  # Next-DiT ImageNet
    # Lumina-Next T2I (LT lumina_next_t2i/models/model.py).
    "NextDiT_2B_patch2": dict(dim=2304, n_layers=24, n_heads=32, patch_size=2),
    "NextDiT_2B_GQA_patch2": dict(dim=2304, n_layers=24, n_heads=32, n_kv_heads=8, patch_size=2),
}
ARCHS = ("auto", "flagdit", "nextdit")  # 'auto' or a model kind of models.registry.MODEL_KINDS
_CONSTRUCTOR_KEYS = (
    "dim", "n_layers", "n_heads", "n_kv_heads", "patch_size", "in_channels", "multiple_of", "ffn_dim_multiplier",
    "norm_eps", "qk_norm", "learn_sigma", "num_classes", "class_dropout_prob", "cap_feat_dim",
)


class CheckpointMismatch(ValueError):
    """The checkpoint does not fit the chosen config (keys or shapes)."""


def _as_dict(args: Any) -> dict:
    return dict(vars(args)) if not isinstance(args, Mapping) else dict(args)


def detect_arch(args: Any, state_dict: Mapping[str, np.ndarray] | None) -> str:
    """'nextdit' or 'flagdit' from the checkpoint (adaLN width 4d vs 6d) or the model name."""
    a, sd = _as_dict(args), state_dict or {}
    if "layers.0.adaLN_modulation.1.weight" in sd:
        width, dim = sd["layers.0.adaLN_modulation.1.weight"].shape[0], sd["x_embedder.weight"].shape[0]
        if width not in (4 * dim, 6 * dim):
            raise ValueError(f"layers.0.adaLN_modulation.1.weight has {width} rows; expected 4*dim (Next-DiT) or "
                             f"6*dim (Flag-DiT) with dim={dim}")
        return "nextdit" if width == 4 * dim else "flagdit"
    if str(a.get("model", "")).startswith("NextDiT"):
        return "nextdit"
    if "model" in a or "dim" in a:
        # The Next-DiT ImageNet file reuses the DiT_Llama_* names: without weights we assume Flag-DiT
        # (pass arch='nextdit' for it); with weights the adaLN width above decides.
        return "flagdit"
    raise ValueError(f"official arguments name neither `model` nor `dim`: keys {sorted(a)}")


def config_from_official(args: Any, state_dict: Mapping[str, np.ndarray] | None = None, *, arch: str = "auto",
                         **overrides) -> LuminaConfig:
    """Official constructor arguments -> `FlagDiTConfig` or `NextDiTConfig`.

    Args:
      args: a dict of `DiT_Llama` / `NextDiT` constructor arguments (`dim`, `n_layers`, ...), or the
        training `argparse.Namespace` from `model_args.pth` (uses `model`, e.g. 'DiT_Llama_5B_patch2'
        or 'NextDiT_2B_GQA_patch2', and `qk_norm`, `num_classes`).
      state_dict: when given, fills what the arguments leave implicit (cap_feat_dim from the
        text-encoder width, n_kv_heads from wk's shape, num_classes from the label table, Flag-DiT
        vs Next-DiT from the adaLN width, Next-DiT's norm and final-layer variants).
      arch: 'auto' (from the state dict or model name), 'flagdit' or 'nextdit'.
      overrides: any config field (e.g. dtype).
    """
    if arch not in ARCHS:
        raise ValueError(f"arch={arch!r}; expected one of {ARCHS}")
    a = _as_dict(args)
    kw: dict[str, Any] = {}
    if "model" in a:
        if a["model"] not in OFFICIAL_MODELS:
            raise ValueError(f"unknown official model {a['model']!r}; expected one of {sorted(OFFICIAL_MODELS)}")
        kw.update(OFFICIAL_MODELS[a["model"]])
    kw.update({k: a[k] for k in _CONSTRUCTOR_KEYS if a.get(k) is not None})
    if "dim" not in kw:
        raise ValueError(f"official arguments name neither `model` nor `dim`: keys {sorted(a)}")
    sd = state_dict or {}
    arch = detect_arch(a, sd) if arch == "auto" else arch
    if "cap_feat_dim" not in kw and "layers.0.attention.wk_y.weight" in sd:
        kw["cap_feat_dim"] = int(sd["layers.0.attention.wk_y.weight"].shape[1])
    if "layers.0.attention.wk.weight" in sd and kw.get("n_kv_heads") is None:
        kv = int(sd["layers.0.attention.wk.weight"].shape[0]) // (kw["dim"] // kw["n_heads"])
        kw["n_kv_heads"] = None if kv == kw["n_heads"] else kv
    text = kw.get("cap_feat_dim", 0) > 0
    if text:
        kw["num_classes"] = 0
        kw["nextline"] = arch == "flagdit"  # Flag-DiT T2I appends eol_token after every row; Next-DiT does not
    else:
        if "y_embedder.embedding_table.weight" in sd and "num_classes" not in a:
            rows = int(sd["y_embedder.embedding_table.weight"].shape[0])
            kw["num_classes"] = rows - int(kw.get("class_dropout_prob", 0.1) > 0)
        kw.setdefault("num_classes", 1000)
    if arch == "nextdit":
        # T2I: learnable pre-norms + scale-only final adaLN; ImageNet: parameter-free pre-norms + shift.
        kw["pre_norm_affine"] = "layers.0.attention_norm1.weight" in sd if sd else text
        final = sd.get("final_layer.adaLN_modulation.1.weight")
        kw["final_shift"] = final.shape[0] == 2 * kw["dim"] if final is not None else not text
    kw.update(overrides)
    return registry.config_class(arch)(**kw)


def _t(w):  # torch Linear weight [out, in] -> kernel [in, out]
    return np.asarray(w).T


def _patch_embed(cfg: LuminaConfig) -> Callable:
    """x_embedder.weight [d, C*p*p] in (C, ph, pw) order -> kernel [p*p*C, d] in (ph, pw, C) order."""
    p, c = cfg.patch_size, cfg.in_channels

    def fn(w):
        w = np.asarray(w)
        return w.reshape(w.shape[0], c, p, p).transpose(2, 3, 1, 0).reshape(p * p * c, w.shape[0])

    return fn


def _patch_unembed(cfg: LuminaConfig) -> Callable:
    """Inverse of `_patch_embed`: kernel [p*p*C, d] in (ph, pw, C) -> weight [d, C*p*p] in (C, ph, pw)."""
    p, c = cfg.patch_size, cfg.in_channels

    def fn(k):
        k = np.asarray(k)
        return k.reshape(p, p, c, k.shape[-1]).transpose(3, 2, 0, 1).reshape(k.shape[-1], c * p * p)

    return fn


def _rules(cfg: LuminaConfig):
    """(official key regex, our path template, transform) in match order."""
    same = np.asarray
    return [
        (r"x_embedder\.weight", "x_embedder/kernel", _patch_embed(cfg)),
        (r"x_embedder\.bias", "x_embedder/bias", same),
        (r"t_embedder\.mlp\.(0|2)\.weight", r"t_embedder/mlp_\1/kernel", _t),
        (r"t_embedder\.mlp\.(0|2)\.bias", r"t_embedder/mlp_\1/bias", same),
        (r"y_embedder\.embedding_table\.weight", "y_embedder/embedding_table", same),
        (r"cap_embedder\.0\.weight", "cap_embedder/norm/scale", same),
        (r"cap_embedder\.0\.bias", "cap_embedder/norm/bias", same),
        (r"cap_embedder\.1\.weight", "cap_embedder/linear/kernel", _t),
        (r"cap_embedder\.1\.bias", "cap_embedder/linear/bias", same),
        (r"layers\.(\d+)\.attention\.(wq|wk|wv|wo|wk_y|wv_y)\.weight", r"layers_\1/attention/\2/kernel", _t),
        (r"layers\.(\d+)\.attention\.(q_norm|k_norm|ky_norm)\.weight", r"layers_\1/attention/\2/scale", same),
        (r"layers\.(\d+)\.attention\.(q_norm|k_norm|ky_norm)\.bias", r"layers_\1/attention/\2/bias", same),
        (r"layers\.(\d+)\.attention\.gate", r"layers_\1/attention/gate", same),
        (r"layers\.(\d+)\.feed_forward\.(w1|w2|w3)\.weight", r"layers_\1/feed_forward/\2/kernel", _t),
        *_norm_rules(cfg),
        (r"layers\.(\d+)\.adaLN_modulation\.1\.weight", r"layers_\1/adaLN_modulation/linear/kernel", _t),
        (r"layers\.(\d+)\.adaLN_modulation\.1\.bias", r"layers_\1/adaLN_modulation/linear/bias", same),
        (r"final_layer\.linear\.weight", "final_layer/linear/kernel", _t),
        (r"final_layer\.linear\.bias", "final_layer/linear/bias", same),
        (r"final_layer\.adaLN_modulation\.1\.weight", "final_layer/adaLN_modulation/linear/kernel", _t),
        (r"final_layer\.adaLN_modulation\.1\.bias", "final_layer/adaLN_modulation/linear/bias", same),
        (r"(eol_token|pad_token)", r"\1", same),
    ]


def _norm_rules(cfg: LuminaConfig):
    """Block RMSNorm weights. Next-DiT: ours are `*_norm1` (pre) and `*_norm2` (post); the ImageNet
    file names its post-norms `attention_norm` / `ffn_norm` (its pre-norms have no weights)."""
    same = np.asarray
    rules = [(r"layers\.(\d+)\.(attention_y_norm)\.weight", r"layers_\1/\2/scale", same)]
    if cfg.kind != "nextdit":
        return rules + [(r"layers\.(\d+)\.(attention_norm|ffn_norm)\.weight", r"layers_\1/\2/scale", same)]
    rules.append((r"layers\.(\d+)\.(attention_norm|ffn_norm)([12])\.weight", r"layers_\1/\2\3/scale", same))
    if not cfg.pre_norm_affine:
        rules.append((r"layers\.(\d+)\.(attention_norm|ffn_norm)\.weight", r"layers_\1/\g<2>2/scale", same))
    return rules


def _first(items, n=5) -> str:
    items = list(items)
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(map(str, items[:n])) + more


def raise_mismatch(header: str, problems: list[tuple[str, list]]) -> None:
    """Raise `CheckpointMismatch` as 'header: label: first few; ...' over the non-empty problem lists."""
    parts = [f"{label}: {_first(items)}" for label, items in problems if items]
    if parts:
        raise CheckpointMismatch(f"{header}: " + "; ".join(parts))


def params_from_state_dict(state_dict: Mapping[str, Any], cfg: LuminaConfig, *, dtype=np.float32) -> dict:
    """Official state dict (numpy-convertible arrays under official keys) -> our params tree.

    The tree is in `cfg`'s block layout: per layer (`layers_{i}`, the official one), or stacked
    under `layers` when `cfg.scan_layers` (`registry.params_for`).

    Raises:
      CheckpointMismatch: naming the first unexpected keys, missing parameters or wrong shapes.
    """
    rules = [(re.compile(pat + r"$"), tmpl, fn) for pat, tmpl, fn in _rules(cfg)]
    # Keys map one-to-one onto the per-layer tree; a scanned config stacks it at the end.
    per_layer = dataclasses.replace(cfg, scan_layers=False)
    expected = {
        "/".join(k): tuple(v.shape)
        for k, v in flax.traverse_util.flatten_dict(nn.unbox(registry.abstract_params(per_layer))).items()
    }
    flat, unexpected = {}, []
    for key, value in state_dict.items():
        for pat, tmpl, fn in rules:
            m = pat.match(key)
            if m:
                flat[m.expand(tmpl)] = (key, fn(np.asarray(value, dtype=dtype)))
                break
        else:
            unexpected.append(key)
    unexpected += [src for path, (src, _) in flat.items() if path not in expected]
    missing = sorted(set(expected) - set(flat))
    wrong = [
        f"{src}: {np.shape(v)} vs expected {expected[path]}"
        for path, (src, v) in flat.items()
        if path in expected and np.shape(v) != expected[path]
    ]
    raise_mismatch(f"checkpoint does not match the config (dim={cfg.dim}, n_layers={cfg.n_layers}, "
                   f"n_heads={cfg.n_heads})", [("unexpected keys", unexpected), ("missing parameters", missing),
                                               ("shape mismatches (after conversion)", wrong)])
    tree = flax.traverse_util.unflatten_dict({tuple(p.split("/")): v for p, (_, v) in flat.items()})
    return registry.params_for(jax.tree.map(np.asarray, tree), cfg)


def state_dict_from_params(params: Mapping[str, Any], cfg: LuminaConfig) -> dict[str, np.ndarray]:
    """Our params -> an official state dict (numpy, official keys and layouts); the inverse of
    `params_from_state_dict` (round trip exact, tests/test_golden.py), for handing weights back
    to the PyTorch code. `params` may be in either block layout (per layer or scanned)."""
    params = registry.params_for(nn.unbox(dict(params)), dataclasses.replace(cfg, scan_layers=False))
    renames = [(r"^layers_(\d+)/", r"layers.\1/"), (r"/mlp_(\d)/", r"/mlp.\1/"),
               (r"adaLN_modulation/linear/", "adaLN_modulation/1/"), (r"^cap_embedder/norm/", "cap_embedder/0/"),
               (r"^cap_embedder/linear/", "cap_embedder/1/"), (r"/embedding_table$", "/embedding_table/weight"),
               (r"/scale$", "/weight")]
    if cfg.kind == "nextdit" and not cfg.pre_norm_affine:  # ImageNet Next-DiT names its post-norms
        renames.append((r"/(attention_norm|ffn_norm)2/", r"/\1/"))
    out = {}
    for path, value in flax.traverse_util.flatten_dict(dict(params), sep="/").items():
        v = np.asarray(value, np.float32)
        key = path
        for pat, rep in renames:
            key = re.sub(pat, rep, key)
        if key == "x_embedder/kernel":
            v, key = _patch_unembed(cfg)(v), "x_embedder/weight"
        elif key.endswith("/kernel"):
            v, key = v.T, key[: -len("kernel")] + "weight"
        out[key.replace("/", ".")] = np.ascontiguousarray(v)
    return out


# What torch.load may build beyond tensors and plain containers (dict, list, tuple, str, numbers,
# None): the official model_args.pth is the training script's argparse.Namespace (LT train.py:
# `torch.save(args, ".../model_args.pth")`), whose fields are ints, floats, strings, bools and None.
_SAFE_GLOBALS = (argparse.Namespace,)


class UnsafeCheckpoint(ValueError):
    """A .pth file pickles a class or function other than tensors and plain data: loading it could run code."""


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def _torch_reason(e: BaseException) -> str:
    """The gist of a torch.load failure: torch wraps it in paragraphs of advice (about weights_only=False,
    which is what we refuse to do) before the 'WeightsUnpickler error:' part."""
    msg = str(e).rpartition("WeightsUnpickler error:")[2]
    gist = next((ln.strip() for ln in msg.splitlines() if ln.strip()), "")
    return f"{type(e).__name__}: {gist.split('. ')[0]}" if gist else type(e).__name__


def load_torch_file(path: str) -> Any:
    """Load a `.pth` (state dict or model_args Namespace) with torch (an optional dependency).

    Never runs code from the file: `weights_only=True` unpickles only tensors, plain containers and
    `_SAFE_GLOBALS`, and refuses anything else before building it.

    Raises:
      UnsafeCheckpoint: the file pickles another class or function (named in the message).
      ValueError: the file is not a readable torch.save file (random bytes, truncated, another format).
      OSError: the file cannot be opened.
    """
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError("reading .pth files needs torch: pip install 'flagdit_jax[torch]'") from e
    try:
        with torch.serialization.safe_globals(list(_SAFE_GLOBALS)), warnings.catch_warnings():
            # A bare pickle (not torch.save) draws a protocol warning before it is refused below.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise  # missing or unreadable: the OS message names the path
    except Exception as e:  # torch reports bad bytes as UnpicklingError, RuntimeError, KeyError, ...
        refused = re.search(r"GLOBAL (\S+)", str(e))
        if refused:
            raise UnsafeCheckpoint(
                f"{path} holds non-tensor objects ({refused.group(1)}); refused as unsafe to load (unpickling "
                "it could run code). If you trust it, re-save the weights as .safetensors and pass those") from e
        raise ValueError(
            f"{path} is not readable as tensors and plain data by torch.load(weights_only=True) ({_torch_reason(e)}): "
            "not a torch.save file, corrupt, or holding objects refused as unsafe; .safetensors is preferred") from e
    if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        obj = obj["model"]  # training checkpoints nest the state dict
    if isinstance(obj, Mapping):
        return {k: (v.float().numpy() if hasattr(v, "numpy") else v) for k, v in obj.items()}
    return obj


def load_model_args(path: str) -> dict:
    """The official `model_args.pth` (an argparse.Namespace, or a dict) as a dict, loaded safely."""
    args = load_torch_file(path)
    if not isinstance(args, (argparse.Namespace, Mapping)):
        raise ValueError(f"{path} holds a {type(args).__name__}; expected the official model_args.pth "
                         "(an argparse.Namespace of training arguments)")
    return _as_dict(args)


def load_state_dict(path: str) -> dict[str, np.ndarray]:
    """State dict from `.pth` / `.pt` / `.bin` (torch, loaded safely) or `.safetensors` (preferred: no torch)."""
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        try:
            return dict(load_file(path))
        except SafetensorError as e:
            raise ValueError(f"{path} is not a readable safetensors file ({_first_line(e)})") from e
    if path.endswith((".pth", ".pt", ".bin")):
        sd = load_torch_file(path)
        if not isinstance(sd, Mapping):
            raise ValueError(f"{path} holds a {type(sd).__name__}, expected a state dict")
        return dict(sd)
    raise ValueError(f"unsupported checkpoint file {path!r}; expected .pth, .pt, .bin or .safetensors")
