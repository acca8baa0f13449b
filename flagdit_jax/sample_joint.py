"""Sampling the joint model (`models/joint.py`): every marginal, conditional and joint distribution of
image and text from one set of weights, by the choice of the two times (UniDiffuser, REFERENCE.md §8,
in the Lumina convention t = 0 noise, t = 1 data):

  mode             image                               text
  'joint'          generated, t                        generated, same t
  'text_to_image'  generated, t                        the condition, clean, t_text = 1
  'image_to_text'  the condition, clean, t_image = 1   generated, t
  'image'          generated, t (marginal)             fresh N(0, I) noise held at t_text = 0
  'text'           fresh N(0, I) noise held at t = 0   generated, t (marginal)

Guidance needs no null-condition training: the unconditional velocity is the model's own marginal,
the condition replaced by fresh noise at time 0 (UniDiffuser's "true_uncond"), and the guided
velocity is v_u + s (v_c - v_u) (`samplers.cfg_combine`'s form: UniDiffuser's
(1 + s') eps_c - s' eps_u is s = 1 + s'). In 'joint' mode each modality is guided by its own
marginal (the other modality at noise, time 0), as UniDiffuser's joint sampler. `gibbs` alternates
image -> text and text -> image (UniDiffuser's blocked Gibbs sampling).

The whole ODE solve is one jitted function per (mode, n, shape) (`samplers.sample_ode` over the
{'image', 'text'} state of the generated modalities).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from flagdit_jax import tokens as tok
from flagdit_jax.flow import losses, paths, samplers

MODES = ("joint", "text_to_image", "image_to_text", "image", "text")


def make_joint_solver(s, n: int, shape: tuple[int, int, int] | None = None, *, mode: str, method: str,
                      num_steps: int, cfg_scale: float = 1.0, shift: float = 1.0):
    """Traceable `solve(params, key, image=None, text=None) -> {'image': frames [n, T, H, W, C], 'text': [n, S, D]}`.

    `image` (frames `[n, T, H, W, C]`) is the condition of 'image_to_text', `text` (`[n, S, D]`) that
    of 'text_to_image'; the output holds the generated modalities and, for the other one, its
    condition (or, in a marginal mode, the noise it was held at). `s` is the run's `train.Setup`
    (a joint model); `shape` (T, H, W) defaults to one `config.data.image_size` square frame.
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; expected one of {MODES}")
    cfg = s.model_cfg
    if getattr(cfg, "kind", "") != "joint":
        raise ValueError(f"joint sampling needs a joint model (models/joint.py), got {type(cfg).__name__}")
    if mode in ("image", "text") and cfg_scale != 1.0:
        raise ValueError(f"mode {mode!r} is a marginal: it has no condition to guide by (cfg_scale={cfg_scale}, "
                         f"expected 1.0)")
    if shape is None:
        shape = (1, s.config.data.image_size, s.config.data.image_size)
    text_shape = (n, cfg.text_len, cfg.text_dim)
    zeros = jnp.zeros((n, *shape, cfg.in_channels))
    layout = tok.pack_for(cfg, zeros)
    layouts = {k: tok.pack_for(cfg, jnp.concatenate([zeros] * k)) for k in (1, 2, 3)}
    path = paths.get_path(s.config.flow.path)
    t0, t1 = losses.sample_interval(path, "velocity")
    gen_image = mode in ("joint", "text_to_image", "image")
    gen_text = mode in ("joint", "image_to_text", "text")
    guided = cfg_scale != 1.0 and mode in ("joint", "text_to_image", "image_to_text")

    def net(params, xi, ti, xt, tt):
        lay = layouts[xi.shape[0] // n]
        return s.model.apply({"params": params}, lay.replace(tokens=xi), ti, text=xt, t_text=tt)

    def combine(c, u):
        return samplers.cfg_combine(c, u, cfg_scale)

    def solve(params, key, image=None, text=None):
        if mode == "image_to_text" and (image is None or jnp.shape(image) != zeros.shape):
            raise ValueError(f"image_to_text needs image frames of shape {zeros.shape}, got "
                             f"{None if image is None else jnp.shape(image)}")
        if mode == "text_to_image" and (text is None or jnp.shape(text) != text_shape):
            raise ValueError(f"text_to_image needs text of shape {text_shape}, got {None if text is None else jnp.shape(text)}")
        k_img, k_txt, k_noise_img, k_noise_txt = jax.random.split(key, 4)
        # A marginalised modality (and guidance's unconditional branch): fresh noise held at t = 0.
        noise_img = jax.random.normal(k_noise_img, layout.tokens.shape)
        noise_txt = jax.random.normal(k_noise_txt, text_shape)
        held_img, held_txt = noise_img, noise_txt
        zero, one = jnp.zeros((n,)), jnp.ones((n,))
        if mode == "image_to_text":
            held_img, t_held_img = tok.pack_for(cfg, jnp.asarray(image, jnp.float32)).tokens, one
        else:
            t_held_img = zero
        if mode == "text_to_image":
            held_txt, t_held_txt = jnp.asarray(text, jnp.float32), one
        else:
            t_held_txt = zero
        state = {}
        if gen_image:
            state["image"] = jax.random.normal(k_img, layout.tokens.shape)
        if gen_text:
            state["text"] = jax.random.normal(k_txt, text_shape)

        def velocity(x, t):
            tb = jnp.full((n,), t)
            xi, ti = (x["image"], tb) if gen_image else (held_img, t_held_img)
            xt, tt = (x["text"], tb) if gen_text else (held_txt, t_held_txt)
            if not guided:
                vi, vt = net(params, xi, ti, xt, tt)
            elif mode == "text_to_image":  # unconditional = the image marginal: text noise at t = 0
                v2, _ = net(params, jnp.concatenate([xi, xi]), jnp.concatenate([ti, ti]),
                            jnp.concatenate([xt, noise_txt]), jnp.concatenate([tt, zero]))
                vi, vt = combine(v2[:n], v2[n:]), None
            elif mode == "image_to_text":  # unconditional = the text marginal: image noise at t = 0
                _, v2 = net(params, jnp.concatenate([xi, noise_img]), jnp.concatenate([ti, zero]),
                            jnp.concatenate([xt, xt]), jnp.concatenate([tt, tt]))
                vi, vt = None, combine(v2[:n], v2[n:])
            else:  # joint: each modality guided by its own marginal
                v3i, v3t = net(params, jnp.concatenate([xi, xi, noise_img]), jnp.concatenate([ti, ti, zero]),
                               jnp.concatenate([xt, noise_txt, xt]), jnp.concatenate([tt, zero, tt]))
                vi, vt = combine(v3i[:n], v3i[n:2 * n]), combine(v3t[:n], v3t[2 * n:])
            return {k: v for k, v in (("image", vi), ("text", vt)) if k in x}

        out = samplers.sample_ode(velocity, state, method=method, num_steps=num_steps, shift=shift, t0=t0, t1=t1)
        img_tokens = out["image"] if gen_image else held_img
        frames = tok.unpack(img_tokens.reshape(layout.tokens.shape), layout)
        return {"image": frames, "text": out["text"] if gen_text else held_txt}

    return solve


def make_joint_generator(s, n: int, shape=None, *, mode: str, method: str, num_steps: int, cfg_scale: float = 1.0,
                         shift: float = 1.0):
    """Jitted `generate(params, key, image=None, text=None)`: `make_joint_solver` (arguments as there)."""
    solve = make_joint_solver(s, n, shape, mode=mode, method=method, num_steps=num_steps, cfg_scale=cfg_scale,
                              shift=shift)
    return jax.jit(solve)


def generate(config, params, s, mode: str, n: int, seed: int, *, image=None, text=None, cfg_scale=None,
             batch: int | None = None, shape=None) -> dict[str, np.ndarray]:
    """`{'image': [n, T, H, W, C] in [-1, 1], 'text': [n, S, D]}` in batches of `batch` (`config.sample`'s
    sampler; `cfg_scale` defaults to `config.sample.cfg_scale` for the conditional and joint modes, 1 for
    the marginals). `image` / `text` are the conditions (`[n, ...]`) of the conditional modes."""
    sc = config.sample
    if cfg_scale is None:
        cfg_scale = 1.0 if mode in ("image", "text") else float(sc.cfg_scale)
    batch = min(batch or n, n)
    gen = make_joint_generator(s, batch, shape, mode=mode, method=sc.method, num_steps=sc.num_steps,
                               cfg_scale=cfg_scale, shift=sc.get("shift", 1.0))

    def part(a, i):
        if a is None:
            return None
        a = np.asarray(a[i:i + batch], np.float32)
        return np.concatenate([a, np.repeat(a[:1], batch - len(a), 0)]) if len(a) < batch else a

    outs = []
    for i in range(0, n, batch):
        o = gen(params, jax.random.fold_in(jax.random.key(seed), i), part(image, i), part(text, i))
        outs.append(jax.tree.map(lambda a: np.asarray(a)[: min(batch, n - i)], o))
    res = {k: np.concatenate([o[k] for o in outs]) for k in ("image", "text")}
    res["image"] = np.clip(res["image"], -1.0, 1.0)
    return res


def gibbs(config, params, s, n: int, steps: int, seed: int, *, batch: int | None = None) -> dict[str, np.ndarray]:
    """Blocked Gibbs sampling between the two modalities: image_0 ~ the image marginal, then for k = 1..steps
    text_k ~ p(text | image_{k-1}) and image_k ~ p(image | text_k). Returns {'image': [steps + 1, n, T, H, W, C],
    'text': [steps, n, S, D]}."""
    if steps < 1:
        raise ValueError(f"gibbs steps={steps}; expected >= 1")
    images = [generate(config, params, s, "image", n, seed, batch=batch)["image"]]
    texts = []
    for k in range(1, steps + 1):
        texts.append(generate(config, params, s, "image_to_text", n, seed + 2 * k - 1, image=images[-1],
                              batch=batch)["text"])
        images.append(generate(config, params, s, "text_to_image", n, seed + 2 * k, text=texts[-1],
                               batch=batch)["image"])
    return {"image": np.stack(images), "text": np.stack(texts)}


def sample_grid(config, workdir, out=None) -> list:
    """`flagdit sample` for a joint run: PNG grids of text -> image (one row per digit, stroke words
    alternating thin / thick along the row), marginal images, joint pairs and Gibbs chains (one chain per
    row), and a JSON of the generated texts read back as words (joint pairs, image -> text on held-out
    digits, Gibbs). Returns the written paths."""
    import json
    import pathlib

    from flagdit_jax import sample, train
    from flagdit_jax.data.joint_mnist import DIGITS, STROKES

    params, s, step = sample.load_params(config, workdir, use_ema=config.sample.use_ema)
    src = train.make_source(config, "eval")
    folder = pathlib.Path(out) if out else pathlib.Path(workdir)
    folder.mkdir(parents=True, exist_ok=True)
    k, seed = int(config.sample.per_class), int(config.seed)
    labels, strokes = np.repeat(np.arange(10), k), np.tile(np.arange(k) % 2, 10)
    paths_out, words = [], {}

    def words_of(text):
        d, st = src.decode_text(text)
        return [f"{DIGITS[a]} {STROKES[b]}" for a, b in zip(d, st)]

    t2i = generate(config, params, s, "text_to_image", 10 * k, seed, text=src.text(labels, strokes))["image"]
    marg = generate(config, params, s, "image", 4 * k, seed)["image"]
    pair = generate(config, params, s, "joint", 4 * k, seed)
    held = np.stack([src[i]["frames"] for i in range(4 * k)])
    words["joint"] = words_of(pair["text"])
    words["image_to_text"] = dict(true=[f"{DIGITS[src.labels[i]]} {STROKES[src.strokes[i]]}" for i in range(4 * k)],
                                  generated=words_of(generate(config, params, s, "image_to_text", 4 * k, seed,
                                                              image=held)["text"]))
    chain = gibbs(config, params, s, 8, int(config.sample.get("gibbs_steps", 4)), seed)
    words["gibbs"] = [words_of(t) for t in chain["text"]]
    for name, imgs, rows in (("text_to_image", t2i, 10), ("marginal", marg, 4), ("joint", pair["image"], 4),
                             ("gibbs", chain["image"][:, :, 0].transpose(1, 0, 2, 3, 4).reshape(
                                 -1, *chain["image"].shape[3:]), 8)):
        p = folder / f"samples_{step}_{name}.png"
        sample.save_grid(p, imgs[:, 0] if imgs.ndim == 5 else imgs, rows=rows)
        paths_out.append(p)
    p = folder / f"samples_{step}_texts.json"
    p.write_text(json.dumps(words, indent=1))
    paths_out.append(p)
    for p in paths_out:
        print(f"wrote {p}")
    return paths_out
