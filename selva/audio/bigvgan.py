"""BigVGAN vocoders: v1 at 16 kHz (MMAudio's ``bigvgan_vocoder.yml``) and v2 at 44.1 kHz.

- 16 kHz, ``BigVGANConfig()``: 80-bin log10-mel (B, 80, F) -> waveform (B, 1, 256*F), ending in tanh.
- 44.1 kHz, ``BIGVGAN_V2_44K`` (NVIDIA ``bigvgan_v2_44khz_128band_512x``, which the official 44k path
  loads): 128-bin ln-mel (B, 128, F) -> (B, 1, 512*F); no bias on ``conv_post`` and a clamp to [-1, 1]
  instead of tanh (its ``use_bias_at_final`` / ``use_tanh_at_final`` are false). Otherwise the same
  network: AMP blocks of anti-aliased SnakeBeta activations with log-scale alpha/beta.

State-dict names equal the released ``best_netG.pt['generator']`` / ``bigvgan_generator.pt['generator']``
in torch's parametrised weight-norm naming
(``X.parametrizations.weight.original0`` = g, ``original1`` = v); checkpoints in the legacy naming
(``X.weight_g`` / ``X.weight_v``) are accepted through :func:`canonical_state_dict`. After loading,
:meth:`BigVGANVocoder.remove_weight_norm` fuses w = g·v/‖v‖ in the module's *current* dtype, as the
official load path does; cast first if you want the fusion in float64.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm

from selva.audio.bigvgan_blocks import Activation1d, SnakeBeta
from selva.checkpoint import load_strict, read_state_dict


@dataclass(frozen=True)
class BigVGANConfig:
    num_mels: int = 80
    upsample_rates: tuple[int, ...] = (4, 4, 2, 2, 2, 2)
    upsample_kernel_sizes: tuple[int, ...] = (8, 8, 4, 4, 4, 4)
    upsample_initial_channel: int = 1536
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
    resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    snake_logscale: bool = True
    use_tanh_at_final: bool = True  # v2 44k: False, the output is clamped to [-1, 1] instead
    use_bias_at_final: bool = True  # v2 44k: False, conv_post has no bias

    @property
    def hop_size(self) -> int:
        hop = 1
        for rate in self.upsample_rates:
            hop *= rate
        return hop


# NVIDIA BigVGAN v2 (v2.4 config ``bigvgan_v2_44khz_128band_512x``; reference-44k hparams file)
BIGVGAN_V2_44K = BigVGANConfig(
    num_mels=128,
    upsample_rates=(8, 4, 2, 2, 2, 2),
    upsample_kernel_sizes=(16, 8, 4, 4, 4, 4),
    use_tanh_at_final=False,
    use_bias_at_final=False,
)
BIGVGAN_CONFIGS: dict[str, BigVGANConfig] = {"16k": BigVGANConfig(), "44k": BIGVGAN_V2_44K}


def _padding(kernel_size: int, dilation: int) -> int:
    # "same" length for an odd kernel with dilation.
    return (kernel_size * dilation - dilation) // 2


class AMPBlock1(nn.Module):
    """Three (snake -> dilated conv -> snake -> conv) residual units sharing one kernel size."""

    def __init__(self, channels: int, kernel_size: int, dilations: Sequence[int], logscale: bool) -> None:
        super().__init__()
        self.convs1 = nn.ModuleList(
            weight_norm(
                nn.Conv1d(channels, channels, kernel_size, 1, dilation=d, padding=_padding(kernel_size, d))
            )
            for d in dilations
        )
        self.convs2 = nn.ModuleList(
            weight_norm(
                nn.Conv1d(channels, channels, kernel_size, 1, dilation=1, padding=_padding(kernel_size, 1))
            )
            for _ in dilations
        )
        # Activations alternate: even indices precede convs1, odd ones precede convs2.
        self.activations = nn.ModuleList(
            Activation1d(SnakeBeta(channels, logscale=logscale)) for _ in range(2 * len(dilations))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        acts1, acts2 = self.activations[::2], self.activations[1::2]
        for c1, c2, a1, a2 in zip(self.convs1, self.convs2, acts1, acts2, strict=True):
            x = x + c2(a2(c1(a1(x))))
        return x


class BigVGANVocoder(nn.Module):
    def __init__(self, config: BigVGANConfig | None = None) -> None:
        super().__init__()
        self.config = c = config or BigVGANConfig()
        self.num_kernels = len(c.resblock_kernel_sizes)
        self.num_upsamples = len(c.upsample_rates)
        ch0 = c.upsample_initial_channel
        self.conv_pre = weight_norm(nn.Conv1d(c.num_mels, ch0, 7, 1, padding=3))
        # Each upsampler sits alone in a ModuleList: that is where the official ``ups.<i>.0`` comes from.
        self.ups = nn.ModuleList(
            nn.ModuleList(
                [
                    weight_norm(
                        nn.ConvTranspose1d(ch0 // 2**i, ch0 // 2 ** (i + 1), k, u, padding=(k - u) // 2)
                    )
                ]
            )
            for i, (u, k) in enumerate(zip(c.upsample_rates, c.upsample_kernel_sizes, strict=True))
        )
        self.resblocks = nn.ModuleList()
        ch = ch0
        for i in range(self.num_upsamples):
            ch = ch0 // 2 ** (i + 1)
            for k, d in zip(c.resblock_kernel_sizes, c.resblock_dilation_sizes, strict=True):
                self.resblocks.append(AMPBlock1(ch, k, d, c.snake_logscale))
        self.activation_post = Activation1d(SnakeBeta(ch, logscale=c.snake_logscale))
        self.conv_post = weight_norm(nn.Conv1d(ch, 1, 7, 1, padding=3, bias=c.use_bias_at_final))

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        x = self.conv_pre(mel)
        for i in range(self.num_upsamples):
            for up in self.ups[i]:
                x = up(x)
            # Multi-receptive-field fusion: the mean of the resblocks of this resolution.
            xs = self.resblocks[i * self.num_kernels](x)
            for j in range(1, self.num_kernels):
                xs = xs + self.resblocks[i * self.num_kernels + j](x)
            x = xs / self.num_kernels
        x = self.conv_post(self.activation_post(x))
        return torch.tanh(x) if self.config.use_tanh_at_final else x.clamp(-1.0, 1.0)

    def weight_normed_modules(self) -> list[nn.Module]:
        return [m for m in self.modules() if parametrize.is_parametrized(m, "weight")]

    @property
    def weight_norm_removed(self) -> bool:
        return not self.weight_normed_modules()

    def remove_weight_norm(self) -> BigVGANVocoder:
        """Replace every g, v pair by the fused weight, computed in the parameters' dtype."""
        for module in self.weight_normed_modules():
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
        return self


