"""The diffusion MLP (``SimpleMLPAdaLN``) and its DDPM training loss, under official names.

``DiffLoss.net`` is the per-token denoiser: given a noisy 16-channel token x_t, its original
timestep t (0..999), the transformer's condition c and the frequency level, it predicts the
noise eps and the variance interpolation value v (learned-range variance).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from far_sdk.maths.diffusion import NUM_TRAIN_TIMESTEPS, diffusion_tables


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


def timestep_features(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features [N, dim] of timesteps t [N]: [cos(t f_k), sin(t f_k)], f_k = exp(-ln(max_period) k /
    (dim/2))."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]  # (N, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, dim)


class TimestepEmbedder(nn.Module):
    def __init__(self, width: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        # features are computed in fp32 (exact for t <= 999), then cast to the weights' dtype
        return self.mlp(timestep_features(t, self.freq_dim).to(self.mlp[0].weight.dtype))


class ResBlock(nn.Module):
    """adaLN residual block: h + gate * MLP(LN(h) * (1 + scale) + shift)."""

    def __init__(self, width: int):
        super().__init__()
        self.in_ln = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        return h + gate * self.mlp(modulate(self.in_ln(h), shift, scale))


class FinalLayer(nn.Module):
    def __init__(self, width: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(h), shift, scale))


class SimpleMLPAdaLN(nn.Module):
    """Per-token denoiser. Output [N, 2C]: columns :C are eps, C: the variance value v."""

    def __init__(self, in_channels: int, width: int, out_channels: int, cond_dim: int, depth: int):
        super().__init__()
        self.in_channels = in_channels
        self.time_embed = TimestepEmbedder(width)
        self.cond_embed = nn.Linear(cond_dim, width)
        self.index_cond_embed = nn.Linear(1, width)
        self.input_proj = nn.Linear(in_channels, width)
        self.res_blocks = nn.ModuleList([ResBlock(width) for _ in range(depth)])
        self.final_layer = FinalLayer(width, out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Official initialisation: Xavier-uniform Linears with zero bias, N(0, .02) time Linears, zero adaLN and
        output."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_embed.mlp[2].weight, std=0.02)
        for blk in self.res_blocks:
            nn.init.zeros_(blk.adaLN_modulation[-1].weight)
            nn.init.zeros_(blk.adaLN_modulation[-1].bias)
        for lin in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def condition(self, c: torch.Tensor, level: torch.Tensor | None) -> torch.Tensor:
        """The timestep-independent part of the adaLN input: cond_embed(c) [+ index_cond_embed(level)].

        Constant over an outer step's inner loop, so fast paths compute it once per outer step.
        """
        y = self.cond_embed(c)
        return y if level is None else y + self.index_cond_embed(level)

    def forward_with_condition(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Denoiser with a precomputed :meth:`condition` (y = time_embed(t) + cond)."""
        return self.trunk(x, self.time_embed(t) + cond)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor, level: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Official evaluation order: y = time_embed(t) + cond_embed(c) + index_cond_embed(level)."""
        y = self.time_embed(t) + self.cond_embed(c)
        if level is not None:
            y = y + self.index_cond_embed(level)
        return self.trunk(x, y)

    def trunk(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.input_proj(x)  # (N, W)
        for blk in self.res_blocks:
            h = blk(h, y)
        return self.final_layer(h, y)  # (N, 2C)

    def forward_with_cfg(
        self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor, level: torch.Tensor | None, cfg_scale: float
    ) -> torch.Tensor:
        """Official CFG wrapper: rows [cond; uncond]; the first half of x is fed to both halves.

        Returns [guided; guided] eps and each half's own v, as the official sampler consumes it.
        """
        half = x[: x.shape[0] // 2]
        out = self.forward(torch.cat([half, half]), t, c, level)
        eps, v = out[:, : self.in_channels], out[:, self.in_channels :]
        eps_c, eps_u = eps.chunk(2)
        guided = eps_u + cfg_scale * (eps_c - eps_u)
        return torch.cat([torch.cat([guided, guided]), v], dim=1)


def _normal_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_std_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _discretized_gaussian_log_likelihood(x, means, log_scales):
    """log-likelihood of x under a Gaussian discretised to 8-bit bins of [-1, 1] (guided-diffusion)."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_std_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return torch.where(
        x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12)))
    )


