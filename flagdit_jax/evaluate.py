"""`flagdit eval`: sample from a training workdir's EMA params and score the samples.

For the embedded MNIST default: FID on the features of the project's own MNIST classifier
(trained once, cached in the workdir) against the held-out digits, and class-conditional
accuracy, printed beside the real-data floor, noise and class-mean baselines at the same N.

For the embedded text-to-image run (`configs/t2i/mnist.py`): prompt following. Prompts cover every
digit x layout (size, place, canvas) x phrasing in turn; each sample is decoded with the run's VAE
and read by `eval/layout_eval.py` (digit by the MNIST classifier, place by the ink centroid, size by
the ink extent), beside the same reading of real held-out renders (the floor).
"""

from __future__ import annotations

import json
import pathlib
import time

import numpy as np

from flagdit_jax import sample


# The embedded modalities' own checks (issue 14): data name -> module with `run(config, workdir) -> dict`.
MODALITY_EVALS = {"moving_mnist": "flagdit_jax.eval.video_eval", "multiview": "flagdit_jax.eval.multiview_eval",
                  "sounds": "flagdit_jax.eval.audio_eval"}


def run(config, workdir: str | pathlib.Path) -> dict:
    if config.data.name == "encoded" and config.get("encode") and config.encode.source == "mnist_t2i":
        return run_layout(config, workdir)
    if config.get("task") == "joint":
        from flagdit_jax.eval import joint_eval

        return joint_eval.run(config, workdir)
    # A modality's latent cache ('encoded' from e.g. moving_mnist) is judged as its raw source is.
    name = config.encode.source if config.data.name == "encoded" and config.get("encode") else config.data.name
    if name in MODALITY_EVALS:
        import importlib

        return importlib.import_module(MODALITY_EVALS[name]).run(config, workdir)
    if config.data.name != "mnist":
        raise ValueError(f"flagdit eval supports the embedded runs (config.data.name='mnist', or 'encoded' from "
                         f"'mnist_t2i'); got {config.data.name!r} (ImageNet FID needs the user's Inception weights)")
    from flagdit_jax.eval import classifier, mnist_eval

    workdir = pathlib.Path(workdir)
    t0 = time.time()
    # The checkpoint first (a missing or mismatched one fails before any classifier training), then
    # the cached feature net, which `report` reuses.
    params, s, step = sample.load_params(config, workdir, use_ema=config.sample.use_ema)
    classifier.load_or_train(workdir, steps=config.eval.get("classifier_steps") or None)
    n = config.eval.num_samples
    labels = np.arange(n) % s.model_cfg.num_classes
    images = sample.generate_images(config, params, s, labels, seed=config.seed + 1, batch=config.eval.batch)
    t_sample = time.time() - t0
    rep = mnist_eval.report(workdir, images, labels, seed=config.seed)
    gen, base = rep["generated"], rep["baselines"]
    rep.update(step=step, sampler=dict(config.sample), sample_seconds=round(t_sample, 1),
               eval_seconds=round(time.time() - t0, 1),
               fid_over_floor=gen["fid"] / base["real_floor"]["fid"])
    out = mnist_eval.write_report(workdir / f"eval_{step}.json", rep)
    print(f"step {step}: {n} samples ({config.sample.method} x{config.sample.num_steps}, cfg {config.sample.cfg_scale})")
    print(f"  class-conditional accuracy {gen['accuracy']:.3f}   FID {gen['fid']:.2f}  "
          f"({rep['fid_over_floor']:.2f}x the real-data floor)")
    for name in ("real_floor", "noise", "class_mean"):
        print(f"  baseline {name:<11} FID {base[name]['fid']:8.2f}   accuracy {base[name]['accuracy']:.3f}")
    print(f"wrote {out}")
    return rep


def layout_prompts(n: int) -> list[dict]:
    """`n` requests [{'label', 'size', 'position', 'canvas', 'template', 'caption', 'box'}]: request
    i = 10k + d asks for digit d in layout (d + k) mod 18, so any 10 consecutive requests hold every
    digit, 180 hold every digit in every layout, and the phrasing changes every 180."""
    from flagdit_jax.data import mnist_t2i as m

    lay = m.layouts()
    out = []
    for i in range(n):
        label, k = i % 10, i // 10
        size, position, canvas = lay[(label + k) % len(lay)]
        template = (k // len(lay)) % len(m.TEMPLATES)
        out.append(dict(label=label, size=size, position=position, canvas=canvas, template=template,
                        caption=m.caption_for(label, size, position, canvas, template),
                        box=m.box_for(size, position, canvas)))
    return out


def size_threshold(opts: dict, n: int = 2000) -> float:
    """The small / large ink-extent threshold measured on `n` random real training renders of square
    canvases (`MnistT2I("train", **opts)`; random, since records are ordered by digit)."""
    from flagdit_jax.data import mnist_t2i
    from flagdit_jax.eval import layout_eval

    real = mnist_t2i.MnistT2I("train", **opts)
    recs = [real[int(i)] for i in np.random.default_rng(0).permutation(len(real))[:n]]
    ext = {k: layout_eval.ink_stats(np.stack([r["image"] for r in recs if r["size"] == k and r["canvas"] == 0]))
           ["extent"] for k in (0, 1)}
    return layout_eval.calibrate(ext[0], ext[1])


def run_layout(config, workdir: str | pathlib.Path) -> dict:
    """Prompt following of a text-to-image run on the embedded data; writes `eval_<step>.json`."""
    from flagdit_jax.data import mnist_t2i
    from flagdit_jax.eval import classifier, layout_eval

    workdir = pathlib.Path(workdir)
    t0 = time.time()
    params, s, step = sample.load_params(config, workdir, use_ema=config.sample.use_ema)
    vae = sample._vae_of(config)
    clf_params, info = classifier.load_or_train(workdir, steps=config.eval.get("classifier_steps") or None)
    opts = dict(config.encode.get("options", {}))
    threshold = size_threshold(opts)

    reqs = layout_prompts(config.eval.num_samples)
    cond = sample.encode_prompts(config, s, [r["caption"] for r in reqs])
    images = [None] * len(reqs)
    f = vae.downsample if vae is not None else 1
    for canvas, (h, w) in enumerate(mnist_t2i.CANVASES):
        rows = [i for i, r in enumerate(reqs) if r["canvas"] == canvas]
        if not rows:
            continue
        part = {k: v[rows] for k, v in cond.items()}
        frames = sample.decode(vae, sample.generate(config, params, s, part, seed=config.seed + 1 + canvas,
                                                    shape=(1, h // f, w // f), batch=config.eval.batch))
        for i, img in zip(rows, frames[:, 0]):
            images[i] = img
    t_sample = time.time() - t0
    get = lambda key: np.array([r[key] for r in reqs])  # noqa: E731
    by_canvas = {}
    for canvas, name in enumerate(mnist_t2i.CANVAS_NAMES):
        rows = [i for i, r in enumerate(reqs) if r["canvas"] == canvas]
        if rows:
            by_canvas[name] = layout_eval.score(np.stack([images[i] for i in rows]), get("label")[rows],
                                                get("box")[rows], get("size")[rows], classifier_params=clf_params,
                                                size_threshold=threshold)
    gen = _pool(by_canvas)
    # The floor: real held-out renders read the same way.
    real = mnist_t2i.MnistT2I("eval", **opts)
    floor_parts = {}
    for canvas, name in enumerate(mnist_t2i.CANVAS_NAMES):
        rr = [real[i] for i in range(min(len(real), 3 * config.eval.num_samples)) if real.layout(i)[2] == canvas]
        rr = rr[: max(1, config.eval.num_samples // 3)]
        floor_parts[name] = layout_eval.score(np.stack([r["image"] for r in rr]), np.array([r["label"] for r in rr]),
                                              np.stack([r["box"] for r in rr]), np.array([r["size"] for r in rr]),
                                              classifier_params=clf_params, size_threshold=threshold)
    rep = dict(step=step, n=len(reqs), generated=gen, by_canvas=by_canvas, real_floor=_pool(floor_parts),
               size_threshold_px=threshold, classifier_heldout_accuracy=info.get("heldout_accuracy"),
               sampler=dict(config.sample), sample_seconds=round(t_sample, 1),
               eval_seconds=round(time.time() - t0, 1))
    out = workdir / f"eval_{step}.json"
    out.write_text(json.dumps(rep, indent=1))
    path = workdir / f"eval_{step}.png"
    order = sorted(range(len(reqs)), key=lambda i: (reqs[i]["canvas"], i))
    for canvas, (h, w) in enumerate(mnist_t2i.CANVASES):  # one strip per canvas: the first 10 requests
        rows = [i for i in order if reqs[i]["canvas"] == canvas][:10]
        if not rows:
            continue
        sample.save_grid(path.with_name(f"eval_{step}_{mnist_t2i.CANVAS_NAMES[canvas]}.png"),
                         np.stack([images[i] for i in rows]), rows=1)
    print(f"step {step}: {len(reqs)} prompts ({config.sample.method} x{config.sample.num_steps}, "
          f"cfg {config.sample.cfg_scale}); {t_sample:.0f} s")
    fl = rep["real_floor"]
    print(f"  digit {gen['digit']:.3f}  position {gen['position']:.3f}  size {gen['size']:.3f}  all {gen['all']:.3f}"
          f"   (real renders: {fl['digit']:.3f} / {fl['position']:.3f} / {fl['size']:.3f} / {fl['all']:.3f})")
    for name, sc in by_canvas.items():
        print(f"  {name:<6} digit {sc['digit']:.3f}  position {sc['position']:.3f}  size {sc['size']:.3f}  (n={sc['n']})")
    print(f"wrote {out}")
    return rep


def _pool(parts: dict) -> dict:
    """Sample-weighted mean of the share metrics of several `layout_eval.score` results."""
    n = sum(p["n"] for p in parts.values())
    return {"n": n, **{k: sum(p[k] * p["n"] for p in parts.values()) / n
                       for k in ("digit", "position", "size", "all", "empty")}}


# ------------------------------------------------------------------------ ADM suite (ImageNet-style)

def _inception(inception_weights, feature_fn, batch_size: int = 200):
    if feature_fn is not None:
        return feature_fn
    if not inception_weights:
        raise ValueError("the ADM suite needs Inception-v3 weights (pytorch-fid's pt_inception-2015-12-05 .pth): "
                         "pass --inception PATH")
    from flagdit_jax.eval.inception import InceptionFeatures

    return InceptionFeatures(inception_weights, batch_size=batch_size)


def run_adm(config, samples, reference, inception_weights=None, *, feature_fn=None, out=None,
            batch: int = 500) -> dict:
    """ADM's FID, sFID, IS, precision and recall of the sample shards `samples` (a folder of
    `samples-*-of-*.npz` from `eval.sample_batch.write_samples`, or one ADM-format `.npz` with `arr_0`)
    against the reference batch `reference` (`eval.adm.read_reference`: ours or ADM's VIRTUAL_*.npz), on
    the features of `inception_weights` (or `feature_fn`: uint8 [n, H, W, 3] -> feature dict). Writes
    `adm_eval.json` beside the samples (or to `out`) and returns the report."""
    from flagdit_jax.eval import adm, sample_batch

    t0 = time.time()
    order = sample_batch.sample_order(samples)  # validates the shards before any feature pass
    reference = pathlib.Path(reference)
    if not reference.is_file():
        raise FileNotFoundError(f"no reference batch at {reference}")
    fn = _inception(inception_weights, feature_fn)
    ref = adm.read_reference(reference, fn, batch=batch)
    feats = adm.features_of(sample_batch.iter_samples(samples, batch), fn)
    feats = {k: v[order] for k, v in feats.items()}  # global index order: IS splits are consecutive indices
    metrics = adm.evaluate(feats, ref, split_size=int(config.get("eval", {}).get("is_split_size", 5000))
                           if config is not None else 5000)
    rep = dict(metrics, num_samples=int(len(order)), reference=str(reference), samples=str(samples),
               seconds=round(time.time() - t0, 1))
    path = pathlib.Path(out) if out else (pathlib.Path(samples) if pathlib.Path(samples).is_dir()
                                          else pathlib.Path(samples).parent) / "adm_eval.json"
    path.write_text(json.dumps(rep, indent=1))
    print(f"{len(order)} samples vs {reference.name}: FID {metrics['fid']:.3f}  sFID {metrics['sfid']:.3f}  "
          f"IS {metrics['is']:.2f}  precision {metrics['precision']:.4f}  recall {metrics['recall']:.4f}")
    print(f"wrote {path}")
    return rep


def run_reference(images, output, inception_weights=None, *, feature_fn=None, keep_images: bool = False,
                  batch: int = 500):
    """An ADM-format reference batch at `output` from uint8 images: `images` is an `.npz` with `arr_0`
    [N, H, W, 3] (e.g. ADM's VIRTUAL_*.npz or the ImageNet pipeline's crops) or a folder of sample shards.
    Stores the statistics and the raw features; the images too (`arr_0`) when `keep_images`."""
    from flagdit_jax.eval import adm, sample_batch

    fn = _inception(inception_weights, feature_fn)
    order = sample_batch.sample_order(images)
    feats = adm.features_of(sample_batch.iter_samples(images, batch), fn)
    feats = {k: v[order] for k, v in feats.items() if k in adm.FEATURE_KEYS}
    arr = sample_batch.load_samples(images)[0] if keep_images else None
    path = adm.write_reference(output, feats, arr)
    print(f"wrote {path}: {len(order)} images, pool {feats['pool'].shape[1]} / spatial {feats['spatial'].shape[1]}")
    return path
