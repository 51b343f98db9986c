"""Anti-aliased periodic activations of BigVGAN v1 (``alias_free_torch`` + ``SnakeBeta``).

Every activation runs at twice the sample rate: up-sample x2 with a kaiser-windowed sinc low-pass,
apply snake-beta, low-pass and decimate x2. The two 12-tap filters are persistent buffers in the
official checkpoint, so they are loaded like weights; the constructor computes the same values so
that a freshly built module is already usable.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def kaiser_sinc_filter1d(cutoff: float, half_width: float, kernel_size: int) -> torch.Tensor:
    """Kaiser-windowed sinc low-pass (cutoff and half_width as fractions of the sample rate), (1,1,K)."""
    even = kernel_size % 2 == 0
    half_size = kernel_size // 2
    # Kaiser's empirical design formulas: attenuation A (dB) from the transition width, then beta.
    delta_f = 4 * half_width
    attenuation = 2.285 * (half_size - 1) * math.pi * delta_f + 7.95
    if attenuation > 50.0:
        beta = 0.1102 * (attenuation - 8.7)
    elif attenuation >= 21.0:
        beta = 0.5842 * (attenuation - 21) ** 0.4 + 0.07886 * (attenuation - 21.0)
    else:
        beta = 0.0
    window = torch.kaiser_window(kernel_size, beta=beta, periodic=False)
    if even:
        time = torch.arange(-half_size, half_size) + 0.5
    else:
        time = torch.arange(kernel_size) - half_size
    if cutoff == 0:
        return torch.zeros(1, 1, kernel_size)
    x = 2 * cutoff * time
    sinc = torch.where(x == 0, torch.ones_like(x), torch.sin(math.pi * x) / (math.pi * x))
    filt = 2 * cutoff * window * sinc
    filt = filt / filt.sum()  # unit DC gain
    return filt.view(1, 1, kernel_size)


class LowPassFilter1d(nn.Module):
    """Depthwise low-pass with replicate padding, optionally strided (decimation)."""

    filter: torch.Tensor

    def __init__(
        self, cutoff: float = 0.5, half_width: float = 0.6, stride: int = 1, kernel_size: int = 12
    ) -> None:
        super().__init__()
        even = kernel_size % 2 == 0
        self.pad_left = kernel_size // 2 - int(even)
        self.pad_right = kernel_size // 2
        self.stride = stride
        self.register_buffer("filter", kaiser_sinc_filter1d(cutoff, half_width, kernel_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, _ = x.shape
        x = F.pad(x, (self.pad_left, self.pad_right), mode="replicate")
        # One filter shared by every channel (the official code expands it to a depthwise conv):
        # fold the channels into the batch. Same sums, but one conv call instead of a per-group
        # loop, which is what CPU float64 convolution would otherwise do (≈20x slower).
        out = F.conv1d(x.reshape(b * c, 1, -1), self.filter, stride=self.stride)
        return out.reshape(b, c, -1)


class UpSample1d(nn.Module):
    """Zero-stuffing x ratio via a transposed depthwise conv with the sinc filter, edges replicated."""

    filter: torch.Tensor

    def __init__(self, ratio: int = 2, kernel_size: int = 12) -> None:
        super().__init__()
        self.ratio = ratio
        self.pad = kernel_size // ratio - 1
        self.pad_left = self.pad * ratio + (kernel_size - ratio) // 2
        self.pad_right = self.pad * ratio + (kernel_size - ratio + 1) // 2
        self.register_buffer("filter", kaiser_sinc_filter1d(0.5 / ratio, 0.6 / ratio, kernel_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, _ = x.shape
        x = F.pad(x, (self.pad, self.pad), mode="replicate")
        # Channels folded into the batch, as in LowPassFilter1d. The factor `ratio` restores the
        # amplitude lost to the inserted zeros.
        x = self.ratio * F.conv_transpose1d(x.reshape(b * c, 1, -1), self.filter, stride=self.ratio)
        return x.reshape(b, c, -1)[..., self.pad_left : -self.pad_right]


class DownSample1d(nn.Module):
    def __init__(self, ratio: int = 2, kernel_size: int = 12) -> None:
        super().__init__()
        self.lowpass = LowPassFilter1d(0.5 / ratio, 0.6 / ratio, stride=ratio, kernel_size=kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lowpass(x)


class SnakeBeta(nn.Module):
    """x + sin²(αx)/β per channel, with α and β stored as logs when ``logscale`` (BigVGAN 16k: yes)."""

    def __init__(self, channels: int, logscale: bool = True) -> None:
        super().__init__()
        self.logscale = logscale
        init = torch.zeros(channels) if logscale else torch.ones(channels)
        self.alpha = nn.Parameter(init.clone())
        self.beta = nn.Parameter(init.clone())
        self.eps = 1e-9  # keeps 1/β finite for a β that trained to zero

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = self.alpha[None, :, None]
        beta = self.beta[None, :, None]
        if self.logscale:
            alpha, beta = torch.exp(alpha), torch.exp(beta)
        return x + (1.0 / (beta + self.eps)) * torch.sin(x * alpha).pow(2)


class Activation1d(nn.Module):
    """Up x2 -> activation -> low-pass and down x2 (the alias-free activation of BigVGAN)."""

    def __init__(self, activation: nn.Module, ratio: int = 2, kernel_size: int = 12) -> None:
        super().__init__()
        self.act = activation
        self.upsample = UpSample1d(ratio, kernel_size)
        self.downsample = DownSample1d(ratio, kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.downsample(self.act(self.upsample(x)))
