"""Conditional flow-matching losses (REFERENCE.md §3; SiT / Lumina `transport.py: training_losses`).

Per sample: mean over all of that sample's (valid) elements of the squared error; then the mean
over the batch. With a validity mask each sample is averaged over its own valid elements, so every
sample weighs the same regardless of its size (Lumina's treatment of variable-size T2I lists).

Targets by parameterisation (SiT `training_losses`), x_t = alpha x1 + sigma x0:
  * 'velocity': (pred - u_t)^2 with u_t = d_alpha x1 + d_sigma x0   (linear: u = x1 - x0)
  * 'noise':    w(t) * (pred - x0)^2
  * 'score':    w(t) * (pred * sigma_t + x0)^2       (i.e. pred -> -x0 / sigma_t)
with SiT's `loss_weight`: None -> w = 1, 'velocity' -> (drift_var / sigma)^2,
'likelihood' -> drift_var / sigma^2, drift_var = `path.sbdm_diffusion(t)`. The weight applies to
the noise / score parameterisations only, as in SiT.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable

import jax
import jax.numpy as jnp

from flagdit_jax.flow.paths import LinearPath, VPPath, expand_t_like, get_path
from flagdit_jax.flow.timesteps import get_time_sampler

__all__ = ["flow_matching_loss", "sample_and_loss", "sample_interval", "to_velocity", "train_interval", "PREDICTIONS",
           "LOSS_WEIGHTS"]

PREDICTIONS = ("velocity", "noise", "score")
LOSS_WEIGHTS = (None, "velocity", "likelihood")

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


def _check_prediction(prediction, loss_weight):
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; expected one of {PREDICTIONS}")
    if loss_weight not in LOSS_WEIGHTS:
        raise ValueError(f"unknown loss_weight {loss_weight!r}; expected one of {LOSS_WEIGHTS}")


def _align_mask(mask, shape):
    """Left-align `mask` with x's shape (leading axis = batch) and broadcast it to `shape`.

    A [B, L] token mask thus applies to x of shape [B, L, D]; a full-rank mask broadcasts as usual.
    """
    mask = jnp.asarray(mask)
    if mask.ndim > len(shape) or mask.ndim == 0:
        raise ValueError(f"mask of shape {mask.shape} does not fit x of shape {shape}; expected a "
                         "mask whose leading axis is the batch, e.g. [B] or [B, L] or x's shape")
    mask = mask.reshape(mask.shape + (1,) * (len(shape) - mask.ndim))
    for m, s in zip(mask.shape, shape):
        if m not in (1, s):
            raise ValueError(f"mask of shape {mask.shape} (left-aligned) is not broadcastable to "
                             f"x of shape {shape}")
    return jnp.broadcast_to(mask, shape)


def flow_matching_loss(
    model_fn: ModelFn,
    x1: jax.Array,
    x0: jax.Array,
    t: jax.Array,
    *,
    path=LinearPath(),
    prediction: str = "velocity",
    mask: jax.Array | None = None,
    loss_weight: str | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Conditional flow-matching loss for given noise and times.

    Args:
      model_fn: `model_fn(x_t [B, ...], t [B]) -> prediction [B, ...]` (same shape as x1).
      x1: data, [B, ...].
      x0: noise, same shape as x1 (N(0, I) in training).
      t: [B] times in [0, 1] (0 = noise, 1 = data).
      path: a path from `flow.paths` or its name ('linear' | 'gvp' | 'vp').
      prediction: 'velocity' | 'noise' | 'score' (what model_fn predicts; see module docstring).
      mask: optional validity mask (1 = valid), leading axis = batch, left-aligned and broadcast to
        x1's shape (e.g. [B, L] for x1 [B, L, D]). Per-sample loss = sum(err*mask)/sum(mask); a
        sample with no valid element gets loss 0 (it still counts in the batch mean).
      loss_weight: None | 'velocity' | 'likelihood' (SiT; noise/score predictions only).
    Returns:
      (loss, per_sample): scalar mean over the batch, and the [B] per-sample losses (float32).
    """
    path = get_path(path)
    _check_prediction(prediction, loss_weight)
    x1 = jnp.asarray(x1)
    x0 = jnp.asarray(x0)
    t = jnp.asarray(t)
    if x1.ndim < 1:
        raise ValueError(f"x1 must have a leading batch axis, got shape {x1.shape}")
    if x0.shape != x1.shape:
        raise ValueError(f"x0 shape {x0.shape} != x1 shape {x1.shape}")
    if t.shape != x1.shape[:1]:
        raise ValueError(f"t must have shape [B]={x1.shape[:1]}, got {t.shape}")
    if mask is not None:
        mask = _align_mask(mask, x1.shape)

    xt, ut = path.interpolate(x0, x1, t)
    pred = model_fn(xt.astype(x1.dtype), t)  # the model sees the data dtype (e.g. bf16)
    if jnp.shape(pred) != x1.shape:
        raise ValueError(f"model_fn returned shape {jnp.shape(pred)}, expected x1's {x1.shape}")
    # Errors in float32 even for bf16 models: the reduction is long.
    pred = pred.astype(jnp.float32)
    te = expand_t_like(t, x1).astype(jnp.float32)
    if prediction == "velocity":
        err = (pred - ut.astype(jnp.float32)) ** 2
    else:
        sigma_t = path.sigma(te)
        if loss_weight is None:
            weight = 1.0
        elif loss_weight == "velocity":
            weight = (path.sbdm_diffusion(te) / sigma_t) ** 2
        else:  # likelihood
            weight = path.sbdm_diffusion(te) / sigma_t**2
        x0f = x0.astype(jnp.float32)
        if prediction == "noise":
            err = weight * (pred - x0f) ** 2
        else:  # score: SiT's target, pred * sigma_t + x0 -> 0
            err = weight * (pred * sigma_t + x0f) ** 2

    axes = tuple(range(1, x1.ndim))
    if mask is None:
        per_sample = jnp.mean(err, axis=axes) if axes else err
    else:
        m = mask.astype(jnp.float32)
        num = jnp.sum(err * m, axis=axes) if axes else err * m
        den = jnp.sum(m, axis=axes) if axes else m
        per_sample = jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)
    return jnp.mean(per_sample), per_sample


