"""The joint model (models/joint.py), its task and its sampling modes (sample_joint.py)."""

import dataclasses
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from flagdit_jax import sample_joint, tasks
from flagdit_jax import tokens as tok
from flagdit_jax.flow import paths
from flagdit_jax.models import registry
from flagdit_jax.models.joint import JointConfig

N, SIDE = 2, 8


def _randomise(params, key, scale=0.3):
    """Every leaf random (the zero-init gates and final layers would make the velocities trivial)."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(tree, [scale * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


@pytest.fixture(scope="module")
def joint():
    cfg = JointConfig(dim=32, n_layers=1, n_heads=2, patch_size=4, in_channels=1, multiple_of=32, text_dim=4,
                      text_len=2)
    model = registry.build(cfg)
    packed, t, kw = registry.example_inputs(cfg, batch=N, size=SIDE)
    init = jax.jit(lambda k: _randomise(model.init(k, packed, t, **kw)["params"], jax.random.key(1)))  # one compile
    params = init(jax.random.key(0))
    config = ml_collections.ConfigDict(dict(data=dict(image_size=SIDE), flow=dict(path="linear")))
    s = types.SimpleNamespace(model=model, model_cfg=cfg, config=config)
    return s, params, jax.jit(lambda p, x, t, xt, tt: model.apply({"params": p}, x, t, text=xt, t_text=tt))


def _inputs(cfg, key):
    k1, k2 = jax.random.split(key)
    frames = jax.random.normal(k1, (N, 1, SIDE, SIDE, 1))
    return tok.pack_for(cfg, frames), jax.random.normal(k2, (N, cfg.text_len, cfg.text_dim))


def test_each_modality_time_reaches_only_its_tokens(joint):
    """With no token mixing (attention output, the time mixer and the pooled text zeroed), t_text moves only
    the text velocity and t only the image velocity: each token is modulated by its own modality's time."""
    s, params, apply = joint
    p = jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.zeros_like(x) if any(getattr(k, "key", "") in ("wo", "time_mixer", "text_pool")
                                                  for k in path) else x, params)
    assert any("wo" in str(path) for path, _ in jax.tree_util.tree_leaves_with_path(params)), "no attention output"
    packed, text = _inputs(s.model_cfg, jax.random.key(2))
    t = jnp.full((N,), 0.3)
    vi, vt = apply(p, packed, t, text, t)
    vi2, vt2 = apply(p, packed, t, text, t + 0.5)  # text time only
    vi3, vt3 = apply(p, packed, t + 0.5, text, t)  # image time only
    np.testing.assert_array_equal(vi2, vi)
    np.testing.assert_array_equal(vt3, vt)
    assert np.abs(vt2 - vt).max() > 1e-3 and np.abs(vi3 - vi).max() > 1e-3
    # The pooled-text adaLN path alone (attention still off) carries the text to the image tokens.
    p_pool = jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.zeros_like(x) if any(getattr(k, "key", "") == "wo" for k in path) else x, params)
    assert np.abs(apply(p_pool, packed, t, -text, t)[0] - apply(p_pool, packed, t, text, t)[0]).max() > 1e-3
    np.testing.assert_array_equal(apply(p, packed, t, -text, t)[0], vi)  # and nothing else does
    # With mixing back on, either time reaches every token (through attention and the mixer).
    vi4, vt4 = apply(params, packed, t, text, t + 0.5)
    assert np.abs(vi4 - apply(params, packed, t, text, t)[0]).max() > 1e-4


@pytest.mark.slow  # ~7 s of eager model calls for an option that is off by default; the suite keeps under 8 min
def test_gated_text_pool_is_silent_for_pure_noise_text(joint):
    """text_pool_gate: the pooled text enters adaLN times t_text, so at t_text = 0 (the image's marginal)
    the text_pool weights change nothing, while at t_text = 0.5 they do; ungated they always do."""
    s, params, _ = joint
    packed, text = _inputs(s.model_cfg, jax.random.key(4))
    bumped = jax.tree_util.tree_map_with_path(
        lambda path, x: x + 1.0 if any(getattr(k, "key", "") == "text_pool" for k in path) else x, params)
    for gate, tt in ((True, 0.0), (True, 0.5), (False, 0.0)):
        model = registry.build(dataclasses.replace(s.model_cfg, text_pool_gate=gate))
        t, t_text = jnp.full((N,), 0.4), jnp.full((N,), tt)
        a, b = (model.apply({"params": p}, packed, t, text=text, t_text=t_text) for p in (params, bumped))
        same = all(np.array_equal(x, y) for x, y in zip(a, b))
        assert same == (gate and tt == 0.0), (gate, tt)


