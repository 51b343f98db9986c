"""Building blocks of MMAudio's 1-D EDM2-style ("magnitude-preserving") mel VAE.

The official blocks live in ``mmaudio/ext/autoencoder/{edm2_utils,vae_modules}.py``. Everything here
keeps the official parameter names (``conv1``, ``nin_shortcut``, ``qkv``...) because released
checkpoints are loaded by name. The magnitude-preserving arithmetic (``mp_silu``, ``mp_sum``,
pixel norm) is what the weights were trained with, so every constant matters.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def normalize(x: torch.Tensor, dim: int | tuple[int, ...] | None = None, eps: float = 1e-4) -> torch.Tensor:
    """EDM2 normalisation: x / (eps + ||x|| * sqrt(norm.numel / x.numel)) over ``dim``.

    With ``dim=None`` the norm runs over every dimension but the first (per output channel for a
    conv weight). The scaling makes the result have unit RMS rather than unit norm. The official
    code always takes the norm in float32 (which makes it refuse float64 inputs); we take it in
    float32 for low-precision and float32 inputs, and in float64 for float64 inputs so that the
    module can still be debugged in double precision.
    """
    if dim is None:
        dim = tuple(range(1, x.ndim))
    norm_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=norm_dtype)
    norm = torch.add(eps, norm, alpha=math.sqrt(norm.numel() / x.numel()))
    return x / norm.to(x.dtype)


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    # 0.596 is the standard deviation of silu(N(0, 1)): keeps unit variance through the activation.
    return F.silu(x) / 0.596


def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    # Weighted residual sum rescaled so that two unit-variance inputs give a unit-variance output.
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t**2)


class MPConv1D(nn.Module):
    """Conv1d whose stored weight is raw; ``remove_weight_norm`` turns it into the used weight.

    Checkpoints hold the raw (un-normalised) weight. Inference uses normalize(w) / sqrt(fan_in),
    computed once, in float32, by :meth:`remove_weight_norm` (the official load path); forward
    refuses to run before that, because the raw weight would silently give wrong outputs.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size))
        self.weight_norm_removed = False

    def forward(self, x: torch.Tensor, gain: float | torch.Tensor = 1) -> torch.Tensor:
        if not self.weight_norm_removed:
            raise RuntimeError("MPConv1D: call remove_weight_norm() before inference")
        w = self.weight * gain
        return F.conv1d(x, w, padding=(w.shape[-1] // 2,))

    @torch.no_grad()
    def remove_weight_norm(self) -> MPConv1D:
        if self.weight_norm_removed:
            return self
        w = self.weight.to(torch.float32)
        w = normalize(w)
        w = w / math.sqrt(w[0].numel())
        self.weight.copy_(w.to(self.weight.dtype))
        self.weight_norm_removed = True
        return self


class ResnetBlock1D(nn.Module):
    """Pixel-norm -> mp_silu -> conv1 -> mp_silu -> conv2, merged with the input by mp_sum(t=0.3)."""

    def __init__(
        self, in_dim: int, out_dim: int | None = None, kernel_size: int = 3, use_norm: bool = True
    ) -> None:
        super().__init__()
        out_dim = in_dim if out_dim is None else out_dim
        self.in_dim, self.out_dim, self.use_norm = in_dim, out_dim, use_norm
        self.conv1 = MPConv1D(in_dim, out_dim, kernel_size)
        self.conv2 = MPConv1D(out_dim, out_dim, kernel_size)
        if in_dim != out_dim:
            # The official block can also use a full conv shortcut; the released VAEs never do.
            self.nin_shortcut = MPConv1D(in_dim, out_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_norm:
            x = normalize(x, dim=1)  # per-frame norm over channels; the shortcut sees it too
        h = self.conv2(mp_silu(self.conv1(mp_silu(x))))
        if self.in_dim != self.out_dim:
            x = self.nin_shortcut(x)
        return mp_sum(x, h, t=0.3)


class AttnBlock1D(nn.Module):
    """Single-head self-attention over time with cosine (normalised) q, k and v."""

    def __init__(self, channels: int, num_heads: int = 1) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = MPConv1D(channels, channels * 3, 1)
        self.proj_out = MPConv1D(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, length = x.shape
        y = self.qkv(x)
        # Channel layout of qkv is (heads, c, 3): q, k and v interleave with stride 3.
        y = y.reshape(b, self.num_heads, -1, 3, length)
        q, k, v = normalize(y, dim=2).unbind(3)
        h = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        h = h.transpose(-1, -2).reshape(x.shape)
        return mp_sum(x, self.proj_out(h), t=0.3)


class Downsample1D(nn.Module):
    """1x1 conv, average-pool by 2, 1x1 conv (the official ``with_conv`` variant)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = MPConv1D(channels, channels, 1)
        self.conv2 = MPConv1D(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.avg_pool1d(self.conv1(x), kernel_size=2, stride=2))


class Upsample1D(nn.Module):
    """Nearest-exact x2 in time, then a k3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = MPConv1D(channels, channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest-exact"))


class DiagonalGaussian:
    """The encoder's posterior: ``moments`` (B, 2*embed, T) split into mean and clamped logvar."""

    def __init__(self, moments: torch.Tensor) -> None:
        self.moments = moments
        self.mean, logvar = torch.chunk(moments, 2, dim=1)
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(
            self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype
        )
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean
