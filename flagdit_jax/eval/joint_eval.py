"""`flagdit eval` for the joint model (`configs/joint/mnist.py`): every mode of one set of weights,
read by judges independent of the generator (issue 14's checks).

* text -> image, guided by the model's own marginal (and unguided): the project's MNIST classifier
  reads the digit (accuracy against the captioned digit) and the ink rule reads the stroke word.
* image -> text on the 500 held-out digits: the generated text's nearest digit word against the
  true label (accuracy by generation), and its stroke word against the image's ink.
* marginal images: FID on the classifier's features against the held-out digits, beside the
  unconditional Flag-DiT trained for the same steps (`eval.baseline_workdir`) and the real-data floor,
  all at the same N with the same feature net.
* joint pairs: does the classifier's reading of the image agree with the generated text?
* blocked Gibbs chains: agreement of each step's text and image, and how often the digit persists.
"""

from __future__ import annotations

import json
import pathlib
import time

import numpy as np

from flagdit_jax import checkpoint, sample, sample_joint, train
from flagdit_jax.eval import classifier, fid as fidlib


def _fid(clf_params, images, real_feats) -> float:
    return float(fidlib.fid_from_features(classifier.features(clf_params, images), real_feats))


def baseline_samples(workdir, n: int, seed: int, batch: int) -> tuple[np.ndarray, int]:
    """`n` samples `[n, 32, 32, 1]` of the unconditional run in `workdir` (its own config and EMA params)."""
    config = checkpoint.read_config(workdir)
    if config.get("task") != "unconditional":
        raise ValueError(f"eval.baseline_workdir={workdir} is a {config.get('task')!r} run; expected the unconditional "
                         f"baseline (configs/joint/mnist.py:uncond)")
    params, s, step = sample.load_params(config, workdir, use_ema=config.sample.use_ema)
    config.sample.cfg_scale = 1.0  # nothing to guide by
    return sample.generate_images(config, params, s, np.zeros(n, np.int32), seed=seed, batch=batch), step


