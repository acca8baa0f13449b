"""tokens.pack / unpack: exact round trip, layout counts, bad input."""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from flagdit_jax import tokens as tok

dims = st.integers(1, 4)


@pytest.mark.slow  # the default suite's 8-minute budget; test_round_trip_batch covers the batch form
@settings(max_examples=4, deadline=None)
@given(
    sizes=st.lists(st.tuples(st.integers(1, 3), dims, dims), min_size=1, max_size=3),
    p=st.sampled_from([1, 2, 3]),
    c=st.integers(1, 3),
    nextline=st.booleans(),
    nextframe=st.booleans(),
    extra_pad=st.integers(0, 3),
    seed=st.integers(0, 2**16),
)
def test_round_trip_list(sizes, p, c, nextline, nextframe, extra_pad, seed):
    rng = np.random.default_rng(seed)
    frames = [rng.normal(size=(t, h * p, w * p, c)).astype(np.float32) for t, h, w in sizes]
    longest = max(tok.seq_len((t, h * p, w * p), p, nextline, nextframe) for t, h, w in sizes)
    packed = tok.pack([jnp.asarray(f) for f in frames], p, nextline=nextline, nextframe=nextframe,
                      pad_to=longest + extra_pad)
    assert packed.tokens.shape == (len(frames), longest + extra_pad, p * p * c)
    out = tok.unpack(packed.tokens, packed)
    assert isinstance(out, list) and len(out) == len(frames)
    for a, b in zip(out, frames):
        np.testing.assert_array_equal(np.asarray(a), b)
    kind = np.asarray(packed.kind)
    for i, (t, h, w) in enumerate(sizes):
        assert (kind[i] == tok.PATCH).sum() == t * h * w
        assert (kind[i] == tok.NEXTLINE).sum() == (t * h if nextline else 0)  # one per patch row
        assert (kind[i] == tok.NEXTFRAME).sum() == (t if nextframe else 0)
    # The host (numpy) packing of training batches gives the same arrays.
    layout = type("Layout", (), dict(patch_size=p, nextline=nextline, nextframe=nextframe))
    host = tok.pack_host(frames, layout, longest + extra_pad)
    for k in ("tokens", "kind", "positions"):
        np.testing.assert_array_equal(host[k], np.asarray(getattr(packed, k)), err_msg=k)
        n = tok.seq_len((t, h * p, w * p), p, nextline, nextframe)
        assert np.asarray(packed.mask[i]).sum() == n and not np.asarray(packed.mask[i, n:]).any()
    # Special tokens carry no data.
    assert not np.asarray(packed.tokens)[kind != tok.PATCH].any()


@settings(max_examples=6, deadline=None)
@given(b=st.integers(1, 3), t=st.integers(1, 2), h=dims, w=dims, nextline=st.booleans(), seed=st.integers(0, 99))
def test_round_trip_batch(b, t, h, w, nextline, seed):
    x = np.random.default_rng(seed).normal(size=(b, t, 2 * h, 2 * w, 4)).astype(np.float32)
    packed = tok.pack(jnp.asarray(x), 2, nextline=nextline)
    np.testing.assert_array_equal(np.asarray(tok.unpack(packed.tokens, packed)), x)
    # A wider output per patch (e.g. 2C model channels) unpacks to the same layout.
    wide = jnp.concatenate([packed.tokens, packed.tokens], -1)
    assert tok.unpack(wide, packed).shape == (b, t, 2 * h, 2 * w, 8)


def test_layout_and_positions():
    """2x3 patches, one frame: rows of 3 patches + [nextline], then [nextframe]."""
    x = jnp.arange(4 * 6 * 1, dtype=jnp.float32).reshape(1, 1, 4, 6, 1)
    packed = tok.pack(x, 2, nextline=True, nextframe=True)
    assert packed.kind[0].tolist() == [0, 0, 0, 1, 0, 0, 0, 1, 2]
    assert packed.positions[0].tolist() == [
        [0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 0, 3], [0, 1, 0], [0, 1, 1], [0, 1, 2], [0, 1, 3], [0, 2, 0]]
    # Patch vector order (ph, pw, C): the first patch is pixels (0,0), (0,1), (1,0), (1,1).
    assert packed.tokens[0, 0].tolist() == [0.0, 1.0, 6.0, 7.0]
    assert packed.index[0].tolist() == list(range(9))


def test_mixed_sizes_pad_positions():
    packed = tok.pack([jnp.zeros((1, 4, 4, 3)), jnp.zeros((1, 2, 8, 3))], 2)
    assert packed.tokens.shape == (2, 6, 12)  # 2 rows x (2+1) vs 1 row x (4+1) -> pad to 6
    assert packed.kind[1].tolist() == [0, 0, 0, 0, 1, 3]
    assert packed.positions[1, -1].tolist() == packed.positions[1, -2].tolist()  # pad repeats last


@pytest.mark.parametrize(
    "frames, match",
    [
        (jnp.zeros((1, 1, 5, 4, 4)), r"\(5, 4\) must be divisible by patch_size=2"),
        (jnp.zeros((1, 4, 4, 4)), r"\[B, T, H, W, C\].*got shape \(1, 4, 4, 4\)"),
        ([jnp.zeros((4, 4, 4))], r"rank 4 \[T, H, W, C\].*\(4, 4, 4\)"),
        ([jnp.zeros((1, 4, 4, 4)), jnp.zeros((1, 4, 4, 3))], r"same channel count, got \[3, 4\]"),
        ([], "empty list"),
    ],
)
def test_bad_input(frames, match):
    with pytest.raises(ValueError, match=match):
        tok.pack(frames, 2)


def test_pad_to_too_short():
    with pytest.raises(ValueError, match="pad_to=3 is shorter than the longest sample"):
        tok.pack(jnp.zeros((1, 1, 4, 4, 1)), 2, pad_to=3)
