"""Paper-scale validation without the hardware (issue #13, item 3): every paper config's parameter
count, FLOPs per train step from XLA's cost analysis, and an ahead-of-time sharded compile of the
real train step on 8 and 64 fake devices with XLA's per-device memory analysis.

    python experiments/paper_configs.py [--devices 8,64] [--only flagdit-3b,sit-xl-2] \
        [--out experiments/results/paper_configs] [--force]

What each column is:
- params: `registry.count_params` of the config's model (`jax.eval_shape`, nothing allocated),
  beside REFERENCE.md §2's count (`registry.REFERENCE_PARAMS`).
- XLA FLOPs: `Lowered.cost_analysis()["flops"]` of the train step (`train.make_train_step`: task
  draws, forward, flow loss, backward with the config's remat, clip, AdamW, EMA) at the paper's
  global batch, TOTAL over all devices: the HLO before SPMD partitioning and optimisation, lowered
  with the blocks as a Python loop (`scan_layers=False`, the configs' own layout), full-score
  attention ('xla') and grad_accum_steps=1 (the same global batch in one piece), because XLA's cost analysis counts a while-loop body once (flagdit_jax/aot.py)
  and a scanned step, the blockwise kernel's chunk loop or accumulation would undercount. Beside it 6 N T (N params, T = global batch x padded tokens per sample)
  and their ratio: attention scores, the per-sample conditioning path and remat recompute push it
  above 1.
- AOT compile: `train.setup` + `make_train_step`, lowered from abstract shapes and compiled
  (`aot.compile_with_report`) on N fake CPU devices (`--xla_force_host_platform_device_count`, one
  subprocess per N, since the count is fixed at jax import) with the config's own mesh: FSDP over
  all devices (1, N, 1, 1) for Flag-DiT / Next-DiT / Lumina (the reference trains with PyTorch FSDP),
  data parallel (N, 1, 1, 1) for DiT / SiT (DDP). 8 = one 8xH100 node, 64 = a v5p-128 pod (64
  chips). Memory = `compiled.memory_analysis()` per device: arguments (params + EMA + AdamW
  state + the batch shard), outputs, temporaries, and total live (args + outputs + temps - donated).
  These compiles use `model.scan_layers=True` (a 3B step compiles in ~20 s instead of ~170 s,
  experiments/results/compile_time.json). Parameters, arguments and outputs are identical either
  way; XLA's temporaries are not (flagdit-3b at batch 1 on one device: 33.9 GiB scanned vs 25.4 GiB
  per layer, compile_time.json), so the temporaries here are those of a scanned run (a config
  option, `--config.model.scan_layers=True`). `--per-layer` compiles the per-layer step instead.
- Caveats: XLA:CPU's buffer assignment and fusion, not the GPU / TPU compiler's, so the bytes
  are the CPU compiler's schedule of the same sharded program; attention 'auto' resolves on CPU
  to 'xla' (full scores) up to 1024^2 scores and 'blockwise' above (GPU picks cuDNN flash, TPU
  splash); the resolved kernel is recorded per row.

Results go to `{out}.json` (one entry per config and device count; entries already there are kept
and skipped unless `--force`, so an interrupted run resumes) and `{out}.md` (the tables), and the
tables are printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class PaperConfig:
    """One row: a config file and its argument, the REFERENCE.md count's registry key, and the paper
    that the recipe comes from. Rows whose count is not in `registry.REFERENCE_PARAMS` give it as
    `reference_params` (and `reference_key` ''), with `reference_source` saying where it comes from."""

    file: str
    arg: str | None
    reference_key: str
    paper: str
    reference_params: float | None = None
    reference_source: str = ""

    def __post_init__(self):
        if (self.reference_params is None) == (not self.reference_key):
            raise ValueError(f"{self.file}:{self.arg}: give exactly one of reference_key={self.reference_key!r} and "
                             f"reference_params={self.reference_params!r}")

    def reference(self) -> float:
        """The count the row is checked against."""
        from flagdit_jax.models import registry

        return float(self.reference_params if self.reference_params is not None
                     else registry.REFERENCE_PARAMS[self.reference_key])


# The released audio model's count from its constructor (configs/t2speech/lumina_t2speech.py:
# reference_params, independent of our model code): both tasks build the same FlagDiTv2.
_AUDIO_PARAMS = 197_940_244
_2B = "the paper's nominal '2B' [2nd]; the shape is inferred (configs/t2v/lumina_t2v.py)"


PAPER_CONFIGS: dict[str, PaperConfig] = {
    "flagdit-600m": PaperConfig("configs/imagenet/flagdit.py", "600m", "flagdit-600m", "Lumina-T2X (ImageNet 256)"),
    "flagdit-3b": PaperConfig("configs/imagenet/flagdit.py", "3b", "flagdit-3b", "Lumina-T2X (ImageNet 256)"),
    "flagdit-7b": PaperConfig("configs/imagenet/flagdit.py", "7b", "flagdit-7b", "Lumina-T2X (ImageNet 256)"),
    "nextdit-600m": PaperConfig("configs/imagenet/nextdit.py", "600m", "nextdit-600m", "Lumina-Next (ImageNet 256)"),
    "nextdit-2b": PaperConfig("configs/imagenet/nextdit.py", "2b", "nextdit-2b", "Lumina-Next (ImageNet 256)"),
    "nextdit-3b": PaperConfig("configs/imagenet/nextdit.py", "3b", "nextdit-3b", "Lumina-Next (ImageNet 256)"),
    "nextdit-7b": PaperConfig("configs/imagenet/nextdit.py", "7b", "nextdit-7b", "Lumina-Next (ImageNet 256)"),
    "dit-xl-2": PaperConfig("configs/imagenet/dit.py", None, "dit-xl-2", "DiT baseline (ImageNet 256)"),
    "sit-xl-2": PaperConfig("configs/imagenet/sit.py", None, "dit-xl-2", "SiT baseline (ImageNet 256)"),
    "lumina-t2i-5b-256": PaperConfig("configs/t2i/lumina_t2i.py", "256", "lumina-t2i-5b", "Lumina-T2I stage 1"),
    "lumina-t2i-5b-512": PaperConfig("configs/t2i/lumina_t2i.py", "512", "lumina-t2i-5b", "Lumina-T2I stage 2"),
    "lumina-t2i-5b-1024": PaperConfig("configs/t2i/lumina_t2i.py", "1024", "lumina-t2i-5b", "Lumina-T2I stage 3"),
    "lumina-next-2b": PaperConfig("configs/t2i/lumina_next.py", "1024", "lumina-next-2b", "Lumina-Next-T2I 1024"),
    # Issue #14: video, multi-view, audio (their configs' docstrings give every source).
    "lumina-t2v-2b-512": PaperConfig("configs/t2v/lumina_t2v.py", "512", "", "Lumina-T2V stage 1 (512 x 32 frames)",
                                     2e9, _2B),
    "lumina-t2v-2b-720p": PaperConfig("configs/t2v/lumina_t2v.py", "720p", "", "Lumina-T2V stage 2 (720p, 128K)",
                                      2e9, _2B),
    "lumina-t2mv-2b-256": PaperConfig("configs/t2mv/lumina_t2mv.py", "256", "", "Lumina-T2MV 12 views 256",
                                      2e9, _2B),
    "lumina-t2mv-2b-512": PaperConfig("configs/t2mv/lumina_t2mv.py", "512", "", "Lumina-T2MV 12 views 512",
                                      2e9, _2B),
    "lumina-t2audio": PaperConfig("configs/t2speech/lumina_t2speech.py", "audio", "", "Lumina-T2Audio (released)",
                                  _AUDIO_PARAMS, "LT lumina_audio FlagDiTv2 constructor"),
    "lumina-t2music": PaperConfig("configs/t2speech/lumina_t2speech.py", "music", "", "Lumina-T2Music (released)",
                                  _AUDIO_PARAMS, "LT lumina_music FlagDiTv2 constructor"),
}


def load_config(name: str, overrides: dict | None = None):
    """The ml_collections config of a paper config by name, with dotted-key `overrides`; data paths
    are set to a never-read placeholder (the step is compiled from abstract shapes)."""
    import importlib.util

    if name not in PAPER_CONFIGS:
        raise ValueError(f"unknown paper config {name!r}; expected one of {sorted(PAPER_CONFIGS)}")
    pc = PAPER_CONFIGS[name]
    spec = importlib.util.spec_from_file_location(f"paper_config_{name.replace('-', '_')}", ROOT / pc.file)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config() if pc.arg is None else mod.get_config(pc.arg)
    c.data.options.data_dir = "/nonexistent/never-read"
    for key, value in (overrides or {}).items():
        node = c
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return c


class _AbstractCaptions:
    """Stands in for the encoded caption source: `train.setup` reads only the empty caption's
    embedding from it, whose shape is the text encoder's (LLaMA 128 tokens x 4096, Gemma 256 x 2048)."""

    def __init__(self, length: int, width: int):
        import numpy as np

        self.length, self.width = length, width
        mask = np.zeros((length,), bool)
        mask[:2] = True  # BOS / EOS of the empty caption
        self._null = {"cap_feats": np.zeros((length, width), np.float32), "cap_mask": mask}

    def null_caption(self):
        return self._null


