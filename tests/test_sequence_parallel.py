"""Sequence parallelism (models/sequence_parallel.py) on the 8 fake CPU devices: the sharded
attention, model forwards and a full train step equal their single-device counterparts, and the
compiled program exchanges data with the scheme's collective (not a gathered sequence)."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_parity
from flagdit_jax import sharding, tokens as tok
from flagdit_jax.models import registry, sequence_parallel as sp
from flagdit_jax.models.attention import dot_product_attention

METHODS = ("ulysses", "ring")
COLLECTIVE = {"ulysses": "all-to-all", "ring": "collective-permute"}


def qkv_mask(b=2, hq=8, hkv=2, length=32, d=8):
    rng = np.random.default_rng(0)  # numpy: eager jax.random costs seconds of compiles here
    q, k, v = (rng.standard_normal((b, h, length, d)).astype(np.float32) for h in (hq, hkv, hkv))
    # padded tails: samples after the first have their last 11 keys masked (> one ring chunk of 4)
    mask = np.arange(length)[None] < np.array([[length]] + [[length - 11]] * (b - 1))
    return q, k, v, mask


def loss_and_grads(attn, q, k, v):
    # sin() so that the cotangent differs per element (sum alone has a degenerate gradient in v)
    return jax.value_and_grad(lambda q, k, v: jnp.sum(jnp.sin(attn(q, k, v))), argnums=(0, 1, 2))(q, k, v)


@pytest.fixture(scope="module")
def reference():
    q, k, v, mask = qkv_mask()
    attn = lambda q, k, v: dot_product_attention(q, k, v, key_mask=mask, scale=0.3)
    return jax.jit(lambda q, k, v: (attn(q, k, v), loss_and_grads(attn, q, k, v)))(q, k, v)


def sharded_attention(shape, method, implementation="xla", **kw):
    q, k, v, mask = qkv_mask(**kw)
    attn = lambda q, k, v: sp.attention(q, k, v, key_mask=mask, scale=0.3, method=method,
                                        implementation=implementation)
    fn = jax.jit(lambda q, k, v: (attn(q, k, v), loss_and_grads(attn, q, k, v)))
    with jax.set_mesh(sharding.make_mesh(shape)), nn.logical_axis_rules(sharding.DEFAULT_RULES):
        compiled = fn.lower(q, k, v).compile()
        out, grads = compiled(q, k, v)
    return out, grads, compiled.as_text()


@pytest.mark.parametrize("shape", [(1, 2, 2, 2), pytest.param((1, 1, 8, 1), marks=pytest.mark.slow),
                                   pytest.param((2, 1, 4, 1), marks=pytest.mark.slow)],
                         ids=["fsdp2-seq2-tensor2", "seq8", "data2-seq4"])
@pytest.mark.parametrize("method", METHODS)
def test_attention_equals_unsharded_forward_and_gradients(method, shape, reference):
    ref_out, (ref_loss, ref_grads) = reference
    out, (loss, grads), hlo = sharded_attention(shape, method)
    assert_parity(out, ref_out)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for g, r in zip(grads, ref_grads):
        assert_parity(g, r)
    # the scheme's collective is in the program: XLA did not just gather the sequence
    assert COLLECTIVE[method] in hlo
    assert COLLECTIVE["ring" if method == "ulysses" else "ulysses"] not in hlo


@pytest.mark.parametrize("method", ["ulysses", pytest.param("ring", marks=pytest.mark.slow)])
def test_memory_linear_kernel_inside(method, reference):
    """implementation='blockwise': 'ulysses' runs it on full-length heads, 'ring' on each chunk (with
    its logsumexp); both inside shard_map, both equal the plain attention, values and gradients."""
    ref_out, (ref_loss, ref_grads) = reference
    out, (loss, grads), hlo = sharded_attention((1, 1, 8, 1), method, implementation="blockwise")
    assert_parity(out, ref_out)
    for g, r in zip(grads, ref_grads):
        assert_parity(g, r)
    assert COLLECTIVE[method] in hlo


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_attention_replicates_batch_and_kv_heads_that_do_not_divide(method):
    """Batch 1 over data=2 and 3 kv heads (GQA 2) over tensor=2 / sequence=2: replicated or repeated,
    still equal; 'ulysses' with 3 query heads per tensor shard on a sequence axis of 2 is refused."""
    q, k, v, mask = qkv_mask(b=1, hq=6, hkv=3, length=16)
    plain = lambda q, k, v: dot_product_attention(q, k, v, key_mask=mask)
    ref_out, (_, ref_grads) = jax.jit(lambda q, k, v: (plain(q, k, v), loss_and_grads(plain, q, k, v)))(q, k, v)
    attn = lambda q, k, v: sp.attention(q, k, v, key_mask=mask, method=method)
    for shape in ((2, 2, 2, 1), (1, 2, 2, 2)):
        with jax.set_mesh(sharding.make_mesh(shape)):
            fn = jax.jit(lambda q, k, v: (attn(q, k, v), loss_and_grads(attn, q, k, v)))
            if method == "ulysses" and shape[3] == 2:
                with pytest.raises(ValueError, match=r"n_heads=6 / 2 = 3\) divisible by the 'sequence' mesh axis"):
                    fn(q, k, v)
                continue
            out, (_, grads) = fn(q, k, v)
        assert_parity(out, ref_out)
        for g, r in zip(grads, ref_grads):
            assert_parity(g, r)


def test_no_mesh_or_unsharded_length_is_the_plain_path():
    q, k, v, mask = qkv_mask()
    plain = jax.jit(lambda q: dot_product_attention(q, k, v, key_mask=mask))(q)
    np.testing.assert_array_equal(jax.jit(lambda q: sp.attention(q, k, v, key_mask=mask, method="ring"))(q), plain)
    with jax.set_mesh(sharding.make_mesh((2, 2, 1, 2))):
        hlo = jax.jit(lambda q: sp.attention(q, k, v, key_mask=mask, method="ring")).lower(q).as_text()
    assert "shard_map" not in hlo and "collective_permute" not in hlo


def test_bad_input_errors():
    q, k, v, mask = qkv_mask(hq=4, length=36)
    with jax.set_mesh(sharding.make_mesh((1, 1, 8, 1))):
        with pytest.raises(ValueError, match=r"token length 36 must be divisible by the 'sequence' mesh axis size 8"):
            sp.attention(q, k, v, key_mask=mask)
        q, k, v, mask = qkv_mask(hq=4, length=32)
        with pytest.raises(ValueError, match=r"query heads per tensor shard \(n_heads=4 / 1 = 4\) divisible by the "
                                             r"'sequence' mesh axis size 8; use model.sequence_parallel='ring'"):
            sp.attention(q, k, v, key_mask=mask, method="ulysses")
    with pytest.raises(ValueError, match="sequence_parallel='tree'"):
        sp.attention(q, k, v, method="tree")
    with pytest.raises(ValueError, match=r"token length \(72\) must be divisible by the sequence axis size 5"):
        sharding.check_sequence_length(72, (1, 1, 5, 1))
    sharding.check_sequence_length(72, (1, 1, 8, 1))
    cfg = registry.get_config("flagdit-tiny")  # 4 heads
    with pytest.raises(ValueError, match=r"n_heads=4 / 2 = 2\) divisible by the 'sequence' mesh axis size 4"):
        sp.check_mesh(cfg, (1, 1, 4, 2))
    sp.check_mesh(cfg, (2, 1, 2, 2))
    sp.check_mesh(dataclasses.replace(cfg, sequence_parallel="ring"), (1, 1, 4, 2))
    assert sharding.sequence_shards((2, 2, 2, 1)) == 2


def test_merge_of_chunks_is_softmax_over_their_union():
    """The ring's per-chunk kernel and merge against one softmax over all keys, including a chunk
    with no valid key and a row with no valid key at all (both average like the plain kernel)."""
    q, k, v, _ = qkv_mask(b=2, length=8)
    mask = np.array([[True] * 3 + [False] * 5, [False] * 8])

    @jax.jit
    def chunked(q, k, v, mask):
        out, lse = sp.chunk_attention(q, k[:, :, :4], v[:, :, :4], mask[:, :4], scale=0.5)
        return sp.merge(out, lse, *sp.chunk_attention(q, k[:, :, 4:], v[:, :, 4:], mask[:, 4:], scale=0.5))

    out, lse = chunked(q, k, v, mask)
    assert_parity(out, jax.jit(dot_product_attention, static_argnames="scale")(q, k, v, key_mask=mask, scale=0.5))
    logits = np.einsum("bhqd,bhkd->bhqk", q, np.repeat(k, 4, axis=1))[:1, ..., :3] * 0.5
    ref_lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    assert_parity(lse[:1], ref_lse)


# ----------------------------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------------------------


def model_inputs(cfg):
    """A padded batch of 2: a 16x16 latent (72 tokens with [nextline]) and a 12x12 one padded to it."""
    rng = np.random.default_rng(0)
    frames = [jnp.asarray(rng.standard_normal((1, s, s, cfg.in_channels)), jnp.float32) for s in (16, 12)]
    packed = tok.pack_for(cfg, frames, pad_to=tok.seq_len((1, 16, 16), *tok.layout_of(cfg)))
    t = jnp.array([0.3, 0.8])
    if cfg.text_conditional:
        kw = dict(cap_feats=jnp.asarray(rng.standard_normal((2, 4, cfg.cap_feat_dim)), jnp.float32),
                  cap_mask=jnp.array([[True] * 4, [True, True, False, False]]))
    else:
        kw = dict(y=jnp.array([3, 7]))
    return packed, t, kw


_MODELS = {}


def random_params(cfg):
    """Random parameters of the model's shapes (numpy: a jitted init costs seconds of compile): 1-D
    ones (norm scales, biases, gates) around 1, matrices ~ 1/sqrt(fan-in), so no path is zero."""
    rng = np.random.default_rng(1)
    shapes = nn.unbox(registry.abstract_params(cfg))
    return jax.tree.map(lambda x: (1 + 0.1 * rng.standard_normal(x.shape) if len(x.shape) == 1 else
                                   rng.standard_normal(x.shape) / np.sqrt(x.shape[-2])).astype(np.float32), shapes)


def tiny_model(name):
    """(config, params, inputs, single-device output) of an 8-head tiny model (8 heads so that
    'ulysses' fits a sequence axis of 8), built once per session."""
    if name not in _MODELS:
        if name == "dit-tiny":  # MHA, 4 heads: 'ulysses' fits (1, 2, 2, 2) only
            cfg = registry.get_config(name)
        elif name == "scanned-remat":  # nn.scan over the blocks, each rematerialised
            cfg = dataclasses.replace(registry.get_config("flagdit-tiny"), n_heads=8, n_kv_heads=2, scan_layers=True,
                                      remat="full")
        else:  # one block: every block runs the same attention
            cfg = dataclasses.replace(registry.get_config(name), n_heads=8, n_kv_heads=2, n_layers=1)
        model = registry.build(cfg)
        packed, t, kw = model_inputs(cfg)
        params = random_params(cfg)
        _MODELS[name] = cfg, params, (packed, t, kw), jax.jit(model.apply)({"params": params}, packed, t, **kw)
    return _MODELS[name]


@pytest.mark.parametrize("shape", [(1, 2, 2, 2), pytest.param((1, 1, 8, 1), marks=pytest.mark.slow)],
                         ids=["fsdp2-seq2-tensor2", "seq8"])
@pytest.mark.parametrize("method", [pytest.param("ulysses", marks=pytest.mark.slow), "ring"])
@pytest.mark.parametrize("name", ["flagdit-tiny"] + [pytest.param(n, marks=pytest.mark.slow) for n in (
    "lumina-next-tiny", "dit-tiny", "scanned-remat")])
def test_model_forward_equals_single_device(name, method, shape):
    cfg, params, (packed, t, kw), ref = tiny_model(name)
    assert packed.has_pads
    cfg = dataclasses.replace(cfg, sequence_parallel=method)
    model = registry.build(cfg)
    mesh = sharding.make_mesh(shape)
    params = jax.device_put(params, sharding.param_shardings(registry.abstract_params(cfg), mesh))
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
        fn = jax.jit(lambda p, tokens: model.apply({"params": p}, packed.replace(tokens=tokens), t, **kw))
        if method == "ulysses" and cfg.n_heads // shape[3] % shape[2]:
            with pytest.raises(ValueError, match=r"sequence_parallel='ulysses' needs the query heads"):
                fn(params, packed.tokens)
            return
        compiled = fn.lower(params, packed.tokens).compile()  # one compile: run it and read its HLO
        out, hlo = compiled(params, packed.tokens), compiled.as_text()
    assert_parity(out, ref)
    assert COLLECTIVE[method] in hlo


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_inference_options_under_a_sequence_mesh(method):
    """Context drop (time-aware), style sharing and proportional attention + NTK scaling: the
    self-attention paths left to XLA (pooled keys, shared styles) and the sequence-parallel one give
    the single-device output."""
    from flagdit_jax.models import common

    cfg = dataclasses.replace(registry.get_config("lumina-next-tiny"), n_heads=8, n_kv_heads=2)
    rng = np.random.default_rng(0)
    packed = tok.pack_for(cfg, jnp.asarray(rng.standard_normal((2, 1, 16, 16, cfg.in_channels)), jnp.float32))
    t = jnp.array([0.3, 0.8])
    kw = dict(cap_feats=jnp.asarray(rng.standard_normal((2, 4, cfg.cap_feat_dim)), jnp.float32),
              cap_mask=np.ones((2, 4), bool))
    model, params = registry.build(cfg), random_params(cfg)
    sp_model = registry.build(dataclasses.replace(cfg, sequence_parallel=method))
    for opts in (common.InferenceOptions(context_drop=2, context_drop_until=0.5),
                 common.InferenceOptions(style_groups=1), common.InferenceOptions(base_seqlen=16, scale_factor=1.5)):
        ref = jax.jit(lambda p: model.apply({"params": p}, packed, t, options=opts, **kw))(params)
        with jax.set_mesh(sharding.make_mesh((2, 1, 4, 1))), nn.logical_axis_rules(sharding.DEFAULT_RULES):
            out = jax.jit(lambda p: sp_model.apply({"params": p}, packed, t, options=opts, **kw))(params)
        assert_parity(out, ref, err_msg=str(opts))


# ----------------------------------------------------------------------------------------------
# a full train step
# ----------------------------------------------------------------------------------------------


def train_config(**kw):
    from test_train import tiny_config

    return tiny_config(**{"model.n_heads": 8, "global_batch": 8, **kw})


def one_step(config):
    from flagdit_jax import train

    s, init_boxed = train.setup(config)
    state = train.init_state(s, init_boxed)
    rng = np.random.default_rng(0)
    elements = [dict(image=rng.uniform(-1, 1, (32, 32, 1)).astype(np.float32), label=np.int32(i)) for i in range(8)]
    batch = train.pack_batch(s, elements, pad_to=80)  # 72 tokens + 8 pads: the key mask rides along
    step = train.make_train_step(s)
    with jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules):
        batch = train.global_batch(s, batch)
        compiled = step.lower(state, batch).compile()
        hlo = compiled.as_text()
        state, metrics = compiled(state, batch)
    return state, metrics, hlo


@pytest.fixture(scope="module")
def single_device_step():
    return one_step(train_config(**{"mesh.shape": (1, 1, 1, 1), "mesh.num_devices": 1}))


@pytest.mark.slow  # ~15 s a step compile on 2 cores: over the default suite's budget
@pytest.mark.parametrize("shape", [(1, 2, 2, 2), (1, 1, 8, 1)], ids=["fsdp2-seq2-tensor2", "seq8"])
@pytest.mark.parametrize("method", METHODS)
def test_train_step_equals_single_device(method, shape, single_device_step):
    ref_state, ref_metrics, _ = single_device_step
    state, metrics, hlo = one_step(train_config(**{"mesh.shape": shape, "model.sequence_parallel": method}))
    assert COLLECTIVE[method] in hlo
    np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-5)
    np.testing.assert_allclose(metrics["grad_norm"], ref_metrics["grad_norm"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params)):
        assert_parity(a, b)
