"""Flow matching (SiT's split, DESIGN.md principle 3): paths, time sampling, losses, samplers.

Convention everywhere: t=0 is noise x0 ~ N(0, I), t=1 is data x1 (REFERENCE.md §3).
"""

from flagdit_jax.flow.losses import flow_matching_loss, sample_and_loss, sample_interval, to_velocity, train_interval
from flagdit_jax.flow.paths import GVPPath, LinearPath, VPPath, get_path
from flagdit_jax.flow.samplers import (
    cfg_combine,
    guided_velocity_fn,
    sample,
    sample_ode,
    sample_sde,
)
from flagdit_jax.flow.timesteps import (
    diffusers_grid,
    get_time_sampler,
    sample_logit_normal,
    sample_uniform,
    shift_time,
    sigmoid_grid,
    time_grid,
)

__all__ = [
    "GVPPath",
    "LinearPath",
    "VPPath",
    "cfg_combine",
    "diffusers_grid",
    "flow_matching_loss",
    "get_path",
    "get_time_sampler",
    "guided_velocity_fn",
    "sample",
    "sample_and_loss",
    "sample_logit_normal",
    "sample_ode",
    "sample_sde",
    "sigmoid_grid",
    "sample_uniform",
    "shift_time",
    "time_grid",
    "sample_interval",
    "to_velocity",
    "train_interval",
]