def caption_length(config) -> int:
    """Tokens per caption of a T2I config's text encoder: `text_encoder.max_length` where the config
    sets it (encoders outside `flagdit_jax.text`: CLIP, T5), else `text.encoder.KINDS`."""
    from flagdit_jax.text.encoder import KINDS

    n = config.text_encoder.get("max_length")
    if n is not None:
        return int(n)
    return int(KINDS[config.text_encoder.kind]["max_length"])


def frame_shape(config) -> tuple[int, int, int]:
    """Latent size (T, H, W) of one training sample: `data.frame_shape` (video, views, audio rows),
    else one square `data.image_size` frame."""
    shape = config.data.get("frame_shape")
    if shape is None:
        return 1, config.data.image_size, config.data.image_size
    shape = tuple(shape)
    if len(shape) != 3 or any(not isinstance(v, int) or v <= 0 for v in shape):
        raise ValueError(f"config.data.frame_shape={shape}; expected three positive ints (T, H, W)")
    return shape


def seq_len(config, model_cfg) -> int:
    """Tokens per sample the step runs at: the config's bucket (T2I: the official max_seq_len), else
    the packed length of `frame_shape`."""
    from flagdit_jax import tokens as tok

    buckets = tuple(config.data.get("buckets", ()) or ())
    if buckets:
        return int(max(buckets))
    return int(tok.seq_len(frame_shape(config), *tok.layout_of(model_cfg)))