def test_conditional_sampling_never_changes_the_condition(joint):
    s, params, _ = joint
    packed, text = _inputs(s.model_cfg, jax.random.key(3))
    frames = tok.unpack(packed.tokens, packed)
    for mode, kw in (("text_to_image", dict(text=text)), ("image_to_text", dict(image=frames))):
        solve = jax.jit(sample_joint.make_joint_solver(s, N, mode=mode, method="heun", num_steps=3, cfg_scale=2.0))
        out = solve(params, jax.random.key(4), **kw)
        if mode == "text_to_image":
            np.testing.assert_array_equal(out["text"], text)
            assert np.isfinite(out["image"]).all() and out["image"].shape == frames.shape
        else:
            np.testing.assert_allclose(out["image"], frames, rtol=0, atol=1e-6)
            assert out["text"].shape == text.shape and not np.allclose(out["text"], 0)


@pytest.mark.parametrize("mode", [m if m in ("joint", "text_to_image") else pytest.param(m, marks=pytest.mark.slow)
                                  for m in sample_joint.MODES])
def test_modes_are_one_network_at_chosen_times(joint, mode):
    """One Euler step of each mode equals the hand-written step with the same weights: conditions clean
    at t = 1, marginalised modalities fresh noise at t = 0, guidance v_u + s (v_c - v_u) from the marginal."""
    s, params, apply = joint
    cfg = s.model_cfg
    scale = 1.0 if mode in ("image", "text") else 2.5
    packed, cond_text = _inputs(cfg, jax.random.key(5))
    frames = tok.unpack(packed.tokens, packed)
    kw = {"text_to_image": dict(text=cond_text), "image_to_text": dict(image=frames)}.get(mode, {})
    out = sample_joint.make_joint_solver(s, N, mode=mode, method="euler", num_steps=1, cfg_scale=scale)(
        params, jax.random.key(6), **kw)

    k_img, k_txt, k_ni, k_nt = jax.random.split(jax.random.key(6), 4)
    x_img, x_txt = jax.random.normal(k_img, packed.tokens.shape), jax.random.normal(k_txt, cond_text.shape)
    n_img, n_txt = jax.random.normal(k_ni, packed.tokens.shape), jax.random.normal(k_nt, cond_text.shape)
    zero, one = jnp.zeros((N,)), jnp.ones((N,))

    def v(xi, ti, xt, tt):
        return apply(params, packed.replace(tokens=xi), ti, xt, tt)

    def g(c, u):
        return u + scale * (c - u)

    if mode == "joint":
        vi_c, vt_c = v(x_img, zero, x_txt, zero)
        vi = g(vi_c, v(x_img, zero, n_txt, zero)[0])
        vt = g(vt_c, v(n_img, zero, x_txt, zero)[1])
        want_img, want_txt = x_img + vi, x_txt + vt
    elif mode == "text_to_image":
        want_img = x_img + g(v(x_img, zero, cond_text, one)[0], v(x_img, zero, n_txt, zero)[0])
        want_txt = cond_text
    elif mode == "image_to_text":
        want_txt = x_txt + g(v(packed.tokens, one, x_txt, zero)[1], v(n_img, zero, x_txt, zero)[1])
        want_img = packed.tokens
    elif mode == "image":
        want_img, want_txt = x_img + v(x_img, zero, n_txt, zero)[0], n_txt
    else:
        want_img, want_txt = n_img, x_txt + v(n_img, zero, x_txt, zero)[1]
    # Tolerance scaled to the outputs' magnitude (the random weights give velocities of size ~10-30).
    want_img = tok.unpack(want_img, packed)
    np.testing.assert_allclose(out["image"], want_img, rtol=0, atol=1e-5 * float(np.abs(want_img).max()))
    np.testing.assert_allclose(out["text"], want_txt, rtol=0, atol=1e-5 * float(np.abs(want_txt).max()))


