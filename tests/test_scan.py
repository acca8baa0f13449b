"""Scanned layers (`ModelConfig.scan_layers`, `models.layer_stack`): the `nn.scan` model equals the
per-layer loop with converted parameters (forward, gradients, remat, inference options), the
layout converters round-trip, and every loader (official, diffusers, parameter folders) fills a
scanned model. The official golden files check the scanned model against the PyTorch reference.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from conftest import GOLDEN_DIR, assert_parity

from flagdit_jax import checkpoint, sharding
from flagdit_jax import tokens as tok
from flagdit_jax.convert import diffusers, official
from flagdit_jax.models import layer_stack, registry
from flagdit_jax.models.common import InferenceOptions, RegionalCaptions

_is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)  # noqa: E731


def _random(tree, seed=0, std=0.05):
    """Unboxed params with every leaf perturbed (zero-init gates and adaLN would hide bugs)."""
    leaves, treedef = jax.tree.flatten(nn.unbox(tree))
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return treedef.unflatten([x + std * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])


def _numpy_params(cfg, seed=0):
    """Random numpy params of `cfg`'s per-layer tree from abstract shapes (no compile)."""
    rng = np.random.default_rng(seed)
    shapes = nn.unbox(registry.abstract_params(dataclasses.replace(cfg, scan_layers=False)))
    return jax.tree.map(lambda a: (0.05 * rng.normal(size=a.shape)).astype(a.dtype), shapes)


class Pair:
    """A per-layer model and its scanned twin (optionally with another remat) for one preset."""

    def __init__(self, preset, remat="none", scan_remat=None, n_layers=2, size=8, batch=2):
        self.cfg = registry.get_config(preset, remat=remat, n_layers=n_layers)
        self.scfg = dataclasses.replace(self.cfg, scan_layers=True, remat=scan_remat or remat)
        self.model, self.smodel = registry.build(self.cfg), registry.build(self.scfg)
        self.packed, _, self.kw = registry.example_inputs(self.cfg, batch=batch, size=size, cap_len=5)
        rng = np.random.default_rng(1)
        self.packed = self.packed.replace(tokens=jnp.asarray(rng.normal(size=self.packed.tokens.shape), jnp.float32))
        if self.cfg.text_conditional:
            self.kw = dict(cap_feats=jnp.asarray(rng.normal(size=self.kw["cap_feats"].shape), jnp.float32),
                           cap_mask=jnp.asarray([[True] * 5, [True, True, True, False, False]][:batch]))
        else:
            self.kw = dict(y=jnp.arange(batch, dtype=jnp.int32) * 7)
        self.t = jnp.linspace(0.2, 0.8, batch)
        self.params = jax.tree.map(jnp.asarray, _numpy_params(self.cfg))
        self.sparams = registry.params_for(self.params, self.scfg)

    def apply(self, scanned, params, **kw):
        """The jitted forward (one compile beats eager op-by-op dispatch for these tiny models)."""
        model = self.smodel if scanned else self.model
        return jax.jit(lambda p: model.apply({"params": p}, self.packed, self.t, **{**self.kw, **kw}))(params)

    def loss_and_grads(self, scanned, params, collect=True, **kw):
        """jit(value_and_grad) of sum(out * w), returning the output and (collect) the per-block
        intermediates."""
        model = self.smodel if scanned else self.model

        def loss(p):
            res = model.apply({"params": p}, self.packed, self.t, **{**self.kw, **kw},
                              mutable=["intermediates"] if collect else False)
            out, inter = (res[0], res[1]["intermediates"]) if collect else (res, {})
            return jnp.sum(out * jnp.cos(jnp.arange(out.size).reshape(out.shape))), (out, inter)

        return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

    def check_forward(self, **kw):
        """Scanned == per-layer: the output and every intermediate (`out:layers_{i}` in both forms)."""
        (out, st), (sout, sst) = (self.apply(s, p, mutable=["intermediates"], **kw)
                                  for s, p in ((False, self.params), (True, self.sparams)))
        assert_parity(sout, out)
        inter, sinter = st["intermediates"], sst["intermediates"]
        assert sorted(sinter) == sorted(inter) and "out:" + registry.block_name(self.cfg) + "_1" in inter
        for k in inter:
            assert_parity(sinter[k][0], inter[k][0], err_msg=k)

    def check_grads(self, **kw):
        """Scanned == per-layer: the gradients (converted), output included."""
        (_, (out, _)), g = self.loss_and_grads(False, self.params, collect=False, **kw)
        (_, (sout, _)), sg = self.loss_and_grads(True, self.sparams, collect=False, **kw)
        assert_parity(sout, out)
        want = registry.params_for(g, self.scfg)
        assert jax.tree.structure(sg) == jax.tree.structure(want)
        for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(sg)[0], jax.tree.leaves(want)):
            assert_parity(a, b, err_msg=jax.tree_util.keystr(path))

    def check(self, **kw):
        """Scanned == per-layer: output, every intermediate, and the gradients (converted)."""
        (_, (out, inter)), g = self.loss_and_grads(False, self.params, **kw)
        (_, (sout, sinter)), sg = self.loss_and_grads(True, self.sparams, **kw)
        assert_parity(sout, out)
        assert sorted(sinter) == sorted(inter)  # per-layer names `out:layers_{i}` in both forms
        for k in inter:
            assert_parity(sinter[k][0], inter[k][0], err_msg=k)
        want = registry.params_for(g, self.scfg)
        assert jax.tree.structure(sg) == jax.tree.structure(want)
        for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(sg)[0], jax.tree.leaves(want)):
            assert_parity(a, b, err_msg=jax.tree_util.keystr(path))


