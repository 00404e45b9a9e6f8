"""The distillation objective: Gaussian moment matching of one student jump against the teacher's trajectory.

A K-step student's jump i takes the teacher's chain state at index j_i to a Gaussian
N(mean, tau^2 exp(log_var)) through the runtime's own step (``training.graph_modules.ddpm_update`` on the
:func:`far_sdk.maths.distilled.distilled_step_table` row: the exported graph computes exactly this). The loss is
that Gaussian's negative log-likelihood of the teacher's state at the next jump point (or its sample), per
channel: minimised, the mean and variance equal the teacher's conditional mean and variance (its first two
moments) given the source state and the condition.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from far_sdk.maths.diffusion import Step
from far_sdk.maths.distilled import DISTILLED_STEPS, distilled_step_table, teacher_boundaries

from ..diffloss import SimpleMLPAdaLN
from ..graph_modules import ddpm_update
from .teacher import STATE_INDICES

#: Every (K, jump) pair: (K, i, source state column, target state column).
JUMPS: tuple[tuple[int, int, int, int], ...] = tuple(
    (k, i, STATE_INDICES.index(src[i]), STATE_INDICES.index(src[i + 1] if i + 1 < k else -1))
    for k in DISTILLED_STEPS
    for src in [teacher_boundaries(k)]
    for i in range(k)
)
#: The step table rows of every jump (cfg, temperature and clip columns set per batch row), [len(JUMPS), len(Step)].
JUMP_ROWS = torch.from_numpy(
    np.stack([distilled_step_table(k, 1.0, 1.0, None)[i] for k, i, _, _ in JUMPS]).astype(np.float32)
)


def jump_moments(
    net: SimpleMLPAdaLN, x: torch.Tensor, cond: torch.Tensor, rows: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, C] source states, cond [N, 2, W], rows [N, len(Step)] (noise scale 1) -> the jump's mean and
    standard deviation [N, C] before the temperature, from the runtime's step: mean = step(noise 0),
    std = step(noise 1) - mean."""
    N, C = x.shape
    W = cond.shape[-1]
    temb = net.time_embed(rows[:, Step.timestep])  # (N, W): each row's own timestep
    y = torch.cat([temb, temb]) + cond.transpose(0, 1).reshape(2 * N, W)  # rows [cond; uncond] as the graph
    out = net.trunk(torch.cat([x, x]), y)  # (2N, 2C)
    cols = rows.t()[:, :, None]  # (len(Step), N, 1): step[c] broadcasts per row
    mean = ddpm_update(out, x, torch.zeros_like(x), cols)
    std = ddpm_update(out, x, torch.ones_like(x), cols) - mean
    return mean, std


def distill_loss(
    student: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    states: torch.Tensor,
    cond: torch.Tensor,
    cfg: torch.Tensor,
    temperature: torch.Tensor,
    jump: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean Gaussian NLL (nats per channel, without the constant) of the teacher's next state under the student's
    jump ``jump`` [N] (indices into :data:`JUMPS`) from rows of :class:`~.teacher.TeacherData`; also the mean
    squared error of the mean, for the log. ``student(x, cond, rows)`` -> (mean, std): :func:`jump_moments` of
    a network (``training.distill.train.StudentJump``, possibly inside DistributedDataParallel)."""
    idx = torch.tensor([(s, t) for _, _, s, t in JUMPS])[jump]  # (N, 2)
    ar = torch.arange(states.shape[0])
    x, target = states[ar, idx[:, 0]], states[ar, idx[:, 1]]
    rows = JUMP_ROWS[jump].clone()
    rows[:, Step.cfg_scale] = cfg
    mean, std = student(x, cond, rows)
    var = (std * temperature[:, None]) ** 2
    err = (target - mean) ** 2
    nll = 0.5 * (torch.log(var) + err / var)
    loss = nll.mean()
    stats = {
        "nll": float(loss.detach()),
        "mse": float(err.detach().mean()),
        "log_std": 0.5 * math.log(float(var.detach().mean())),
    }
    return loss, stats
