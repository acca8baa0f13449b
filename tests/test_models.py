"""Backbone behaviour: RoPE invariants, padding invariance, zero-init, presets, bad input."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flagdit_jax import tokens as tok
from flagdit_jax.models import layers as L
from flagdit_jax.models import registry
from flagdit_jax.models.common import InferenceOptions
from flagdit_jax.models.dit import sincos_2d
from flagdit_jax.models.flag_dit import FlagDiTConfig


def randomize(params, key, scale=0.3):
    """Move every parameter off its (partly zero) init so every path matters."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(tree, [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


@pytest.fixture(scope="module")
def t2i():
    cfg = registry.get_config("lumina-t2i-tiny")
    model = registry.build(cfg)
    packed, t, kw = registry.example_inputs(cfg)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), packed, t, **kw)["params"])
    return cfg, model, params


# --- RoPE ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_axes", [1, 2, 3])
def test_rope_scores_depend_only_on_relative_position(n_axes):
    key = jax.random.key(n_axes)
    hd = 24
    q, k = jax.random.normal(key, (2, 1, 2, 7, hd))
    pos = jax.random.randint(jax.random.key(1), (1, 7, n_axes), 0, 50)
    shift = jnp.array([17, -5, 3][:n_axes])

    def scores(p):
        a = L.rope_angles(p, hd)
        return jnp.einsum("bhqd,bhkd->bhqk", L.apply_rope(q, a), L.apply_rope(k, a))

    np.testing.assert_allclose(scores(pos), scores(pos + shift), atol=2e-4)
    # ... and do depend on position (a broken RoPE that ignores it would pass the line above).
    assert not np.allclose(scores(pos), jnp.einsum("bhqd,bhkd->bhqk", q, k), atol=1e-2)


def test_rope_is_a_rotation_and_scaling_options():
    x = jax.random.normal(jax.random.key(0), (1, 2, 5, 8))
    a = L.rope_angles(jnp.arange(5)[None], 8)
    np.testing.assert_allclose(jnp.linalg.norm(L.apply_rope(x, a), axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)
    # Position 1, pair i rotates by theta^(-2i/d); NTK multiplies theta, PI divides positions.
    i = jnp.arange(4)
    np.testing.assert_allclose(a[0, 1], 10000.0 ** (-2 * i / 8), rtol=1e-6)
    ntk = L.rope_angles(jnp.arange(5)[None], 8, ntk_factor=2.5)
    np.testing.assert_allclose(ntk[0, 1], 25000.0 ** (-2 * i / 8), rtol=1e-6)
    pi = L.rope_angles(jnp.arange(5)[None], 8, pi_factor=2.0)
    np.testing.assert_allclose(pi[0, 4], a[0, 2], rtol=1e-6)
    # 2-D interleaved layout: pair 2k follows rows, 2k+1 columns, both with 10000^(-4k/d).
    a2 = L.rope_angles(jnp.array([[[3, 5]]]), 8)
    k = jnp.arange(2)
    np.testing.assert_allclose(a2[0, 0, 0::2], 3 * 10000.0 ** (-4 * k / 8), rtol=1e-6)
    np.testing.assert_allclose(a2[0, 0, 1::2], 5 * 10000.0 ** (-4 * k / 8), rtol=1e-6)


def test_proportional_scale():
    assert L.proportional_scale(4096, 4096, 64) == pytest.approx(1 / 8)
    assert L.proportional_scale(4096 * 4, 4096, 64) == pytest.approx(np.sqrt(np.log(4 * 4096) / np.log(4096) / 64))


@pytest.mark.slow  # default-suite time budget
def test_gqa_attention_matches_repeated_heads():
    """Grouped kv heads == the reference's repeat-interleave of kv heads."""
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(kq, (2, 4, 5, 8))
    k = jax.random.normal(kk, (2, 2, 6, 8))
    v = jax.random.normal(kv, (2, 2, 6, 8))
    mask = jnp.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], bool)
    ours = L.dot_product_attention(q, k, v, key_mask=mask)
    ref = jax.nn.dot_product_attention(q.swapaxes(1, 2), jnp.repeat(k, 2, 1).swapaxes(1, 2),
                                       jnp.repeat(v, 2, 1).swapaxes(1, 2), mask=mask[:, None, None, :]).swapaxes(1, 2)
    np.testing.assert_allclose(ours, ref, atol=1e-5)