def abstract_batch(s, length: int):
    """The packed global batch as ShapeDtypeStructs with the batch sharding: one zero element of
    `frame_shape` packed on the host to `length` tokens (only shapes and dtypes are kept), its
    leading axis set to the global batch."""
    import jax
    import numpy as np

    from flagdit_jax import tokens as tok
    from flagdit_jax import train

    t, h, w = frame_shape(s.config)
    real = tok.seq_len((t, h, w), *tok.layout_of(s.model_cfg))
    if real > length:
        raise ValueError(f"config.data.frame_shape={(t, h, w)} packs to {real} tokens, more than the bucket {length}")
    element = {"frames": np.zeros((t, h, w, s.model_cfg.in_channels), np.float32)}
    if hasattr(s.task, "caption_shape"):
        n, d = s.task.caption_shape
        element.update(cap_feats=np.zeros((n, d), np.float32), cap_mask=np.ones((n,), bool))
    else:
        element["label"] = np.int32(0)
    host = train.pack_batch(s, [element], pad_to=length)
    b = s.config.global_batch
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct((b,) + np.shape(a)[1:], np.asarray(a).dtype,
                                                       sharding=s.batch_sharding), host)


def _setup(config):
    from flagdit_jax import train

    cfg = train.model_config(config)
    source = None
    if getattr(cfg, "cap_feat_dim", 0):
        source = _AbstractCaptions(caption_length(config), cfg.cap_feat_dim)
    return train.setup(config, source)[0]