def run(config, workdir: str | pathlib.Path) -> dict:
    workdir = pathlib.Path(workdir)
    t0 = time.time()
    params, s, step = sample.load_params(config, workdir, use_ema=config.sample.use_ema)
    clf, _ = classifier.load_or_train(workdir, steps=config.eval.get("classifier_steps") or None)
    src = train.make_source(config, "eval")
    ec, sc = config.eval, config.sample
    n, batch, seed = min(int(ec.num_samples), len(src)), int(ec.batch), int(config.seed) + 1
    labels, strokes = src.labels[:n], src.strokes[:n]
    frames = np.stack([src[i]["frames"] for i in range(n)])
    real_feats = classifier.features(clf, frames[:, 0])
    rep = dict(step=step, n=n, sampler=dict(sc))

    def gen(mode, **kw):
        return sample_joint.generate(config, params, s, mode, n, seed, batch=batch, **kw)

    # (a) text -> image, guided by the marginal, and unguided.
    for name, scale in (("text_to_image", float(sc.cfg_scale)), ("text_to_image_unguided", 1.0)):
        img = gen("text_to_image", text=src.text(labels, strokes), cfg_scale=scale)["image"]
        rep[name] = dict(cfg_scale=scale, accuracy=classifier.accuracy(clf, img[:, 0], labels),
                         stroke_accuracy=float(np.mean(src.stroke_of(img, labels) == strokes)),
                         fid=_fid(clf, img[:, 0], real_feats))
        if name == "text_to_image":
            t2i = img
    # (b) image -> text on the held-out digits.
    for name, scale in (("image_to_text", float(sc.cfg_scale)), ("image_to_text_unguided", 1.0)):
        digit, stroke = src.decode_text(gen("image_to_text", image=frames, cfg_scale=scale)["text"])
        rep[name] = dict(cfg_scale=scale, accuracy=float(np.mean(digit == labels)),
                         stroke_accuracy=float(np.mean(stroke == strokes)))
    # (c) marginal images vs the unconditional baseline and the real-data floor (same N, same features).
    marg = gen("image")["image"]
    train_frames, _ = classifier.digits("train")
    rep["marginal_image"] = dict(fid=_fid(clf, marg[:, 0], real_feats))
    # n random train digits, as mnist_eval.baselines (the split is stored class by class: its first n are not a sample).
    pick = np.random.default_rng(int(config.seed)).choice(len(train_frames), size=n, replace=False)
    rep["real_floor_fid"] = _fid(clf, train_frames[pick], real_feats)
    if ec.get("baseline_workdir"):
        base, base_step = baseline_samples(ec.baseline_workdir, n, seed, batch)
        rep["unconditional_baseline"] = dict(workdir=str(ec.baseline_workdir), step=base_step,
                                             fid=_fid(clf, base, real_feats))
        rep["marginal_over_baseline"] = rep["marginal_image"]["fid"] / rep["unconditional_baseline"]["fid"]
    # Marginal text: how the generated digit words spread over the ten classes (uniform data).
    digit_m, _ = src.decode_text(gen("text")["text"])
    rep["marginal_text_digit_counts"] = np.bincount(digit_m, minlength=10).tolist()
    # Joint pairs: the classifier's reading of the image against the generated text.
    pair = gen("joint")
    digit_j, stroke_j = src.decode_text(pair["text"])
    read = classifier.logits(clf, pair["image"][:, 0]).argmax(-1)
    rep["joint"] = dict(cfg_scale=float(sc.cfg_scale), digit_agreement=float(np.mean(read == digit_j)),
                        stroke_agreement=float(np.mean(src.stroke_of(pair["image"], digit_j) == stroke_j)),
                        fid=_fid(clf, pair["image"][:, 0], real_feats))
    # Blocked Gibbs: chains of gibbs_steps image -> text -> image rounds.
    k, m = int(sc.get("gibbs_steps", 4)), min(n, 100)
    chain = sample_joint.gibbs(config, params, s, m, k, seed, batch=min(batch, m))
    read = np.stack([classifier.logits(clf, im[:, 0]).argmax(-1) for im in chain["image"]])  # [k + 1, m]
    words = np.stack([src.decode_text(t)[0] for t in chain["text"]])  # [k, m]
    rep["gibbs"] = dict(steps=k, chains=m,
                        text_reads_previous_image=[float(np.mean(words[i] == read[i])) for i in range(k)],
                        image_shows_text=[float(np.mean(read[i + 1] == words[i])) for i in range(k)],
                        digit_kept_from_start=[float(np.mean(read[i] == read[0])) for i in range(k + 1)])
    rep["eval_seconds"] = round(time.time() - t0, 1)

    out = workdir / f"eval_{step}.json"
    out.write_text(json.dumps(rep, indent=1))
    # Strips: text -> image (first 10 held-out captions), marginal, joint pairs, one Gibbs chain per row.
    sample.save_grid(workdir / f"eval_{step}_text_to_image.png", t2i[:40, 0], rows=4)
    sample.save_grid(workdir / f"eval_{step}_marginal.png", marg[:40, 0], rows=4)
    sample.save_grid(workdir / f"eval_{step}_joint.png", pair["image"][:40, 0], rows=4)
    sample.save_grid(workdir / f"eval_{step}_gibbs.png",
                     chain["image"][:, :8, 0].transpose(1, 0, 2, 3, 4).reshape(-1, *chain["image"].shape[3:]),
                     rows=8)
    a, b = rep["text_to_image"], rep["image_to_text"]
    print(f"step {step}: N={n}, {sc.method} x{sc.num_steps}, guidance {sc.cfg_scale} from the marginal")
    print(f"  text -> image: digit accuracy {a['accuracy']:.3f} (unguided {rep['text_to_image_unguided']['accuracy']:.3f}),"
          f" stroke {a['stroke_accuracy']:.3f}")
    print(f"  image -> text: digit accuracy {b['accuracy']:.3f} (unguided {rep['image_to_text_unguided']['accuracy']:.3f}),"
          f" stroke {b['stroke_accuracy']:.3f}")
    line = f"  marginal image FID {rep['marginal_image']['fid']:.2f} (real floor {rep['real_floor_fid']:.2f})"
    if "unconditional_baseline" in rep:
        line += (f"; unconditional Flag-DiT {rep['unconditional_baseline']['fid']:.2f} -> "
                 f"{rep['marginal_over_baseline']:.2f}x")
    print(line)
    print(f"  joint pairs: digit agreement {rep['joint']['digit_agreement']:.3f}, stroke "
          f"{rep['joint']['stroke_agreement']:.3f}; Gibbs image shows text {rep['gibbs']['image_shows_text']}")
    print(f"wrote {out} ({rep['eval_seconds']} s)")
    return rep
