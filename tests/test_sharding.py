"""Logical axis names on every parameter; a sharded forward equals the single-device one."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from flagdit_jax import sharding
from flagdit_jax.models import registry


def test_eight_fake_devices():
    assert jax.device_count() == 8, "conftest.py must set XLA_FLAGS before jax is imported"


@pytest.mark.parametrize("name", ["flagdit-tiny", "lumina-t2i-tiny", "dit-tiny", "flagdit-7b", "nextdit-tiny",
                                  "lumina-next-tiny", "lumina-next-2b"])
def test_every_parameter_axis_is_named_and_ruled(name):
    abstract = registry.abstract_params(registry.get_config(name))
    known = {k for k, _ in sharding.DEFAULT_RULES}
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]:
        assert isinstance(leaf, nn.Partitioned), f"{jax.tree_util.keystr(path)} has no logical axis names"
        assert len(leaf.names) == len(leaf.value.shape)
        assert set(leaf.names) <= known, (jax.tree_util.keystr(path), leaf.names)


@pytest.mark.slow  # default-suite time budget (tests/test_sequence_parallel.py shards a model by default)
@pytest.mark.parametrize("preset", ["lumina-t2i-tiny", "lumina-next-tiny"])
def test_sharded_forward_matches_single_device(preset):
    cfg = registry.get_config(preset)
    model = registry.build(cfg)
    packed, _, kw = registry.example_inputs(cfg, batch=4, size=8, cap_len=4)
    key = jax.random.key(0)
    packed = packed.replace(tokens=jax.random.normal(key, packed.tokens.shape))
    t = jnp.linspace(0.1, 0.9, 4)
    kw["cap_feats"] = jax.random.normal(key, kw["cap_feats"].shape)
    params = nn.unbox(model.init(key, packed, t, **kw)["params"])
    params = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(key, x.shape), params)
    ref = model.apply({"params": params}, packed, t, **kw)

    mesh = sharding.make_mesh((2, 2, 1, 2))
    shardings = sharding.param_shardings(registry.abstract_params(cfg), mesh)
    sharded = jax.device_put(params, shardings)
    wq = sharded["layers_0"]["attention"]["wq"]["kernel"]
    assert wq.sharding.spec == P("fsdp", "tensor") and len(wq.addressable_shards) == 8
    assert wq.addressable_shards[0].data.shape == (cfg.dim // 2, cfg.dim // 2)

    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
        out = jax.jit(lambda p, x, t, c, m: model.apply({"params": p}, packed.replace(tokens=x), t, cap_feats=c,
                                                        cap_mask=m))(sharded, packed.tokens, t, kw["cap_feats"],
                                                                     kw["cap_mask"])
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_bad_mesh_shape():
    with pytest.raises(ValueError, match=r"mesh shape \(3, 2, 1, 1\) needs 6 devices but 8 are available"):
        sharding.make_mesh((3, 2, 1, 1))
