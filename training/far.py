"""The FAR transformer (MAR-style encoder/decoder with class buffer tokens), under official names.

Token layout: a latent image [B, C, 16, 16] is the token sequence [B, 256, C] in row-major
order (token = row * 16 + column), channels as features (patch size 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import FARConfig
from .diffloss import DiffLoss


class Attention(nn.Module):
    """Multi-head self-attention; qkv outputs ordered [q | k | v], heads split contiguously."""

    def __init__(self, dim: int, num_heads: int, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = attn_drop
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, N, D]; attn_mask [B, 1, N, N] bool (True = query may attend to key), None = full attention."""
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, H, N, hd)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.attn_drop if self.training else 0.0
        )  # (B, H, N, hd)
        x = x.transpose(1, 2).reshape(B, N, D)
        return self.proj_drop(self.proj(x))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm ViT block (timm ``Block`` names, LayerNorm eps 1e-6, exact GELU)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, attn_drop: float, proj_drop: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, attn_drop, proj_drop)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), proj_drop)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), attn_mask)
        return x + self.mlp(self.norm2(x))


# ---- masking with static shapes (the exported graphs; the same function as the gathers below) ------------


def kept_rows(mask: torch.Tensor, buffer_size: int) -> torch.Tensor:
    """mask [B, L] (1 = masked) -> keep [B, K + L] bool: the K buffer rows are always kept."""
    B = mask.shape[0]
    return torch.cat([torch.ones(B, buffer_size, dtype=torch.bool, device=mask.device), mask < 0.5], dim=1)


def kept_attention_mask(keep: torch.Tensor) -> torch.Tensor:
    """keep [B, T] bool -> attn_mask [B, 1, T, T] bool: a kept query attends to the kept keys only;
    a dropped query attends to every key.

    Kept rows then compute exactly what the encoder computes on the gathered kept rows: softmax over
    the kept keys, the dropped keys' weights exactly 0 (exp(-inf)), and the dropped rows stay finite
    (their attention is never empty), so 0 x value adds exactly 0. Dropped rows are garbage that no
    kept row reads and the decoder replaces (:func:`refill`). Every row has at least one allowed key
    even when nothing is kept (a T2I model has no buffer rows), so no softmax is over an empty set.
    """
    return (keep[:, None, :] | ~keep[:, :, None])[:, None]  # (B, 1, T, T)


def refill(x: torch.Tensor, keep: torch.Tensor, mask_token: torch.Tensor) -> torch.Tensor:
    """x [B, T, D], keep [B, T] bool -> x where kept, ``mask_token`` [1, 1, D] elsewhere (one select)."""
    return torch.where(keep[:, :, None], x, mask_token.to(x.dtype))


