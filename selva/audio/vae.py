"""MMAudio's 1-D mel VAE at half the mel frame rate: ``get_my_vae('16k')`` 80 bins -> 20-d, ``'44k'`` 128 -> 40.

State-dict names and shapes equal the released ``v1-16.pth`` / ``v1-44.pth`` (manifests
``vae_16k.keys.json``, ``vae_44k.keys.json``). The checkpoint holds *raw* MPConv1D weights; call
:meth:`VAE.remove_weight_norm` after loading (the official load path does so), which fixes the
weights in float32. Use :func:`load_vae` for the whole sequence.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from selva.audio.vae_blocks import (
    AttnBlock1D,
    DiagonalGaussian,
    Downsample1D,
    MPConv1D,
    ResnetBlock1D,
    Upsample1D,
    mp_silu,
)
from selva.checkpoint import load_strict, read_state_dict


@dataclass(frozen=True)
class VAEConfig:
    data_dim: int = 80
    embed_dim: int = 20
    hidden_dim: int = 384
    ch_mult: tuple[int, ...] = (1, 2, 4)
    num_res_blocks: int = 2
    attn_layers: tuple[int, ...] = (3,)  # level 3 does not exist with 3 levels: no level attention
    down_layers: tuple[int, ...] = (0,)
    kernel_size: int = 3
    clip_act: float = 256.0


# ``v1-16.pth`` and ``v1-44.pth``, both verified against the official vectors (the 44.1 kHz one is the
# same network on 128 mel bands, 40 latent channels and 512/1024/2048 hidden channels).
VAE_CONFIGS: dict[str, VAEConfig] = {"16k": VAEConfig(), "44k": VAEConfig(data_dim=128, embed_dim=40, hidden_dim=512)}


class _Level(nn.Module):
    """One resolution level; a plain container so that the names read ``down.<i>.block.<j>``."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()


