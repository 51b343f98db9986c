"""Model presets: the four released generator sizes, and ``tiny`` / ``tiny_44k`` for laptops and tests.

The released SELVA generators are MMAudio's network at four sizes on one TextSynch video encoder:
``small_16k`` (157 M parameters, 16 kHz audio through the 20-channel VAE and BigVGAN v1) and
``small_44k``, ``medium_44k``, ``large_44k`` (157 M, 622 M, 1.03 B; 44.1 kHz audio through the
40-channel VAE and BigVGAN v2). Sizes, rates and lengths are those of the official code
(``get_my_mmaudio``, ``SequenceConfig``; ``../shared/reference-44k/README.md`` section 5).

``tiny`` and ``tiny_44k`` exist for tests, the demo and laptops: 64-pixel frames, 2-second clips,
narrow layers, and the embedded encoders (no downloads). Every code path of the official sizes runs
in them: pre-only joint block, fused blocks, RoPE with frequency scaling, segment pooling, [SUP]
tokens, and (``tiny_44k``) the 44.1 kHz sequence lengths and sample counts.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from selva.generator import Generator, GeneratorConfig
from selva.motionformer import MotionFormerConfig
from selva.sequence import SequenceConfig
from selva.textsynch import TextSynch, TextSynchConfig

# official audio modes: the mel converter, VAE and vocoder of each rate (selva.audio)
AUDIO_MODES = ("16k", "44k")
_MODE_RATES = {"16k": (16_000, 256), "44k": (44_100, 512)}  # sampling rate, mel hop in samples
OFFICIAL_LATENT_DIMS = {"16k": 20, "44k": 40}  # the official VAE's latent channels per mode


@dataclass(frozen=True)
class ModelPreset:
    name: str
    duration: float
    frame_size: int  # sync frames are squashed to frame_size x frame_size
    generator: GeneratorConfig
    textsynch: TextSynchConfig
    audio_mode: str = "16k"
    """Which official codec fits the preset ("16k" or "44k"); the embedded codec runs at the same rates."""
    released: bool = False
    """True for the sizes of the official release (they load released weights)."""

    @property
    def seq(self) -> SequenceConfig:
        return self.generator.sequence

    def sequence(self, duration: float | None = None) -> SequenceConfig:
        """Sequence lengths of a clip of ``duration`` seconds (default: the preset's) at its audio rates."""
        return self.generator.sequence_for(self.duration if duration is None else duration)

    @property
    def sampling_rate(self) -> int:
        return self.generator.sampling_rate

    @property
    def data_signature(self) -> tuple:
        """What a precomputed dataset depends on: clip length, frame size, audio rates and the feature
        widths. Presets with equal signatures share datasets (small/medium/large_44k: one dataset, three
        generator sizes)."""
        g, seq = self.generator, self.seq
        return (self.duration, self.frame_size, seq.sampling_rate, seq.spectrogram_frame_rate, g.latent_dim,
                g.text_dim, g.text_seq_len, self.textsynch.text_dim)

    def build_generator(self) -> Generator:
        return Generator(self.generator)

    def build_textsynch(self) -> TextSynch:
        return TextSynch(self.textsynch)


def _official_generator(mode: str, hidden_dim: int, num_heads: int, depth: int, fused_depth: int) -> GeneratorConfig:
    rate, hop = _MODE_RATES[mode]
    return GeneratorConfig(latent_dim=OFFICIAL_LATENT_DIMS[mode], hidden_dim=hidden_dim, num_heads=num_heads,
                           depth=depth, fused_depth=fused_depth, sampling_rate=rate, spectrogram_frame_rate=hop)


def _released(name: str, mode: str, generator: GeneratorConfig) -> ModelPreset:
    return ModelPreset(name=name, duration=8.0, frame_size=224, generator=generator, textsynch=TextSynchConfig(),
                       audio_mode=mode, released=True)


# get_my_mmaudio: small = 448 wide, 7 heads, 12 blocks (8 fused); medium = 896/14/12 (8);
# large = 896/14/21 (14). The joint blocks are depth - fused_depth, the last one pre-only.
SMALL_16K = _released("small_16k", "16k", _official_generator("16k", 448, 7, 12, 8))
SMALL_44K = _released("small_44k", "44k", _official_generator("44k", 448, 7, 12, 8))
MEDIUM_44K = _released("medium_44k", "44k", _official_generator("44k", 896, 14, 12, 8))
LARGE_44K = _released("large_44k", "44k", _official_generator("44k", 896, 14, 21, 14))

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

# tiny at 44.1 kHz: 87 latents (one per 1024 samples) for 2 s instead of 63; same widths
TINY_44K = replace(
    TINY, name="tiny_44k", audio_mode="44k",
    generator=replace(TINY.generator, sampling_rate=44_100, spectrogram_frame_rate=512),
)

PRESETS: dict[str, ModelPreset] = {p.name: p for p in (SMALL_16K, SMALL_44K, MEDIUM_44K, LARGE_44K, TINY, TINY_44K)}


def get_preset(name: str) -> ModelPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None
