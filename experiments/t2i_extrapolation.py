"""Resolution extrapolation of the embedded text-to-image model (REFERENCE.md §6), scored like
`experiments/extrapolation.py`: prompts for square-canvas layouts are sampled at the training size
(32x32 px) and at larger squares (48x48 = 2.25x and 64x64 = 4x the area: positions the model never
saw) with each extrapolation technique of the pipeline (`applications.extrapolation.variants`: time
shifting, proportional attention, NTK, PI, Lumina-Next's time-aware RoPE, ...), shrunk back to
32x32 and read by `eval/layout_eval.py`: is the prompt's digit drawn, at its place and size?

    flagdit train --config configs/t2i/mnist.py:next --workdir runs/t2i_next
    python experiments/t2i_extrapolation.py --workdir runs/t2i_next [--num 100]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import numpy as np

from flagdit_jax import checkpoint, evaluate, pretrained, sample
from flagdit_jax.applications import extrapolation
from flagdit_jax.eval import classifier, layout_eval


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--num", type=int, default=100, help="prompts per row (square-canvas layouts)")
    ap.add_argument("--sizes", default="48x48,64x64")
    ap.add_argument("--steps", type=int, default=21, help="grid points of the solver")
    ap.add_argument("--method", default="heun")
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--out", default=None, help="JSON (default experiments/results/t2i_extrapolation_<run>.json)")
    args = ap.parse_args(argv)
    t0 = time.time()
    workdir = pathlib.Path(args.workdir)
    config = checkpoint.read_config(workdir)
    pipe = pretrained.pipeline_from_run(config, workdir)
    _, s, step = sample.load_params(config, workdir)
    reqs = [r for r in evaluate.layout_prompts(40 * args.num) if r["canvas"] == 0][: args.num]
    cond = sample.encode_prompts(config, s, [r["caption"] for r in reqs])
    null = s.task.null_cond(len(reqs))
    uncond = {k: np.asarray(v) for k, v in null.items()}
    clf_params, _ = classifier.load_or_train(workdir)
    threshold = evaluate.size_threshold(dict(config.encode.get("options", {})))
    labels, boxes, sizes = (np.array([r[k] for r in reqs]) for k in ("label", "box", "size"))

    def score(images):
        r = layout_eval.score(images, labels, boxes, sizes, classifier_params=clf_params, size_threshold=threshold)
        return {k: r[k] for k in ("digit", "position", "size", "all")}

    table = extrapolation.score_table(
        pipe, cond, uncond, score, sizes=[tuple(int(v) for v in hw.split("x")) for hw in args.sizes.split(",")],
        batch=args.num, num_inference_steps=args.steps, method=args.method, guidance_scale=args.guidance)
    out = pathlib.Path(args.out or pathlib.Path(__file__).parent / "results" / f"t2i_extrapolation_{workdir.name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    rep = dict(workdir=str(workdir), step=step, num=args.num, sampler=dict(method=args.method, steps=args.steps,
               guidance=args.guidance), results=table, seconds=round(time.time() - t0, 1))
    out.write_text(json.dumps(rep, indent=1))
    print(f"wrote {out} ({rep['seconds']} s)")
    return rep


if __name__ == "__main__":
    main()