def init_transformer_layers(model: nn.Module, stop_at: nn.Module) -> None:
    """The official transformer initialisation of ``model``'s modules before ``stop_at`` (the diffusion MLP,
    which keeps its own): Xavier-uniform Linears with zero bias, unit / zero affine LayerNorms."""
    for m in model.modules():
        if m is stop_at:
            break
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class FAR(nn.Module):
    """Class-conditional FAR: transformer -> per-token condition z, plus the diffusion MLP ``diffloss``."""

    def __init__(self, config: FARConfig):
        super().__init__()
        self.config = cfg = config
        De, Dd, K, L, C = cfg.encoder_embed_dim, cfg.decoder_embed_dim, cfg.buffer_size, cfg.seq_len, cfg.token_channels
        # Direct parameters first: their order is the official state-dict order.
        self.fake_latent = nn.Parameter(torch.zeros(1, De))  # the null-class embedding
        self.mask_token = nn.Parameter(torch.zeros(1, 1, Dd))
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, K + L, De))
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, K + L, Dd))
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, L, Dd))
        self.class_emb = nn.Embedding(cfg.num_classes, De)
        self.z_proj = nn.Linear(C, De)
        self.z_proj_ln = nn.LayerNorm(De, eps=1e-6)
        self.encoder_blocks = nn.ModuleList(
            [
                Block(De, cfg.encoder_num_heads, cfg.mlp_ratio, cfg.attn_dropout, cfg.proj_dropout)
                for _ in range(cfg.encoder_depth)
            ]
        )
        self.encoder_norm = nn.LayerNorm(De, eps=1e-6)
        self.decoder_embed = nn.Linear(De, Dd)
        self.decoder_blocks = nn.ModuleList(
            [
                Block(Dd, cfg.decoder_num_heads, cfg.mlp_ratio, cfg.attn_dropout, cfg.proj_dropout)
                for _ in range(cfg.decoder_depth)
            ]
        )
        self.decoder_norm = nn.LayerNorm(Dd, eps=1e-6)
        self.diffloss = DiffLoss(C, Dd, cfg.diffloss_d, cfg.diffloss_w)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Official initialisation (mask_token stays zero unless the model is built for masking)."""
        for p in (
            self.fake_latent,
            self.encoder_pos_embed_learned,
            self.decoder_pos_embed_learned,
            self.diffusion_pos_embed_learned,
            self.class_emb.weight,
        ):
            nn.init.normal_(p, std=0.02)
        if self.config.mask:
            nn.init.normal_(self.mask_token, std=0.02)
        init_transformer_layers(self, stop_at=self.diffloss)

    # ---- conditioning -------------------------------------------------------------------------
    def class_embedding(self, labels: torch.Tensor | None, batch: int | None = None) -> torch.Tensor:
        """[B, D]: class_emb(labels), or the null embedding ``fake_latent`` when labels is None."""
        if labels is None:
            return self.fake_latent.expand(batch, -1)
        return self.class_emb(labels)

    def cfg_class_embedding(self, labels: torch.Tensor) -> torch.Tensor:
        """[2B, D]: [class_emb(labels); fake_latent x B] — the CFG batch, conditional half first."""
        return torch.cat([self.class_emb(labels), self.fake_latent.expand(labels.shape[0], -1)])

    # ---- transformer ----------------------------------------------------------------------------
    def forward_encoder(
        self, tokens: torch.Tensor, class_embedding: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """tokens [B, L, C], class_embedding [B, D] -> [B, K + L_kept, D]. mask [B, L]: 1 = dropped
        (the official gather: needs the same kept count in every row; :meth:`condition_static` has static shapes)."""
        B, L, _ = tokens.shape
        K = self.config.buffer_size
        x = self.z_proj(tokens)  # (B, L, D)
        buf = class_embedding[:, None, :].expand(B, K, -1).to(x.dtype)  # all K buffer rows = the class
        x = torch.cat([buf, x], dim=1)  # (B, K + L, D)
        x = self.z_proj_ln(x + self.encoder_pos_embed_learned)
        if mask is not None and self.config.mask:
            keep = torch.cat([torch.ones(B, K, dtype=torch.bool, device=x.device), ~mask.bool()], dim=1)
            x = x[keep].reshape(B, -1, x.shape[-1])  # (B, K + L_kept, D)
        for blk in self.encoder_blocks:
            x = blk(x)
        return self.encoder_norm(x)

    def forward_decoder(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder output -> per-token condition z [B, L, D] (buffer rows dropped)."""
        K = self.config.buffer_size
        x = self.decoder_embed(x)
        if mask is not None and self.config.mask:
            B = x.shape[0]
            keep = torch.cat([torch.ones(B, K, dtype=torch.bool, device=x.device), ~mask.bool()], dim=1)
            full = self.mask_token.to(x.dtype).expand(B, keep.shape[1], -1).clone()  # (B, K + L, D)
            full[keep] = x.reshape(-1, x.shape[-1])
            x = full
        x = x + self.decoder_pos_embed_learned
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_norm(x)
        return x[:, K:] + self.diffusion_pos_embed_learned  # (B, L, D)

    def condition(
        self, tokens: torch.Tensor, class_embedding: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The transformer: current tokens [B, L, C] + class embedding [B, D] -> z [B, L, D]."""
        return self.forward_decoder(self.forward_encoder(tokens, class_embedding, mask), mask)

    def condition_static(self, tokens: torch.Tensor, class_embedding: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """:meth:`condition` with ``mask`` [B, L] (1 = dropped) in static shapes, for exported graphs:
        the encoder runs on all K + L rows with :func:`kept_attention_mask` instead of gathering the kept
        ones, and the decoder's refill with ``mask_token`` is :func:`refill` (a select) instead of a
        scatter. Same function (tests/test_mask_mode.py, float64); any kept count per row. A model
        built with mask=False ignores the mask, as the official one does."""
        if not self.config.mask:
            return self.condition(tokens, class_embedding)
        B, L, _ = tokens.shape
        K = self.config.buffer_size
        x = self.z_proj(tokens)  # (B, L, D)
        buf = class_embedding[:, None, :].expand(B, K, -1).to(x.dtype)
        x = self.z_proj_ln(torch.cat([buf, x], dim=1) + self.encoder_pos_embed_learned)  # (B, K + L, D)
        keep = kept_rows(mask, K)  # (B, K + L) bool
        attn_mask = kept_attention_mask(keep)  # (B, 1, K + L, K + L)
        for blk in self.encoder_blocks:
            x = blk(x, attn_mask)
        x = refill(self.decoder_embed(self.encoder_norm(x)), keep, self.mask_token)  # (B, K + L, Dd)
        x = x + self.decoder_pos_embed_learned
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_norm(x)
        return x[:, K:] + self.diffusion_pos_embed_learned  # (B, L, Dd)

    # ---- training ---------------------------------------------------------------------------------
    def forward(
        self,
        tokens_in: torch.Tensor,
        labels: torch.Tensor,
        target: torch.Tensor,
        level: int,
        mask: torch.Tensor | None = None,
        drop_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Training loss for one batch at frequency ``level``.

        tokens_in [B, L, C]: the level's low-passed latents (model input); target [B, L, C]: the clean
        latents; drop_labels [B] bool: rows that get the null embedding (label dropout for CFG).
        """
        B, L, C = target.shape
        emb = self.class_emb(labels)
        if drop_labels is not None:
            emb = torch.where(drop_labels[:, None], self.fake_latent.expand(B, -1).to(emb.dtype), emb)
        z = self.condition(tokens_in, emb, mask)  # (B, L, D)
        mul = self.config.diffusion_batch_mul
        z = z.reshape(B * L, -1).repeat(mul, 1)
        tgt = target.reshape(B * L, C).repeat(mul, 1)
        lvl = torch.full((tgt.shape[0], 1), float(level), device=tgt.device, dtype=z.dtype)
        return self.diffloss(tgt, z, lvl)
