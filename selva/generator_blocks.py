"""Transformer blocks of the MMAudio generator (joint multimodal and single-stream DiT blocks).

Layouts follow the official code so checkpoints load by name:
- qkv is one Linear whose output splits as ``(heads, head_dim, 3)`` with the q/k/v index innermost;
- q and k get a per-head RMSNorm (eps = machine epsilon of the compute dtype), then RoPE;
- adaLN chunks are (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp);
- a ``pre_only`` block (the last joint block's clip and text streams) only produces q, k, v.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from selva.layers import ChannelLastConv1d, ConvSwiGLU, SwiGLU, apply_rope, modulate


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(B, H, N, D) x3 -> (B, N, H*D)."""
    out = F.scaled_dot_product_attention(q.contiguous(), k.contiguous(), v.contiguous())
    b, h, n, d = out.shape
    return out.transpose(1, 2).reshape(b, n, h * d)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden dim {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.q_norm = nn.RMSNorm(self.head_dim)  # eps=None: finfo(dtype).eps, as the official code
        self.k_norm = nn.RMSNorm(self.head_dim)

    def pre_attention(
        self, x: torch.Tensor, rot: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, n, _ = x.shape
        qkv = self.qkv(x).view(b, n, self.num_heads, self.head_dim, 3).permute(4, 0, 2, 1, 3)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (B, H, N, D) each
        q = self.q_norm(q)
        k = self.k_norm(k)
        if rot is not None:
            q = apply_rope(q, rot)
            k = apply_rope(k, rot)
        return q, k, v


Modulation = tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]


class MMDiTSingleBlock(nn.Module):
    """One adaLN-modulated stream: attention inputs before, residual attention + FFN after."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        pre_only: bool = False,
        kernel_size: int = 7,
        padding: int = 3,
    ):
        super().__init__()
        self.pre_only = pre_only
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False)
        self.attn = SelfAttention(dim, num_heads)
        if pre_only:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim, bias=True))
            return
        hidden = int(dim * mlp_ratio)
        if kernel_size == 1:
            self.linear1 = nn.Linear(dim, dim)
            self.ffn = SwiGLU(dim, hidden)
        else:
            self.linear1 = ChannelLastConv1d(dim, dim, kernel_size=kernel_size, padding=padding)
            self.ffn = ConvSwiGLU(dim, hidden, kernel_size=kernel_size, padding=padding)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim, bias=True))

    def pre_attention(
        self, x: torch.Tensor, c: torch.Tensor, rot: torch.Tensor | None
    ) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], Modulation]:
        """``c`` is (B, 1, D) for a global condition or (B, N, D) for a per-frame one."""
        modulation = self.adaLN_modulation(c)
        if self.pre_only:
            shift_msa, scale_msa = modulation.chunk(2, dim=-1)
            rest: Modulation = (None, None, None, None)
        else:
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation.chunk(6, dim=-1)
            rest = (gate_msa, shift_mlp, scale_mlp, gate_mlp)
        x = modulate(self.norm1(x), shift_msa, scale_msa)
        return self.attn.pre_attention(x, rot), rest

    def post_attention(self, x: torch.Tensor, attn_out: torch.Tensor, mod: Modulation) -> torch.Tensor:
        if self.pre_only:
            return x
        gate_msa, shift_mlp, scale_mlp, gate_mlp = mod
        x = x + self.linear1(attn_out) * gate_msa
        r = modulate(self.norm2(x), shift_mlp, scale_mlp)
        return x + self.ffn(r) * gate_mlp

    def forward(self, x: torch.Tensor, c: torch.Tensor, rot: torch.Tensor | None) -> torch.Tensor:
        qkv, mod = self.pre_attention(x, c, rot)
        return self.post_attention(x, attention(*qkv), mod)


class JointBlock(nn.Module):
    """Joint attention over [latent | clip | text]; each stream keeps its own weights."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, pre_only: bool = False):
        super().__init__()
        self.pre_only = pre_only
        self.latent_block = MMDiTSingleBlock(dim, num_heads, mlp_ratio, pre_only=False, kernel_size=3, padding=1)
        self.clip_block = MMDiTSingleBlock(dim, num_heads, mlp_ratio, pre_only=pre_only, kernel_size=3, padding=1)
        self.text_block = MMDiTSingleBlock(dim, num_heads, mlp_ratio, pre_only=pre_only, kernel_size=1)

    def forward(
        self,
        latent: torch.Tensor,
        clip_f: torch.Tensor,
        text_f: torch.Tensor,
        global_c: torch.Tensor,
        extended_c: torch.Tensor,
        latent_rot: torch.Tensor,
        clip_rot: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x_qkv, x_mod = self.latent_block.pre_attention(latent, extended_c, latent_rot)
        c_qkv, c_mod = self.clip_block.pre_attention(clip_f, global_c, clip_rot)
        t_qkv, t_mod = self.text_block.pre_attention(text_f, global_c, None)  # text has no RoPE

        n_latent, n_clip = latent.shape[1], clip_f.shape[1]
        joint = [torch.cat([x_qkv[i], c_qkv[i], t_qkv[i]], dim=2) for i in range(3)]
        out = attention(*joint)

        latent = self.latent_block.post_attention(latent, out[:, :n_latent], x_mod)
        if not self.pre_only:
            clip_f = self.clip_block.post_attention(clip_f, out[:, n_latent : n_latent + n_clip], c_mod)
            text_f = self.text_block.post_attention(text_f, out[:, n_latent + n_clip :], t_mod)
        return latent, clip_f, text_f


class FinalBlock(nn.Module):
    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim, bias=True))
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.conv = ChannelLastConv1d(dim, out_dim, kernel_size=7, padding=3)

    def forward(self, latent: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.conv(modulate(self.norm(latent), shift, scale))


class TimestepEmbedder(nn.Module):
    """Sinusoidal timestep features ([cos, sin], cos first) followed by an MLP.

    As in the official code, t is rounded to float32 and the frequencies are computed in float32;
    a float64 model keeps both roundings.
    """

    def __init__(self, dim: int, frequency_embedding_size: int = 256, max_period: float = 10000.0):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, dim), nn.SiLU(), nn.Linear(dim, dim))
        half = torch.arange(0, frequency_embedding_size, 2, dtype=torch.float32) / frequency_embedding_size
        freqs = 1.0 / (10000**half)
        freqs = (10000 / max_period) * freqs
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        args = t[:, None].float() * self.freqs[None]
        features = torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(t.dtype)
        return self.mlp(features)