PRESETS = ["flagdit-tiny", "lumina-next-tiny", "dit-tiny"]


@pytest.mark.parametrize("preset", PRESETS)
def test_scanned_tree_is_one_stacked_subtree(preset):
    cfg = registry.get_config(preset)
    scfg = dataclasses.replace(cfg, scan_layers=True)
    name = registry.block_name(cfg)
    boxed = registry.abstract_params(scfg)
    assert f"{name}_0" not in boxed and name in boxed
    for path, leaf in jax.tree_util.tree_flatten_with_path(boxed[name], is_leaf=_is_box)[0]:
        assert leaf.names[0] == "layers", path
        assert leaf.value.shape[0] == cfg.n_layers, path
    # The stacked axis is replicated by the default rules: the per-layer spec behind a None.
    per = registry.abstract_params(cfg)
    mesh_axes = lambda tree: jax.tree.map(lambda s: tuple(nn.logical_to_mesh_axes(s, sharding.DEFAULT_RULES)),  # noqa
                                          nn.get_partition_spec(tree), is_leaf=lambda s: isinstance(s, P))
    specs, per_specs = mesh_axes(boxed[name]), mesh_axes(per[f"{name}_0"])
    assert jax.tree.structure(specs, is_leaf=lambda s: isinstance(s, tuple)) == \
        jax.tree.structure(per_specs, is_leaf=lambda s: isinstance(s, tuple))
    assert all(s == (None, *q) for s, q in zip(jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, tuple)),
                                               jax.tree.leaves(per_specs, is_leaf=lambda s: isinstance(s, tuple))))
    # The converter writes what the scanned init writes (tree, shapes and logical names)...
    converted = registry.params_for(per, scfg)
    assert jax.tree.structure(converted) == jax.tree.structure(boxed)
    assert all(jax.tree.leaves(jax.tree.map(lambda a, b: (a.value.shape, a.names) == (b.value.shape, b.names),
                                            converted, boxed, is_leaf=_is_box)))
    # ...and back: scanned -> per-layer -> scanned is the identity on numpy leaves (boxes kept).
    filled = jax.tree.map(lambda b: b.replace_boxed(np.random.default_rng(0).normal(size=b.value.shape)), boxed,
                          is_leaf=_is_box)
    again = layer_stack.scan_params(layer_stack.unscan_params(filled, name), cfg.n_layers, name)
    assert jax.tree.structure(again) == jax.tree.structure(filled)
    for a, b in zip(jax.tree.leaves(again, is_leaf=_is_box), jax.tree.leaves(filled, is_leaf=_is_box)):
        assert a.names == b.names and isinstance(a.value, np.ndarray) and np.array_equal(a.value, b.value)
    # per-layer -> scanned -> per-layer, plain arrays; a tree already in the layout is left alone.
    plain = _numpy_params(cfg)
    back = registry.params_for(registry.params_for(plain, scfg), cfg)
    assert jax.tree.structure(back) == jax.tree.structure(plain)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(plain)))
    assert registry.params_for(plain, cfg).keys() == plain.keys()


