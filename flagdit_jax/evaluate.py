"""`flagdit eval`: sample from a training workdir's EMA params and score the samples.

For the embedded MNIST default: FID on the features of the project's own MNIST classifier
(trained once, cached in the workdir) against the held-out digits, and class-conditional
accuracy, printed beside the real-data floor, noise and class-mean baselines at the same N.
"""

from __future__ import annotations

import pathlib
import time

import numpy as np

from flagdit_jax import sample


def run(config, workdir: str | pathlib.Path) -> dict:
    if config.data.name != "mnist":
        raise ValueError(f"flagdit eval supports config.data.name='mnist' (the embedded default); got "
                         f"{config.data.name!r} (ImageNet FID needs the user's Inception weights)")
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