def train_interval(path=LinearPath(), prediction: str = "velocity",
                   train_eps: float | None = None) -> tuple[float, float]:
    """[t0, t1] that training times are mapped onto: SiT / Lumina `create_transport` defaults and
    `Transport.check_interval` (transport/__init__.py, transport.py):

      * VP path: train_eps = 1e-5 for every prediction, interval [0, 1 - eps] (d_sigma -> -inf
        at t=1; t=0 is fine);
      * linear / GVP, noise or score prediction: eps = 1e-3, interval [eps, 1 - eps];
      * linear / GVP, velocity prediction: eps = 0, [0, 1] ("stable everywhere").
    An explicit `train_eps` replaces the default (official velocity + linear/GVP ignores it;
    here it gives [eps, 1 - eps]).

    Returns:
      (t0, t1) as Python floats.
    """
    path = get_path(path)
    _check_prediction(prediction, None)
    is_vp = isinstance(path, VPPath)
    if train_eps is None:
        train_eps = 1e-5 if is_vp else (0.0 if prediction == "velocity" else 1e-3)
    if not (isinstance(train_eps, numbers.Real) and 0.0 <= train_eps < 0.5):
        raise ValueError(f"train_eps must be a number in [0, 0.5), got {train_eps!r}")
    return (0.0 if is_vp else float(train_eps)), 1.0 - float(train_eps)