def test_converters_refuse_bad_trees():
    cfg = registry.get_config("flagdit-tiny")
    params = nn.unbox(registry.abstract_params(cfg))
    with pytest.raises(ValueError, match=r"missing \['layers_2'\] for n_layers=3"):
        layer_stack.scan_params(params, 3)
    with pytest.raises(ValueError, match="layers_1, more layers than n_layers=1"):
        layer_stack.scan_params(params, 1)
    with pytest.raises(ValueError, match="n_layers=0"):
        layer_stack.scan_params(params, 0)
    with pytest.raises(ValueError, match="no stacked 'layers' subtree"):
        layer_stack.unscan_params(params)
    scanned = layer_stack.scan_params(params, 2)
    with pytest.raises(ValueError, match="already has a stacked 'layers'"):
        layer_stack.scan_params({**scanned, "layers_0": params["layers_0"]}, 2)
    bad = dict(params, layers_1={**params["layers_1"], "extra": jax.ShapeDtypeStruct((1,), jnp.float32)})
    with pytest.raises(ValueError, match="layers_1 has another parameter structure"):
        layer_stack.scan_params(bad, 2)


def test_flagdit_scan_with_remat_gradients_equal_loop():
    """Scanned Flag-DiT with remat='full' per block vs the plain loop: output and gradients."""
    Pair("flagdit-tiny", scan_remat="full").check_grads()


@pytest.mark.slow
def test_next_dit_t2i_context_drop_under_scan():
    """Text-conditional Next-DiT (cross-attention, a padded caption) with time-aware context drop
    (a lax.cond on a traced predicate inside the scanned block), proportional attention and the
    watershed RoPE switch: output and every block's intermediate (gradients:
    test_next_dit_t2i_options_gradients_under_scan)."""
    Pair("lumina-next-tiny").check_forward(options=InferenceOptions(
        context_drop=2, context_drop_until=0.5, base_seqlen=9, scale_factor=1.5, scale_watershed=0.4))


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["flagdit-tiny", "lumina-t2i-tiny", "nextdit-tiny", "lumina-next-tiny",
                                    "dit-tiny"])
def test_scan_equals_loop(preset):
    Pair(preset).check()
    Pair(preset, scan_remat="full").check_grads()


@pytest.mark.slow
def test_next_dit_t2i_options_gradients_under_scan():
    opts = InferenceOptions(context_drop=2, context_drop_until=0.5, base_seqlen=9, scale_factor=1.5,
                            scale_watershed=0.4)
    Pair("lumina-next-tiny", scan_remat="full").check(options=opts)
    Pair("lumina-next-tiny").check(options=opts.replace(context_drop_until=None))  # always pooled, no cond


@pytest.mark.slow
def test_next_dit_more_options_under_scan():
    """Style sharing, then regional captions (cross-attention per region), on the T2I Next-DiT;
    label dropout (rng 'dropout') on the class-conditional Flag-DiT."""
    p = Pair("lumina-next-tiny")
    opts = InferenceOptions(style_groups=1, base_seqlen=9)
    assert_parity(p.apply(True, p.sparams, options=opts), p.apply(False, p.params, options=opts))
    b, l = p.packed.tokens.shape[:2]
    rng = np.random.default_rng(2)
    regions = RegionalCaptions(feats=jnp.asarray(rng.normal(size=(b, 2, 3, p.cfg.cap_feat_dim)), jnp.float32),
                               mask=jnp.ones((b, 2, 3), bool),
                               region=jnp.asarray(np.arange(l)[None, None] % 2 == np.arange(2)[None, :, None])
                               .repeat(b, 0))
    assert_parity(p.apply(True, p.sparams, regions=regions), p.apply(False, p.params, regions=regions))
    p = Pair("flagdit-tiny")
    rngs = {"dropout": jax.random.key(5)}
    out = p.model.apply({"params": p.params}, p.packed, p.t, **p.kw, train=True, rngs=rngs)
    assert_parity(p.smodel.apply({"params": p.sparams}, p.packed, p.t, **p.kw, train=True, rngs=rngs), out)


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["flagdit-tiny", "nextdit-tiny", "lumina-t2i-tiny", "dit-tiny"])
@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_policies_with_scan_deep(preset, remat):
    """Deeper stacks (5 layers) under every remat policy (both forms remat'd), with [PAD] tokens
    (two latent sizes) where the model has them."""
    p = Pair(preset, remat=remat, n_layers=5)
    if preset != "dit-tiny":
        p.packed = tok.pack_for(p.cfg, [jnp.ones((1, 8, 8, 4)), jnp.ones((1, 4, 6, 4)) * 0.5])
    p.check()