# --- padding, zero-init --------------------------------------------------------------------------


@pytest.mark.slow
def test_padding_never_changes_real_tokens(t2i):
    cfg, model, params = t2i
    params = randomize(params, jax.random.key(1))
    a = jax.random.normal(jax.random.key(2), (1, 4, 6, 4))
    b = jax.random.normal(jax.random.key(3), (1, 8, 8, 4))
    cap = jax.random.normal(jax.random.key(4), (2, 3, cfg.cap_feat_dim))
    cap_mask = jnp.array([[1, 1, 0], [1, 1, 1]], bool)
    t = jnp.array([0.3, 0.7])

    def run(frames, p, options=None):
        packed = tok.pack_for(cfg, frames)
        out = model.apply({"params": p}, packed, t[: len(frames)], cap_feats=cap[: len(frames)],
                          cap_mask=cap_mask[: len(frames)], options=options)
        return tok.unpack(out, packed)

    alone = run([a], params)[0]
    mixed = run([a, b], params)[0]  # a is padded to b's length
    np.testing.assert_allclose(mixed, alone, atol=1e-5)
    other_pad = dict(params, pad_token=params["pad_token"] + 10.0)
    np.testing.assert_allclose(run([a, b], other_pad)[0], alone, atol=1e-5)
    # The same holds under proportional attention (its scale uses the padded length, as the
    # reference does, so compare two padded runs that differ only in the pad content).
    prop = InferenceOptions(base_seqlen=16)
    np.testing.assert_allclose(run([a, b], params, prop)[0], run([a, b], other_pad, prop)[0], atol=1e-5)


@pytest.mark.parametrize("name", ["flagdit-tiny", pytest.param("lumina-t2i-tiny", marks=pytest.mark.slow),
                                  pytest.param("dit-tiny", marks=pytest.mark.slow)])
def test_zero_init_identity_blocks_and_zero_output(name):
    cfg = registry.get_config(name)
    model = registry.build(cfg)
    packed, t, kw = registry.example_inputs(cfg, batch=2)
    packed = packed.replace(tokens=jax.random.normal(jax.random.key(0), packed.tokens.shape))
    t = jnp.array([0.2, 0.9])
    params = nn.unbox(model.init(jax.random.key(1), packed, t, **kw)["params"])
    out, state = model.apply({"params": params}, packed, t, **kw, mutable=["intermediates"])
    np.testing.assert_array_equal(out, 0.0)  # final layer zero-init (weight and bias)
    inter = state["intermediates"]
    # adaLN(-Zero) init -> every gate is 0 -> every block is the identity on its input.
    x = inter["out:embedded" if "out:embedded" in inter else "out:x_embedder"][0]
    blocks = [k for k in inter if k.startswith(("out:layers_", "out:blocks_"))]
    assert len(blocks) == cfg.n_layers
    for k in blocks:
        np.testing.assert_array_equal(inter[k][0], x)
    # ... and it is not an accident of a dead network: a random perturbation changes the output.
    out2 = model.apply({"params": randomize(params, jax.random.key(2))}, packed, t, **kw)
    assert float(jnp.abs(out2).max()) > 1e-3


