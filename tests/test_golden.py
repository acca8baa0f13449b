"""Replay the official PyTorch models' recorded calls (../shared/golden, or $FLAGDIT_GOLDEN_DIR).

Each golden file holds a state dict under the official keys, the constructor arguments and every
recorded call with its inputs and outputs. We convert the state dict with our converter, rebuild
the model from the arguments and replay every call generically, so any file of the same format
(other widths, depths, heads, seeds, sizes) is checked the same way.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import GOLDEN_DIR, assert_parity

from flagdit_jax import tokens as tok
from flagdit_jax.convert import official
from flagdit_jax.flow.samplers import cfg_combine
from flagdit_jax.models import registry
from flagdit_jax.models.common import InferenceOptions

SUPPORTED = {"flagdit_imagenet", "lumina_t2i", "nextdit_imagenet", "lumina_next_t2i"}
FILES = sorted(GOLDEN_DIR.glob("*.json"))


def test_golden_dir_has_files():
    assert FILES, f"no golden files in {GOLDEN_DIR} (set FLAGDIT_GOLDEN_DIR)"


class Golden:
    def __init__(self, path):
        self.meta = json.loads(path.read_text())
        self.npz = np.load(path.with_suffix(".npz"))
        keys = self.meta["npz"]["params"]
        self.state_dict = {k: self.npz[k] for k in keys}
        self.cfg = official.config_from_official(self.meta["config"], self.state_dict)
        self.params = official.params_from_state_dict(self.state_dict, self.cfg)
        self.model = registry.build(self.cfg)

    def args(self, call):
        out = {}
        for p in call["positional_inputs"]:
            out[p["arg"]] = [self.npz[k] for k in p["list"]] if "list" in p else self.npz[p["key"]]
        return out

    def run(self, x, t, cond, cap_mask=None, capture=False, options=None):
        """Official-layout call: x [B, C, H, W] or a list of [C, H, W]; returns the same layout."""
        cfg = self.cfg
        frames = [jnp.asarray(f.transpose(1, 2, 0))[None] for f in x] if isinstance(x, list) else \
            jnp.asarray(x.transpose(0, 2, 3, 1))[:, None]
        packed = tok.pack_for(cfg, frames)
        kw = dict(cap_feats=jnp.asarray(cond), cap_mask=jnp.asarray(cap_mask)) if cfg.text_conditional else \
            dict(y=jnp.asarray(cond))
        with jax.default_matmul_precision("highest"):
            out, state = self.model.apply({"params": self.params}, packed, jnp.asarray(t), **kw, options=options,
                                          mutable=["intermediates"])
        frames_out = tok.unpack(out, packed)
        res = [np.asarray(f[0]).transpose(2, 0, 1) for f in frames_out] if isinstance(x, list) else \
            np.asarray(frames_out[:, 0]).transpose(0, 3, 1, 2)
        return (res, packed, state["intermediates"]) if capture else res


def _options(kwargs):
    """Official forward_with_cfg keyword arguments -> our `InferenceOptions`."""
    opts = {}
    if "ntk_factor" in kwargs:
        opts["ntk_factor"] = kwargs["ntk_factor"]
    if "rope_scaling_factor" in kwargs:
        opts["pi_factor"] = kwargs["rope_scaling_factor"]
    if kwargs.get("proportional_attn"):
        opts["base_seqlen"] = kwargs["base_seqlen"]
    if "scale_factor" in kwargs:  # Lumina-Next's time-aware switch (official default watershed 1.0)
        opts["scale_factor"] = kwargs["scale_factor"]
        opts["scale_watershed"] = kwargs.get("scale_watershed", 1.0)
    unknown = set(kwargs) - {"cfg_scale", "ntk_factor", "rope_scaling_factor", "proportional_attn", "base_seqlen",
                             "scale_factor", "scale_watershed"}
    if unknown:
        raise NotImplementedError(f"golden call option(s) {sorted(unknown)} not mapped")
    return InferenceOptions(**opts)


def replay(g, call):
    a = g.args(call)
    cond_name = "cap_feats" if g.cfg.text_conditional else "y"
    x, t, cond, cap_mask = a["x"], a["t"], a[cond_name], a.get("cap_mask")
    if call["fn"] == "forward":
        return g.run(x, t, cond, cap_mask)
    assert call["fn"] == "forward_with_cfg", call["fn"]
    half = x[: len(x) // 2]
    out = g.run(np.concatenate([half, half]), t, cond, cap_mask, options=_options(call["kwargs"]))
    # Reference CFG on the first 3 channels (channels-last for cfg_combine); each half keeps its
    # own remaining channels.
    c, u = np.split(out.transpose(0, 2, 3, 1), 2)
    guided = np.asarray(cfg_combine(c, u, call["kwargs"]["cfg_scale"], channels=3))
    bottom = np.concatenate([guided[..., :3], u[..., 3:]], -1)
    return np.concatenate([guided, bottom]).transpose(0, 3, 1, 2)


def _params(path):
    variant = json.loads(path.read_text())["variant"]
    if variant not in SUPPORTED:
        raise ValueError(f"{path}: unknown golden variant {variant!r}; expected one of {sorted(SUPPORTED)}")
    return pytest.param(path, id=path.stem)


@pytest.fixture(scope="module", params=[_params(p) for p in FILES])
def golden(request):
    return Golden(request.param)


def test_parameter_count(golden):
    n = sum(v.size for v in jax.tree.leaves(golden.params))
    assert n == golden.meta["derived"]["n_params"]


@pytest.mark.slow  # layer-by-layer diagnosis; test_calls checks the outputs in the default suite
def test_intermediates(golden):
    """Embedders, every block and the final layer of the plain forward call."""
    call = next(c for c in golden.meta["calls"] if c["name"] == "forward")
    a = golden.args(call)
    cond = a["cap_feats"] if golden.cfg.text_conditional else a["y"]
    _, packed, inter = golden.run(a["x"], a["t"], cond, a.get("cap_mask"), capture=True)
    checked = 0
    for key in golden.npz.files:
        if not key.startswith("inter."):
            continue
        name = key[len("inter."):].replace("layers.", "layers_")
        ref = golden.npz[key]
        ours = np.asarray(inter["out:" + name][0])
        if name == "x_embedder":  # the reference records patches only, before [nextline] insertion
            ours = ours[np.asarray(packed.kind) == tok.PATCH]
            ref = ref.reshape(-1, ref.shape[-1])
        assert_parity(ours, ref, err_msg=key)
        checked += 1
    assert checked >= 4


def test_calls(golden):
    for call in golden.meta["calls"]:
        out = replay(golden, call)
        refs = call["output"] if isinstance(call["output"], list) else [call["output"]]
        outs = out if isinstance(out, list) else [out]
        assert len(outs) == len(refs)
        for o, key in zip(outs, refs):
            assert_parity(o, golden.npz[key], err_msg=f"{call['name']} {key}")


def test_converter_refuses_mismatch(golden):
    sd = dict(golden.state_dict)
    sd.pop("layers.0.attention.wq.weight")
    sd["layers.0.attention.bogus.weight"] = np.zeros(3)
    with pytest.raises(official.CheckpointMismatch, match=r"bogus.*missing parameters: layers_0/attention/wq/kernel"):
        official.params_from_state_dict(sd, golden.cfg)
    sd = dict(golden.state_dict)
    sd["final_layer.linear.bias"] = np.zeros(7)
    with pytest.raises(official.CheckpointMismatch, match=r"final_layer.linear.bias: \(7,\)"):
        official.params_from_state_dict(sd, golden.cfg)


def test_state_dict_round_trip_is_exact(golden):
    """params -> official state dict gives back the file's tensors under the file's keys."""
    back = official.state_dict_from_params(golden.params, golden.cfg)
    assert sorted(back) == sorted(golden.state_dict)
    for k, v in golden.state_dict.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)