# ------------------------------------------------------------------------------------------------
# loaders: official, diffusers, parameter folders
# ------------------------------------------------------------------------------------------------


def _scanned_golden(name):
    """A golden file's official state dict converted straight into a scanned model."""
    import test_golden

    g = test_golden.Golden(GOLDEN_DIR / f"{name}.json")
    g.cfg = dataclasses.replace(g.cfg, scan_layers=True)
    g.params = official.params_from_state_dict(g.state_dict, g.cfg)
    g.model = registry.build(g.cfg)
    assert "layers" in g.params and "layers_0" not in g.params
    return g, test_golden


@pytest.mark.skipif(not (GOLDEN_DIR / "flagdit_imagenet.json").exists(), reason="no golden files")
def test_official_converter_loads_into_scanned_model():
    """Official Flag-DiT weights -> scanned model: every recorded block output and the final
    output of the PyTorch reference's forward match; the state dict round-trips exactly."""
    g, _ = _scanned_golden("flagdit_imagenet")
    call = next(c for c in g.meta["calls"] if c["name"] == "forward")
    a = g.args(call)
    frames = jnp.asarray(a["x"].transpose(0, 2, 3, 1))[:, None]
    packed = tok.pack_for(g.cfg, frames)

    def run(params):
        with jax.default_matmul_precision("highest"):
            return g.model.apply({"params": params}, packed, jnp.asarray(a["t"]), y=jnp.asarray(a["y"]),
                                 mutable=["intermediates"])

    out, st = jax.jit(run)(g.params)
    assert_parity(np.asarray(tok.unpack(out, packed)[:, 0]).transpose(0, 3, 1, 2), g.npz[call["output"]])
    blocks = [k for k in g.npz.files if k.startswith("inter.layers.")]
    assert len(blocks) == g.cfg.n_layers
    for key in blocks:
        assert_parity(st["intermediates"]["out:" + key[len("inter."):].replace("layers.", "layers_")][0], g.npz[key],
                      err_msg=key)
    sd = official.state_dict_from_params(g.params, g.cfg)
    assert sorted(sd) == sorted(g.state_dict)
    assert all(np.array_equal(sd[k], g.state_dict[k]) for k in sd)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["flagdit_imagenet", "lumina_t2i", "nextdit_imagenet", "lumina_next_t2i"])
def test_scanned_model_replays_golden_calls(name):
    """Every recorded call of the official models (padding, CFG, proportional attention, RoPE
    scaling) through the scanned model converted from their state dicts."""
    if not (GOLDEN_DIR / f"{name}.json").exists():
        pytest.skip("no golden files")
    g, test_golden = _scanned_golden(name)
    test_golden.test_intermediates(g)
    test_golden.test_calls(g)


def test_diffusers_converter_both_layouts():
    cfg = registry.get_config("lumina-next-tiny")
    params = _numpy_params(cfg)
    sd = diffusers.params_to_diffusers(params, cfg)
    scfg = dataclasses.replace(cfg, scan_layers=True)
    sparams = diffusers.params_from_diffusers(sd, scfg)
    want = registry.params_for(params, scfg)
    assert jax.tree.structure(sparams) == jax.tree.structure(want)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(sparams), jax.tree.leaves(want)))
    back = diffusers.params_to_diffusers(sparams, scfg)  # a scanned tree writes the same state dict
    assert sorted(back) == sorted(sd) and all(np.array_equal(back[k], sd[k]) for k in sd)


