"""Synchformer's MotionFormer video backbone (ViT with divided space-time attention), frozen in SELVA.

Per 16-frame clip at S x S pixels: a Conv3d tubelet embedding (2 frames x 16 x 16 pixels) gives
t = 8 tubelets of (S/16)^2 patches; 12 blocks of divided attention (time first, then space, then
MLP); a final LayerNorm. ``spatial_attn_agg`` pools each tubelet's patches into one token with a
learned CLS query (torch ``TransformerEncoderLayer``), so a clip becomes 8 tokens.

Names follow the official state dict (``vfeat_extractor.*`` in TextSynch). ``patch_embed`` (a 2-D
patch embedding) is in the official state dict but unused; it is kept so checkpoints load strictly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class MotionFormerConfig:
    img_size: int = 224
    patch_size: int = 16
    num_frames: int = 16  # frames per segment
    tubelet: int = 2  # frames per token in time
    dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    agg_num_heads: int = 12

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @property
    def num_tubelets(self) -> int:
        return self.num_frames // self.tubelet


class DividedAttention(nn.Module):
    """Attention within groups (same patch over time, or same frame over space).

    The CLS query attends to every token; every group also sees the CLS key/value.
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, over: str, num_frames: int, num_patches: int) -> torch.Tensor:
        b, n, c = x.shape
        h, d = self.num_heads, self.head_dim
        q, k, v = (t.view(b, n, h, d).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))  # (B, H, L, d)
        q = q * self.scale  # the official code scales q before the products

        cls_out = F.scaled_dot_product_attention(q[:, :, :1], k, v, scale=1.0)  # (B, H, 1, d)

        def groups(t: torch.Tensor) -> torch.Tensor:
            t = t[:, :, 1:].reshape(b, h, num_frames, num_patches, d)
            return t.transpose(2, 3) if over == "time" else t  # (B, H, groups, group_len, d)

        q_, k_, v_ = groups(q), groups(k), groups(v)
        g = q_.shape[2]
        cls_k = k[:, :, :1].unsqueeze(2).expand(b, h, g, 1, d)
        cls_v = v[:, :, :1].unsqueeze(2).expand(b, h, g, 1, d)
        out = F.scaled_dot_product_attention(
            q_, torch.cat([cls_k, k_], dim=3), torch.cat([cls_v, v_], dim=3), scale=1.0
        )
        if over == "time":
            out = out.transpose(2, 3)
        out = torch.cat([cls_out, out.reshape(b, h, num_frames * num_patches, d)], dim=2)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DividedSpaceTimeBlock(nn.Module):
    """Temporal attention (norm3, timeattn), then spatial attention (norm1, attn), then the MLP (norm2)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = DividedAttention(dim, num_heads)
        self.timeattn = DividedAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.norm3 = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: torch.Tensor, num_frames: int, num_patches: int) -> torch.Tensor:
        x = x + self.timeattn(self.norm3(x), "time", num_frames, num_patches)
        x = x + self.attn(self.norm1(x), "space", num_frames, num_patches)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, conv: nn.Module):
        super().__init__()
        self.proj = conv


class SpatialAggregator(nn.TransformerEncoderLayer):
    """Pools the patches of each tubelet into its CLS output (pre-norm encoder layer)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__(
            d_model=dim,
            nhead=num_heads,
            dim_feedforward=int(dim * mlp_ratio),
            dropout=0.0,
            activation="gelu",
            layer_norm_eps=1e-6,
            batch_first=True,
            norm_first=True,
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """(B, L, D) -> (B, D): the CLS output."""
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return super().forward(x)[:, 0]


class MotionFormer(nn.Module):
    def __init__(self, cfg: MotionFormerConfig):
        super().__init__()
        self.cfg = cfg
        d, p = cfg.dim, cfg.patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, d))
        self.temp_embed = nn.Parameter(torch.zeros(1, cfg.num_tubelets, d))
        self.patch_embed = PatchEmbed(nn.Conv2d(3, d, kernel_size=p, stride=p))  # unused; kept for loading
        self.patch_embed_3d = PatchEmbed(nn.Conv3d(3, d, kernel_size=(cfg.tubelet, p, p), stride=(cfg.tubelet, p, p)))
        self.blocks = nn.ModuleList(DividedSpaceTimeBlock(d, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(d, eps=1e-6)
        self.spatial_attn_agg = SpatialAggregator(d, cfg.agg_num_heads, cfg.mlp_ratio)
        for param in (self.cls_token, self.pos_embed, self.temp_embed):
            nn.init.trunc_normal_(param, std=0.02)

    def forward_tokens(self, clips: torch.Tensor) -> torch.Tensor:
        """(B, C, T, H, W) clips normalised to [-1, 1] -> patch tokens after the final norm.

        Output (B, t * h * w, D), token index = tubelet * h * w + row * w + col; CLS removed.
        """
        cfg = self.cfg
        if clips.shape[2] != cfg.num_frames or clips.shape[-1] != cfg.img_size or clips.shape[-2] != cfg.img_size:
            raise ValueError(
                f"MotionFormer expects clips of {cfg.num_frames} frames at {cfg.img_size}x{cfg.img_size}, "
                f"got shape {tuple(clips.shape)} (B, C, T, H, W)"
            )
        x = self.patch_embed_3d.proj(clips).flatten(2).transpose(1, 2)  # (B, t*h*w, D)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        patch_pos = self.pos_embed[:, 1:].repeat(1, cfg.num_tubelets, 1)
        time_pos = self.temp_embed.repeat_interleave(cfg.num_patches, dim=1)
        x = x + torch.cat([self.pos_embed[:, :1], patch_pos + time_pos], dim=1)
        for block in self.blocks:
            x = block(x, cfg.num_tubelets, cfg.num_patches)
        return self.norm(x[:, 1:])

    def aggregate(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, t*h*w, D) -> (B, t, D): one token per tubelet via ``spatial_attn_agg``."""
        b, _, d = tokens.shape
        t = self.cfg.num_tubelets
        per_tubelet = tokens.reshape(b * t, self.cfg.num_patches, d)
        return self.spatial_attn_agg(per_tubelet).view(b, t, d)

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        return self.aggregate(self.forward_tokens(clips))