class DiffLoss(nn.Module):
    """Holds the denoiser as ``net`` (state-dict prefix ``diffloss.net.``) and computes the training loss."""

    def __init__(self, target_channels: int, z_channels: int, depth: int, width: int):
        super().__init__()
        self.in_channels = target_channels
        #: Share of training rows whose t is drawn from [high_t_min, T) instead of [0, T) (0 = official).
        self.high_t_fraction = 0.0
        self.high_t_min = 950
        self.net = SimpleMLPAdaLN(target_channels, width, target_channels * 2, z_channels, depth)
        tab = diffusion_tables(None)  # all 1000 training steps
        # Not parameters and not in the state dict (persistent=False), like the official NumPy arrays.
        for name, arr in (
            ("sqrt_alphas_cumprod", np.sqrt(tab.alphas_cumprod)),
            ("sqrt_one_minus_alphas_cumprod", np.sqrt(1.0 - tab.alphas_cumprod)),
            *(
                (n, getattr(tab, n))
                for n in (
                    "sqrt_recip_alphas_cumprod",
                    "sqrt_recipm1_alphas_cumprod",
                    "posterior_mean_coef1",
                    "posterior_mean_coef2",
                    "posterior_log_variance_clipped",
                    "log_betas",
                )
            ),
        ):
            self.register_buffer(name, torch.from_numpy(np.asarray(arr, dtype=np.float32).copy()), persistent=False)

    def loss_terms(
        self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, c: torch.Tensor, level: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row (mse, vb) of the official hybrid loss for explicit t [N] and noise [N, C].

        x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise; mse = mean_c (noise - eps)^2;
        vb = KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t)) / ln 2 with eps detached (t = 0: decoder NLL).
        """
        C = self.in_channels
        x_t = self.sqrt_alphas_cumprod[t][:, None] * x0 + self.sqrt_one_minus_alphas_cumprod[t][:, None] * noise
        out = self.net(x_t, t, c, level)
        eps, v = out[:, :C], out[:, C:]
        mse = ((noise - eps) ** 2).mean(dim=1)
        col = lambda name: getattr(self, name)[t][:, None]  # noqa: E731  (N, 1) at each row's t
        c1, c2 = col("posterior_mean_coef1"), col("posterior_mean_coef2")
        minlog, maxlog = col("posterior_log_variance_clipped"), col("log_betas")
        true_mean = c1 * x0 + c2 * x_t
        x0_hat = col("sqrt_recip_alphas_cumprod") * x_t - col("sqrt_recipm1_alphas_cumprod") * eps.detach()
        model_mean = c1 * x0_hat + c2 * x_t
        frac = (v + 1) / 2
        model_log_var = frac * maxlog + (1 - frac) * minlog
        kl = _normal_kl(true_mean, minlog, model_mean, model_log_var).mean(dim=1) / math.log(2.0)
        nll = -_discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var).mean(dim=1) / math.log(2.0)
        vb = torch.where(t == 0, nll, kl)
        return mse, vb

    def forward(
        self,
        target: torch.Tensor,
        z: torch.Tensor,
        level: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Mean training loss over rows (or over masked rows when ``mask`` is given), random t and noise."""
        N = target.shape[0]
        t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (N,), device=target.device, generator=generator)
        if self.high_t_fraction > 0:
            # Extra rows at the noisiest timesteps, where sampling multiplies the eps error by up to
            # sqrt(1 / alpha_bar_999) ~ 2e4. Off (0) in the official recipe; draws unchanged then.
            hi = torch.randint(self.high_t_min, NUM_TRAIN_TIMESTEPS, (N,), device=target.device, generator=generator)
            pick = torch.rand(N, device=target.device, generator=generator) < self.high_t_fraction
            t = torch.where(pick, hi, t)
        noise = torch.randn(target.shape, device=target.device, dtype=target.dtype, generator=generator)
        mse, vb = self.loss_terms(target, t, noise, z, level)
        loss = mse + vb
        if mask is not None:
            return (loss * mask).sum() / mask.sum()
        return loss.mean()