@pytest.mark.parametrize("clean,noise", [(0.0, 0.0), (0.3, 0.2), ((0.1, 0.3), (0.05, 0.35))])
def test_joint_task_draws_independent_times_and_sums_both_losses(joint, clean, noise):
    s, params, apply = joint
    cfg = s.model_cfg
    task = tasks.Joint(path=paths.LinearPath(), time_sampler="lognorm", text_shape=(cfg.text_len, cfg.text_dim),
                       clean_prob=clean, noise_prob=noise)
    packed, text = _inputs(cfg, jax.random.key(7))
    d = task.draw(jax.random.key(8), packed, {"text": text})
    assert d["x0_text"].shape == text.shape and not np.allclose(d["t"], d["t_text"])
    big = task.draw(jax.random.key(9), tok.pack_for(cfg, jnp.zeros((4096, 1, 4, 4, 1))), {"text": jnp.zeros((4096, 2, 4))})
    assert abs(np.corrcoef(big["t"], big["t_text"])[0, 1]) < 0.05  # independent draws
    pairs = [p if isinstance(p, tuple) else (p, p) for p in (clean, noise)]
    for i, (t, w) in enumerate(((big["t"], big["w"]), (big["t_text"], big["w_text"]))):
        # Each modality's endpoints at its own probabilities (binomial sd at n=4096 is <= 0.008); only clean
        # ones lose weight.
        assert abs(np.mean(t == 1.0) - pairs[0][i]) < 0.03 and abs(np.mean(t == 0.0) - pairs[1][i]) < 0.03
        np.testing.assert_array_equal(w, np.where(t == 1.0, 0.0, 1.0))
    if clean != 0.0:  # make both weights vary in the small batch too
        d = dict(d, w=jnp.array([1.0, 0.0]), w_text=jnp.array([0.0, 1.0]))
    loss = jax.jit(lambda pk, c, dr: task.loss(lambda p, t, **kw: s.model.apply({"params": params}, p, t, **kw),
                                                 pk, c, dr))(packed, {"text": text}, d)
    # By hand: the linear path, velocity targets x1 - x0, both modalities' mean squared errors summed.
    te, tt = d["t"][:, None, None], d["t_text"][:, None, None]
    vi, vt = apply(params, packed.replace(tokens=te * packed.tokens + (1 - te) * d["x0"]), d["t"],
                   tt * text + (1 - tt) * d["x0_text"], d["t_text"])
    m = (packed.kind == tok.PATCH)[..., None]
    per_img = ((vi - (packed.tokens - d["x0"])) ** 2 * m).sum((1, 2)) / (m.sum((1, 2)) * packed.tokens.shape[-1])
    per_txt = ((vt - (text - d["x0_text"])) ** 2).mean((1, 2))
    np.testing.assert_allclose(loss, np.mean(d["w"] * per_img + d["w_text"] * per_txt), rtol=1e-5)


def test_joint_config_and_task_checks():
    with pytest.raises(ValueError, match="no class or caption condition"):
        JointConfig(num_classes=10)
    cfg = registry.get_config("joint-tiny")
    assert registry.config_from_dict(registry.config_to_dict(cfg)) == cfg
    config = ml_collections.ConfigDict(dict(task="joint", flow=dict(path="linear", time_sampler="lognorm",
                                                                   prediction="velocity")))
    with pytest.raises(ValueError, match="joint task needs the joint model"):
        tasks.get_task(config, registry.get_config("flagdit-tiny"))
    assert isinstance(tasks.get_task(config, cfg), tasks.Joint)
    with pytest.raises(ValueError, match="no null condition"):
        tasks.get_task(config, cfg).null_cond(2)
    config.joint = dict(clean_prob=0.2, noise_prob=0.1)
    task = tasks.get_task(config, cfg)
    assert (task.clean_prob, task.noise_prob) == (0.2, 0.1)
    config.joint = dict(clean_prob=[0.1, 0.3], noise_prob=0.2)
    task = tasks.get_task(config, cfg)
    assert task.endpoints() == ((0.1, 0.3), (0.2, 0.2))
    for bad, msg in ((dict(clean_prob=1.0), "the image probability 1.0 must be in"),
                     (dict(clean_prob=0.6, noise_prob=0.5), "< 1"),
                     (dict(clean_prob=(0.1, 0.5), noise_prob=(0.1, 0.5)), "0.5 \\+ 0.5 for the text must be < 1"),
                     (dict(clean_prob=(0.1, 0.2, 0.3)), "expected a number or an \\(image, text\\) pair"),
                     (dict(clean_prob="0.1"), "expected a number"), (dict(clean=0.1), "unknown keys \\['clean'\\]")):
        config.joint = bad
        with pytest.raises(ValueError, match=msg):
            tasks.get_task(config, cfg)


def test_joint_time_endpoints_are_validated_with_the_config():
    import importlib.util

    from flagdit_jax import train
    from test_train import ROOT

    spec = importlib.util.spec_from_file_location("joint_mnist_config", ROOT / "configs" / "joint" / "mnist.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    train.validate(mod.get_config("joint"))
    bad = mod.get_config("joint")
    bad.joint = ml_collections.ConfigDict(dict(clean_prob=0.2, noise_prob=(0.1, 0.9)))
    with pytest.raises(ValueError, match="clean_prob \\+ noise_prob"):
        train.validate(bad)
    uncond = mod.get_config("uncond")
    uncond.joint = ml_collections.ConfigDict(dict(clean_prob=0.2))
    with pytest.raises(ValueError, match="config.joint=.*is for the joint task; config.task='unconditional'"):
        train.validate(uncond)


def test_joint_mnist_text_round_trip():
    from flagdit_jax.data.joint_mnist import JointMnistSource

    src = JointMnistSource("eval", text_dim=16)
    labels, strokes = src.labels[:50], src.strokes[:50]
    d, st = src.decode_text(src.text(labels, strokes))
    np.testing.assert_array_equal(d, labels)
    np.testing.assert_array_equal(st, strokes)
    assert 0.3 < src.strokes.mean() < 0.7  # per-class medians of train: about half thick on held-out digits
    rec = src[3]
    assert rec["frames"].shape == (1, 32, 32, 1) and rec["text"].shape == (2, 16)
