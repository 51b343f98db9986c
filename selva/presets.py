"""Model presets: ``small_16k`` (the official sizes) and ``tiny`` (same code paths, small widths).

``tiny`` exists for tests, the demo and laptops: 64-pixel frames, 2-second clips, narrow layers,
and the embedded encoders (no downloads). Every code path of ``small_16k`` runs in ``tiny``:
pre-only joint block, fused blocks, RoPE with frequency scaling, segment pooling, [SUP] tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

from selva.generator import Generator, GeneratorConfig
from selva.motionformer import MotionFormerConfig
from selva.sequence import SequenceConfig
from selva.textsynch import TextSynch, TextSynchConfig


@dataclass(frozen=True)
class ModelPreset:
    name: str
    duration: float
    frame_size: int  # sync frames are squashed to frame_size x frame_size
    generator: GeneratorConfig
    textsynch: TextSynchConfig

    @property
    def seq(self) -> SequenceConfig:
        return SequenceConfig(self.duration)

    def build_generator(self) -> Generator:
        return Generator(self.generator)

    def build_textsynch(self) -> TextSynch:
        return TextSynch(self.textsynch)


SMALL_16K = ModelPreset(
    name="small_16k",
    duration=8.0,
    frame_size=224,
    generator=GeneratorConfig(),
    textsynch=TextSynchConfig(),
)

TINY = ModelPreset(
    name="tiny",
    duration=2.0,
    frame_size=64,
    generator=GeneratorConfig(
        latent_dim=40,  # the embedded codec's mel bands (the official VAE latent has 20 channels)
        clip_dim=64,
        sync_dim=64,
        text_dim=64,
        hidden_dim=64,
        num_heads=2,
        depth=4,
        fused_depth=2,
        duration=2.0,
    ),
    textsynch=TextSynchConfig(
        backbone=MotionFormerConfig(img_size=64, dim=64, depth=2, num_heads=2, agg_num_heads=2),
        text_dim=64,
        cross_heads=2,
    ),
)

PRESETS: dict[str, ModelPreset] = {p.name: p for p in (SMALL_16K, TINY)}


def get_preset(name: str) -> ModelPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None
