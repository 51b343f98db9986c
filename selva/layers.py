"""Small building blocks shared by the generator and the video encoder.

Names and parameter layouts follow the official MMAudio/SELVA code so that released state dicts
load without a key mapping (``w1``/``w2``/``w3`` of the SwiGLU, channel-last convolutions that keep
``nn.Conv1d``'s ``weight``/``bias``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def swiglu_hidden_dim(hidden_dim: int, multiple_of: int = 256) -> int:
    """LLaMA-style SwiGLU width: 2/3 of the nominal width, rounded up to ``multiple_of``.

    MMAudio's nominal widths are 4 x dim, so 448 -> 1280 and 768 -> 2048.
    """
    hidden_dim = int(2 * hidden_dim / 3)
    return multiple_of * ((hidden_dim + multiple_of - 1) // multiple_of)


class ChannelLastConv1d(nn.Conv1d):
    """A ``Conv1d`` over the sequence axis of (B, N, C) tensors; returns (B, N_out, C_out).

    On CPU the convolution runs as im2col + one matmul (``F.linear`` on the unfolded windows: the
    same sums, parameters and key names as ``nn.Conv1d``). Why: oneDNN's float32 direct convolution,
    which ``nn.Conv1d`` uses on CPU, was ~3x less accurate on an AVX2 machine (generator velocity
    5.6e-6 relative to the official float32 vectors, against 1.8e-6 this way), and CFG 4.5 over the
    sampler's steps amplified that past the official 1e-5 tolerance (1.19e-5; 4.0e-6 this way). The
    result must not depend on which CPU a check runs on. On GPUs ``nn.Conv1d`` (cuDNN) is kept: the
    unfolded windows cost kernel_size times the activation memory.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plain = self.stride == (1,) and self.dilation == (1,) and self.groups == 1 and self.padding_mode == "zeros"
        if x.device.type != "cpu" or not plain or isinstance(self.padding, str):
            return super().forward(x.transpose(1, 2)).transpose(1, 2)
        pad = self.padding[0]
        windows = F.pad(x, (0, 0, pad, pad)).unfold(1, self.kernel_size[0], 1)  # (B, N_out, C, k)
        return F.linear(windows.flatten(2), self.weight.flatten(1), self.bias)


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x), no biases (official ``MLP``)."""

    def __init__(self, dim: int, hidden_dim: int, multiple_of: int = 256):
        super().__init__()
        hidden = swiglu_hidden_dim(hidden_dim, multiple_of)
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class ConvSwiGLU(nn.Module):
    """SwiGLU whose three projections are channel-last 1-D convolutions (official ``ConvMLP``)."""

    def __init__(self, dim: int, hidden_dim: int, kernel_size: int = 3, padding: int = 1, multiple_of: int = 256):
        super().__init__()
        hidden = swiglu_hidden_dim(hidden_dim, multiple_of)
        conv = dict(kernel_size=kernel_size, padding=padding, bias=False)
        self.w1 = ChannelLastConv1d(dim, hidden, **conv)
        self.w2 = ChannelLastConv1d(hidden, dim, **conv)
        self.w3 = ChannelLastConv1d(dim, hidden, **conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


def rope_rotations(length: int, head_dim: int, theta: float = 10000.0, freq_scaling: float = 1.0) -> torch.Tensor:
    """RoPE rotation matrices, shape (1, length, head_dim/2, 2, 2) = [[cos, -sin], [sin, cos]].

    Computed in float32 whatever the model dtype, as the official code does: a float64 model holds
    these float32 values cast up, and the reference vectors depend on it.
    """
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head dimension, got {head_dim}")
    pos = torch.arange(length, dtype=torch.float32)
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs *= freq_scaling
    angles = pos[:, None] * freqs[None, :]  # (N, D/2)
    cos, sin = torch.cos(angles), torch.sin(angles)
    rot = torch.stack([cos, -sin, sin, cos], dim=-1)
    return rot.view(1, length, head_dim // 2, 2, 2)


def apply_rope(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """Rotate pairs of channels of ``x`` (B, H, N, D) by ``rot`` (1, N, D/2, 2, 2).

    Like the official code, ``x`` is rounded to float32 first and the product is taken in the
    table's dtype, then cast back; in a float64 model this rounding is part of the reference.
    """
    pairs = x.float().view(*x.shape[:-1], -1, 1, 2)
    out = rot[..., 0] * pairs[..., 0] + rot[..., 1] * pairs[..., 1]
    return out.reshape(x.shape).to(x.dtype)
