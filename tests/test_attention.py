"""Attention implementations: the memory-linear 'blockwise' kernel (forward, its own backward, the
logsumexp output and its cotangent) against the full-score 'xla' path, jax.nn.dot_product_attention
and autodiff of a plain jnp formula; the 'auto' resolver; the cuDNN path's key reordering."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_parity

from flagdit_jax import tokens as tok
from flagdit_jax.models import attention as A
from flagdit_jax.models import registry


def _inputs(seed, b, hq, hkv, lq, lk, d, dtype=jnp.float32):
    """q, k, v and loss weights w (numpy draws: no per-shape compiles of jax.random)."""
    rng = np.random.default_rng(seed)
    normal = lambda *shape: rng.standard_normal(shape, np.float32)
    q, k, v = normal(b, hq, lq, d), normal(b, hkv, lk, d), normal(b, hkv, lk, d)
    return jnp.asarray(q, dtype), jnp.asarray(k, dtype), jnp.asarray(v, dtype), jnp.asarray(normal(b, hq, lq, d))


def _plain(q, k, v, mask, scale):
    """Independent reference: repeat kv heads, full scores, -inf for masked keys, jax softmax."""
    g = q.shape[1] // k.shape[1]
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, jnp.repeat(k, g, 1)) * scale
    if mask is not None:
        logits = jnp.where(mask[:, None, None, :], logits, -jnp.inf)
    return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(logits, -1), jnp.repeat(v, g, 1)), jax.nn.logsumexp(logits, -1)


def _jax_nn(q, k, v, mask, scale):
    """jax.nn.dot_product_attention (its own GQA and mask handling), in our [B, H, L, D] layout."""
    def f(q, k, v, mask):
        m = None if mask is None else mask[:, None, None, :]
        out = jax.nn.dot_product_attention(q.swapaxes(1, 2), k.swapaxes(1, 2), v.swapaxes(1, 2), mask=m,
                                           scale=scale, implementation="xla")
        return out.swapaxes(1, 2)

    return jax.jit(f)(q, k, v, mask)


def _grads(fn, q, k, v, w):
    return jax.jit(jax.grad(lambda q, k, v: jnp.sum(w * fn(q, k, v)), (0, 1, 2)))(q, k, v)


# (b, hq, hkv, lq, lk, d, scale, mask kind, block_q, block_k)
CASES = {
    "gqa_masked_tails": (2, 4, 2, 19, 23, 8, None, "tails", 8, 8),  # lengths not block multiples
    "mha_nomask_exact_blocks": (1, 2, 2, 16, 32, 8, None, None, 8, 16),
    "cross_short_caption": (2, 4, 2, 40, 5, 8, None, "tails", 16, 64),  # Lq != Lk, one key block
    "proportional_scale_random_mask": (2, 4, 1, 33, 33, 16, 0.4137, "random", 16, 8),
}


def _mask(kind, b, lk, seed=3):
    if kind is None:
        return None
    if kind == "tails":  # batch row i has its last i+1 keys padded
        return jnp.asarray(np.arange(lk)[None, :] < (lk - 1 - np.arange(b))[:, None])
    m = np.random.default_rng(seed).uniform(size=(b, lk)) > 0.4
    m[:, 0] = True
    return jnp.asarray(m)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_blockwise_matches_xla_and_jax_nn_forward_and_gradients(case):
    b, hq, hkv, lq, lk, d, scale, kind, bq, bk = CASES[case]
    q, k, v, w = _inputs(0, b, hq, hkv, lq, lk, d)
    mask = _mask(kind, b, lk)
    s = 1 / np.sqrt(d) if scale is None else scale
    ours = functools.partial(A.blockwise_attention, key_mask=mask, scale=scale, block_q=bq, block_k=bk)
    xla = functools.partial(A.dot_product_attention, key_mask=mask, scale=scale, implementation="xla")
    out = ours(q, k, v)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_parity(out, xla(q, k, v))
    assert_parity(out, _jax_nn(q, k, v, mask, s))
    g_ours, g_xla = _grads(ours, q, k, v, w), _grads(xla, q, k, v, w)
    g_ref = _grads(lambda *a: _plain(*a, mask, s)[0], q, k, v, w)
    for name, a, x, r in zip("qkv", g_ours, g_xla, g_ref):
        assert_parity(a, x, err_msg=f"d{name} vs xla")
        assert_parity(a, r, err_msg=f"d{name} vs autodiff")


def test_blockwise_parity_in_one_compile():
    """Default-suite summary of the slow tests below, one jit per side: GQA, lengths that are not
    block multiples, a padded tail, a random mask, a row with no valid key, a proportional scale;
    out, lse and the gradients of sum(w*out) + sum(u*lse) against autodiff of the plain formula."""
    q, k, v, w = _inputs(12, 3, 4, 2, 19, 23, 8)
    u = jnp.asarray(np.random.default_rng(13).standard_normal(q.shape[:3], np.float32))
    mask = jnp.asarray(np.stack([_mask("tails", 1, 23)[0], _mask("random", 1, 23)[0], np.zeros(23, bool)]))
    scale = 0.4137

    def value_and_grads(fn, q, k, v):
        (out, lse), vjp = jax.vjp(fn, q, k, v)
        return out, lse, vjp((w[: q.shape[0]], u[: q.shape[0]]))

    ours = jax.jit(functools.partial(value_and_grads, lambda *a: A.blockwise_attention(
        *a, key_mask=mask, scale=scale, block_q=16, block_k=8, return_lse=True)))(q, k, v)
    ref = jax.jit(functools.partial(value_and_grads, lambda *a: _plain(*a, mask[:2], scale)))(q[:2], k[:2], v[:2])
    out, lse, grads = ours
    assert_parity(out[:2], ref[0])
    assert_parity(out[:2], _jax_nn(q[:2], k[:2], v[:2], mask[:2], scale))
    assert_parity(lse[:2], ref[1])
    for name, a, r in zip("qkv", grads, ref[2]):
        assert_parity(a[:2], r, err_msg=f"d{name}")
        np.testing.assert_array_equal(a[2], 0.0)  # nothing flows through the empty row
    np.testing.assert_array_equal(out[2], 0.0)
    np.testing.assert_array_equal(lse[2], A.MASKED_LSE)


@pytest.mark.slow
def test_fully_masked_row_gives_zero_not_nan():
    q, k, v, w = _inputs(1, 2, 4, 2, 13, 11, 8)
    mask = jnp.ones((2, 11), bool).at[1].set(False)  # batch row 1 has no valid key
    f = functools.partial(A.blockwise_attention, key_mask=mask, block_q=8, block_k=4, return_lse=True)
    out, lse = f(q, k, v)
    np.testing.assert_array_equal(out[1], 0.0)
    np.testing.assert_array_equal(lse[1], A.MASKED_LSE)
    assert_parity(out[0], A.dot_product_attention(q, k, v, key_mask=mask)[0])
    grads = jax.grad(lambda *a: jnp.sum(w * f(*a)[0]) + jnp.sum(f(*a)[1][0]), (0, 1, 2))(q, k, v)
    for g in grads:
        assert np.all(np.isfinite(g))
        np.testing.assert_array_equal(g[1], 0.0)  # nothing flows through the empty row


@pytest.mark.slow
@pytest.mark.parametrize("mask_kind", [None, "random"])
def test_return_lse_value_and_its_gradient(mask_kind):
    q, k, v, w = _inputs(2, 2, 4, 2, 21, 18, 8)
    u = jnp.asarray(np.random.default_rng(9).standard_normal(q.shape[:3], np.float32))  # lse cotangent weights
    mask = _mask(mask_kind, 2, 18)
    out, lse = A.blockwise_attention(q, k, v, key_mask=mask, scale=0.3, block_q=8, block_k=8, return_lse=True)
    ref_out, ref_lse = _plain(q, k, v, mask, 0.3)
    assert lse.shape == q.shape[:3] and lse.dtype == jnp.float32
    assert_parity(lse, ref_lse)
    assert_parity(out, ref_out)

    def loss(fn):
        def f(q, k, v):
            o, l = fn(q, k, v)
            return jnp.sum(w * o) + jnp.sum(u * l)
        return jax.grad(f, (0, 1, 2))(q, k, v)

    ours = loss(lambda *a: A.blockwise_attention(*a, key_mask=mask, scale=0.3, block_q=8, block_k=8, return_lse=True))
    ref = loss(lambda *a: _plain(*a, mask, 0.3))
    for name, a, r in zip("qkv", ours, ref):
        assert_parity(a, r, err_msg=f"d{name}")


@pytest.mark.slow
def test_lse_merge_of_key_chunks_equals_full_attention():
    """What ring attention does: attend to disjoint key chunks, merge with the lse weights; the
    result and its gradients equal attention over all keys."""
    q, k, v, w = _inputs(4, 1, 4, 2, 24, 30, 8)
    mask = _mask("random", 1, 30, seed=5)
    chunks = [(0, 12), (12, 30)]

    def merged(q, k, v):
        outs, lses = zip(*[A.blockwise_attention(q, k[:, :, a:e], v[:, :, a:e], key_mask=mask[:, a:e], block_q=8,
                                                 block_k=8, return_lse=True) for a, e in chunks])
        lse = jnp.logaddexp(*lses)
        return sum(jnp.exp(l - lse)[..., None] * o for o, l in zip(outs, lses))

    full = functools.partial(A.dot_product_attention, key_mask=mask, implementation="xla")
    assert_parity(merged(q, k, v), full(q, k, v))
    for name, a, r in zip("qkv", _grads(merged, q, k, v, w), _grads(full, q, k, v, w)):
        assert_parity(a, r, err_msg=f"d{name}")


@pytest.mark.slow
def test_blockwise_bf16_accumulates_in_fp32():
    q, k, v, _ = _inputs(6, 1, 4, 2, 40, 40, 16, jnp.bfloat16)
    mask = _mask("tails", 1, 40)
    out = A.blockwise_attention(q, k, v, key_mask=mask, block_q=16, block_k=16)
    assert out.dtype == jnp.bfloat16
    f32 = lambda x: x.astype(jnp.float32)
    ref = _plain(f32(q), f32(k), f32(v), mask, 0.25)[0]
    np.testing.assert_allclose(f32(out), ref, atol=2e-2 * float(jnp.max(jnp.abs(ref))))


def test_auto_resolver():
    r = functools.partial(A.resolve_implementation, head_dim=64)
    assert r(q_len=1024, k_len=1024, dtype=jnp.float32, backend="cpu") == "xla"
    assert r(q_len=256, k_len=64, dtype=jnp.bfloat16, backend="cpu") == "xla"
    assert r(q_len=1025, k_len=1024, dtype=jnp.float32, backend="cpu") == "blockwise"
    assert r(q_len=131072, k_len=128, dtype=jnp.float32, backend="cpu") == "blockwise"  # long cross-attention
    assert r(q_len=16384, k_len=16384, dtype=jnp.bfloat16, backend="gpu") == "cudnn"
    assert r(q_len=16384, k_len=16384, dtype=jnp.float32, backend="gpu") == "blockwise"
    assert r(q_len=4096, k_len=4096, dtype=jnp.float32, backend="gpu") == "xla"
    assert A.resolve_implementation(q_len=16384, k_len=16384, head_dim=12, dtype=jnp.bfloat16,
                                    backend="gpu") == "blockwise"  # cuDNN needs head_dim % 8 == 0
    assert r(q_len=1024, k_len=1024, dtype=jnp.float32, backend="tpu") == "splash"
    assert r(q_len=1000, k_len=1024, dtype=jnp.float32, backend="tpu") == "blockwise"
    # On this (CPU) backend a short 'auto' call is exactly today's 'xla' path.
    q, k, v, _ = _inputs(7, 1, 4, 2, 9, 9, 8)
    auto, xla = (jax.jit(functools.partial(A.dot_product_attention, implementation=i)) for i in ("auto", "xla"))
    np.testing.assert_array_equal(auto(q, k, v), xla(q, k, v))


@pytest.mark.slow
def test_cudnn_path_key_reordering_matches_mask():
    """The cuDNN path turns a key mask into valid-keys-first + lengths; run that path with jax's
    'xla' kernel (the cuDNN kernel needs a GPU) and compare with the masked attention."""
    q, k, v, w = _inputs(8, 2, 4, 2, 12, 10, 8)
    mask = _mask("random", 2, 10, seed=11)
    ours = functools.partial(A._cudnn_attention, key_mask=mask, scale=0.3, implementation="xla")
    xla = functools.partial(A.dot_product_attention, key_mask=mask, scale=0.3, implementation="xla")
    assert_parity(ours(q, k, v), xla(q, k, v))
    for a, r in zip(_grads(ours, q, k, v, w), _grads(xla, q, k, v, w)):
        assert_parity(a, r)


def test_bad_blockwise_input():
    q, k, v = jnp.zeros((1, 4, 8, 8)), jnp.zeros((1, 2, 8, 8)), jnp.zeros((1, 2, 8, 8))
    with pytest.raises(ValueError, match="query heads 4 must be a multiple of kv heads 3"):
        A.blockwise_attention(q, jnp.zeros((1, 3, 8, 8)), jnp.zeros((1, 3, 8, 8)))
    with pytest.raises(ValueError, match=r"key_mask must be \[B, Lk\]=\(1, 8\)"):
        A.blockwise_attention(q, k, v, key_mask=jnp.ones((1, 7), bool))
    with pytest.raises(ValueError, match="block_k must be a positive int, got 0"):
        A.blockwise_attention(q, k, v, block_k=0)
    with pytest.raises(ValueError, match="unknown attention implementation 'flash'"):
        A.dot_product_attention(q, k, v, implementation="flash")


def _model_case(preset, monkeypatch):
    """xla and blockwise models of a preset, random params, a padded batch and a partly masked
    caption. Small tiles, so self- and cross-attention span several of them."""
    monkeypatch.setattr(A, "blockwise_attention", functools.partial(A.blockwise_attention, block_q=24, block_k=16))
    cfg_x = registry.get_config(preset, attention="xla")
    rng = np.random.default_rng(2)
    frames = rng.standard_normal((2, 1, 12, 12, cfg_x.in_channels), np.float32)
    packed = tok.pack_for(cfg_x, jnp.asarray(frames), pad_to=50)  # padded: self-attention gets a key mask
    t = jnp.array([0.3, 0.8])
    kw = dict(cap_feats=jnp.asarray(rng.standard_normal((2, 5, cfg_x.cap_feat_dim), np.float32)),
              cap_mask=jnp.arange(5)[None] < jnp.array([[5], [3]]))
    model_x, model_b = registry.build(cfg_x), registry.build(preset, attention="blockwise")
    # Random parameters of the right shapes (no init compile); none at its zero init, so the gated
    # cross-attention matters.
    shapes = nn.unbox(jax.eval_shape(model_x.init, jax.random.key(0), packed, t, **kw)["params"])
    params = jax.tree.map(lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape, np.float32)), shapes)
    return model_x, model_b, params, (packed, t), kw


def test_flagdit_forward_blockwise_equals_xla(monkeypatch):
    """attention='blockwise' reaches every attention of a Flag-DiT T2I (masked self-attention,
    cross-attention to a padded caption) and gives the 'xla' output."""
    model_x, model_b, params, args, kw = _model_case("lumina-t2i-tiny", monkeypatch)
    fwd = lambda m: jax.jit(lambda p: m.apply({"params": p}, *args, **kw))(params)
    assert_parity(fwd(model_b), fwd(model_x))


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["lumina-t2i-tiny", "lumina-next-tiny"])
def test_model_blockwise_equals_xla_with_gradients(preset, monkeypatch):
    """Flag-DiT / Next-DiT loss and parameter gradients, attention='blockwise' vs 'xla'."""
    model_x, model_b, params, args, kw = _model_case(preset, monkeypatch)

    def loss(model):
        return jax.jit(jax.value_and_grad(lambda p: jnp.sum(model.apply({"params": p}, *args, **kw) ** 2)))(params)

    (vx, gx), (vb, gb) = loss(model_x), loss(model_b)
    assert_parity(vb, vx)
    # One tolerance for the whole gradient (scaled by its largest entry): some leaves' true
    # gradients are 0 (a bias added to every key shifts all scores of a row equally) and carry
    # only rounding noise.
    flat = lambda g: jnp.concatenate([x.ravel() for x in jax.tree.leaves(g)])
    assert jax.tree.structure(gb) == jax.tree.structure(gx)
    assert_parity(flat(gb), flat(gx))


@pytest.mark.slow
def test_blockwise_default_blocks_long_sequence():
    """Default tiles on a sequence spanning several of them (non-multiple length, GQA, masked tail)."""
    q, k, v, w = _inputs(10, 1, 4, 2, 1500, 1500, 16)
    mask = _mask("tails", 1, 1500)
    ours = functools.partial(A.blockwise_attention, key_mask=mask)
    xla = functools.partial(A.dot_product_attention, key_mask=mask, implementation="xla")
    assert_parity(ours(q, k, v), xla(q, k, v))
    for a, r in zip(_grads(ours, q, k, v, w), _grads(xla, q, k, v, w)):
        assert_parity(a, r)
