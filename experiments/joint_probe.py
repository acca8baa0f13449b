"""Quick reading of a joint run (configs/joint/mnist.py): text -> image and image -> text digit accuracy on
N random held-out records, at one or more guidance scales. A cheap subset of `flagdit eval` (same sampler,
same classifier cache `workdir/feature_net`) for choosing steps or guidance.

    python experiments/joint_probe.py --workdir runs/joint --n 200 --cfg 2,4
"""

import argparse
import time

import numpy as np

from flagdit_jax import checkpoint, sample, sample_joint, train
from flagdit_jax.eval import classifier


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--cfg", default="2.0", help="comma-separated guidance scales")
    ap.add_argument("--seed", type=int, default=0, help="picks the held-out records")
    a = ap.parse_args()
    config = checkpoint.read_config(a.workdir)
    t0 = time.time()
    params, s, step = sample.load_params(config, a.workdir, use_ema=True)
    clf, _ = classifier.load_or_train(a.workdir, steps=config.eval.get("classifier_steps") or None)
    src = train.make_source(config, "eval")
    if not 0 < a.n <= len(src):
        raise SystemExit(f"--n={a.n}; expected 1..{len(src)} (the held-out records)")
    idx = np.random.default_rng(a.seed).choice(len(src), a.n, replace=False)  # the split is stored class by class
    labels, strokes = src.labels[idx], src.strokes[idx]
    frames = np.stack([src[i]["frames"] for i in idx])
    batch = min(a.n, int(config.eval.batch))
    for scale in (float(x) for x in a.cfg.split(",")):
        img = sample_joint.generate(config, params, s, "text_to_image", a.n, 1, text=src.text(labels, strokes),
                                    cfg_scale=scale, batch=batch)["image"]
        digit, _ = src.decode_text(sample_joint.generate(config, params, s, "image_to_text", a.n, 2, image=frames,
                                                         cfg_scale=scale, batch=batch)["text"])
        print(f"{a.workdir} step {step} guidance {scale}: text->image digit "
              f"{classifier.accuracy(clf, img[:, 0], labels):.3f}, stroke "
              f"{np.mean(src.stroke_of(img, labels) == strokes):.3f} | image->text digit {np.mean(digit == labels):.3f}"
              f" ({time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
