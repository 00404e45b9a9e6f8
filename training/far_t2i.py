"""FAR-T2I: the text-to-image FAR transformer under the official names (``models/far_t2i.py``, spec §11).

The class-conditional model's buffer rows give way to cross-attention: every block is a diffusers
``BasicTransformerBlock`` (layer_norm type, no elementwise affine, eps 1e-5; attention biases; GELU-tanh
feed-forward), written here in plain torch:

    x = x + attn1(LN(x))                    self-attention over the image tokens
    x = x + attn2(LN(x), context)           cross-attention to the projected text, no key mask
    x = x + ff(LN(x))                       Linear(D, 4D) -> GELU(tanh) -> Linear(4D, D)

The text hidden states [B, T, Dtxt] pass through ``context_embed`` (Linear Dtxt -> D); the null context
for CFG is the learned ``fake_latent`` [1, T, D] (already in the projected space). Token layout as in
:mod:`training.far`: [B, 256, C], token = row * 16 + column.

Training (official ``forward``): one input level per *sample*, masking always on (a fixed share
m ~ truncated normal(1, 0.25) on [mask_ratio_min, 1] per batch, ceil(L m) tokens per row along a random
order), the loss over all tokens. One deliberate difference: the official code replaces the context of
dropped rows (label drop, for CFG) in the encoder only — its decoder still cross-attends to the text, so
the decoder never learns the null context it gets at sampling time. Here a dropped row gets
``fake_latent`` in both halves, which is what the sampler's unconditional branch feeds.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config_t2i import T2IConfig
from .diffloss import DiffLoss
from .far import init_transformer_layers, kept_attention_mask, kept_rows, refill

#: diffusers' BasicTransformerBlock LayerNorm epsilon (norm_eps=1e-5, elementwise_affine=False).
BLOCK_NORM_EPS = 1e-5


class CrossAttention(nn.Module):
    """diffusers ``Attention`` with biases: to_q/to_k/to_v, to_out.0; heads split contiguously, scale 1/sqrt(hd)."""

    def __init__(self, dim: int, heads: int, head_dim: int, kv_dim: int | None = None):
        super().__init__()
        inner = heads * head_dim
        self.heads, self.head_dim = heads, head_dim
        self.to_q = nn.Linear(dim, inner)
        self.to_k = nn.Linear(kv_dim or dim, inner)
        self.to_v = nn.Linear(kv_dim or dim, inner)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Dropout(0.0)])

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        B, N, _ = x.shape
        kv = x if context is None else context  # (B, M, Dkv)
        H, hd = self.heads, self.head_dim
        q = self.to_q(x).reshape(B, N, H, hd).transpose(1, 2)  # (B, H, N, hd)
        k = self.to_k(kv).reshape(B, kv.shape[1], H, hd).transpose(1, 2)  # (B, H, M, hd)
        v = self.to_v(kv).reshape(B, kv.shape[1], H, hd).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=1.0 / math.sqrt(hd))  # (B, H, N, hd)
        return self.to_out[0](o.transpose(1, 2).reshape(B, N, H * hd))  # (B, N, D)


class GELUProj(nn.Module):
    """diffusers ``GELU(approximate="tanh")``: proj then tanh-approximate GELU."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    """``ff.net`` = [GELUProj, Dropout(0), Linear(inner, dim)] (diffusers FeedForward names)."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.net = nn.ModuleList([GELUProj(dim, inner), nn.Dropout(0.0), nn.Linear(inner, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class TransformerBlock(nn.Module):
    """diffusers ``BasicTransformerBlock`` as FAR-T2I builds it (pre-norm, parameter-free LayerNorms)."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=BLOCK_NORM_EPS, elementwise_affine=False)
        self.attn1 = CrossAttention(dim, heads, head_dim)
        self.norm2 = nn.LayerNorm(dim, eps=BLOCK_NORM_EPS, elementwise_affine=False)
        self.attn2 = CrossAttention(dim, heads, head_dim, kv_dim=context_dim)
        self.norm3 = nn.LayerNorm(dim, eps=BLOCK_NORM_EPS, elementwise_affine=False)
        self.ff = FeedForward(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, context: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x), attn_mask=attn_mask)
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class FART2I(nn.Module):
    """Text-conditional FAR: transformer -> per-token condition z, plus the diffusion MLP ``diffloss``."""

    def __init__(self, config: T2IConfig):
        super().__init__()
        self.config = cfg = config
        De, Dd, L, C, T = cfg.encoder_embed_dim, cfg.decoder_embed_dim, cfg.seq_len, cfg.token_channels, cfg.context_len
        # Direct parameters first, in the official state-dict order.
        self.fake_latent = nn.Parameter(torch.zeros(1, T, De))  # the null (projected) context
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, L, De))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, Dd))
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, L, Dd))
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, L, Dd))
        self.context_embed = nn.Linear(cfg.context_dim, De)
        self.z_proj = nn.Linear(C, De)
        self.z_proj_ln = nn.LayerNorm(De, eps=1e-6)
        hd = cfg.attention_head_dim
        self.encoder_blocks = nn.ModuleList(
            [TransformerBlock(De, cfg.encoder_num_heads, hd, De, cfg.mlp_ratio) for _ in range(cfg.encoder_depth)]
        )
        self.encoder_norm = nn.LayerNorm(De, eps=1e-6)
        self.decoder_embed = nn.Linear(De, Dd)
        self.decoder_blocks = nn.ModuleList(
            [TransformerBlock(Dd, cfg.decoder_num_heads, hd, De, cfg.mlp_ratio) for _ in range(cfg.decoder_depth)]
        )
        self.decoder_norm = nn.LayerNorm(Dd, eps=1e-6)
        self.diffloss = DiffLoss(C, Dd, cfg.diffloss_d, cfg.diffloss_w)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Official initialisation: N(0, .02) for the five direct parameters, Xavier-uniform Linears with zero
        bias and unit/zero affine LayerNorms in the transformer (the diffusion MLP keeps its own)."""
        for p in (
            self.fake_latent,
            self.mask_token,
            self.encoder_pos_embed_learned,
            self.decoder_pos_embed_learned,
            self.diffusion_pos_embed_learned,
        ):
            nn.init.normal_(p, std=0.02)
        init_transformer_layers(self, stop_at=self.diffloss)

    # ---- conditioning -------------------------------------------------------------------------
    def context_embedding(self, context: torch.Tensor) -> torch.Tensor:
        """Text hidden states [B, T, Dtxt] -> projected context [B, T, D] (``context_embed``)."""
        return self.context_embed(context.to(self.context_embed.weight.dtype))

    def cfg_context(self, context: torch.Tensor) -> torch.Tensor:
        """[2B, T, D]: [context_embed(context); fake_latent x B] — the CFG batch, conditional half first."""
        emb = self.context_embedding(context)
        return torch.cat([emb, self.fake_latent.expand(emb.shape[0], -1, -1).to(emb.dtype)])

    # ---- transformer ----------------------------------------------------------------------------
    def forward_encoder(
        self, tokens: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """tokens [B, L, C], projected context [B, T, D], mask [B, L] (1 = dropped) -> [B, L_kept, D]."""
        x = self.z_proj_ln(self.z_proj(tokens) + self.encoder_pos_embed_learned)  # (B, L, D)
        if mask is not None:
            keep = ~mask.bool()
            B, D = x.shape[0], x.shape[-1]
            x = x[keep].reshape(B, int(keep.sum()) // B, D)  # (B, L_kept, D); host sync
        for blk in self.encoder_blocks:
            x = blk(x, context)
        return self.encoder_norm(x)

    def forward_decoder(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder output -> per-token condition z [B, L, D] (mask_token at the dropped positions)."""
        x = self.decoder_embed(x)
        if mask is not None:
            B, L = mask.shape
            full = self.mask_token.to(x.dtype).expand(B, L, -1).clone()  # (B, L, D)
            full[~mask.bool()] = x.reshape(-1, x.shape[-1])
            x = full
        x = x + self.decoder_pos_embed_learned
        for blk in self.decoder_blocks:
            x = blk(x, context)
        return self.decoder_norm(x) + self.diffusion_pos_embed_learned  # (B, L, D)

    def condition(self, tokens: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The transformer: current tokens [B, L, C] + projected context [B, T, D] -> z [B, L, D]."""
        return self.forward_decoder(self.forward_encoder(tokens, context, mask), context, mask)

    def condition_static(self, tokens: torch.Tensor, context: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """:meth:`condition` with ``mask`` [B, L] (1 = dropped) in static shapes, for exported graphs: the encoder's
        self-attention runs on all L rows under :func:`training.far.kept_attention_mask` instead of gathering the
        kept ones, and the decoder's refill with ``mask_token`` is a select (:func:`training.far.refill`). Dropped
        rows' cross-attention and feed-forward are per row, so no kept row reads them."""

        x = self.z_proj_ln(self.z_proj(tokens) + self.encoder_pos_embed_learned)  # (B, L, D)
        keep = kept_rows(mask, 0)  # (B, L) bool
        attn_mask = kept_attention_mask(keep)  # (B, 1, L, L)
        for blk in self.encoder_blocks:
            x = blk(x, context, attn_mask)
        x = refill(self.decoder_embed(self.encoder_norm(x)), keep, self.mask_token)  # (B, L, Dd)
        x = x + self.decoder_pos_embed_learned
        for blk in self.decoder_blocks:
            x = blk(x, context)
        return self.decoder_norm(x) + self.diffusion_pos_embed_learned  # (B, L, Dd)

    # ---- training ---------------------------------------------------------------------------------
    def forward(
        self,
        tokens_in: torch.Tensor,
        context: torch.Tensor,
        target: torch.Tensor,
        levels: torch.Tensor,
        mask: torch.Tensor | None = None,
        drop_context: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Training loss of one batch: tokens_in [B, L, C] (each row low-passed to its own level), text hidden
        states context [B, T, Dtxt], clean target [B, L, C], levels [B], mask [B, L] (1 = dropped),
        drop_context [B] bool (rows that get fake_latent, for CFG)."""
        B, L, C = target.shape
        ctx = self.context_embedding(context)  # (B, T, D)
        if drop_context is not None:
            ctx = torch.where(drop_context[:, None, None], self.fake_latent.to(ctx.dtype), ctx)
        z = self.condition(tokens_in, ctx, mask)  # (B, L, D)
        mul = self.config.diffusion_batch_mul
        z = z.reshape(B * L, -1).repeat(mul, 1)
        tgt = target.reshape(B * L, C).repeat(mul, 1)
        lvl = levels.to(z.dtype).reshape(B, 1).repeat_interleave(L, 0).repeat(mul, 1)  # (B*L*mul, 1)
        return self.diffloss(tgt, z, lvl)