def measure_compile(name: str, overrides: dict | None = None, *, scan_layers: bool = True) -> dict:
    """AOT-compile the config's train step on all visible devices: mesh, per-device memory,
    compile time, the kernel 'auto' attention resolves to, and (for reference only: the while
    loop of scanned blocks is counted once) the compiled per-device FLOPs."""
    import flax.linen as nn
    import jax

    from flagdit_jax import aot, train
    from flagdit_jax.models import attention

    config = load_config(name, dict(overrides or {}, **{"model.scan_layers": scan_layers}))
    s = _setup(config)
    length = seq_len(config, s.model_cfg)
    batch = abstract_batch(s, length)
    step = train.make_train_step(s)
    with jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules):
        _, rep = aot.compile_with_report(step, s.abstract_state, batch)
    kernel = s.model_cfg.attention
    if kernel == "auto":
        kernel = attention.resolve_implementation(q_len=length, k_len=length, head_dim=s.model_cfg.head_dim,
                                                  dtype=s.model_cfg.dtype)
    state_dev = sum(train.state_bytes(s.abstract_state).values())
    state_all = sum(train.state_bytes(s.abstract_state, per_device=False).values())
    return dict(devices=jax.device_count(), mesh_shape=list(s.mesh.devices.shape), scan_layers=scan_layers,
                state_bytes_per_device=state_dev, state_bytes_even_split=state_all / jax.device_count(),
                attention=kernel, compile_s=rep.compile_seconds, argument_bytes=rep.argument_bytes,
                output_bytes=rep.output_bytes, temp_bytes=rep.temp_bytes, alias_bytes=rep.alias_bytes,
                total_bytes=rep.peak_bytes, compiled_flops_per_device=rep.hlo_flops_per_device,
                compiled_has_loops=rep.has_loops)


def measure_flops(name: str, overrides: dict | None = None) -> dict:
    """Parameters, tokens and the total XLA FLOPs of one train step at the paper's global batch:
    the cost analysis of the per-layer (unscanned) step's HLO before partitioning (no compile)."""
    import jax

    from flagdit_jax import aot, train
    from flagdit_jax.models import registry

    # Per-layer blocks, full-score attention and no accumulation loop: XLA's cost analysis counts a
    # while-loop body once, and scanned blocks, the blockwise (flash-form) attention kernel and
    # gradient accumulation are loops (accumulation splits the same global batch: same FLOPs but the
    # micro-gradient sums).
    config = load_config(name, dict(overrides or {}, **{"model.scan_layers": False, "model.attention": "xla",
                                                        "grad_accum_steps": 1}))
    s = _setup(config)
    length = seq_len(config, s.model_cfg)
    batch = abstract_batch(s, length)
    t0 = time.perf_counter()
    lowered = train.make_train_step(s).lower(s.abstract_state, batch)
    cost = lowered.cost_analysis() or {}
    lower_s = time.perf_counter() - t0
    n = registry.count_params(s.model_cfg)
    tokens = config.global_batch * length
    cap = caption_length(config) if getattr(s.model_cfg, "cap_feat_dim", 0) else 0
    analytic = aot.model_flops(s.model_cfg, s.abstract_state.params, batch=config.global_batch, seq_len=length,
                               cap_len=cap)
    xla = float(cost.get("flops", float("nan")))
    return dict(params=n, reference_params=PAPER_CONFIGS[name].reference(),
                global_batch=config.global_batch, seq_len=length, caption_len=cap, tokens=tokens,
                xla_flops_total=xla, six_n_t=6.0 * n * tokens, ratio_to_6nt=xla / (6.0 * n * tokens),
                analytic_model_flops=analytic, dtype=s.model_cfg.dtype, remat=s.model_cfg.remat,
                flops_lower_s=lower_s, jax=jax.__version__)


# ------------------------------------------------------------------------------------------------
# driver: one subprocess per device count, a resumable json, markdown tables
# ------------------------------------------------------------------------------------------------


def _worker(args) -> None:
    """In a process whose device count was fixed by XLA_FLAGS: measure each named config and
    append one JSON line per config to --worker-out as soon as it is done."""
    import jax

    if jax.device_count() != args.worker_devices:
        raise RuntimeError(f"expected {args.worker_devices} fake devices, jax sees {jax.device_count()}")
    overrides = json.loads(args.overrides) if args.overrides else {}
    with open(args.worker_out, "a") as f:
        for name in args.only.split(","):
            t0 = time.perf_counter()
            row = dict(name=name, **measure_compile(name, overrides, scan_layers=not args.per_layer))
            if args.with_flops:
                row["flops"] = measure_flops(name, overrides)
            row["wall_s"] = time.perf_counter() - t0
            f.write(json.dumps(row) + "\n")
            f.flush()
            print(f"[{args.worker_devices} devices] {name}: mesh {tuple(row['mesh_shape'])}, total "
                  f"{row['total_bytes'] / 2**30:.2f} GiB per device, compiled in {row['compile_s']:.1f} s "
                  f"({row['wall_s']:.1f} s in all)", flush=True)


