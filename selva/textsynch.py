"""TextSynch: SELVA's text-conditioned video encoder.

Per 16-frame segment (stride 8): frozen MotionFormer patch tokens -> cross-attention to the
projected prompt (queries = video tokens) -> spatial CLS pooling -> 8 tokens. Five learnable
[SUP] tokens are prepended to the FLAN-T5 features (mask True) before the projection
(Linear -> SiLU -> SwiGLU); they give attention somewhere to go when a region is irrelevant.

Trainable in stage 1: ``text_proj``, ``synch_text_cross_blocks``, ``sup_text_feat``. The backbone
(``vfeat_extractor``) is frozen: its tokens do not depend on the text, so it runs without autograd
whenever its parameters do not require gradients.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from selva.layers import SwiGLU
from selva.motionformer import MotionFormer, MotionFormerConfig
from selva.sequence import num_sync_segments


@dataclass(frozen=True)
class TextSynchConfig:
    backbone: MotionFormerConfig = field(default_factory=MotionFormerConfig)
    text_dim: int = 768  # FLAN-T5-base width
    num_sup_tokens: int = 5
    cross_depth: int = 1
    cross_heads: int = 12
    segment_step: int = 8

    @property
    def dim(self) -> int:
        return self.backbone.dim


class CrossAttention(nn.Module):
    """Queries from video tokens (no pre-norm), keys/values from text; per-head RMSNorm on q and k."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.kv_proj = nn.Linear(dim, dim * 2)  # output splits as (heads, head_dim, 2): k, v innermost
        self.q_norm = nn.RMSNorm(self.head_dim)  # eps=None: machine epsilon of the compute dtype
        self.k_norm = nn.RMSNorm(self.head_dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        h, d = self.num_heads, self.head_dim
        q = self.q_proj(x).view(b, n, h, d).transpose(1, 2)
        kv = self.kv_proj(context).view(b, context.shape[1], h, d, 2)
        k, v = kv[..., 0].transpose(1, 2), kv[..., 1].transpose(1, 2)
        q, k = self.q_norm(q), self.k_norm(k)
        # boolean mask: True = attend; padded text slots are ignored completely
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
        return out.transpose(1, 2).reshape(b, n, c)


class CrossAttentionBlock(nn.Module):
    """x + norm1(linear1(attn(x, text))), then x + ffn(norm2(x)); starts as the identity."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = CrossAttention(dim, num_heads)
        self.linear1 = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = SwiGLU(dim, int(dim * mlp_ratio))
        # zero-init the branch outputs so a fresh block passes the backbone tokens through unchanged
        nn.init.zeros_(self.norm1.weight)
        nn.init.zeros_(self.ffn.w2.weight)

    def forward(self, x: torch.Tensor, text: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.norm1(self.linear1(self.attn(x, text, mask)))
        return x + self.ffn(self.norm2(x))


@dataclass
class TextSynchTrace:
    """Intermediates of the last segment chunk (reference checks and debugging)."""

    text_proj: torch.Tensor | None = None
    patch_tokens: list[torch.Tensor] = field(default_factory=list)
    xattn_out: list[torch.Tensor] = field(default_factory=list)
    spatial_agg: list[torch.Tensor] = field(default_factory=list)


class TextSynch(nn.Module):
    def __init__(self, cfg: TextSynchConfig):
        super().__init__()
        self.cfg = cfg
        dim = cfg.dim
        self.sup_text_feat = nn.Parameter(torch.zeros(cfg.num_sup_tokens, cfg.text_dim))
        # in the official state dict but unused by encode_video_with_sync
        self.empty_string_feat = nn.Parameter(torch.zeros(1, cfg.text_dim))
        self.vfeat_extractor = MotionFormer(cfg.backbone)
        self.text_proj = nn.Sequential(nn.Linear(cfg.text_dim, dim), nn.SiLU(), SwiGLU(dim, dim * 4))
        self.synch_text_cross_blocks = nn.ModuleList(
            CrossAttentionBlock(dim, cfg.cross_heads) for _ in range(cfg.cross_depth)
        )

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What stage 1 trains: text projection, cross blocks, [SUP] tokens."""
        return [self.sup_text_feat, *self.text_proj.parameters(), *self.synch_text_cross_blocks.parameters()]

    def prepend_sup_text_tokens(self, text: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L, Dt), (B, L) bool -> (B, K+L, Dt), (B, K+L) with the K [SUP] tokens first, mask True."""
        b = text.shape[0]
        sup = self.sup_text_feat.unsqueeze(0).expand(b, -1, -1).to(text.dtype)
        sup_mask = torch.ones(b, self.cfg.num_sup_tokens, dtype=torch.bool, device=mask.device)
        return torch.cat([sup, text], dim=1), torch.cat([sup_mask, mask.bool()], dim=1)

    def segment(self, video: torch.Tensor) -> torch.Tensor:
        """(B, T, C, H, W) -> (B, S, C, 16, H, W): 16-frame segments at stride 8; leftover frames dropped."""
        frames = self.cfg.backbone.num_frames
        s = num_sync_segments(video.shape[1], frames, self.cfg.segment_step)
        segs = video.unfold(1, frames, self.cfg.segment_step)[:, :s]  # (B, S, C, H, W, 16)
        return segs.permute(0, 1, 2, 5, 3, 4)

    def encode_video_with_sync(
        self,
        video: torch.Tensor,
        text: torch.Tensor,
        mask: torch.Tensor,
        *,
        clips_per_chunk: int | None = None,
        trace: TextSynchTrace | None = None,
    ) -> torch.Tensor:
        """Video (B, T, 3, H, W) in [-1, 1], text with [SUP] already prepended -> (B, S*8, D).

        ``clips_per_chunk`` bounds memory: the B*S clips go through the backbone in chunks
        (default B, like the official code); the result does not depend on it.
        """
        b = video.shape[0]
        segs = self.segment(video)
        s = segs.shape[1]
        clips = segs.reshape(b * s, *segs.shape[2:])
        text_f = self.text_proj(text)
        if trace is not None:
            trace.text_proj = text_f
        text_f = text_f.repeat_interleave(s, dim=0)  # clip i of item j sees item j's text
        clip_mask = mask.bool().repeat_interleave(s, dim=0)

        backbone_grad = torch.is_grad_enabled() and any(p.requires_grad for p in self.vfeat_extractor.parameters())
        chunk = clips_per_chunk or b
        outputs = []
        for start in range(0, b * s, chunk):
            sl = slice(start, start + chunk)
            with torch.set_grad_enabled(backbone_grad):
                tokens = self.vfeat_extractor.forward_tokens(clips[sl])
            x = tokens
            for block in self.synch_text_cross_blocks:
                x = block(x, text_f[sl], clip_mask[sl])
            pooled = self.vfeat_extractor.aggregate(x)  # (chunk, 8, D)
            outputs.append(pooled)
            if trace is not None:
                trace.patch_tokens.append(tokens)
                trace.xattn_out.append(x)
                trace.spatial_agg.append(pooled)
        out = torch.cat(outputs, dim=0)
        return out.reshape(b, s * out.shape[1], out.shape[2])

    def encode_video_without_text(self, video: torch.Tensor, *, clips_per_chunk: int | None = None) -> torch.Tensor:
        """Video (B, T, 3, H, W) in [-1, 1] -> (B, S*8, D) with the cross blocks skipped: Synchformer's
        own features (backbone tokens -> spatial CLS pooling). What MMAudio conditions on, so it is the
        "no text in the video encoder" ablation and the ``pretrain`` stage's path."""
        b = video.shape[0]
        segs = self.segment(video)
        clips = segs.reshape(b * segs.shape[1], *segs.shape[2:])
        chunk = clips_per_chunk or b
        pooled = [
            self.vfeat_extractor.aggregate(self.vfeat_extractor.forward_tokens(clips[i : i + chunk]))
            for i in range(0, clips.shape[0], chunk)
        ]
        out = torch.cat(pooled, dim=0)
        return out.reshape(b, segs.shape[1] * out.shape[1], out.shape[2])

    def forward(self, video: torch.Tensor, text: torch.Tensor, mask: torch.Tensor, **kwargs) -> torch.Tensor:
        """Video + raw T5 features/mask -> sync features; prepends the [SUP] tokens first."""
        text, mask = self.prepend_sup_text_tokens(text, mask)
        return self.encode_video_with_sync(video, text, mask, **kwargs)