def sample_interval(path=LinearPath(), prediction: str = "velocity",
                    sample_eps: float | None = None) -> tuple[float, float]:
    """[t0, t1] an ODE sampler integrates over (SiT `Transport.check_interval(..., eval=True)`,
    `create_transport` default sample_eps = 1e-3):

      * VP path, any prediction: [0, 1 - eps] (the velocity diverges at t=1);
      * linear / GVP, noise or score prediction: [eps, 1 - eps] (the conversion to a velocity is
        singular at t=0, and noise -> velocity divides by sigma -> 0 at t=1 for score);
      * linear / GVP, velocity prediction: [0, 1].
    """
    path = get_path(path)
    _check_prediction(prediction, None)
    is_vp = isinstance(path, VPPath)
    if sample_eps is None:
        sample_eps = 1e-3 if (is_vp or prediction != "velocity") else 0.0
    if not (isinstance(sample_eps, numbers.Real) and 0.0 <= sample_eps < 0.5):
        raise ValueError(f"sample_eps must be a number in [0, 0.5), got {sample_eps!r}")
    return (0.0 if is_vp else float(sample_eps)), 1.0 - float(sample_eps)


def to_velocity(prediction_value, x, t, path=LinearPath(), prediction: str = "velocity"):
    """The velocity a model's output stands for: identity for 'velocity', else the path's
    `velocity_from_noise` / `velocity_from_score` (SiT `ode` drift for noise / score models).
    Shapes like x; t a scalar or `[B]`. The conversion is affine in the prediction, so guidance
    applied before or after it gives the same velocity."""
    path = get_path(path)
    _check_prediction(prediction, None)
    if prediction == "velocity":
        return prediction_value
    if prediction == "noise":
        return path.velocity_from_noise(prediction_value, x, t)
    return path.velocity_from_score(prediction_value, x, t)


def sample_and_loss(
    model_fn: ModelFn,
    x1: jax.Array,
    key: jax.Array,
    *,
    path=LinearPath(),
    time_sampler="uniform",
    prediction: str = "velocity",
    mask: jax.Array | None = None,
    loss_weight: str | None = None,
    train_eps: float | None = None,
) -> tuple[jax.Array, dict[str, Any]]:
    """Draw x0 ~ N(0, I) and t, then `flow_matching_loss`.

    Times are drawn on [0, 1] by `time_sampler` (a name for `get_time_sampler` or `fn(key, n)`)
    and mapped affinely to `train_interval(path, prediction, train_eps)` as SiT/Lumina do:
    [train_eps, 1 - train_eps] with train_eps = 0 for velocity prediction (linear/GVP are stable
    everywhere), 1e-3 for noise/score prediction; [0, 1 - 1e-5] for the VP path. (Lumina skips the
    interval map for 'shift_<s>'; that matters only where eps > 0: noise/score prediction, which
    Lumina does not support, and the VP path.)

    Args:
      model_fn, x1, path, prediction, mask, loss_weight: as in `flow_matching_loss`.
      key: PRNG key.
    Returns:
      (loss, aux) with aux = {'per_sample': [B], 't': [B]}; fits `jax.value_and_grad(has_aux=True)`.
    """
    path = get_path(path)
    _check_prediction(prediction, loss_weight)
    sampler = get_time_sampler(time_sampler)
    x1 = jnp.asarray(x1)
    if x1.ndim < 1:
        raise ValueError(f"x1 must have a leading batch axis, got shape {x1.shape}")
    t0, t1 = train_interval(path, prediction, train_eps)
    k_noise, k_t = jax.random.split(key)
    x0 = jax.random.normal(k_noise, x1.shape, x1.dtype)
    t = sampler(k_t, x1.shape[0])
    t = t0 + (t1 - t0) * t
    loss, per_sample = flow_matching_loss(model_fn, x1, x0, t, path=path, prediction=prediction,
                                          mask=mask, loss_weight=loss_weight)
    return loss, {"per_sample": per_sample, "t": t}