def run_device_count(n: int, names: list[str], *, with_flops: bool, per_layer: bool, overrides: dict,
                     tmp: pathlib.Path, nice: int = 0) -> tuple[list[dict], str | None]:
    """Measure `names` in a subprocess with `n` fake CPU devices; returns the rows it wrote (also
    those written before a failure) and the failure's description (None when it succeeded)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}").strip())
    cmd = [sys.executable, __file__, "--worker-devices", str(n), "--worker-out", str(tmp), "--only", ",".join(names),
           "--overrides", json.dumps(overrides)]
    cmd += ["--with-flops"] if with_flops else []
    cmd += ["--per-layer"] if per_layer else []
    if nice:
        cmd = ["nice", "-n", str(nice)] + cmd
    proc = subprocess.run(cmd, env=env, cwd=ROOT)
    rows = [json.loads(line) for line in tmp.read_text().splitlines()] if tmp.exists() else []
    tmp.unlink(missing_ok=True)
    error = None
    if proc.returncode:
        error = (f"the {n}-device worker failed (exit {proc.returncode}) after {len(rows)} of {len(names)} configs "
                 f"({', '.join(names[len(rows):])} not measured); its traceback is above")
    return rows, error


NOTES = """Notes:
- FLOPs are per optimizer step at the paper's global batch, summed over all devices: XLA's
  HloCostAnalysis of the step's HLO before SPMD partitioning, lowered with per-layer blocks,
  full-score ('xla') attention and no gradient accumulation, since a while-loop body (scanned
  blocks, the blockwise kernel's chunk loop, accumulation) is counted once. Flash kernels (cuDNN,
  splash, blockwise) also recompute the scores in the backward (2 S^2 d more per layer and
  sample), not counted here. Included: remat recompute, the task's draws, AdamW and EMA. 6 N T
  counts every parameter once per token; the adaLN modulation kernels and the timestep / label
  embedders act once per sample (Flag-DiT: a 1024 x 6d kernel per layer, a quarter of the 600M),
  so the ratio sits below 1 where they are a large share; attention scores (4 L S^2 d per sample,
  forward) push it up at long sequences. 'analytic model FLOPs' is `aot.model_flops` (per-token
  kernels x tokens + per-sample kernels + attention, x3 for forward + backward).
- Memory is XLA:CPU's memory analysis of the sharded program on fake CPU devices, with
  `scan_layers=True` (arguments and outputs as per layer; temporaries are the scanned schedule's
  and differ per layer, in either direction: flagdit-600m on 8 devices 31.9 GiB per layer vs 11.4
  scanned, experiments/results/paper_configs_per_layer.md; flagdit-3b at batch 1 on one device
  25.4 vs 33.9, compile_time.json).
  GPU / TPU compilers fuse and schedule differently, and attention 'auto' picks cuDNN flash / splash
  there instead of the CPU's kernel named in the mesh column.
- Related runs: experiments/results/paper_configs_t2i_micro.md (the T2I stages at the reference's
  micro batches 16 / 8 / 2 per device on 8 devices, grad_accum_steps 4 / 8 / 32),
  paper_configs_t2i1024_accum4.md (1024 px on 64 devices, micro batch 2), paper_configs_cond_fsdp.md
  (the ('cond', 'fsdp') rule measured before it became the default; those two side runs predate it),
  paper_configs_per_layer.md.
