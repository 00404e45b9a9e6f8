"""Teacher trajectories for distillation, data-free: the frozen FAR samples images of random classes with its
own DDPM inner loop on the :data:`far_sdk.maths.distilled.TEACHER_STEPS`-step chain, and every outer step
contributes one row per (kept) token: the transformer graph's ``cond`` for both CFG halves (exactly what the runtime
feeds a denoiser), that step's guidance scale and temperature, and the inner chain's states at the chain indices
the K-step students jump between (:data:`STATE_INDICES`), the sample last.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from far_sdk.maths.diffusion import denoise_step_table
from far_sdk.maths.distilled import DISTILLED_STEPS, TEACHER_STEPS, teacher_boundaries
from far_sdk.maths.schedules import SamplingPlan

from ..far import FAR
from ..filters import grid_to_tokens, official_low_pass, tokens_to_grid
from ..graph_modules import DenoiserGraph, TransformerGraph

#: Teacher chain indices whose input state is kept (noisiest first), then -1: the chain's output (the sample).
STATE_INDICES: tuple[int, ...] = (
    *sorted({j for k in DISTILLED_STEPS for j in teacher_boundaries(k)}, reverse=True),
    -1,
)


@dataclass
class TeacherData:
    """N rows (one per token and outer step): cond [N, 2, W] (conditional, unconditional), states
    [N, len(STATE_INDICES), C], cfg [N], temperature [N]."""

    cond: torch.Tensor
    states: torch.Tensor
    cfg: torch.Tensor
    temperature: torch.Tensor

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"cond": self.cond, "states": self.states, "cfg": self.cfg, "temperature": self.temperature}

    @classmethod
    def cat(cls, parts: list[TeacherData]) -> TeacherData:
        return cls(*(torch.cat([getattr(p, f) for p in parts]) for f in ("cond", "states", "cfg", "temperature")))

    def __len__(self) -> int:
        return int(self.cond.shape[0])


@torch.no_grad()
def teacher_trajectories(
    model: FAR, labels: torch.Tensor, plan: SamplingPlan, generator: torch.Generator, keep: int | None = None
) -> TeacherData:
    """Sample ``labels`` [B] with ``model`` following ``plan`` (no-mask DDPM) and return the distillation rows
    of every outer step. ``keep`` tokens per image and outer step (a random subset; None: all) run the
    teacher's :data:`TEACHER_STEPS`-step chain, recorded; the others run ``plan``'s own (shorter) chain, only
    to make the image the next outer step's transformer sees. Every kept token's sample is the teacher's."""
    if plan.mode != "nomask" or plan.inner_sampler != "ddpm":
        raise ValueError("the teacher plan must be no-mask DDPM")
    cfgm = model.config
    B, L, C, G = labels.shape[0], cfgm.seq_len, cfgm.token_channels, cfgm.grid_size
    keep = L if keep is None else min(keep, L)
    tg, dg = TransformerGraph(model), DenoiserGraph(model.diffloss.net)
    ids = torch.cat([labels, torch.full_like(labels, cfgm.num_classes)])  # (2B,): the null class second
    record = {j: i for i, j in enumerate(STATE_INDICES)}
    tokens = torch.zeros(B, L, C)
    parts = []

    def chain(x: torch.Tensor, cond2: torch.Tensor, rows: torch.Tensor, states: torch.Tensor | None) -> torch.Tensor:
        n = rows.shape[0]
        for i, row in enumerate(rows):
            k = n - 1 - i  # the chain index of this step's input
            if states is not None and k in record:
                states[:, :, record[k]] = x
            x = dg(x, torch.randn(x.shape, generator=generator), cond2, row)
        if states is not None:
            states[:, :, record[-1]] = x
        return x

    for s in range(plan.num_steps):
        cond = tg(torch.cat([tokens, tokens]), ids, torch.tensor([float(plan.levels[s])]))  # (2B, L, W)
        cond2 = cond.reshape(2, B, L, -1)
        sel = torch.stack([torch.randperm(L, generator=generator)[:keep] for _ in range(B)])  # (B, keep)
        gather = sel[None, :, :, None].expand(2, B, keep, cond.shape[-1])
        cond_k = torch.gather(cond2, 2, gather)  # (2, B, keep, W)
        teacher_rows = denoise_step_table(TEACHER_STEPS, plan.cfg[s], plan.temperature[s], plan.x0_clip)
        states = torch.empty(B, keep, len(STATE_INDICES), C)
        x_k = chain(torch.randn(B, keep, C, generator=generator), cond_k, torch.from_numpy(teacher_rows), states)
        x = x_k
        if keep < L:
            x = chain(torch.randn(B, L, C, generator=generator), cond2, torch.from_numpy(plan.step_table(s)), None)
            x = x.scatter(1, sel[:, :, None].expand(B, keep, C), x_k)
        parts.append(
            TeacherData(
                cond=cond_k.permute(1, 2, 0, 3).reshape(-1, 2, cond.shape[-1]).clone(),
                states=states.reshape(-1, len(STATE_INDICES), C),
                cfg=torch.full((B * keep,), float(plan.cfg[s])),
                temperature=torch.full((B * keep,), float(plan.temperature[s])),
            )
        )
        raw = tokens_to_grid(x, G)
        after = plan.filter_after[s]
        tokens = grid_to_tokens(raw if after is None else official_low_pass(raw, after, plan.filter))
    return TeacherData.cat(parts)