@pytest.mark.slow  # default-suite time budget
def test_label_dropout_uses_null_class():
    cfg = registry.get_config("flagdit-tiny", class_dropout_prob=0.5)
    model = registry.build(cfg)
    packed, _, _ = registry.example_inputs(cfg, batch=64)
    t = jnp.zeros(64)
    y = jnp.zeros(64, jnp.int32)
    params = nn.unbox(model.init(jax.random.key(0), packed, t, y=y)["params"])
    params = randomize(params, jax.random.key(1))
    _, st = model.apply({"params": params}, packed, t, y=y, train=True, rngs={"dropout": jax.random.key(3)},
                        mutable=["intermediates"])
    emb = st["intermediates"]["out:y_embedder"][0]
    table = params["y_embedder"]["embedding_table"]
    dropped = np.all(np.isclose(emb, table[cfg.num_classes]), -1)
    kept = np.all(np.isclose(emb, table[0]), -1)
    assert np.all(dropped | kept) and 16 < dropped.sum() < 48


def test_dit_sincos_matches_dit_numpy_formula():
    """DiT's get_2d_sincos_pos_embed, written out in numpy: emb = [1d(w-coords), 1d(h-coords)]."""
    d, g = 16, 3

    def one(pos):
        omega = 1.0 / 10000 ** (np.arange(d // 4, dtype=np.float64) / (d / 4))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], 1)

    grid = np.meshgrid(np.arange(g, dtype=np.float32), np.arange(g, dtype=np.float32))  # (w, h)
    ref = np.concatenate([one(grid[0]), one(grid[1])], 1)
    rows, cols = np.meshgrid(np.arange(g), np.arange(g), indexing="ij")
    ours = sincos_2d(jnp.stack([rows.reshape(-1), cols.reshape(-1)], -1)[None], d)[0]
    np.testing.assert_allclose(ours, ref, atol=1e-6)


# --- presets and bad input -----------------------------------------------------------------------


@pytest.mark.slow
def test_preset_parameter_counts_match_reference():
    for name, ref in registry.REFERENCE_PARAMS.items():
        n = registry.count_params(registry.get_config(name))
        print(f"{name:<16} {n / 1e9:.3f}B  (REFERENCE.md {ref / 1e9:.3f}B)")
        assert abs(n - ref) / ref < 0.01, (name, n, ref)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(dim=64, n_heads=5), "n_heads=5 must divide dim=64"),
        (dict(dim=64, n_heads=4, n_kv_heads=3), "n_kv_heads=3 must divide n_heads=4"),
        (dict(dim=60, n_heads=4), "head_dim=15 must be even"),
        (dict(num_classes=10, cap_feat_dim=8), "exactly one of num_classes=10"),
        (dict(attention="flash"), "attention='flash'"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FlagDiTConfig(**kwargs)


def test_bad_preset_and_inputs(t2i):
    with pytest.raises(ValueError, match=r"unknown preset 'flagdit-9b'.*known presets"):
        registry.get_config("flagdit-9b")
    cfg, model, params = t2i
    packed = tok.pack_for(cfg, jnp.zeros((1, 1, 8, 8, 4)))
    with pytest.raises(ValueError, match=r"cap_feats must be \[B=1, S, 32\]"):
        model.apply({"params": params}, packed, jnp.zeros(1), cap_feats=jnp.zeros((1, 3, 7)),
                    cap_mask=jnp.ones((1, 3), bool))
    with pytest.raises(ValueError, match=r"t must have shape \[B\]=\(1,\)"):
        model.apply({"params": params}, packed, jnp.zeros(2), cap_feats=jnp.zeros((1, 3, 32)),
                    cap_mask=jnp.ones((1, 3), bool))
    wrong = tok.pack(jnp.zeros((1, 1, 8, 8, 4)), 2, nextline=False)
    with pytest.raises(ValueError, match="nextline=False.*model's nextline=True"):
        model.apply({"params": params}, wrong, jnp.zeros(1), cap_feats=jnp.zeros((1, 3, 32)),
                    cap_mask=jnp.ones((1, 3), bool))
    with pytest.raises(ValueError, match="width p\\*p\\*C=16"):
        model.apply({"params": params}, tok.pack(jnp.zeros((1, 1, 8, 8, 3)), 2), jnp.zeros(1),
                    cap_feats=jnp.zeros((1, 3, 32)), cap_mask=jnp.ones((1, 3), bool))
    assert dataclasses.replace(cfg, dim=128).head_dim == 32


def test_attention_gradient_matches_autodiff():
    """The hand-written attention backward equals autodiff of the plain formula (GQA + mask)."""
    kq, kk, kv, kg = jax.random.split(jax.random.key(5), 4)
    q = jax.random.normal(kq, (2, 4, 5, 8))
    k = jax.random.normal(kk, (2, 2, 6, 8))
    v = jax.random.normal(kv, (2, 2, 6, 8))
    w = jax.random.normal(kg, (2, 4, 5, 8))
    mask = jnp.array([[1, 1, 1, 0, 1, 0], [1, 1, 1, 1, 1, 1]], bool)

    def plain(q, k, v):
        logits = jnp.einsum("bhqd,bhkd->bhqk", q, jnp.repeat(k, 2, 1)) * 0.3
        logits = jnp.where(mask[:, None, None, :], logits, -jnp.inf)
        return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(logits, -1), jnp.repeat(v, 2, 1))

    ours = jax.grad(lambda *a: jnp.sum(w * L.dot_product_attention(*a, key_mask=mask, scale=0.3)), (0, 1, 2))(q, k, v)
    ref = jax.grad(lambda *a: jnp.sum(w * plain(*a)), (0, 1, 2))(q, k, v)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a, b, atol=1e-5)


