"""What varies by kind of training (DESIGN.md principle 7), so that the train loop never branches.

A task is a small frozen object chosen by `config.task`. The loop and the samplers only call:

  task.collate(elements)             host: the per-sample conditions of a batch -> numpy arrays [b, ...]
  task.example_cond(b)               zeros of the condition's shapes (init, abstract shapes)
  task.draw(key, packed, cond)       randomness of one global batch: noise x0, times t, CFG drop mask
  task.loss(apply, packed, cond, d)  the flow-matching loss of a (micro-)batch, through flow/losses.py
  task.model_kwargs(cond)            the model's condition keywords (y=..., or cap_feats= / cap_mask=)
  task.null_cond(b)                  the unconditional condition classifier-free guidance pairs with

`draw` runs once per global batch and its outputs are split with the batch into accumulation
micro-batches, so accumulation equals the full-batch step. A joint multi-modal task (several
modalities, each with its own time) overrides `draw` and `loss` (per-token times from the token
kinds) and keeps the loop as it is.

Tasks:
  * 'class_label': class id -> null class `num_classes` with probability `dropout` (LT
    `Flag-DiT-ImageNet/models/model.py: LabelEmbedder.token_drop`, p = 0.1).
  * 'caption': pre-computed caption embeddings + mask stored with the data (training never runs a
    text encoder); dropped captions become the empty caption's embedding, as the official T2I
    trainers replace the caption by "" with probability 0.1 (LT `lumina_t2i/train.py`,
    `lumina_next_t2i/train.py`; REFERENCE.md: the null caption is the encoder's output of "", not zeros).

  * 'joint': UniDiffuser-style joint flow matching (`models/joint.py`, REFERENCE.md §8). Elements
    carry 'text' `[S, D]` (a second modality of continuous tokens) beside the frames; each modality
    gets its own noise and its own time, drawn independently from the time sampler, and the loss is
    the sum of the two modalities' flow-matching losses (UniDiffuser sums its two MSEs). No condition
    is ever dropped: guidance uses the model's own marginal (`sample_joint.py`).
  * 'unconditional': no condition at all (a one-class model, the label always 0, never dropped):
    the unconditional baseline the joint model's marginal is compared with.

Loss mask (all): only patch tokens count; [nextline], [nextframe] and [PAD] never contribute, and
each sample is averaged over its own real tokens (the official `training_losses` over a list of
variable-size images: equal weight per image).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from flagdit_jax import tokens as tok
from flagdit_jax.flow import losses, paths, timesteps

TASKS = ("class_label", "caption", "joint", "unconditional")


@dataclasses.dataclass(frozen=True, eq=False)
class FlowTask:
    """Shared flow-matching part: path, time sampler, prediction target, CFG dropout rate."""

    path: Any = paths.LinearPath()
    time_sampler: str = "uniform"  # a name (tasks travel to grain workers, so they must pickle)
    prediction: str = "velocity"
    dropout: float = 0.1

    def draw(self, key: jax.Array, packed: tok.Packed, cond: dict) -> dict:
        """`{'x0': [B, L, D] noise, 't': [B] times, 'drop': [B] bool}` for one global batch.

        Times are drawn on [0, 1] and mapped onto the official training interval of the path and
        prediction (`losses.train_interval`: [0, 1] for velocity on linear / GVP, [0, 1 - 1e-5] on VP).
        """
        b = packed.tokens.shape[0]
        k_noise, k_t, k_drop = jax.random.split(key, 3)
        t0, t1 = losses.train_interval(self.path, self.prediction)
        return {"x0": jax.random.normal(k_noise, packed.tokens.shape, packed.tokens.dtype),
                "t": t0 + (t1 - t0) * timesteps.get_time_sampler(self.time_sampler)(k_t, b),
                "drop": jax.random.uniform(k_drop, (b,)) < self.dropout}

    def loss_mask(self, packed: tok.Packed) -> jax.Array:
        """`[B, L]` True at patch tokens only."""
        return packed.kind == tok.PATCH

    def loss(self, apply: Callable, packed: tok.Packed, cond: dict, draws: dict) -> jax.Array:
        """Scalar loss; `apply(packed, t, **model_kwargs) -> [B, L, D]` is the model with its params."""
        kw = self.model_kwargs(self.apply_dropout(cond, draws["drop"]))

        def model_fn(x_t, t):
            return apply(packed.replace(tokens=x_t), t, **kw)

        return losses.flow_matching_loss(model_fn, packed.tokens, draws["x0"], draws["t"], path=self.path,
                                         prediction=self.prediction, mask=self.loss_mask(packed))[0]

    # --- condition hooks ------------------------------------------------------------------------
    def collate(self, elements: list[dict]) -> dict:
        raise NotImplementedError

    def example_cond(self, b: int) -> dict:
        raise NotImplementedError

    def apply_dropout(self, cond: dict, drop: jax.Array) -> dict:
        null = self.null_cond(drop.shape[0])
        return jax.tree.map(lambda c, n: jnp.where(drop.reshape((-1,) + (1,) * (c.ndim - 1)), n, c), cond, null)

    def model_kwargs(self, cond: dict) -> dict:
        raise NotImplementedError

    def null_cond(self, b: int) -> dict:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True, eq=False)
class ClassLabel(FlowTask):
    """Class-conditional: elements carry 'label'; the null class id is `num_classes`."""

    num_classes: int = 1000

    def collate(self, elements):
        labels = np.array([int(e["label"]) for e in elements], np.int32)
        if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"labels {sorted(set(labels.tolist()))} outside [0, {self.num_classes})")
        return {"label": labels}

    def example_cond(self, b):
        return {"label": jnp.zeros((b,), jnp.int32)}

    def model_kwargs(self, cond):
        return {"y": cond["label"]}

    def null_cond(self, b):
        return {"label": jnp.full((b,), self.num_classes, jnp.int32)}


@dataclasses.dataclass(frozen=True, eq=False)
class Caption(FlowTask):
    """Text-conditional on pre-computed caption embeddings.

    Elements carry 'cap_feats' `[S, D]` and 'cap_mask' `[S]` (S the source's fixed caption length).
    `null_feats` `[S, D]` / `null_mask` `[S]` are the empty caption's embedding from the same encoder.
    """

    null_feats: Any = None
    null_mask: Any = None

    def __post_init__(self):
        if self.null_feats is None or self.null_mask is None:
            raise ValueError("the caption task needs the empty caption's embedding (null_feats [S, D], null_mask [S]); "
                             "the data source provides it as null_caption()")
        f, m = np.asarray(self.null_feats), np.asarray(self.null_mask)
        if f.ndim != 2 or m.shape != f.shape[:1]:
            raise ValueError(f"null caption must be feats [S, D] and mask [S], got {f.shape} and {m.shape}")
        if not m.any():
            raise ValueError("the null caption's mask is all False; the empty caption still has its BOS/EOS tokens")

    @property
    def caption_shape(self) -> tuple[int, int]:
        return tuple(np.shape(self.null_feats))

    def collate(self, elements):
        feats = np.stack([np.asarray(e["cap_feats"], np.float32) for e in elements])
        mask = np.stack([np.asarray(e["cap_mask"], bool) for e in elements])
        if feats.shape[1:] != self.caption_shape or mask.shape != feats.shape[:2]:
            raise ValueError(f"caption embeddings {feats.shape} / masks {mask.shape} do not fit the task's "
                             f"[S, D]={self.caption_shape}")
        return {"cap_feats": feats, "cap_mask": mask}

    def example_cond(self, b):
        s, d = self.caption_shape
        return {"cap_feats": jnp.zeros((b, s, d)), "cap_mask": jnp.ones((b, s), bool)}

    def model_kwargs(self, cond):
        return {"cap_feats": cond["cap_feats"], "cap_mask": cond["cap_mask"]}

    def null_cond(self, b):
        s, d = self.caption_shape
        return {"cap_feats": jnp.broadcast_to(jnp.asarray(self.null_feats, jnp.float32), (b, s, d)),
                "cap_mask": jnp.broadcast_to(jnp.asarray(self.null_mask, bool), (b, s))}


@dataclasses.dataclass(frozen=True, eq=False)
class Unconditional(ClassLabel):
    """No condition: a one-class model whose label is always 0 and never dropped (its 'null' is the same)."""

    num_classes: int = 1
    dropout: float = 0.0

    def collate(self, elements):
        return {"label": np.zeros((len(elements),), np.int32)}

    def null_cond(self, b):
        return {"label": jnp.zeros((b,), jnp.int32)}


# The order of config.joint's per-modality (image, text) pairs.
ENDPOINT_PAIR = ("image", "text")


@dataclasses.dataclass(frozen=True, eq=False)
class Joint(FlowTask):
    """Image + text tokens, one time per modality (`models/joint.py`). Elements carry 'text' `[S, D]`.

    `draw` adds the text noise 'x0_text' `[B, S, D]` and time 't_text' `[B]` (independent of the
    image's 't'); `loss` = per-sample image loss over patch tokens + text loss, averaged over the batch.
    `model_kwargs(cond)` is the text-conditional use (text clean at t_text = 1); the other modes live in
    `sample_joint.py`.
    """

    text_shape: tuple[int, int] = (2, 16)
    dropout: float = 0.0
    # Per modality and example, independently: probability that its time is set to the clean end
    # (t = 1: it is the other's condition, and its own loss term is dropped) or to pure noise (t = 0:
    # the other is trained as a marginal). One number for both modalities or an (image, text) pair.
    # 0, 0 = the time sampler alone (UniDiffuser). See configs/joint/mnist.py for why the embedded
    # run uses them.
    clean_prob: float | tuple[float, float] = 0.0
    noise_prob: float | tuple[float, float] = 0.0

    def __post_init__(self):
        if self.prediction != "velocity":
            raise ValueError(f"the joint task predicts velocities; got flow.prediction={self.prediction!r}")
        clean, noise = self.endpoints()
        for name, pair in (("clean_prob", clean), ("noise_prob", noise)):
            for modality, v in zip(ENDPOINT_PAIR, pair):
                if not 0.0 <= v < 1.0:
                    raise ValueError(f"config.joint.{name}={getattr(self, name)}: the {modality} probability {v} "
                                     f"must be in [0, 1)")
        for modality, c, n in zip(ENDPOINT_PAIR, clean, noise):
            if c + n >= 1.0:
                raise ValueError(f"config.joint.clean_prob + noise_prob = {c} + {n} for the {modality} must be < 1 "
                                 f"(some times must come from the time sampler)")

    def endpoints(self) -> tuple[tuple[float, float], tuple[float, float]]:
        """((clean_image, clean_text), (noise_image, noise_text)) probabilities."""
        return _modality_pair("clean_prob", self.clean_prob), _modality_pair("noise_prob", self.noise_prob)

    def collate(self, elements):
        text = np.stack([np.asarray(e["text"], np.float32) for e in elements])
        if text.shape[1:] != tuple(self.text_shape):
            raise ValueError(f"text tokens {text.shape} do not fit the joint model's [S, D]={tuple(self.text_shape)}")
        return {"text": text}

    def example_cond(self, b):
        return {"text": jnp.zeros((b, *self.text_shape))}

    def draw(self, key, packed, cond):
        """Noise 'x0' / 'x0_text', times 't' / 't_text' `[B]`, and 'w' / 'w_text' `[B]`: 0 where that
        modality was set clean (a condition: no loss), else 1."""
        b = packed.tokens.shape[0]
        k_noise, k_text, k_t, k_tt, k_e = jax.random.split(key, 5)
        t0, t1 = losses.train_interval(self.path, self.prediction)
        sampler = timesteps.get_time_sampler(self.time_sampler)
        u = jax.random.uniform(k_e, (2, b))  # one endpoint draw per modality: independent times
        p_clean, p_noise = (jnp.asarray(p, jnp.float32)[:, None] for p in self.endpoints())
        clean, noise = u < p_clean, (u >= p_clean) & (u < p_clean + p_noise)
        times = []
        for i, k in enumerate((k_t, k_tt)):
            t = t0 + (t1 - t0) * sampler(k, b)
            times.append(jnp.where(clean[i], t1, jnp.where(noise[i], t0, t)))
        w = 1.0 - clean.astype(jnp.float32)
        return {"x0": jax.random.normal(k_noise, packed.tokens.shape, packed.tokens.dtype),
                "x0_text": jax.random.normal(k_text, cond["text"].shape, cond["text"].dtype),
                "t": times[0], "t_text": times[1], "w": w[0], "w_text": w[1]}

    def loss(self, apply, packed, cond, draws):
        x_img, u_img = self.path.interpolate(draws["x0"], packed.tokens, draws["t"])
        x_txt, u_txt = self.path.interpolate(draws["x0_text"], cond["text"], draws["t_text"])
        v_img, v_txt = apply(packed.replace(tokens=x_img.astype(packed.tokens.dtype)), draws["t"],
                             text=x_txt.astype(cond["text"].dtype), t_text=draws["t_text"])
        m = self.loss_mask(packed).astype(jnp.float32)
        err_img = jnp.sum((v_img - u_img.astype(jnp.float32)) ** 2, -1) / packed.tokens.shape[-1]  # [B, L]
        per_img = jnp.sum(err_img * m, 1) / jnp.maximum(jnp.sum(m, 1), 1.0)
        per_txt = jnp.mean((v_txt - u_txt.astype(jnp.float32)) ** 2, axis=(1, 2))
        return jnp.mean(draws["w"] * per_img + draws["w_text"] * per_txt)

    def model_kwargs(self, cond):
        b = cond["text"].shape[0]
        return {"text": cond["text"], "t_text": jnp.ones((b,), jnp.float32)}

    def null_cond(self, b):
        raise ValueError("the joint task has no null condition: guidance uses the model's marginal "
                         "(flagdit_jax.sample_joint)")


def _modality_pair(name, v) -> tuple[float, float]:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v), float(v)
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                            for x in v):
        return float(v[0]), float(v[1])
    raise ValueError(f"config.joint.{name}={v!r}; expected a number or an (image, text) pair of numbers "
                     f"(on the command line over a pair: --config.joint.{name}='(0.1,0.3)')")


def joint_endpoints(config) -> dict:
    """`config.joint`'s clean_prob / noise_prob as `Joint` keyword arguments, each a number or an
    (image, text) pair (`Joint` checks the values); unknown keys are an error."""
    jc = config.get("joint", None) or {}
    unknown = sorted(set(jc.keys()) - {"clean_prob", "noise_prob"})
    if unknown:
        raise ValueError(f"config.joint has unknown keys {unknown}; expected clean_prob and noise_prob")
    return {name: tuple(v) if isinstance(v, list) else v for name, v in jc.items()}


def task_name(config, model_cfg) -> str:
    """`config.task`, or the model's own kind of condition when the config does not say."""
    name = config.get("task", None) or ("joint" if getattr(model_cfg, "kind", "") == "joint" else
                                        "caption" if getattr(model_cfg, "cap_feat_dim", 0) else "class_label")
    if name not in TASKS:
        raise ValueError(f"config.task={name!r}; expected one of {TASKS}")
    return name


def get_task(config, model_cfg, source=None) -> FlowTask:
    """The task `config.task` names, for `model_cfg`; the caption task reads the empty caption's
    embedding from `source.null_caption()`."""
    name = task_name(config, model_cfg)
    common = dict(path=paths.get_path(config.flow.path), time_sampler=config.flow.time_sampler,
                  prediction=config.flow.prediction)
    if (name == "joint") != (getattr(model_cfg, "kind", "") == "joint"):
        raise ValueError(f"config.task={name!r} with a {type(model_cfg).__name__}: the joint task needs the joint "
                         f"model (preset 'joint-tiny' or a JointConfig) and the joint model needs the joint task")
    if name == "joint":
        return Joint(text_shape=(model_cfg.text_len, model_cfg.text_dim), **joint_endpoints(config), **common)
    if name == "unconditional":
        if getattr(model_cfg, "num_classes", 0) != 1 or model_cfg.class_dropout_prob:
            raise ValueError(f"config.task='unconditional' needs a one-class model without label dropout "
                             f"(model.num_classes=1, model.class_dropout_prob=0), got num_classes="
                             f"{getattr(model_cfg, 'num_classes', None)}, class_dropout_prob="
                             f"{getattr(model_cfg, 'class_dropout_prob', None)}")
        return Unconditional(**common)
    if name == "class_label":
        if not getattr(model_cfg, "num_classes", 0):
            raise ValueError("config.task='class_label' needs a class-conditional model (config.model.num_classes > 0)")
        return ClassLabel(num_classes=model_cfg.num_classes, dropout=model_cfg.class_dropout_prob, **common)
    if not getattr(model_cfg, "cap_feat_dim", 0):
        raise ValueError("config.task='caption' needs a text-conditional model (config.model.cap_feat_dim > 0)")
    if source is None or not hasattr(source, "null_caption"):
        raise ValueError(f"config.task='caption' needs a data source with caption embeddings and null_caption(); "
                         f"config.data.name={config.data.name!r} has none")
    null = source.null_caption()
    if np.shape(null["cap_feats"])[-1] != model_cfg.cap_feat_dim:
        raise ValueError(f"the data's caption embeddings have width {np.shape(null['cap_feats'])[-1]} but "
                         f"config.model.cap_feat_dim={model_cfg.cap_feat_dim}")
    return Caption(null_feats=np.asarray(null["cap_feats"], np.float32), null_mask=np.asarray(null["cap_mask"], bool),
                   dropout=float(config.get("caption_dropout", 0.1)), **common)