def _same(a, b):
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_parameter_folder_loads_into_either_layout(tmp_path):
    cfg = registry.get_config("flagdit-tiny")
    scfg = dataclasses.replace(cfg, scan_layers=True)
    params = _numpy_params(cfg)
    checkpoint.save_params(tmp_path / "per_layer", params, cfg)
    loaded, got = checkpoint.load_params(tmp_path / "per_layer", scan_layers=True)
    assert got == scfg and _same(loaded, registry.params_for(params, scfg))
    with pytest.raises(ValueError, match="scan_layers='yes'"):
        checkpoint.load_params(tmp_path / "per_layer", scan_layers="yes")


@pytest.mark.slow
def test_parameter_and_pipeline_folders_other_direction(tmp_path):
    """A scanned run's folder loads per layer, or as saved (None); pretrained.load_transformer builds
    the model of the asked layout and it runs."""
    from flagdit_jax import pretrained

    cfg = registry.get_config("flagdit-tiny")
    scfg = dataclasses.replace(cfg, scan_layers=True)
    params = _numpy_params(cfg)
    checkpoint.save_params(tmp_path / "scanned", registry.params_for(params, scfg), scfg)
    loaded, got = checkpoint.load_params(tmp_path / "scanned", scan_layers=False)
    assert got == cfg and _same(loaded, params)
    loaded, got = checkpoint.load_params(tmp_path / "scanned")
    assert got == scfg and "layers" in loaded
    model, loaded = pretrained.load_transformer(tmp_path / "scanned", scan_layers=False)
    assert model.cfg == cfg and _same(loaded, params)
    packed, t, kw = registry.example_inputs(cfg)
    smodel, sloaded = pretrained.load_transformer(tmp_path / "scanned")
    assert_parity(smodel.apply({"params": sloaded}, packed, t, **kw), model.apply({"params": loaded}, packed, t, **kw))


def _abstract_on_mesh(cfg, mesh):
    boxed = registry.abstract_params(cfg)
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, sharding.DEFAULT_RULES)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.unbox(boxed), shardings)


@pytest.mark.slow
@pytest.mark.parametrize("saved_scanned", [False, True])
def test_training_checkpoint_restores_into_either_layout(tmp_path, saved_scanned):
    """`checkpoint.restore_params`: a run's params (checksummed, FSDP-sharded over 8 devices) restore
    into the other block layout, on the config's shardings, equal to the converted arrays."""
    import orbax.checkpoint as ocp

    cfg = registry.get_config("flagdit-tiny")
    scfg = dataclasses.replace(cfg, scan_layers=True)
    mesh = sharding.make_mesh((1, 8, 1, 1))
    write_cfg, read_cfg = (scfg, cfg) if saved_scanned else (cfg, scfg)
    params = registry.params_for(_numpy_params(cfg), write_cfg)
    state = {"params": jax.device_put(params, jax.tree.map(lambda a: a.sharding, _abstract_on_mesh(write_cfg, mesh)))}
    fp, _ = checkpoint.fingerprint(state)
    with ocp.CheckpointManager(tmp_path) as mngr:
        mngr.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave(state)),
                  custom_metadata={checkpoint.FINGERPRINT_KEY: fp})
        mngr.wait_until_finished()
    # Read as sample.load_params does: a fresh read-only manager.
    with ocp.CheckpointManager(tmp_path, options=ocp.CheckpointManagerOptions(read_only=True)) as mngr:
        abstract = _abstract_on_mesh(read_cfg, mesh)
        got = checkpoint.restore_params(mngr, 3, "params", abstract, read_cfg)
        assert _same(jax.tree.map(np.asarray, got), registry.params_for(params, read_cfg))
        assert all(jax.tree.leaves(jax.tree.map(lambda g, a: g.sharding == a.sharding, got, abstract)))
        # A model of another depth fits neither layout: a clear mismatch.
        with pytest.raises(checkpoint.CheckpointMismatch, match="does not fit"):
            checkpoint.restore_params(mngr, 3, "params", _abstract_on_mesh(
                dataclasses.replace(read_cfg, n_layers=3), mesh), dataclasses.replace(read_cfg, n_layers=3))