- reference: REFERENCE.md §2's count; for the video / multi-view / audio rows (issue #14) the
  `reference_source` of their PaperConfig: Lumina-T2V / T2MV are the paper's nominal "2B" (known
  second-hand; their 2304 x 24 x 32 shape, CLIP width 2048 and token layouts are inferred, see
  configs/t2v/lumina_t2v.py, configs/t2mv/lumina_t2mv.py), the audio rows the released FlagDiTv2
  counted from its constructor (ours has one more [PAD] vector, 768 parameters). Their global
  batches: T2V 1024 (stage 1, second-hand) and 128 (stage 2, a guess); T2MV 64 / 16 (second-hand);
  audio 64 (a guess). T2V 720p and T2MV 512 run with a sequence axis (8 / 4), see the mesh column;
  the rules shard no parameter over it, hence their state at 8x / 4x an even split. At the full
  global batch in one step the video rows need terabytes of activations per device:
  paper_configs_modality_micro.md compiles them with gradient accumulation (same global batch, one
  sample per device per micro step).
- state / even split: the few small parameters with no fsdp-mapped axis (norm scales, biases,
  embedder tails) are replicated, hence 1.01-1.03x on 64 devices; DiT / SiT are data parallel, every
  parameter replicated by design, as DDP.
"""


def _gib(b) -> str:
    return f"{b / 2**30:.2f}"


def markdown(results: dict, devices: list[int]) -> str:
    """Two tables: counts and FLOPs per config; per-device memory per config and device count."""
    lines = ["| config | paper | params | reference | global batch x tokens | XLA FLOPs / step (total) | "
             "6 N T | ratio | analytic model FLOPs |", "|---|---|---:|---:|---|---:|---:|---:|---:|"]
    for name in PAPER_CONFIGS:
        f = results.get(name, {}).get("flops")
        if not f:
            continue
        lines.append(f"| {name} | {PAPER_CONFIGS[name].paper} | {f['params'] / 1e9:.3f}B | "
                     f"{f['reference_params'] / 1e9:.3f}B | {f['global_batch']} x {f['seq_len']}"
                     + (f" (+{f['caption_len']} caption)" if f["caption_len"] else "")
                     + f" | {f['xla_flops_total'] / 1e15:.2f} PF | {f['six_n_t'] / 1e15:.2f} PF | "
                     f"{f['ratio_to_6nt']:.2f} | {f['analytic_model_flops'] / 1e15:.2f} PF |")
    lines += ["", "Per-device bytes of the compiled train step (GiB: arguments / outputs / temporaries / total "
              "live), mesh (data, fsdp, sequence, tensor) and the attention kernel on CPU, the per-device share of "
              "params + EMA + AdamW state over an even 1/N split (1.00x = fully sharded, N = replicated), compile "
              "seconds:", ""]
    head = "| config | dtype, remat |" + "".join(
        f" {n} devices: mesh | state / even split | args / out / temp / total | compile s |" for n in devices)
    lines += [head, "|---|---|" + "---|---:|---|---:|" * len(devices)]
    for name in PAPER_CONFIGS:
        entry = results.get(name, {})
        if not any(str(n) in entry.get("compile", {}) for n in devices):
            continue
        f = entry.get("flops", {})
        row = f"| {name} | {f.get('dtype', '?')}, {f.get('remat', '?')} |"
        for n in devices:
            r = entry.get("compile", {}).get(str(n))
            if r is None:
                row += " - | - | - | - |"
                continue
            split = r["state_bytes_per_device"] / r["state_bytes_even_split"]
            row += (f" {tuple(r['mesh_shape'])} {r['attention']} | {split:.2f}x | {_gib(r['argument_bytes'])} / "
                    f"{_gib(r['output_bytes'])} / {_gib(r['temp_bytes'])} / **{_gib(r['total_bytes'])}** | "
                    f"{r['compile_s']:.0f} |")
        lines.append(row)
    return "\n".join(lines)


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", default="8,64", help="comma-separated fake device counts (default 8,64)")
    ap.add_argument("--only", default="", help=f"comma-separated names (default all): {','.join(PAPER_CONFIGS)}")
    ap.add_argument("--out", default=str(ROOT / "experiments/results/paper_configs"), help="writes OUT.json, OUT.md")
    ap.add_argument("--force", action="store_true", help="re-measure entries already in OUT.json")
    ap.add_argument("--per-layer", action="store_true", help="compile with scan_layers=False (slow, exact temporaries)")
    ap.add_argument("--nice", type=int, default=0, help="run the workers under `nice -n NICE`")
    ap.add_argument("--overrides", default="", help="JSON of dotted config overrides for every config (tests: a tiny "
                                                    "model, e.g. '{\"model.dim\": 64}')")
    # worker mode (internal): one subprocess per device count
    ap.add_argument("--worker-devices", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", default="", help=argparse.SUPPRESS)
    ap.add_argument("--with-flops", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or list(PAPER_CONFIGS)
    bad = [n for n in names if n not in PAPER_CONFIGS]
    if bad:
        raise ValueError(f"--only names {bad} are not paper configs; expected some of {list(PAPER_CONFIGS)}")
    try:
        devices = [int(d) for d in args.devices.split(",") if d]
    except ValueError:
        raise ValueError(f"--devices={args.devices!r}; expected comma-separated device counts, e.g. 8,64") from None
    if not devices or any(d < 1 for d in devices):
        raise ValueError(f"--devices={args.devices!r}; expected positive device counts, e.g. 8,64")
    args.only, args.device_list = ",".join(names), devices
    return args


def _merge(results: dict, n: int, rows: list[dict]) -> None:
    """Worker rows of `n` devices into `results[name]` ('flops' and 'compile'[n])."""
    for row in rows:
        row = dict(row)
        entry = results.setdefault(row.pop("name"), {})
        if "flops" in row:
            entry["flops"] = row.pop("flops")
        entry.setdefault("compile", {})[str(n)] = row


def main(argv=None) -> dict:
    args = parse(argv)
    if args.worker_devices:
        _worker(args)
        return {}
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    path = out.with_suffix(".json")
    doc = json.loads(path.read_text()) if path.exists() else {}
    results = doc.get("results", {})
    overrides = json.loads(args.overrides) if args.overrides else {}
    names = args.only.split(",")
    for n in args.device_list:  # rows an interrupted run's worker wrote before the driver saved them
        tmp = out.with_suffix(f".{n}.jsonl")
        if tmp.exists():
            _merge(results, n, [json.loads(line) for line in tmp.read_text().splitlines() if line.strip()])
            tmp.unlink()
    t0, measured = time.perf_counter(), 0
    for i, n in enumerate(args.device_list):
        with_flops = i == 0  # the FLOP count is of the global program: once, in the first worker
        todo = [m for m in names if args.force or str(n) not in results.get(m, {}).get("compile", {})
                or (with_flops and "flops" not in results.get(m, {}))]
        if not todo:
            continue
        print(f"{n} fake devices: {', '.join(todo)}", flush=True)
        measured += len(todo)
        rows, error = run_device_count(n, todo, with_flops=with_flops, per_layer=args.per_layer,
                                       overrides=overrides, tmp=out.with_suffix(f".{n}.jsonl"), nice=args.nice)
        _merge(results, n, rows)
        doc.update(results=results)
        path.write_text(json.dumps(doc, indent=1))  # the rows measured so far: a rerun resumes after them
        if error:
            raise RuntimeError(error)
    wall = time.perf_counter() - t0
    import platform

    flags = (f"--devices {','.join(map(str, args.device_list))}",
             f"--only {args.only}" if args.only != ",".join(PAPER_CONFIGS) else "",
             "--per-layer" if args.per_layer else "", "--force" if args.force else "",
             f"--nice {args.nice}" if args.nice else "", f"--overrides '{args.overrides}'" if args.overrides else "")
    runs = doc.setdefault("runs", [])
    if measured:  # a rerun with nothing left to measure only redraws the tables
        runs.append(dict(command="python experiments/paper_configs.py " + " ".join(a for a in flags if a),
                         wall_s=wall, when=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                         machine=f"{platform.machine()}, {os.cpu_count()} CPUs (shared)"))
    doc.update(results=results, what=__doc__.split("\n\n")[0])
    path.write_text(json.dumps(doc, indent=1))
    table = markdown(results, args.device_list)
    made = "\n".join(f"- `{r['command']}` ({r['when']}): {r['wall_s'] / 60:.1f} min wall, {r['machine']}" for r in runs)
    md = (f"# Paper configs: parameters, XLA FLOPs, AOT sharded compile on fake devices\n\n{made}\n\n{table}\n\n"
          f"{NOTES}")
    out.with_suffix(".md").write_text(md)
    print(table)
    print(f"wall {wall:.0f} s; wrote {path} and {out.with_suffix('.md')}")
    return doc


if __name__ == "__main__":
    main()