# --- the model family's seam: one kind table, sibling configs, one options object ---------------

# model.json files as the code before the kind table wrote them (commit ba8a67f): they must still load.
_OLD_MODEL_JSON = [
    '{"kind": "flagdit", "config": {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "patch_size": 2, '
    '"in_channels": 4, "multiple_of": 256, "ffn_dim_multiplier": null, "norm_eps": 1e-05, "qk_norm": true, '
    '"learn_sigma": true, "num_classes": 1000, "class_dropout_prob": 0.1, "cap_feat_dim": 0, "nextline": false, '
    '"nextframe": false, "rope_theta": 10000.0, "dtype": "float32", "param_dtype": "float32", "attention": "xla", '
    '"remat": "none"}}',
    '{"kind": "nextdit", "config": {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "patch_size": 2, '
    '"in_channels": 4, "multiple_of": 256, "ffn_dim_multiplier": null, "norm_eps": 1e-05, "qk_norm": true, '
    '"learn_sigma": true, "num_classes": 0, "class_dropout_prob": 0.1, "cap_feat_dim": 32, "nextline": false, '
    '"nextframe": false, "rope_theta": 10000.0, "dtype": "float32", "param_dtype": "float32", "attention": "xla", '
    '"remat": "none", "pre_norm_affine": true, "final_shift": false, "rope_axes": 2}}',
    '{"kind": "dit", "config": {"dim": 64, "n_layers": 2, "n_heads": 4, "patch_size": 2, "in_channels": 4, '
    '"input_size": 16, "mlp_ratio": 4.0, "num_classes": 1000, "class_dropout_prob": 0.1, "learn_sigma": true, '
    '"dtype": "float32", "param_dtype": "float32", "attention": "xla", "remat": "none"}}',
]