_LEGACY_SUFFIXES = {
    ".weight_g": ".parametrizations.weight.original0",
    ".weight_v": ".parametrizations.weight.original1",
}


def canonical_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map legacy weight-norm names (``X.weight_g``/``X.weight_v``) to the parametrised names."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        for old, new in _LEGACY_SUFFIXES.items():
            if name.endswith(old):
                name = name[: -len(old)] + new
                break
        if name in out:
            raise ValueError(f"BigVGAN state dict holds {name!r} in both legacy and new naming")
        out[name] = tensor
    return out


def load_bigvgan(
    weights: str | os.PathLike | Mapping[str, torch.Tensor],
    config: BigVGANConfig | None = None,
    *,
    source: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> BigVGANVocoder:
    """Build, load strictly, cast, fuse the weight norm (in ``dtype``), eval.

    ``weights`` is ``best_netG.pt`` (its ``generator`` entry is used), a safetensors file, or a
    state dict; legacy and new weight-norm names are both accepted.
    """
    if isinstance(weights, Mapping):
        state, source = dict(weights), source or "BigVGAN state dict"
    else:
        path = str(weights)
        state = read_state_dict(path, key=None if path.endswith(".safetensors") else "generator")
        source = source or path
    vocoder = BigVGANVocoder(config)
    load_strict(vocoder, canonical_state_dict(state), source)
    vocoder = vocoder.to(device=device, dtype=dtype)
    return vocoder.remove_weight_norm().eval().requires_grad_(False)
