"""The three bundle graphs as PyTorch modules, with exactly the signatures of :mod:`far_sdk.bundle.graphs`.

Each wrapper is both what ``far-export onnx`` traces and what the runtime's torch backend runs,
so a bundle's graphs and the torch backend compute the same function by construction:

- :class:`TransformerGraph`: tokens [N, L, C], class_ids [N] int64, level [1] (+ mask [N, L] for a model
  built with mask=True) -> cond [N, L, W].
- :class:`DenoiserGraph`: x [B, L, C], noise [B, L, C], cond [2, B, L, W], step [10] -> x_prev [B, L, C].
- :class:`VAEDecoderGraph`: latents [B, C, H, W] -> image [B, 3, f H, f W].
- :class:`FusedDenoiserStep`: the denoiser step as the torch backend runs it on GPUs (same function,
  fewer and larger kernels); :func:`ddpm_update` is the guided DDPM arithmetic both share.

Ops stay ONNX-friendly at opset 17 (one Gather for the class table, LayerNormalization, no
data-dependent control flow) and keep the reference sampler's float32 evaluation order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from far_sdk.errors import InvalidArgumentError
from far_sdk.maths.diffusion import Step as S

from .diffloss import SimpleMLPAdaLN, timestep_features
from .far import FAR
from .vae import AutoencoderKL, DiagonalGaussian


class TransformerGraph(nn.Module):
    """cond = cond_embed(far.condition(tokens, emb[, mask])) + index_cond_embed(level), per token.

    ``emb`` is row ``class_ids`` of [class_emb.weight; fake_latent], so id ``num_classes`` is the
    null (unconditional) class. Computed once per outer step for the whole CFG batch.
    A model built with mask=True (mask mode only) takes ``mask`` [N, L] float (1 = dropped), run with
    static shapes by :meth:`training.far.FAR.condition_static` (a key mask in attention, a select refill).
    """

    input_names: tuple[str, ...] = ("tokens", "class_ids", "level")
    output_names = ("cond",)

    def __init__(self, far: FAR):
        super().__init__()
        self.far = far
        if far.config.mask:
            self.input_names = TransformerGraph.input_names + ("mask",)

    def forward(
        self, tokens: torch.Tensor, class_ids: torch.Tensor, level: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        far, net = self.far, self.far.diffloss.net
        if far.config.mask and mask is None:
            raise InvalidArgumentError(
                "this model was built with mask=True: its transformer needs the mask [N, L] (mask mode)"
            )
        table = torch.cat([far.class_emb.weight, far.fake_latent])  # (num_classes + 1, D); folded at export
        emb = F.embedding(class_ids, table)  # (N, D): one Gather
        z = far.condition(tokens, emb) if mask is None else far.condition_static(tokens, emb, mask)  # (N, L, D)
        # level [1] -> [1, 1, 1]: index_cond_embed gives one [1, 1, W] row, broadcast over all tokens
        # (the reference applies the same Linear to an identical row per token).
        return net.condition(z, level.reshape(1, 1, 1))  # (N, L, W)


class TextTransformerGraph(nn.Module):
    """The FAR-T2I transformer graph: cond = cond_embed(far.condition_static(tokens, ctx, mask)) +
    index_cond_embed(level)
    with ctx = ``fake_latent`` where null > 0.5 (the unconditional CFG rows), else ``context_embed(context)``.

    context [N, T, D_text] text hidden states, null [N] float (1 / 0), mask [N, L] float (1 = dropped): T2I
    samples in mask mode only. The null context stays inside the graph (its weights), so a caller needs no
    embedding of its own for the unconditional half (any context rows there are ignored).
    """

    input_names: tuple[str, ...] = ("tokens", "context", "null", "level", "mask")
    output_names = ("cond",)

    def __init__(self, far: nn.Module):
        super().__init__()
        self.far = far

    def forward(
        self, tokens: torch.Tensor, context: torch.Tensor, null: torch.Tensor, level: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        far, net = self.far, self.far.diffloss.net
        emb = far.context_embedding(context)  # (N, T, D)
        emb = torch.where(null.reshape(-1, 1, 1) > 0.5, far.fake_latent.to(emb.dtype), emb)
        z = far.condition_static(tokens, emb, mask)  # (N, L, D)
        return net.condition(z, level.reshape(1, 1, 1))  # (N, L, W)


class DenoiserGraph(nn.Module):
    """One guided reverse DDPM step of the diffusion MLP, in the reference sampler's order.

    h = [x; x]; (eps, v) = net(h, t, cond); eps = eps_u + cfg (eps_c - eps_u); v from the
    conditional half; x0 = a x - b eps; mean = c1 x0 + c2 x; frac = (v + 1) / 2;
    log_var = frac max_log + (1 - frac) min_log; x_prev = mean + exp(log_var / 2) noise s,
    with every coefficient read from ``step`` (columns :class:`far_sdk.maths.diffusion.Step`).
    """

    input_names = ("x", "noise", "cond", "step")
    output_names = ("x_prev",)

    def __init__(self, net: SimpleMLPAdaLN):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, noise: torch.Tensor, cond: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        B, L, C = x.shape
        W = cond.shape[-1]
        xf = x.reshape(B * L, C)  # (BL, C)
        h = torch.cat([xf, xf])  # (2BL, C): both CFG halves see x
        # The time embedding of one [1] timestep is broadcast over the rows: every row of the
        # reference gets the same t, so computing it once gives the same values (to float32 rounding:
        # a 1-row GEMM may round differently) at 1/2BL of the cost.
        # ``step`` stays float32 under reduced precision; the features are cast to the network's
        # dtype (a no-op in fp32, where this is exactly net.forward_with_condition).
        net = self.net
        t = step[S.timestep : S.timestep + 1]  # (1,)
        temb = net.time_embed.mlp(timestep_features(t, net.time_embed.freq_dim).to(cond.dtype))  # (1, W)
        out = net.trunk(h.to(cond.dtype), temb + cond.reshape(2 * B * L, W))  # (2BL, 2C)
        return ddpm_update(out, xf, noise.reshape(B * L, C), step).reshape(B, L, C).to(x.dtype)  # (B, L, C)


def ddpm_update(out: torch.Tensor, xf: torch.Tensor, noise: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """The guided reverse step from the network output, in fp32 whatever the network's dtype.

    out [2N, 2C] (rows [cond; uncond], columns [eps, v]), xf [N, C], noise [N, C], step [>= 10]
    (one row of :class:`far_sdk.maths.diffusion.Step` columns) -> x_prev [N, C] float32: the formula in
    ``Step``'s docstring. The one implementation of the step: the exported denoiser graph, the torch
    backend's fused step and the reference sampler's DDPM path all call it.
    At t = 999, x0 = 2e4 x - 2e4 eps loses everything in bf16, hence fp32 (no-op casts in an fp32 graph).
    """
    C = xf.shape[-1]
    dt = (
        torch.float64 if xf.dtype == torch.float64 else torch.float32
    )  # at least fp32 (a float64 reference stays float64)
    out = out.to(dt).reshape(2, -1, 2 * C)  # (2, N, 2C): [cond; uncond]
    xf = xf.to(dt)
    eps_c, eps_u = out[0, :, :C], out[1, :, :C]  # (N, C) each
    eps = eps_u + step[S.cfg_scale] * (eps_c - eps_u)
    v = out[0, :, C:]  # (N, C): conditional half's v
    x0 = step[S.x0_coef_x] * xf - step[S.x0_coef_eps] * eps
    clip = step[S.x0_clip]
    x0 = torch.minimum(torch.maximum(x0, -clip), clip)  # +inf (official): exact no-op
    mean = step[S.mean_coef_x0] * x0 + step[S.mean_coef_xt] * xf
    frac = (v + 1) / 2
    log_var = frac * step[S.max_log_var] + (1 - frac) * step[S.min_log_var]
    return mean + torch.exp(0.5 * log_var) * noise.to(dt) * step[S.noise_scale]


class FusedDenoiserStep(nn.Module):
    """:class:`DenoiserGraph`'s step restructured for GPUs; the same function to rounding.

    - The time embedding is an input: :meth:`time_table` embeds all n timesteps of an outer step
      in one call instead of two 1-row GEMMs per step.
    - Every adaLN modulation (3 W per res block, 2 W for the final layer) is ONE GEMM on SiLU(y):
      y = temb + cond is shared by all blocks, so the concatenated weights give each block's chunk
      (4 small GEMMs -> 1 that fills the GPU).
    - x and noise stay fp32 (the latents never round to bf16); only the network runs in its dtype.
    The concatenated adaLN weights are copies made at construction: build it after moving ``net``.
    """

    def __init__(self, net: SimpleMLPAdaLN):
        super().__init__()
        self.net = net
        mods = [blk.adaLN_modulation[1] for blk in net.res_blocks] + [net.final_layer.adaLN_modulation[1]]
        self.register_buffer("ada_weight", torch.cat([m.weight.detach() for m in mods]).clone(), persistent=False)
        self.register_buffer("ada_bias", torch.cat([m.bias.detach() for m in mods]).clone(), persistent=False)

    def time_table(self, timesteps: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """timesteps [n] (float, 0..999) -> time embeddings [n, W] in ``dtype``."""
        net = self.net
        return net.time_embed.mlp(timestep_features(timesteps, net.time_embed.freq_dim).to(dtype))

    def forward(
        self, x: torch.Tensor, noise: torch.Tensor, cond: torch.Tensor, temb: torch.Tensor, step: torch.Tensor
    ) -> torch.Tensor:
        """x, noise [B, L, C] fp32; cond [2, B, L, W]; temb [W] (a :meth:`time_table` row); step [>= 10] fp32 ->
        x_prev fp32."""
        return self.step_with_modulations(x, noise, self.modulation_table(cond, temb[None])[0], step)

    def modulation_table(self, cond: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """cond [2, B, L, W], temb [n, W] -> every adaLN modulation of n steps, [n, 2BL, (3 depth + 2) W]: one GEMM
        with n x 2BL rows (it does not depend on x, so a whole outer step's can be computed before its loop)."""
        W = cond.shape[-1]
        y = temb[:, None, :] + cond.reshape(1, -1, W)  # (n, 2BL, W): as DenoiserGraph
        return F.linear(F.silu(y), self.ada_weight, self.ada_bias)  # (n, 2BL, (3 depth + 2) W)

    def step_with_modulations(
        self, x: torch.Tensor, noise: torch.Tensor, mods: torch.Tensor, step: torch.Tensor
    ) -> torch.Tensor:
        """x, noise [B, L, C] fp32; mods [2BL, (3 depth + 2) W] (a :meth:`modulation_table` row); step -> x_prev."""
        B, L, C = x.shape
        W = self.ada_weight.shape[1]
        net = self.net
        xf = x.reshape(B * L, C)  # (BL, C)
        h = net.input_proj(torch.cat([xf, xf]).to(mods.dtype))  # (2BL, W)
        off = 0
        for blk in net.res_blocks:
            shift, scale, gate = mods[:, off : off + 3 * W].chunk(3, dim=-1)
            off += 3 * W
            h = h + gate * blk.mlp(blk.in_ln(h) * (1 + scale) + shift)
        shift, scale = mods[:, off : off + 2 * W].chunk(2, dim=-1)
        fl = net.final_layer
        out = fl.linear(fl.norm_final(h) * (1 + scale) + shift)  # (2BL, 2C)
        return ddpm_update(out, xf, noise.reshape(B * L, C), step).reshape(B, L, C)


class VAEDecoderGraph(nn.Module):
    """image = vae.decode(latents / latent_scale): sampler-scale latents -> RGB in about [-1, 1].

    Holds only the decode half (``post_quant_conv``, ``decoder``): its parameters are exactly the
    graph's weights, so a VAE whose encoder was never materialised (e.g. built on the meta
    device from a bundle's ``vae.`` weights) can be moved and run.
    """

    input_names = ("latents",)
    output_names = ("image",)

    def __init__(self, vae: AutoencoderKL, latent_scale: float):
        super().__init__()
        self.post_quant_conv = vae.post_quant_conv
        self.decoder = vae.decoder
        self.latent_scale = float(latent_scale)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        # = AutoencoderKL.decode(latents / latent_scale)
        return self.decoder(self.post_quant_conv(latents / self.latent_scale))  # (B, 3, f H, f W)


class VAEEncoderGraph(nn.Module):
    """(mean, std) = the posterior of vae.encode(image), both x latent_scale: an image in [-1, 1] -> the posterior
    at the sampler's scale (mean + std * eps is a posterior sample). Holds only the encode half."""

    input_names = ("image",)
    output_names = ("mean", "std")

    def __init__(self, vae: AutoencoderKL, latent_scale: float):
        super().__init__()
        self.encoder = vae.encoder
        self.quant_conv = vae.quant_conv
        self.latent_scale = float(latent_scale)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        post = DiagonalGaussian(self.quant_conv(self.encoder(image)))  # = AutoencoderKL.encode(image)
        return post.mean * self.latent_scale, post.std * self.latent_scale  # (B, C, H / f, W / f) each


@torch.no_grad()
def randomize_for_export(model: nn.Module, seed: int, std: float = 0.02) -> nn.Module:
    """Re-draw every parameter that is identically zero with N(0, std^2) noise, in place; returns ``model``.

    A freshly initialised FAR has zero adaLN modulations, a zero final layer, a zero mask_token
    and zero biases, which makes its diffusion MLP output 0 whatever its inputs: useless for
    validating an export or benchmarking. After this every output depends on every input.
    Parameters are visited in ``named_parameters`` order with one ``torch.Generator(seed)``, so
    the result depends only on the model's prior state and ``seed``.
    """
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    for _name, p in model.named_parameters():
        if p.numel() and not p.detach().any():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).mul_(std).to(p.dtype))
    return model
