"""Analytic FLOP counts of FAR sampling, as pure functions of the configs (no model is built, no torch):
a config is ``training.config.FARConfig`` / ``training.vae.VAEConfig`` or the same fields as a dict,
e.g. a bundle manifest's ``model`` / ``vae``.

Convention
----------
- One multiply-add is 2 FLOPs. Counted: every matrix product of a Linear layer
  (``2 * rows * in * out``), every convolution (``2 * C_out * C_in * kh * kw * H_out * W_out``
  per image, the whole kernel at every output position, padding included), and the two
  products of attention, ``Q K^T`` and ``A V`` (``2 * N_q * N_k * d`` each, summed over heads).
- Not counted: bias additions, residual additions, LayerNorm / GroupNorm, GELU / SiLU / swish,
  softmax and the attention scale, embedding look-ups, positional-embedding additions, the
  nearest-neighbour upsampling, the adaLN modulation arithmetic (``x * (1 + scale) + shift``,
  ``gate * u``), the CFG mix, the DDPM update, the frequency filter and the noise draws. All of
  these are O(elements) rather than O(elements x width): a rough count puts them near 0.3 % of
  the transformer and diffusion-MLP figures and near 1 % of the VAE decoder's (GroupNorm and
  swish on the wide, full-resolution feature maps).
- This is exactly the convention of ``torch.utils.flop_counter.FlopCounterMode`` (``mm``/``addmm``/
  ``bmm`` = 2 m n k with the ``addmm`` bias ignored, ``convolution`` likewise, ``sdpa`` = the two
  attention products), so the counts here equal its totals on the real modules to the FLOP
  (``tests/test_model_stats.py``). On CPU, ``FlopCounterMode`` has no formula for
  ``aten._scaled_dot_product_flash_attention_for_cpu`` (it reports 0 for attention); the test maps
  that op to torch's own ``sdpa_flop_count``.

What a "call" is
----------------
The runtime (``far_sdk.bundle.graphs``) splits one outer step into a ``transformer`` graph, which also
computes the diffusion MLP's timestep-independent condition ``cond_embed(z) + index_cond_embed(level)``
once per outer step, and a ``denoiser`` graph run once per inner DDPM step, in which the timestep
embedding is computed on one row (every row of a step has the same t). The official code instead
recomputes ``cond_embed`` and ``index_cond_embed`` on every row at every inner step and embeds the
timestep on every row: pass ``eager=True`` (or the individual flags) to count it that way.
Only the no-mask sampler is modelled (every call sees all K + L = 320 positions).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import SimpleNamespace
from typing import Any, Union

from far_sdk.maths.schedules import inner_step_schedule

#: A FAR model config: training.config.FARConfig or its dict (a bundle manifest's "model").
FARConfig = Any
#: A VAE config: training.vae.VAEConfig or its dict (a bundle manifest's "vae").
VAEConfig = Any

#: Width of the sinusoidal timestep features fed to ``time_embed.mlp.0``.
TIME_FREQ_DIM = 256


def _config(cfg: Any) -> Any:
    """A config object, or a manifest dict read as one (with the derived ``seq_len`` / ``downsample_factor``)."""
    if not isinstance(cfg, Mapping):
        return cfg
    ns = SimpleNamespace(**cfg)
    if "grid_size" in cfg:
        ns.seq_len = cfg["grid_size"] ** 2
    if "ch_mult" in cfg:
        ns.downsample_factor = 2 ** (len(cfg["ch_mult"]) - 1)
    return ns


def _linear(rows: int, fan_in: int, fan_out: int) -> int:
    return 2 * rows * fan_in * fan_out


def _conv(batch: int, c_in: int, c_out: int, k: int, h: int, w: int) -> int:
    return 2 * batch * c_out * c_in * k * k * h * w


def _block(rows: int, n: int, d: int, mlp_ratio: float) -> dict[str, int]:
    """One pre-norm ViT block on ``rows`` sequences of ``n`` tokens of width ``d``."""
    hidden = int(d * mlp_ratio)
    t = rows * n
    return {
        "qkv": _linear(t, d, 3 * d),
        "attn_qk": 2 * rows * n * n * d,  # all heads together: heads * n * n * head_dim
        "attn_av": 2 * rows * n * n * d,
        "proj": _linear(t, d, d),
        "fc1": _linear(t, d, hidden),
        "fc2": _linear(t, hidden, d),
    }


def _add(acc: dict[str, int], part: dict[str, int], prefix: str = "") -> None:
    for k, v in part.items():
        acc[prefix + k] = acc.get(prefix + k, 0) + v


# ---- transformer -----------------------------------------------------------------------------------------------


def transformer_flops_breakdown(cfg: FARConfig, batch_rows: int, *, include_condition: bool = True) -> dict[str, int]:
    """Per-component FLOPs of one transformer call on ``batch_rows`` sequences (see :func:`transformer_flops`)."""
    cfg = _config(cfg)
    K, L, C = cfg.buffer_size, cfg.seq_len, cfg.token_channels
    N = K + L
    De, Dd, W = cfg.encoder_embed_dim, cfg.decoder_embed_dim, cfg.diffloss_w
    out: dict[str, int] = {"z_proj": _linear(batch_rows * L, C, De)}  # buffer rows are copies of the class embedding
    for _ in range(cfg.encoder_depth):
        _add(out, _block(batch_rows, N, De, cfg.mlp_ratio), "encoder.")
    out["decoder_embed"] = _linear(batch_rows * N, De, Dd)
    for _ in range(cfg.decoder_depth):
        _add(out, _block(batch_rows, N, Dd, cfg.mlp_ratio), "decoder.")
    if include_condition:
        out["cond_embed"] = _linear(batch_rows * L, Dd, W)  # on the L image tokens (buffer rows dropped)
        out["index_cond_embed"] = _linear(1, 1, W)  # level [1]: one row per call
    return out


def transformer_flops(cfg: FARConfig, batch_rows: int, *, include_condition: bool = True) -> int:
    """FLOPs of one transformer call over ``batch_rows`` sequences of K + L (= 320) tokens.

    z_proj (on the L image tokens), encoder blocks (qkv, Q K^T, A V, proj, fc1, fc2),
    decoder_embed, decoder blocks, and — with ``include_condition`` (the runtime graph) — the
    diffusion MLP's condition projections: ``cond_embed`` (D -> W on the L tokens of every row)
    and ``index_cond_embed`` (1 -> W, once per call). With classifier-free guidance a sampler
    calls this with ``batch_rows = 2 * batch``.
    """
    return sum(transformer_flops_breakdown(cfg, batch_rows, include_condition=include_condition).values())


# ---- diffusion MLP ---------------------------------------------------------------------------------------------


def denoiser_step_flops_breakdown(
    cfg: FARConfig,
    batch: int,
    *,
    cfg_guidance: bool = True,
    include_condition: bool = False,
    time_embed_per_row: bool = False,
) -> dict[str, int]:
    """Per-component FLOPs of one DDPM step of the diffusion MLP (see :func:`denoiser_step_flops`)."""
    cfg = _config(cfg)
    C, L, W, Dd = cfg.token_channels, cfg.seq_len, cfg.diffloss_w, cfg.decoder_embed_dim
    rows = (2 if cfg_guidance else 1) * batch * L
    t_rows = rows if time_embed_per_row else 1
    out = {"time_embed": _linear(t_rows, TIME_FREQ_DIM, W) + _linear(t_rows, W, W)}
    if include_condition:
        out["cond_embed"] = _linear(rows, Dd, W)
        out["index_cond_embed"] = _linear(rows, 1, W)
    out["input_proj"] = _linear(rows, C, W)
    out["res_blocks.adaLN"] = cfg.diffloss_d * _linear(rows, W, 3 * W)
    out["res_blocks.mlp"] = cfg.diffloss_d * 2 * _linear(rows, W, W)
    out["final_layer.adaLN"] = _linear(rows, W, 2 * W)
    out["final_layer.linear"] = _linear(rows, W, 2 * C)
    return out


def denoiser_step_flops(
    cfg: FARConfig,
    batch: int,
    *,
    cfg_guidance: bool = True,
    include_condition: bool = False,
    time_embed_per_row: bool = False,
) -> int:
    """FLOPs of one (guided) DDPM step: the diffusion MLP on 2 * batch * L rows.

    The official CFG wrapper feeds the conditional half of x to both halves, so the network
    runs on all ``2 * batch * L`` rows (``batch * L`` with ``cfg_guidance=False``): input_proj
    (C -> W), per res block adaLN (W -> 3W) and two W x W linears, the final adaLN (W -> 2W)
    and linear (W -> 2C), plus the timestep embedding (256 -> W -> W) on one row.

    ``include_condition=True``: also ``cond_embed`` (D -> W) and ``index_cond_embed`` (1 -> W)
    on every row, as the official code recomputes them at every inner step;
    ``time_embed_per_row=True``: the timestep embedding on every row, as the official code does.
    """
    return sum(
        denoiser_step_flops_breakdown(
            cfg,
            batch,
            cfg_guidance=cfg_guidance,
            include_condition=include_condition,
            time_embed_per_row=time_embed_per_row,
        ).values()
    )


# ---- VAE decoder -----------------------------------------------------------------------------------------------


def vae_decoder_flops_breakdown(vae_cfg: VAEConfig, batch: int, latent_size: int | None = None) -> dict[str, int]:
    """Per-part FLOPs of ``decode`` = ``decoder(post_quant_conv(z))`` (see :func:`vae_decoder_flops`)."""
    vae_cfg = _config(vae_cfg)
    h = latent_size if latent_size is not None else vae_cfg.resolution // vae_cfg.downsample_factor
    n = len(vae_cfg.ch_mult)
    c = vae_cfg.ch * vae_cfg.ch_mult[-1]
    out: dict[str, int] = {
        "post_quant_conv": _conv(batch, vae_cfg.embed_dim, vae_cfg.z_channels, 1, h, h),
        "conv_in": _conv(batch, vae_cfg.z_channels, c, 3, h, h),
    }

    def res(c_in: int, c_out: int, side: int) -> int:
        f = _conv(batch, c_in, c_out, 3, side, side) + _conv(batch, c_out, c_out, 3, side, side)
        return f + (_conv(batch, c_in, c_out, 1, side, side) if c_in != c_out else 0)

    hw = h * h
    out["mid.blocks"] = 2 * res(c, c, h)
    out["mid.attn_1"] = 4 * _conv(batch, c, c, 1, h, h) + 2 * (2 * batch * hw * hw * c)  # q, k, v, proj_out; QK^T, AV
    side = h
    for i in reversed(range(n)):
        c_out = vae_cfg.ch * vae_cfg.ch_mult[i]
        f = 0
        for j in range(vae_cfg.num_res_blocks + 1):
            f += res(c if j == 0 else c_out, c_out, side)
        out[f"up.{i}.block"] = f
        if i > 0:
            side *= 2
            out[f"up.{i}.upsample"] = _conv(batch, c_out, c_out, 3, side, side)  # at the upsampled resolution
        c = c_out
    out["conv_out"] = _conv(batch, c, vae_cfg.out_ch, 3, side, side)
    return out


def vae_decoder_flops(vae_cfg: VAEConfig, batch: int, latent_size: int | None = None) -> int:
    """FLOPs of decoding ``batch`` latents of side ``latent_size`` (default resolution / 2^(levels-1) = 16).

    post_quant_conv (1x1), conv_in, the middle res blocks and single-head attention (q, k, v,
    proj_out 1x1 convs and the two HW x HW products), each level's res blocks (two 3x3 convs,
    plus the 1x1 nin_shortcut where the width changes), each upsample conv at the upsampled
    resolution, and conv_out.
    """
    return sum(vae_decoder_flops_breakdown(vae_cfg, batch, latent_size).values())


# ---- whole generation ------------------------------------------------------------------------------------------

PlanLike = Union[Any, tuple[int, Union[int, str, Sequence[int]]]]


def _inner_steps(plan: PlanLike) -> tuple[int, ...]:
    if hasattr(plan, "inner_steps") and hasattr(plan, "levels"):  # far_sdk.maths.schedules.SamplingPlan
        return tuple(int(n) for n in plan.inner_steps)

    num_steps, inner = plan
    return inner_step_schedule(inner, int(num_steps))


def generation_flops(
    cfg: FARConfig,
    vae_cfg: VAEConfig | None,
    plan: PlanLike,
    batch: int = 1,
    cfg_guidance: bool = True,
    *,
    eager: bool = False,
) -> dict[str, float]:
    """FLOPs per image of one generation, by stage, and their total.

    ``plan``: a :class:`far_sdk.maths.schedules.SamplingPlan`, or ``(num_steps, inner_steps)`` with
    ``inner_steps`` as :func:`far_sdk.maths.schedules.inner_step_schedule` takes it ("frequency-aware",
    "official", an int or one count per outer step).

    - ``transformer``: one call per outer step on ``2 * batch`` rows with guidance (``batch``
      without), including the condition projections.
    - ``diffusion_mlp``: :func:`denoiser_step_flops` summed over the inner-step schedule.
    - ``vae_decode``: one :func:`vae_decoder_flops` (0 when ``vae_cfg`` is None).

    ``eager=True`` counts the official code's work instead: the condition projections move from
    the transformer into every inner step, on every row, and the timestep is embedded per row.
    Values are the batch's FLOPs divided by ``batch`` (exact ints for ``batch=1``; only the
    one-row timestep embedding does not scale with the batch).
    """
    inner = _inner_steps(plan)
    rows = 2 * batch if cfg_guidance else batch
    tr = len(inner) * transformer_flops(cfg, rows, include_condition=not eager)
    mlp = sum(inner) * denoiser_step_flops(
        cfg, batch, cfg_guidance=cfg_guidance, include_condition=eager, time_embed_per_row=eager
    )
    vae = vae_decoder_flops(vae_cfg, batch) if vae_cfg is not None else 0
    stages = {"transformer": tr, "diffusion_mlp": mlp, "vae_decode": vae}
    stages["total"] = tr + mlp + vae
    if batch == 1:
        return dict(stages)
    return {k: v / batch for k, v in stages.items()}