class Encoder1D(nn.Module):
    def __init__(self, c: VAEConfig) -> None:
        super().__init__()
        self.num_layers = len(c.ch_mult)
        self.num_res_blocks = c.num_res_blocks
        self.clip_act = c.clip_act
        self.down_layers = tuple(c.down_layers)
        self.conv_in = MPConv1D(c.data_dim, c.hidden_dim, c.kernel_size)
        in_ch_mult = (1, *c.ch_mult)
        self.down = nn.ModuleList()
        block_in = c.hidden_dim
        for level in range(self.num_layers):
            down = _Level()
            block_in = c.hidden_dim * in_ch_mult[level]
            block_out = c.hidden_dim * c.ch_mult[level]
            for _ in range(c.num_res_blocks):
                down.block.append(ResnetBlock1D(block_in, block_out, c.kernel_size))
                block_in = block_out
                if level in c.attn_layers:
                    down.attn.append(AttnBlock1D(block_in))
            if level in c.down_layers:
                down.downsample = Downsample1D(block_in)
            self.down.append(down)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock1D(block_in, block_in, c.kernel_size)
        self.mid.attn_1 = AttnBlock1D(block_in)
        self.mid.block_2 = ResnetBlock1D(block_in, block_in, c.kernel_size)
        self.conv_out = MPConv1D(block_in, 2 * c.embed_dim, c.kernel_size)  # mean and logvar
        # Registered after the children in the official code, but a module's own parameters come
        # first in its state_dict either way.
        self.learnable_gain = nn.Parameter(torch.zeros([]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in range(self.num_layers):
            down = self.down[level]
            for i in range(self.num_res_blocks):
                h = down.block[i](h)
                if len(down.attn) > 0:
                    h = down.attn[i](h)
                h = h.clamp(-self.clip_act, self.clip_act)
            if level in self.down_layers:
                h = down.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        h = h.clamp(-self.clip_act, self.clip_act)
        return self.conv_out(mp_silu(h), gain=self.learnable_gain + 1)


class Decoder1D(nn.Module):
    def __init__(self, c: VAEConfig) -> None:
        super().__init__()
        self.num_layers = len(c.ch_mult)
        self.num_res_blocks = c.num_res_blocks
        self.clip_act = c.clip_act
        # The decoder upsamples *after* the level above each encoder downsampling level.
        self.up_layers = tuple(i + 1 for i in c.down_layers)
        block_in = c.hidden_dim * c.ch_mult[-1]
        self.conv_in = MPConv1D(c.embed_dim, block_in, c.kernel_size)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock1D(block_in, block_in, c.kernel_size)
        self.mid.attn_1 = AttnBlock1D(block_in)
        self.mid.block_2 = ResnetBlock1D(block_in, block_in, c.kernel_size)
        levels: list[_Level] = []
        for level in reversed(range(self.num_layers)):
            up = _Level()
            block_out = c.hidden_dim * c.ch_mult[level]
            for _ in range(c.num_res_blocks + 1):
                up.block.append(ResnetBlock1D(block_in, block_out, c.kernel_size))
                block_in = block_out
                if level in c.attn_layers:
                    up.attn.append(AttnBlock1D(block_in))
            if level in self.up_layers:
                up.upsample = Upsample1D(block_in)
            levels.insert(0, up)  # index by level, so up.0 is the finest level
        self.up = nn.ModuleList(levels)
        self.conv_out = MPConv1D(block_in, c.data_dim, c.kernel_size)
        self.learnable_gain = nn.Parameter(torch.zeros([]))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        h = h.clamp(-self.clip_act, self.clip_act)
        for level in reversed(range(self.num_layers)):
            up = self.up[level]
            for i in range(self.num_res_blocks + 1):
                h = up.block[i](h)
                if len(up.attn) > 0:
                    h = up.attn[i](h)
                h = h.clamp(-self.clip_act, self.clip_act)
            if level in self.up_layers:
                h = up.upsample(h)
        return self.conv_out(mp_silu(h), gain=self.learnable_gain + 1)


class VAE(nn.Module):
    """Mel (B, data_dim, T) <-> latent (B, embed_dim, T/2); T must be even."""

    data_mean: torch.Tensor
    data_std: torch.Tensor

    def __init__(self, config: VAEConfig | None = None) -> None:
        super().__init__()
        self.config = c = config or VAEConfig()
        # Official constructor constants; every checkpoint carries them, so placeholders are fine
        # until loading (load_strict insists on their presence).
        self.register_buffer("data_mean", torch.zeros(1, c.data_dim, 1))
        self.register_buffer("data_std", torch.ones(1, c.data_dim, 1))
        self.encoder = Encoder1D(c)
        self.decoder = Decoder1D(c)

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.data_mean) / self.data_std

    def unnormalize(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.data_std + self.data_mean

    def encode(self, mel: torch.Tensor, normalize: bool = True) -> DiagonalGaussian:
        if normalize:
            mel = self.normalize(mel)
        return DiagonalGaussian(self.encoder(mel))

    def decode(self, z: torch.Tensor, unnormalize: bool = True) -> torch.Tensor:
        mel = self.decoder(z)
        return self.unnormalize(mel) if unnormalize else mel

    def forward(self, mel: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.decode(self.encode(mel).sample(generator))

    def remove_weight_norm(self) -> VAE:
        for module in self.modules():
            if isinstance(module, MPConv1D):
                module.remove_weight_norm()
        return self

    @property
    def weight_norm_removed(self) -> bool:
        return all(m.weight_norm_removed for m in self.modules() if isinstance(m, MPConv1D))


def get_my_vae(mode: str = "16k") -> VAE:
    if mode not in VAE_CONFIGS:
        raise ValueError(f"unknown VAE mode {mode!r}; expected one of {sorted(VAE_CONFIGS)}")
    return VAE(VAE_CONFIGS[mode])


def load_vae(
    weights: str | os.PathLike | Mapping[str, torch.Tensor],
    mode: str = "16k",
    *,
    source: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    ignore_unexpected: Sequence[str] = (),
) -> VAE:
    """Build, load strictly (raw weights, float32), fuse the weight norm, move and cast, eval.

    ``weights`` is a file (``v1-16.pth`` or safetensors) or a state dict in the checkpoint layout.
    The weight norm is fused in float32, as the official path does, before any cast to ``dtype``.
    """
    if isinstance(weights, Mapping):
        state, source = dict(weights), source or "VAE state dict"
    else:
        state, source = read_state_dict(weights), source or str(weights)
    vae = get_my_vae(mode)
    load_strict(vae, state, source, ignore_unexpected=ignore_unexpected)
    vae.remove_weight_norm()
    return vae.to(device=device, dtype=dtype).eval().requires_grad_(False)