def test_kind_table_builds_and_round_trips_every_preset():
    import json

    from flagdit_jax.models.common import ModelConfig
    from flagdit_jax.models.next_dit import NextDiTConfig

    assert not issubclass(NextDiTConfig, FlagDiTConfig) and not issubclass(FlagDiTConfig, NextDiTConfig)
    for name, cfg in registry.PRESETS.items():
        config_cls, module_cls = registry.MODEL_KINDS[cfg.kind]
        assert type(cfg) is config_cls and isinstance(cfg, ModelConfig), name
        assert type(registry.build(name)) is module_cls, name
        saved = json.loads(json.dumps(registry.config_to_dict(cfg)))  # through JSON, as model.json
        assert saved["kind"] == cfg.kind and registry.config_from_dict(saved) == cfg, name
    # Same fields, different kinds: never equal (a saved config cannot come back as the other kind).
    fields = dict(dim=64, n_layers=2, n_heads=4, num_classes=10)
    assert FlagDiTConfig(**fields) != NextDiTConfig(**fields)
    for text, preset in zip(_OLD_MODEL_JSON, ["flagdit-tiny", "lumina-next-tiny", "dit-tiny"]):
        # They name attention='xla' (the default then; 'auto' now) and keep it.
        assert registry.config_from_dict(json.loads(text)) == registry.get_config(preset, attention="xla")
    with pytest.raises(ValueError, match=r"unknown model kind 'uvit'; expected one of \['dit', 'flagdit', 'joint', 'nextdit'\]"):
        registry.config_from_dict({"kind": "uvit", "config": {}})
    with pytest.raises(ValueError, match=r"unknown NextDiTConfig field\(s\) \['bogus'\]"):
        registry.config_from_dict({"kind": "nextdit", "config": {"bogus": 1}})
    with pytest.raises(ValueError, match="expected a model config"):
        registry.build(dict(dim=64))


def test_options_are_one_hashable_value_validated_up_front():
    a, b = InferenceOptions(ntk_factor=2, base_seqlen=16), InferenceOptions(ntk_factor=2.0, base_seqlen=16)
    assert a == b and hash(a) == hash(b) and a != InferenceOptions()
    for kwargs, match in [(dict(ntk_factor=0.0), "ntk_factor=0.0 must be a positive number"),
                          (dict(base_seqlen=1), "base_seqlen=1 must be an integer >= 2"),
                          (dict(scale_watershed=1.5), r"scale_watershed=1.5 must be a time in \[0, 1\]"),
                          (dict(rope_scaling="yarn"), "rope_scaling='yarn'"),
                          (dict(rope_scaling="frequency_aware", scale_factor=2.0), "needs rope_train_len"),
                          (dict(context_drop=0), "context_drop=0 must be an integer >= 1")]:
        with pytest.raises(ValueError, match=match):
            InferenceOptions(**kwargs)


@pytest.mark.parametrize("name, bad", [("flagdit-tiny", "scale_factor=2.0"), ("dit-tiny", "ntk_factor=2.0")])
def test_models_refuse_options_they_do_not_have(name, bad):
    """An option a backbone cannot apply is an error naming it, never silently ignored."""
    cfg = registry.get_config(name)
    model = registry.build(cfg)
    packed, t, kw = registry.example_inputs(cfg)
    params = model.init(jax.random.key(0), packed, t, **kw)["params"]
    key, value = bad.split("=")
    with pytest.raises(ValueError, match=rf"does not support the inference option\(s\) {bad}"):
        model.apply({"params": params}, packed, t, **kw, options=InferenceOptions(**{key: float(value)}))
    with pytest.raises(ValueError, match="options must be a models.common.InferenceOptions"):
        model.apply({"params": params}, packed, t, **kw, options={"ntk_factor": 2.0})


@pytest.mark.slow  # default-suite time budget
def test_flagdit_options_are_rope_and_proportional_attention(t2i):
    """Default options are the plain call; each Flag-DiT option reaches the network (their values
    are checked against the official model by the golden replay's forward_with_cfg calls)."""
    cfg, model, params = t2i
    params = randomize(params, jax.random.key(7))
    packed, t, kw = registry.example_inputs(cfg, batch=1, size=8)
    packed = packed.replace(tokens=jax.random.normal(jax.random.key(8), packed.tokens.shape))
    run = lambda o=None: np.asarray(model.apply({"params": params}, packed, jnp.full((1,), 0.4), **kw, options=o))
    base = run()
    np.testing.assert_array_equal(run(InferenceOptions()), base)
    for o in (InferenceOptions(ntk_factor=3.0), InferenceOptions(pi_factor=2.0), InferenceOptions(base_seqlen=9)):
        assert not np.allclose(run(o), base, atol=1e-4), o
