"""Small-scale twins of the papers' tables, on the embedded MNIST data and 2 CPU cores.

Each twin is a sweep of short `flagdit train` runs of the embedded default (configs/default.py) that
differ in one thing, scored the way the default is scored: FID on the project's MNIST feature
network against the 500 held-out digits (N = 500 samples, same sampler, same noise for every run
and checkpoint), plus class-conditional accuracy. The twins and the paper claim each one tests:

  a  model size vs convergence: FID vs step for three Flag-DiT sizes ("bigger converges faster")
  b  Flag-DiT vs DiT vs SiT at equal steps and data (paper's ImageNet table / curves)
  c  1-D RoPE + [nextline] (and 2-D RoPE) vs absolute position embedding at unseen resolutions
  d  logit-normal vs uniform time sampling
  e  ODE vs SDE samplers and step counts: FID vs NFE
  f  Next-DiT vs Flag-DiT at equal steps (Lumina-Next's convergence claim)

    python experiments/twins.py sweep --twins a,b,c,d,e,f --root runs/twins   # all, in sequence
    python experiments/twins.py commands --twins b --root runs/twins          # one line per run
    python experiments/twins.py run flag-lognorm-s0 --root runs/twins         # one run (a cluster task)
    python experiments/twins.py report --twins b --root runs/twins            # table + plot

`commands` prints one `run` command per line (a SLURM array: `sed -n "${SLURM_ARRAY_TASK_ID}p"`;
a TPU pod: one line per host), then the `report` command that needs them all. Runs are shared
between twins (the Flag-DiT baseline appears in a, b, c, d, e and f) and skipped when finished.
Reports go to experiments/results/twin_{x}.{json,md,png}.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import pathlib
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
RESULTS = REPO / "experiments" / "results"

STEPS = 1000        # training steps of every run (the default trains 3,200)
N_EVAL = 500        # samples per FID (the held-out set has 500 digits)

# Backbones at the default's size unless named otherwise (dim, layers, heads).
_FLAG = dict(preset="flagdit-tiny", dim=128, n_layers=4, n_heads=4, n_kv_heads=None, patch_size=4, multiple_of=128)
MODELS = {
    "flag": dict(_FLAG),                                            # 1-D RoPE, no [nextline] (ImageNet Flag-DiT)
    "flag_s": dict(_FLAG, dim=64, n_layers=2, n_heads=4, multiple_of=64),
    "flag_l": dict(_FLAG, dim=192, n_layers=6, n_heads=6),
    "flag_nl": dict(_FLAG, nextline=True),                          # 1-D RoPE + [nextline] (Lumina-T2X)
    "next": dict(_FLAG, preset="nextdit-tiny"),                     # 2-D RoPE, sandwich norms (Lumina-Next)
    "dit": dict(preset="dit-tiny", dim=128, n_layers=4, n_heads=4, patch_size=4, input_size=8),  # APE
}
# Training objectives (REFERENCE.md §3). 'vp_noise' is DiT's DDPM recipe in this framework: the VP
# (DDPM-limit) path with noise prediction and uniform t, sampled through its probability-flow ODE.
OBJECTIVES = {
    "lognorm": dict(path="linear", time_sampler="lognorm", prediction="velocity"),  # Flag-DiT / Next-DiT
    "uniform": dict(path="linear", time_sampler="uniform", prediction="velocity"),  # SiT
    "vp_noise": dict(path="vp", time_sampler="uniform", prediction="noise"),        # DiT
}


@dataclasses.dataclass(frozen=True)
class Run:
    model: str
    objective: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.model}-{self.objective}-s{self.seed}"

    @classmethod
    def parse(cls, name: str) -> "Run":
        try:
            model, objective, seed = name.split("-")
            run = cls(model, objective, int(seed.removeprefix("s")))
        except ValueError:
            raise ValueError(f"run name {name!r}; expected MODEL-OBJECTIVE-sSEED, e.g. flag-lognorm-s0") from None
        if model not in MODELS or objective not in OBJECTIVES:
            raise ValueError(f"run {name!r}: model must be one of {sorted(MODELS)}, objective one of {sorted(OBJECTIVES)}")
        return run


def _runs(spec: str) -> list[Run]:
    return [Run.parse(n) for n in spec.split()]


# The arms of each twin: label -> runs (seeds averaged). Seeds are what one 3-hour session on 2 shared cores
# could train (about 20 min per run with its scoring); add `-s1`, `-s2` runs to an arm to average more.
TWINS = {
    "a": {"title": "Model size vs convergence (Flag-DiT, logit-normal t)",
          "claim": "a bigger Flag-DiT reaches a lower FID at every step (Lumina-T2X scaling curves)",
          "arms": {"Flag-DiT S (dim 64, 2 layers)": _runs("flag_s-lognorm-s0"),
                   "Flag-DiT M (dim 128, 4 layers)": _runs("flag-lognorm-s0 flag-lognorm-s1"),
                   "Flag-DiT L (dim 192, 6 layers)": _runs("flag_l-lognorm-s0 flag_l-lognorm-s1")}},
    "b": {"title": "Flag-DiT vs DiT vs SiT, equal steps and data",
          "claim": "Flag-DiT beats the DiT and SiT baselines at equal training steps (Lumina-T2X ImageNet table)",
          "arms": {"DiT (APE, adaLN-Zero; VP noise-prediction)": _runs("dit-vp_noise-s0"),
                   "SiT (DiT backbone; linear flow, uniform t)": _runs("dit-uniform-s0"),
                   "Flag-DiT, uniform t (backbone only)": _runs("flag-uniform-s0 flag-uniform-s1"),
                   "Flag-DiT (logit-normal t)": _runs("flag-lognorm-s0 flag-lognorm-s1")}},
    "c": {"title": "Position embedding at unseen resolutions (trained at 32x32)",
          "claim": "RoPE + [nextline] keeps working at unseen resolutions where APE fails",
          "arms": {"APE (SiT backbone)": _runs("dit-uniform-s0"),
                   "1-D RoPE, no [nextline]": _runs("flag-lognorm-s0"),
                   "1-D RoPE + [nextline] (Flag-DiT)": _runs("flag_nl-lognorm-s0"),
                   "2-D RoPE (Next-DiT)": _runs("next-lognorm-s0")}},
    "d": {"title": "Logit-normal vs uniform time sampling (Flag-DiT)",
          "claim": "logit-normal t sampling converges faster than uniform (Lumina-T2X / SD3)",
          "arms": {"uniform t": _runs("flag-uniform-s0 flag-uniform-s1"),
                   "logit-normal t": _runs("flag-lognorm-s0 flag-lognorm-s1")}},
    "e": {"title": "ODE vs SDE samplers: FID vs NFE (Flag-DiT M, final EMA)",
          "claim": "higher-order ODE solvers reach a given FID at far fewer NFE than Euler or the SDE",
          "arms": {"Flag-DiT M": _runs("flag-lognorm-s0")}},
    "f": {"title": "Next-DiT vs Flag-DiT, equal steps",
          "claim": "Next-DiT converges faster than Flag-DiT (Lumina-Next)",
          # A third seed here: at 1,000 steps the two seeds left the gap (10 FID) inside the spread.
          "arms": {"Flag-DiT": _runs("flag-lognorm-s0 flag-lognorm-s1 flag-lognorm-s2"),
                   "Next-DiT": _runs("next-lognorm-s0 next-lognorm-s1 next-lognorm-s2")}},
}
SIDES = (32, 48, 64)  # twin c: the training size, then unseen sizes (2.25x and 4x the tokens)
C_SAMPLER = ("heun", 10)  # twin c samples 4 models at 3 sizes: half the default's steps keeps it ~15 min
# Twin c's sampling-time RoPE scaling rows (no retraining), Lumina's inference options at the linear
# scale s = side / 32 for a model whose 32x32 sequence has l0 tokens: label -> (s, l0) -> InferenceOptions
# fields, plus 'shift' (the sampler's time shift) for the papers' full recipes (REFERENCE.md §4, §6).
# Proportional attention's base is the trained length: (S/16)^2 tokens at size S for Lumina-Next, and
# with the [nextline] tokens for Lumina-T2I, i.e. l0 either way.
_NEXT_RECIPE = "Lumina-Next recipe (time-aware RoPE @0.3 + prop. attn + shift 4)"
C_SCALINGS = {
    "NTK (ntk_factor = s)": lambda s, l0: dict(ntk_factor=s),
    "PI (pi_factor = s)": lambda s, l0: dict(pi_factor=s),
    "prop. attn (base_seqlen = 32x32 length)": lambda s, l0: dict(base_seqlen=l0),
    # LT lumina_t2i/demo.py: theta * (token-count ratio) = NTK s^2, proportional attention, shift 4.
    "Lumina-T2I recipe (NTK s^2 + prop. attn + shift 4)": lambda s, l0: dict(ntk_factor=s * s, base_seqlen=l0,
                                                                              shift=4.0),
    # LT lumina_next_t2i/demo.py: the code's time-aware switch (PI while t < 0.3, NTK theta * s after),
    # proportional attention, shift 4. Next-DiT only (Flag-DiT has no time-aware RoPE).
    _NEXT_RECIPE: lambda s, l0: dict(
        scale_factor=s, rope_scaling="watershed", scale_watershed=0.3, base_seqlen=l0, shift=4.0),
}
C_SCALED_ARMS = ("1-D RoPE + [nextline] (Flag-DiT)", "2-D RoPE (Next-DiT)")  # the RoPE models Lumina scales
C_SCALING_ARMS = {_NEXT_RECIPE: ("2-D RoPE (Next-DiT)",)}


def scaled_arms(row: str) -> tuple[str, ...]:
    """The twin c arms that scaling row `row` applies to."""
    return C_SCALING_ARMS.get(row, C_SCALED_ARMS)


# Twin e: (label, method, steps list); NFE = steps x NFE per step (+1 for the SDE's last mean step).
SAMPLER_SWEEP = (("Euler ODE", "euler", (4, 8, 16, 32)), ("Heun ODE", "heun", (2, 4, 8, 16)),
                 ("Euler-Maruyama SDE", "sde", (8, 16, 32, 64)))
_NFE_PER_STEP = {"euler": 1, "heun": 2, "midpoint": 2, "rk4": 4}


# ------------------------------------------------------------------------------------------------
# configs and runs
# ------------------------------------------------------------------------------------------------

def run_config(run: Run, steps: int = STEPS):
    """configs/default.py with this run's backbone, objective and seed; a checkpoint every steps / 4."""
    spec = importlib.util.spec_from_file_location("flagdit_default_config", REPO / "configs" / "default.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config()
    base = {k: c.model[k] for k in ("in_channels", "num_classes", "class_dropout_prob", "dtype", "remat",
                                    "attention", "scan_layers", "sequence_parallel")}
    c.model = type(c.model)(dict(base, **MODELS[run.model]))
    c.flow = type(c.flow)(OBJECTIVES[run.objective])
    c.seed = run.seed
    c.total_steps = steps
    c.checkpoint.every_steps = max(1, steps // 4)
    c.checkpoint.keep = 5
    c.log_every_steps = max(1, steps // 4)
    return c


def run_dir(root, run: Run) -> pathlib.Path:
    return pathlib.Path(root) / "runs" / run.name


def classifier_of(root):
    """The MNIST feature network, trained once per sweep root (cached in {root}/classifier)."""
    from flagdit_jax.eval import classifier

    return classifier.load_or_train(pathlib.Path(root) / "classifier")


def restore_ema(s, workdir, step: int):
    """EMA params of checkpoint `step` in `workdir`, for the run's `train.Setup` `s`."""
    import orbax.checkpoint as ocp

    from flagdit_jax import checkpoint

    mngr = ocp.CheckpointManager(pathlib.Path(workdir).absolute() / "checkpoints",
                                 options=ocp.CheckpointManagerOptions(read_only=True))
    try:
        return checkpoint.restore_params(mngr, step, "ema_params", s.abstract_state.ema_params, s.model_cfg)
    finally:
        mngr.close()


def final_params(root, run: Run):
    """(config, setup, EMA params) of `run`'s last checkpoint."""
    from flagdit_jax import train

    steps = _load(root, run)["steps"]
    config = run_config(run, steps)
    s, _ = train.setup(config)
    return config, s, restore_ema(s, run_dir(root, run), steps)


def score(root, images, labels) -> dict:
    """FID / accuracy of `images` [N, 32, 32, 1] in [-1, 1] (the project's MNIST evaluator)."""
    from flagdit_jax.eval import mnist_eval

    r = mnist_eval.evaluate(pathlib.Path(root) / "classifier", images, labels, classifier=classifier_of(root))
    return {"fid": r["fid"], "accuracy": r["accuracy"]}


class Sampler:
    """N class-conditional samples (labels 0..9 cycled) at `side` x `side` ([N, side, side, 1] from
    `__call__`; `to_32` fits them to the evaluator); compiled once per (side, method, steps, options).
    The same seed everywhere: every run and checkpoint is scored on the same initial noise.
    `options`: a `models.common.InferenceOptions` for every model call (RoPE scaling etc.); `shift`: the
    sampler's time shift (default the config's)."""

    def __init__(self, config, s, *, side: int = 32, method=None, num_steps=None, n: int = N_EVAL, options=None,
                 shift=None):
        from flagdit_jax import sample as smp

        if n < 2 or n % 2:
            raise ValueError(f"n={n} samples: expected an even number >= 2 (drawn in two halves)")
        sc = config.sample
        self.side, self.n, self.half = side, n, n // 2
        self.gen = smp.make_generator(s, self.half, (1, side, side), method=method or sc.method,
                                      num_steps=num_steps or sc.num_steps, cfg_scale=sc.cfg_scale,
                                      shift=sc.shift if shift is None else shift, options=options)

    def __call__(self, params, seed: int = 1):
        import jax
        import jax.numpy as jnp

        labels = np.arange(self.n) % 10
        out = []
        for i in range(0, self.n, self.half):
            key = jax.random.fold_in(jax.random.key(seed), i)
            out.append(np.asarray(self.gen(params, {"label": jnp.asarray(labels[i:i + self.half], jnp.int32)}, key))[:, 0])
        return np.clip(np.concatenate(out), -1.0, 1.0), labels


FITS = ("resize", "crop")


def to_32(x, fit: str = "resize"):
    """Images [N, S, S, C] (S >= 32) -> [N, 32, 32, C] for the evaluator. 'resize': area-averaging
    (antialiased) resize, the whole canvas shrunk (rewards the same digit drawn bigger); 'crop': the
    central 32x32 (what a model that keeps its trained spacing draws at the trained scale)."""
    import jax

    n, h, w, c = x.shape
    if h != w or h < 32:
        raise ValueError(f"images of shape {x.shape}: expected square sides >= 32")
    if fit not in FITS:
        raise ValueError(f"fit={fit!r}; expected one of {FITS}")
    if h == 32:
        return x
    if fit == "crop":
        o = (h - 32) // 2
        return x[:, o:o + 32, o:o + 32]
    return np.asarray(jax.image.resize(x, (n, 32, 32, c), "linear", antialias=True))


def eval_steps(steps: int) -> list[int]:
    """Checkpoints scored for the FID-vs-step curves: halfway and the end (each FID costs ~40 NFE x 500
    samples; the first runs of the 2-core sweep also scored steps / 4 and 3 steps / 4)."""
    return sorted({max(1, steps // 2), steps})


def do_run(root, run: Run, *, steps: int = STEPS) -> dict:
    """Train `run` (resuming if interrupted), then score every checkpoint; writes {workdir}/twin.json."""
    from flagdit_jax import train

    wd = run_dir(root, run)
    out = wd / "twin.json"
    if out.is_file():
        return json.loads(out.read_text())
    config = run_config(run, steps)
    classifier_of(root)  # trains the feature net once, before the first run's clock starts
    t0 = time.time()
    train.train(config, wd)
    t_train = time.time() - t0
    curve = []
    s, _ = train.setup(config)
    sampler = Sampler(config, s)
    for step in eval_steps(steps):
        params = restore_ema(s, wd, step)
        x, y = sampler(params)
        curve.append(dict(step=step, **score(root, x, y)))
        print(f"{run.name} step {step}: FID {curve[-1]['fid']:.2f} accuracy {curve[-1]['accuracy']:.3f}", flush=True)
    import jax

    n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
    rec = dict(run=run.name, model=run.model, objective=run.objective, seed=run.seed, steps=steps,
               params=n_params, preset=config.model.preset, curve=curve, train_seconds=round(t_train, 1),
               eval_seconds=round(time.time() - t0 - t_train, 1), sampler=dict(config.sample))
    out.write_text(json.dumps(rec, indent=1))
    return rec


def needed_runs(twins) -> list[Run]:
    """The distinct runs of `twins`, every twin's seed 0 first (a partial sweep covers every arm)."""
    seen = {}
    for t in twins:
        for runs in TWINS[t]["arms"].values():
            for r in runs:
                seen.setdefault(r.name, r)
    return sorted(seen.values(), key=lambda r: r.seed)


# ------------------------------------------------------------------------------------------------
# reports
# ------------------------------------------------------------------------------------------------

def _load(root, run: Run) -> dict:
    p = run_dir(root, run) / "twin.json"
    if not p.is_file():
        raise FileNotFoundError(f"run {run.name} has no result ({p}); run `python experiments/twins.py run "
                                f"{run.name} --root {root}` first")
    return json.loads(p.read_text())


def _mean_sd(values):
    v = np.asarray(values, np.float64)
    return float(v.mean()), (float(v.std(ddof=1)) if len(v) > 1 else float("nan"))


def _fmt(m, sd, digits=2):
    return f"{m:.{digits}f}" if np.isnan(sd) else f"{m:.{digits}f} ± {sd:.{digits}f}"


def curves_report(twin: str, root) -> dict:
    """Twins a, b, d, f: FID (and accuracy) vs step per arm, mean ± sd over seeds."""
    arms = {}
    loaded = {label: [_load(root, r) for r in runs] for label, runs in TWINS[twin]["arms"].items()}
    # The steps every run of the twin scored (runs may have scored more).
    steps = sorted(set.intersection(*[{p["step"] for p in r["curve"]} for recs in loaded.values() for r in recs]))
    for label, recs in loaded.items():
        at = [{p["step"]: p for p in r["curve"]} for r in recs]
        fid = np.array([[a[st]["fid"] for st in steps] for a in at])
        acc = np.array([[a[st]["accuracy"] for st in steps] for a in at])
        arms[label] = dict(runs=[r["run"] for r in recs], params=recs[0]["params"], steps=steps,
                           fid=fid.tolist(), accuracy=acc.tolist(),
                           train_seconds=[r["train_seconds"] for r in recs])
    return arms


def _c_cell(root, config, s, params, side: int, n: int, options: dict) -> dict:
    """One twin-c cell: N samples at `side` with InferenceOptions(**options) (its 'shift' is the
    sampler's), scored resized and cropped."""
    from flagdit_jax.models.common import InferenceOptions

    t0 = time.time()
    fields = {k: v for k, v in options.items() if k != "shift"}
    sampler = Sampler(config, s, side=side, method=C_SAMPLER[0], num_steps=C_SAMPLER[1], n=n,
                      options=InferenceOptions(**fields) if fields else None, shift=options.get("shift"))
    x, y = sampler(params)
    cell = {fit: score(root, to_32(x, fit), y) for fit in (FITS if side > 32 else FITS[:1])}
    cell.update(n=n, options=options, seconds=round(time.time() - t0, 1))
    return cell


def extrapolation_report(root, scaled_n: int = N_EVAL) -> dict:
    """Twin c: each arm's final EMA params sampled at SIDES, scored after resizing to 32x32 and, past
    32, on the central 32x32 crop; the C_SCALED_ARMS also with each C_SCALINGS option at the unseen
    sides (N = `scaled_n` samples per cell). Cells are cached per run in {run}/twin_c_cells.json."""
    arms, missing = {}, []
    for label, runs in TWINS["c"]["arms"].items():
        (run,) = runs
        if not (run_dir(root, run) / "twin.json").is_file():
            missing.append(run.name)
            continue
    if missing:
        raise FileNotFoundError(f"twin c: runs {missing} have no result yet")
    from flagdit_jax import tokens as tok

    todo = [(label, "plain", side, N_EVAL) for label in TWINS["c"]["arms"] for side in SIDES]
    # The largest side first: if the shared cores run out of time, the 4x-token cells are there.
    todo += [(label, row, side, scaled_n) for side in SIDES[1:][::-1] for row in C_SCALINGS for label in scaled_arms(row)]
    loaded, cached = {}, {}
    for label, row, side, n in todo:
        (run,) = TWINS["c"]["arms"][label]
        path = run_dir(root, run) / "twin_c_cells.json"  # cells are cached as they finish: a rerun resumes
        if run.name not in cached:  # one read per run
            cached[run.name] = json.loads(path.read_text()) if path.is_file() else {}
        cells = cached[run.name]
        key = f"{row}|{side}|{C_SAMPLER[0]}x{C_SAMPLER[1]}|n{n}"
        if key not in cells:
            old = run_dir(root, run) / "twin_c.json"  # the first report's cache: plain rows, resized only
            first = json.loads(old.read_text()) if row == "plain" and side == 32 and old.is_file() else None
            if first is not None and first["key"] == dict(sides=list(SIDES), sampler=list(C_SAMPLER), n=N_EVAL):
                cells[key] = dict(resize=first["sides"]["32"], n=n, options={})
            else:
                if run.name not in loaded:
                    loaded[run.name] = final_params(root, run)
                config, s, params = loaded[run.name]
                l0 = tok.seq_len((1, 32, 32), *tok.layout_of(s.model_cfg))
                options = {} if row == "plain" else C_SCALINGS[row](side / 32, l0)
                cells[key] = _c_cell(root, config, s, params, side, n, options)
                print(f"c: {label}, {row} at {side}x{side} (N={n}, {cells[key]['seconds']:.0f} s): " + ", ".join(
                      f"{fit} FID {cells[key][fit]['fid']:.2f} acc. {cells[key][fit]['accuracy']:.3f}"
                      for fit in FITS if fit in cells[key]), flush=True)
            path.write_text(json.dumps(cells, indent=1))
        a = arms.setdefault(label, dict(run=run.name, sides={}, crop={}, scalings={}, cell_seconds=0.0))
        c = cells[key]
        a["cell_seconds"] = round(a["cell_seconds"] + c.get("seconds", 0.0), 1)  # the first report's cells: not timed
        if row == "plain":
            a["sides"][str(side)] = c["resize"]  # the first report's layout: resized scores per side
            if "crop" in c:
                a["crop"][str(side)] = c["crop"]
        else:
            r = a["scalings"].setdefault(row, dict(n=n, sides={}))
            r["sides"][str(side)] = {fit: c[fit] for fit in FITS} | dict(options=c["options"])
    return arms


def samplers_report(root) -> dict:
    """Twin e: one model's final EMA params under each sampler and step count."""
    (run,) = TWINS["e"]["arms"]["Flag-DiT M"]
    config, s, params = final_params(root, run)
    arms = {}
    for label, method, step_list in SAMPLER_SWEEP:
        pts = []
        for n in step_list:
            x, y = Sampler(config, s, method=method, num_steps=n)(params)
            nfe = n + 1 if method == "sde" else n * _NFE_PER_STEP[method]
            pts.append(dict(steps=n, nfe=nfe, **score(root, x, y)))
            print(f"e: {label} {n} steps ({nfe} NFE): FID {pts[-1]['fid']:.2f}", flush=True)
        arms[label] = pts
    return dict(run=run.name, arms=arms)


def real_floor(root) -> dict:
    from flagdit_jax.eval import mnist_eval

    b = mnist_eval.baselines(pathlib.Path(root) / "classifier", N_EVAL, 0, classifier=classifier_of(root))
    return {"fid": b["real_floor"]["fid"], "accuracy": b["real_floor"]["accuracy"]}


def table(twin: str, data: dict) -> str:
    """The twin's result as a markdown table in the paper's layout."""
    lines = [f"### Twin {twin}: {TWINS[twin]['title']}", "", f"Claim tested: {TWINS[twin]['claim']}.", ""]
    if twin in "abdf":
        steps = next(iter(data["arms"].values()))["steps"]
        lines += ["| model | params | seeds | " + " | ".join(f"FID @{s}" for s in steps) + " | accuracy @" +
                  f"{steps[-1]} |", "|" + "---|" * (len(steps) + 4)]
        for label, a in data["arms"].items():
            fid = np.asarray(a["fid"])
            cells = [_fmt(*_mean_sd(fid[:, i])) for i in range(len(steps))]
            lines.append(f"| {label} | {a['params'] / 1e6:.2f}M | {len(a['runs'])} | " + " | ".join(cells)
                         + f" | {_fmt(*_mean_sd(np.asarray(a['accuracy'])[:, -1]), digits=3)} |")
    elif twin == "c":
        ns = sorted({r["n"] for a in data["arms"].values() for r in a.get("scalings", {}).values()})
        lines += [f"Sampler {C_SAMPLER[0]} x{C_SAMPLER[1]}. Samples larger than 32x32 are scored two ways: "
                  "**resize**, the whole canvas shrunk to 32x32 (antialiased; rewards the same digit drawn bigger), "
                  "and **crop**, the central 32x32 (the digit at the trained scale). The scaling rows only change "
                  "the sampling-time options of the same checkpoint (s = side / 32; no retraining; the papers' "
                  "recipes also set the sampler's time shift to 4, as their demos do) and are sampled at the "
                  "unseen sizes only (—)"
                  + (f"; they are scored on N = {', '.join(map(str, ns))} samples per cell" if ns and ns != [N_EVAL]
                     else "") + ".", ""]
        big = SIDES[1:]
        cols = [f"{s}x{s}" for s in SIDES[:1]] + [f"{s}x{s} {fit}" for s in big for fit in FITS]
        lines += ["| position embedding | sampling | " + " | ".join(f"FID {c}" for c in cols) + " | "
                  + " | ".join(f"acc. {c}" for c in cols) + " |", "|" + "---|" * (2 * len(cols) + 2)]

        def row(label, how, first, cells):
            fid = [first[0]] + [f"{cells[s][f]['fid']:.2f}" for s in big for f in FITS]
            acc = [first[1]] + [f"{cells[s][f]['accuracy']:.3f}" for s in big for f in FITS]
            lines.append(f"| {label} | {how} | " + " | ".join(fid) + " | " + " | ".join(acc) + " |")

        for label, a in data["arms"].items():
            r0 = a["sides"][str(SIDES[0])]
            row(label, "plain", (f"{r0['fid']:.2f}", f"{r0['accuracy']:.3f}"),
                {s: {"resize": a["sides"][str(s)], "crop": a["crop"][str(s)]} for s in big})
            for how, r in a.get("scalings", {}).items():
                row(label, how, ("—", "—"), {s: r["sides"][str(s)] for s in big})
    else:
        n = max(len(pts) for pts in data["arms"]["arms"].values())
        lines += ["| sampler | " + " | ".join("steps (NFE): FID" for _ in range(n)) + " |", "|" + "---|" * (n + 1)]
        for label, pts in data["arms"]["arms"].items():
            lines.append(f"| {label} | " + " | ".join(f"{p['steps']} ({p['nfe']}): {p['fid']:.2f}" for p in pts) + " |")
    fl = data["real_floor"]
    lines += ["", f"FID on the project's MNIST features, N = {N_EVAL} vs the 500 held-out digits (real-data floor at "
              f"this N: FID {fl['fid']:.2f}, accuracy {fl['accuracy']:.3f}); mean ± sd over seeds; "
              f"{data['steps']} steps, batch 32, sampler {data['sampler']}."]
    return "\n".join(lines)


def plot(twin: str, data: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if twin == "c":
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4.5), sharey=True)
    else:
        fig, ax = plt.subplots(figsize=(6, 4))
    if twin in "abdf":
        for label, a in data["arms"].items():
            fid = np.asarray(a["fid"])
            m = fid.mean(0)
            ax.plot(a["steps"], m, marker="o", label=label)
            if fid.shape[0] > 1:
                ax.fill_between(a["steps"], fid.min(0), fid.max(0), alpha=0.2)
        ax.set_xlabel("training step")
        ax.set_ylabel("FID (MNIST features)")
    elif twin == "c":  # two panels: resized / central crop; scaling rows dashed, in their arm's colour
        styles = dict(zip(C_SCALINGS, ("--", ":", "-.", (0, (5, 1)), (0, (1, 1)))))
        for i, (label, a) in enumerate(data["arms"].items()):
            color = f"C{i}"
            first = a["sides"][str(SIDES[0])]["fid"]
            for panel, fit in ((ax, "resize"), (ax2, "crop")):
                at = a["sides"] if fit == "resize" else a["crop"]
                panel.plot(SIDES, [first] + [at[str(s)]["fid"] for s in SIDES[1:]], marker="o", color=color,
                           label=label if panel is ax else None)
                for how, r in a.get("scalings", {}).items():
                    panel.plot(SIDES, [first] + [r["sides"][str(s)][fit]["fid"] for s in SIDES[1:]], marker=".",
                               color=color, ls=styles.get(how, "--"), lw=1,
                               label=f"{label.split(' (')[0]}: {how}" if panel is ax2 else None)
        for panel, what in ((ax, "resized to 32x32"), (ax2, "central 32x32 crop")):
            panel.axvline(32, color="grey", ls=":", lw=1)
            panel.set_xlabel("sampled side (trained at 32)")
            panel.set_ylabel(f"FID, {what}")
        ax2.axhline(data["real_floor"]["fid"], color="k", ls="--", lw=1)
        ax2.legend(fontsize=6)
    else:
        for label, pts in data["arms"]["arms"].items():
            ax.plot([p["nfe"] for p in pts], [p["fid"] for p in pts], marker="o", label=label)
        ax.set_xscale("log")
        ax.set_xlabel("NFE (model evaluations per sample, x2 with CFG)")
        ax.set_ylabel("FID (MNIST features)")
    ax.axhline(data["real_floor"]["fid"], color="k", ls="--", lw=1, label="real-data floor")
    ax.set_yscale("log")
    ax.set_title(f"Twin {twin}: {TWINS[twin]['title']}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(twin: str, root, out_dir=RESULTS, command: str = "", c_scaled_n: int = N_EVAL) -> dict:
    """Twin `twin`'s table (md), data (json) and plot (png) in `out_dir`, from the finished runs in `root`.
    `c_scaled_n`: samples per cell of twin c's RoPE-scaling rows."""
    t0 = time.time()
    if twin in "abdf":
        data = {"arms": curves_report(twin, root)}
    elif twin == "c":
        data = {"arms": extrapolation_report(root, scaled_n=c_scaled_n)}
    else:
        data = {"arms": samplers_report(root)}
    runs = [r for rs in TWINS[twin]["arms"].values() for r in rs]
    recs = [_load(root, r) for r in runs]
    data.update(twin=twin, title=TWINS[twin]["title"], claim=TWINS[twin]["claim"], real_floor=real_floor(root),
                steps=recs[0]["steps"], n_eval=N_EVAL, sampler=f"{recs[0]['sampler']['method']} x{recs[0]['sampler']['num_steps']}, "
                f"cfg {recs[0]['sampler']['cfg_scale']}",
                wall_seconds={"runs (train + per-checkpoint eval)": {r["run"]: r["train_seconds"] + r["eval_seconds"]
                                                                     for r in recs},
                              "report": round(time.time() - t0, 1)},
                command=command)
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"twin_{twin}.json").write_text(json.dumps(data, indent=1))
    md = table(twin, data)
    total = sum(data["wall_seconds"]["runs (train + per-checkpoint eval)"].values()) + data["wall_seconds"]["report"]
    md += (f"\n\nCommand: `{command}`; wall time {total / 60:.1f} min on 2 CPU cores (the runs' train + eval, "
           f"shared with other twins, plus {data['wall_seconds']['report']:.0f} s for this report).")
    if twin == "c":  # cells are cached across report invocations: their own sampling + scoring time
        cells = sum(a["cell_seconds"] for a in data["arms"].values())
        data["wall_seconds"]["twin c cells (sampling + scoring, summed over cached cells)"] = cells
        (out_dir / f"twin_{twin}.json").write_text(json.dumps(data, indent=1))
        md += (f" The timed cells (everything but the first report's plain 32x32 scores) took {cells / 60:.1f} min "
               "of sampling + scoring in all, summed over report invocations.")
    md += "\n"
    (out_dir / f"twin_{twin}.md").write_text(md)
    plot(twin, data, out_dir / f"twin_{twin}.png")
    print(md)
    return data


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("sweep", "commands", "report"):
        a = sub.add_parser(name)
        a.add_argument("--twins", default="a,b,c,d,e,f")
        a.add_argument("--root", default="runs/twins")
        a.add_argument("--out", default=str(RESULTS))
        a.add_argument("--steps", type=int, default=STEPS, help="training steps per run")
        a.add_argument("--c-scaled-n", type=int, default=N_EVAL, help="samples per cell of twin c's RoPE-scaling rows")
    r = sub.add_parser("run")
    r.add_argument("--steps", type=int, default=STEPS, help="training steps per run")
    r.add_argument("name", help="MODEL-OBJECTIVE-sSEED, e.g. flag-lognorm-s0")
    r.add_argument("--root", default="runs/twins")
    args = p.parse_args(argv)
    if args.cmd == "run":
        do_run(args.root, Run.parse(args.name), steps=args.steps)
        return
    twins = [t.strip() for t in args.twins.split(",") if t.strip()]
    bad = [t for t in twins if t not in TWINS]
    if bad:
        raise SystemExit(f"unknown twin(s) {bad}; expected some of {sorted(TWINS)}")
    here = "python experiments/twins.py"
    if args.cmd == "commands":
        for run in needed_runs(twins):
            print(f"{here} run {run.name} --root {args.root} --steps {args.steps}")
        print(f"{here} report --twins {','.join(twins)} --root {args.root}  # after all runs")
        return
    if args.cmd == "sweep":
        from flagdit_jax import checkpoint

        busy = []
        for run in needed_runs(twins):
            try:
                do_run(args.root, run, steps=args.steps)
            except checkpoint.WorkdirLocked:  # another worker (`run NAME`) is training it
                print(f"{run.name}: running in another process; skipped", flush=True)
                busy.append(run.name)
        if busy:
            raise SystemExit(f"runs still in progress elsewhere: {busy}; rerun the sweep (or `report`) when done")
    extra = f" --c-scaled-n {args.c_scaled_n}" if args.c_scaled_n != N_EVAL else ""
    for t in twins:
        report(t, args.root, args.out, command=f"{here} {args.cmd} --twins {','.join(twins)} --root {args.root}{extra}",
               c_scaled_n=args.c_scaled_n)


if __name__ == "__main__":
    sys.exit(main())
