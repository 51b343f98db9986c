"""What one training step computes: a stage's trained parameters and SELVA's flow-matching loss.

Stages (DESIGN §4; ``selva/stages.py`` holds stages 1 and 2):

- ``pretrain``: the MotionFormer backbone + the generator train; TextSynch's text parts are unused
  (text not in the video encoder).
- ``encoder`` (stage 1): TextSynch's text projection, cross blocks and [SUP] train; the backbone runs
  under ``no_grad``; the generator is frozen but runs *with* autograd: the gradient reaches TextSynch
  through it.
- ``generator`` (stage 2): the generator trains; all of TextSynch runs under ``no_grad``.

The generator's ``latent_mean``/``latent_std``/``empty_string_feat`` are frozen in every stage.

Only the trained parameters go into DeepSpeed (:class:`TrainedParameters`): frozen modules stay
outside the engine, so ZeRO never partitions, broadcasts or casts them (DeepSpeed issues 6771, 4055,
5439). The parameters are *shared* with the modules, so the modules' own forward trains them.

Randomness is drawn per sample from ``(seed, micro-step, sample key)`` (:func:`sample_generator`):
the latent posterior draw, t, the noise and the CFG-dropout coins. A sample therefore gets the same
draws whatever the world size, batch split or resume point: that is what makes "2 ranks × b equals
1 rank × 2b" and exact resumption hold.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from selva.flow_matching import FlowMatching
from selva.generator import Generator
from selva.stages import GENERATOR_FROZEN, set_trainable
from selva.textsynch import TextSynch

STAGES = ("pretrain", "encoder", "generator")


def set_stage_trainable(textsynch: TextSynch, generator: Generator, stage: str, *, pretrain_backbone: bool = True
                        ) -> list[tuple[str, nn.Parameter]]:
    """Set ``requires_grad`` for ``stage``; returns the trained parameters as (qualified name, parameter).

    ``pretrain_backbone`` (stage ``pretrain`` only): train the video backbone with the generator, or
    keep it at its initialisation (a random-init embedded backbone stays a fixed random-feature encoder).
    """
    if stage == "pretrain":
        for p in (*textsynch.parameters(), *generator.parameters()):
            p.requires_grad_(False)
        # the 2-D patch_embed is unused (kept for loading Synchformer's keys): it would never get a gradient
        named = [(f"textsynch.vfeat_extractor.{n}", p) for n, p in textsynch.vfeat_extractor.named_parameters()
                 if pretrain_backbone and not n.startswith("patch_embed.")]
        named += [(f"generator.{n}", p) for n, p in generator.named_parameters() if n not in GENERATOR_FROZEN]
        for _, p in named:
            p.requires_grad_(True)
        return named
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; one of {', '.join(STAGES)}")
    trained = {id(p) for p in set_trainable(textsynch, generator, stage)}
    named = [(f"textsynch.{n}", p) for n, p in textsynch.named_parameters() if id(p) in trained]
    named += [(f"generator.{n}", p) for n, p in generator.named_parameters() if id(p) in trained]
    return named


class TrainedParameters(nn.Module):
    """The module handed to ``deepspeed.initialize``: the trained parameters only, registered under
    their qualified names (dots become ``__``), shared with TextSynch and the generator.

    Its ``forward`` is the loss (:meth:`SelvaObjective.loss`), so DeepSpeed's engine runs the whole
    step inside its own forward (and its torch-autocast context). The frozen modules are reachable
    through a plain attribute, so the engine neither registers nor moves them.
    """

    def __init__(self, named: Sequence[tuple[str, nn.Parameter]], objective: SelvaObjective):
        super().__init__()
        self.params = nn.ParameterDict({name.replace(".", "__"): p for name, p in named})
        self.__dict__["objective"] = objective  # not a submodule: the frozen parts stay outside

    def forward(self, batch: dict, micro_step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.objective.loss(batch, micro_step)


def sample_generator(seed: int, micro_step: int, key: str) -> torch.Generator:
    """A CPU generator depending only on (seed, micro-step, sample key); blake2b, as selva.mixing does."""
    digest = hashlib.blake2b(f"selva.train:{int(seed)}:{int(micro_step)}:{key}".encode(), digest_size=8).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest, "little") >> 1)


@dataclass
class SampleDraws:
    """Per-sample random draws of one micro-step, stacked: eps (B, N, D), noise (B, N, D), t (B,),
    null_video / null_text (B,) bool."""

    eps: torch.Tensor
    noise: torch.Tensor
    t: torch.Tensor
    null_video: torch.Tensor
    null_text: torch.Tensor


def draw(
    keys: Sequence[str], latent_shape: tuple[int, int], seed: int, micro_step: int, cfg_dropout: float
) -> SampleDraws:
    """The draws of each sample from its own generator, in a fixed order (eps, noise, t, two coins)."""
    eps, noise, t, coins = [], [], [], []
    for key in keys:
        g = sample_generator(seed, micro_step, key)
        eps.append(torch.randn(latent_shape, generator=g))
        noise.append(torch.randn(latent_shape, generator=g))
        t.append(FlowMatching.sample_t(1, generator=g))
        coins.append(torch.rand(2, generator=g))
    c = torch.stack(coins)
    return SampleDraws(torch.stack(eps), torch.stack(noise), torch.cat(t), c[:, 0] < cfg_dropout, c[:, 1] < cfg_dropout)


class SelvaObjective:
    """The flow-matching loss of a stage, on a batch of the loader's contract (training/loader.py).

    ``loss(batch, micro_step)`` returns ``(mean loss (), per-sample loss (B,), t (B,))``, float32.
    Formula (MMAudio/SELVA): x1 = normalize(mean + std·ε) of the codec posterior; t = sigmoid(N(0, 1));
    x_t = (1 − t)·noise + t·x1; loss = mean over (N, D) of (v(x_t, t | c) − (x1 − noise))². CFG dropout
    (probability ``cfg_dropout`` each): the video conditions (sync; the CLIP-video stream is always the
    learned empty token in SELVA) are replaced by the generator's empty sync token, and separately the
    text by the empty prompt's features.
    """

    def __init__(self, textsynch: TextSynch, generator: Generator, *, stage: str, text_in_encoder: bool,
                 cfg_dropout: float, seed: int):
        self.textsynch, self.generator = textsynch, generator
        self.stage = stage
        self.text_in_encoder = text_in_encoder and stage != "pretrain"
        self.cfg_dropout = cfg_dropout
        self.seed = seed
        self.fm = FlowMatching()

    def sync_features(self, batch: dict) -> torch.Tensor:
        """TextSynch (or text-free Synchformer features) of the batch's normalised video."""
        video = batch["video"]
        textsynch_trains = any(p.requires_grad for p in self.textsynch.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and textsynch_trains):
            if self.text_in_encoder:
                return self.textsynch(video, batch["t5"], batch["t5_mask"])
            return self.textsynch.encode_video_without_text(video)

    def loss(self, batch: dict, micro_step: int, *, draws: SampleDraws | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        gen = self.generator
        mean, std = batch["latent_mean"], batch["latent_std"]
        device = mean.device
        if draws is None:
            draws = draw(batch["key"], tuple(mean.shape[1:]), self.seed, micro_step, self.cfg_dropout)
        to = lambda x: x.to(device)  # draws are made on the CPU: the same numbers on every device
        x1 = gen.normalize(mean + std * to(draws.eps))
        sync = self.sync_features(batch)
        b = x1.shape[0]
        clip_f = gen.empty_clip_sequence(b)
        text_f = batch["clip_text"]
        null_video, null_text = to(draws.null_video), to(draws.null_text)
        # always through torch.where, even when no coin came up: every trained parameter (the empty
        # tokens included) must get a gradient on every rank at every step, or ZeRO's gradient buckets
        # differ between ranks and their reductions no longer pair up (gloo aborts, NCCL hangs)
        sync = torch.where(null_video[:, None, None], gen.empty_sync_sequence(b).to(sync.dtype), sync)
        text_f = torch.where(null_text[:, None, None], gen.empty_string_sequence(b).to(text_f.dtype), text_f)
        noise, t = to(draws.noise), to(draws.t)
        xt = self.fm.interpolate(noise, x1, t)
        predicted = gen(xt, clip_f, sync, text_f, t)
        per_sample = self.fm.loss(predicted.float(), noise, x1)
        return per_sample.mean(), per_sample.detach(), t
