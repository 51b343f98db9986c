"""Which parameters each SELVA training stage trains.

- Stage 1 (``encoder``): TextSynch's new parameters (text projection, cross blocks, [SUP] tokens);
  the MotionFormer backbone and the pretrained generator stay frozen.
- Stage 2 (``generator``): the generator (initialised from MMAudio); TextSynch stays frozen. The
  generator's latent statistics and empty-string features are frozen in every stage (official).

Freezing is done with ``requires_grad`` so that autograd never computes what is not trained, and
optimizers are built from :func:`set_trainable`'s return value.
"""

from __future__ import annotations

from enum import StrEnum

from torch import nn

from selva.generator import Generator
from selva.textsynch import TextSynch

# frozen parameters of the generator, in every stage
GENERATOR_FROZEN = ("latent_mean", "latent_std", "empty_string_feat")


class Stage(StrEnum):
    ENCODER = "encoder"
    GENERATOR = "generator"

    @classmethod
    def parse(cls, value: str | int | Stage) -> Stage:
        aliases = {"1": cls.ENCODER, "2": cls.GENERATOR, "encoder": cls.ENCODER, "generator": cls.GENERATOR}
        key = value.value if isinstance(value, Stage) else str(value).lower()
        if key not in aliases:
            raise ValueError(f"unknown training stage {value!r}; use 1/encoder or 2/generator")
        return aliases[key]


def set_trainable(textsynch: TextSynch, generator: Generator, stage: Stage | str | int) -> list[nn.Parameter]:
    """Set ``requires_grad`` for ``stage`` and return the trained parameters (optimizer order)."""
    stage = Stage.parse(stage)
    for p in (*textsynch.parameters(), *generator.parameters()):
        p.requires_grad_(False)
    if stage is Stage.ENCODER:
        trained = textsynch.trainable_parameters()
    else:
        trained = [p for name, p in generator.named_parameters() if name not in GENERATOR_FROZEN]
    for p in trained:
        p.requires_grad_(True)
    return trained
