"""Online self-augmentation (DESIGN §5): mix each clip with another clip of the same batch.

A mixed sample shows its own (target) frames squeezed to ``⌊λ·W⌋`` columns next to a partner clip
squeezed to the remaining ``W − ⌊λ·W⌋`` columns, over every frame; the sample keeps the target's
prompt, text features and audio latent, so TextSynch must learn to find the prompted half.

Departures from the official release, on purpose:

- frames are normalised exactly once, ``x / 127.5 − 1`` after the join (the release normalised
  mixed clips a second time);
- the target's side is random per sample (the release always put it left, a shortcut the model
  can learn instead of reading the prompt);
- every random decision comes from one CPU ``torch.Generator`` derived from ``(seed, step, rank)``,
  so CPU and CUDA runs make identical decisions and a resumed run continues the same stream;
- a partner never has the target's prompt when the batch offers another one: with two "dog barking"
  halves the prompt cannot say which half the latent belongs to. A sample whose batch holds only its
  own prompt stays unmixed and is counted (:attr:`MixInfo.no_distinct_partner`).

Layouts: input ``(B, T, H, W, 3)`` uint8, channel-last as the loader decodes ``sync.mp4``; output
``(B, T, 3, H, W)`` float in ``[-1, 1]``, what :class:`selva.textsynch.TextSynch` takes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class MixConfig:
    """How often and how strongly to mix.

    ``prob`` 0.5: the paper mixes a fraction of the training samples; half keeps plain clips (the
    inference-time distribution) as common as mixed ones. ``alpha`` 1.0: Beta(1, 1) is uniform on
    λ, no preference for balanced or lopsided splits. ``min_lambda`` floors λ (DESIGN: 0.05) and
    also caps it at ``1 − min_lambda``: the Beta draw is symmetric, and a mix whose partner gets
    almost no columns is an unmixed clip with a distorted aspect ratio, the same degenerate case the
    floor prevents for the target. ``constant_lambda`` replaces the Beta draw (must lie in that
    range). ``seed`` is the run's seed that :func:`mixing_generator` combines with step and rank.
    """

    prob: float = 0.5
    alpha: float = 1.0
    constant_lambda: float | None = None
    min_lambda: float = 0.05
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.prob <= 1.0:
            raise ValueError(f"MixConfig.prob must be in [0, 1], got {self.prob}")
        if not self.alpha > 0.0:
            raise ValueError(f"MixConfig.alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.min_lambda < 0.5:
            raise ValueError(f"MixConfig.min_lambda must be in [0, 0.5), got {self.min_lambda}")
        lo, hi = self.lambda_range
        if self.constant_lambda is not None and not lo <= self.constant_lambda <= hi:
            raise ValueError(f"MixConfig.constant_lambda must be in [{lo}, {hi}], got {self.constant_lambda}")

    @property
    def lambda_range(self) -> tuple[float, float]:
        return self.min_lambda, 1.0 - self.min_lambda

    def generator(self, step: int, rank: int) -> torch.Generator:
        return mixing_generator(self.seed, step, rank)


def mixing_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """A CPU generator that depends only on (seed, step, rank).

    blake2b, not ``hash()``: Python salts string hashes per process and a tuple hash is not a
    promise across versions. The "selva.mixing" tag keeps this stream apart from other streams
    (data order, flow noise) derived from the same three numbers.
    """
    key = f"selva.mixing:{int(seed)}:{int(step)}:{int(rank)}".encode()
    digest = hashlib.blake2b(key, digest_size=8).digest()
    # manual_seed takes any 64-bit value; keep 63 bits so it is never read as negative
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest, "little") >> 1)


@dataclass(frozen=True)
class MixInfo:
    """What :func:`mix_batch` did, per sample, on the CPU (logging needs no device sync).

    ``lam`` is 1.0 and ``partner`` −1 for unmixed samples; ``width`` is the target's column count
    (``W`` when unmixed, ``⌊λ·W⌋`` otherwise, kept within ``[1, W − 1]`` for very narrow frames).
    ``no_distinct_partner`` marks samples drawn for mixing that stayed unmixed because every other
    sample of the batch has the same prompt (all False when no prompts were given).
    """

    mixed: torch.Tensor  # bool (B,)
    lam: torch.Tensor  # float64 (B,)
    target_left: torch.Tensor  # bool (B,); False where not mixed
    partner: torch.Tensor  # long (B,)
    width: torch.Tensor  # long (B,)
    no_distinct_partner: torch.Tensor  # bool (B,)

    def stats(self) -> dict[str, float]:
        """Batch summaries for the metrics log (DESIGN §8 "mixing stats").

        ``mix/no_distinct_partner`` is a count (summed over batches it says how many mixes a
        label-heavy batch composition cost), the others are shares or means of the batch.
        """
        n = int(self.mixed.sum())
        out = {"mix/rate": n / max(1, self.mixed.numel())}
        out["mix/no_distinct_partner"] = float(self.no_distinct_partner.sum())
        if n:
            out["mix/lambda_mean"] = float(self.lam[self.mixed].mean())
            out["mix/target_left_rate"] = float(self.target_left[self.mixed].double().mean())
        return out


def _beta(alpha: float, batch: int, generator: torch.Generator) -> torch.Tensor:
    """``batch`` draws of Beta(α, α), float64, from one 63-bit seed taken off ``generator``.

    torch has no public seedable Beta sampler (``torch.distributions.Beta`` takes no generator), so the
    draws come from NumPy's documented ``Generator.beta`` on a PCG64 stream seeded from ``generator``:
    deterministic per (seed, step, rank), public API only, and exactly one draw from ``generator``
    whatever ``batch`` and ``alpha`` are.
    """
    seed = int(torch.randint(0, 2**63 - 1, (1,), generator=generator))
    rng = np.random.Generator(np.random.PCG64(seed))
    return torch.from_numpy(rng.beta(alpha, alpha, size=batch).astype(np.float64))


def _pick_partners(u: torch.Tensor, prompts: Sequence[str] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(partner (B,) long, lonely (B,) bool) from uniform draws ``u`` in [0, 1).

    Sample i picks ``candidates[⌊u_i · n_i⌋]`` among the other samples in index order, where the
    candidates are the samples with a different prompt (all others when ``prompts`` is None): uniform
    over them, never itself. ``lonely[i]``: no other sample has a different prompt; its partner is
    then a same-prompt one (or −1 in a batch of one), which :func:`mix_batch` does not use.
    """
    b = len(u)
    if prompts is not None and len(prompts) != b:
        raise ValueError(f"mix_batch: {len(prompts)} prompts for a batch of {b}")
    partner = torch.full((b,), -1, dtype=torch.long)
    lonely = torch.zeros(b, dtype=torch.bool)
    for i in range(b):
        others = [j for j in range(b) if j != i]
        distinct = others if prompts is None else [j for j in others if prompts[j] != prompts[i]]
        if not distinct:
            lonely[i] = True
            distinct = others
        if distinct:
            partner[i] = distinct[min(int(float(u[i]) * len(distinct)), len(distinct) - 1)]
    return partner, lonely


def _draw(
    cfg: MixConfig, batch: int, generator: torch.Generator, prompts: Sequence[str] | None = None
) -> tuple[torch.Tensor, ...]:
    """All random decisions for one batch, drawn in a fixed order and count from ``generator``.

    The count does not depend on ``cfg`` or ``prompts``: changing λ's law or the batch's labels
    never shifts the other decisions. Returns (mixed, lam, target_left, partner, lonely).
    """
    mixed = torch.rand(batch, generator=generator, dtype=torch.float64) < cfg.prob
    beta = _beta(cfg.alpha, batch, generator)
    if cfg.constant_lambda is not None:
        lam = torch.full((batch,), float(cfg.constant_lambda), dtype=torch.float64)
    else:
        lam = beta
    lam = lam.clamp(*cfg.lambda_range)
    target_left = torch.rand(batch, generator=generator, dtype=torch.float64) < 0.5
    u = torch.rand(batch, generator=generator, dtype=torch.float64)
    partner, lonely = _pick_partners(u, prompts)
    return mixed, lam, target_left, partner, lonely


def mix_batch(
    frames_u8: torch.Tensor,
    cfg: MixConfig,
    generator: torch.Generator,
    out_dtype: torch.dtype = torch.float32,
    prompts: Sequence[str] | None = None,
) -> tuple[torch.Tensor, MixInfo]:
    """Mix a batch of uint8 clips; return ``(video, info)``.

    ``prompts`` (B strings, the batch's ``"text"``): partners are chosen among samples with another
    prompt; a sample with none stays unmixed (skipping beats an ambiguous target: an unmixed clip is
    still a correct example of the inference-time input) and is counted in ``info``.

    ``frames_u8``: ``(B, T, H, W, 3)`` uint8 on any device. ``video``: ``(B, T, 3, H, W)`` in
    ``[-1, 1]``, ``out_dtype`` (float32 by default, what the model consumes), same device.
    Resizing works in float64 when ``out_dtype`` is float64 and in float32 otherwise: a half or bf16
    ``out_dtype`` is only a final cast, so pixels do not depend on low-precision kernels.
    Resizing is bilinear with ``antialias=True``: every resize here shrinks the width, and without
    a low-pass filter thin stripes alias into moiré the model could key on. ``align_corners=False`` keeps both halves
    covering their whole source frame. Pixel values are resized in [0, 255] and normalised once
    after the join; bilinear weights are non-negative, so the clamp only guards rounding.
    """
    if frames_u8.dtype != torch.uint8:
        raise TypeError(f"mix_batch: frames must be uint8 (B, T, H, W, 3), got dtype {frames_u8.dtype}")
    if frames_u8.ndim != 5 or frames_u8.shape[-1] != 3:
        raise ValueError(f"mix_batch: frames must have shape (B, T, H, W, 3), got {tuple(frames_u8.shape)}")
    if not out_dtype.is_floating_point:
        raise TypeError(f"mix_batch: out_dtype must be a floating dtype, got {out_dtype}")
    b, t, h, w, _ = frames_u8.shape
    work_dtype = torch.float64 if out_dtype == torch.float64 else torch.float32

    mixed, lam, target_left, partner, lonely = _draw(cfg, b, generator, prompts)
    if b < 2 or w < 2:  # no other sample, or no room for two parts: nothing can be mixed
        mixed = torch.zeros(b, dtype=torch.bool)
    no_distinct_partner = mixed & lonely if prompts is not None else torch.zeros(b, dtype=torch.bool)
    mixed = mixed & ~no_distinct_partner
    width = torch.floor(lam * w).long().clamp(1, max(1, w - 1))
    lam = torch.where(mixed, lam, torch.ones_like(lam))
    width = torch.where(mixed, width, torch.full_like(width, w))
    partner = torch.where(mixed, partner, torch.full_like(partner, -1))

    # (B, T, H, W, 3) -> (B, T, 3, H, W); the float copy is the only full-size allocation
    video = frames_u8.permute(0, 1, 4, 2, 3).to(work_dtype).contiguous()
    joined: dict[int, torch.Tensor] = {}
    for i in torch.nonzero(mixed).flatten().tolist():
        tw = int(width[i])
        tgt = F.interpolate(video[i], size=(h, tw), mode="bilinear", align_corners=False, antialias=True)
        prt = F.interpolate(
            video[int(partner[i])], size=(h, w - tw), mode="bilinear", align_corners=False, antialias=True
        )
        joined[i] = torch.cat((tgt, prt) if bool(target_left[i]) else (prt, tgt), dim=-1)
    # write only after all joins: a partner that is itself mixed must contribute its original frames
    for i, clip in joined.items():
        video[i] = clip

    out = video.div_(127.5).sub_(1.0).clamp_(-1.0, 1.0).to(out_dtype)
    info = MixInfo(
        mixed=mixed, lam=lam, target_left=target_left & mixed, partner=partner, width=width,
        no_distinct_partner=no_distinct_partner,
    )
    return out, info


def apply_to_batch(batch: dict, cfg: MixConfig, generator: torch.Generator) -> dict:
    """Mix ``batch["video_u8"]`` into a new dict with ``"video"`` and ``"mix"`` (a :class:`MixInfo`).

    Contract: the input dict is not modified; every other key (the target's text, T5 and CLIP text
    features, masks, audio latents, ``video_u8`` itself) is carried over as the very same object.
    That is how a mixed sample keeps its target's conditioning and latent: mixing only ever
    touches the frames. A batch that already has ``"video"`` or ``"mix"`` is refused, since mixing
    or normalising a batch twice is exactly the release bug this module exists to avoid.
    ``batch["text"]`` (the prompts), when present, steers partner choice (see :func:`mix_batch`).
    """
    if "video_u8" not in batch:
        raise KeyError(f"apply_to_batch: batch has no 'video_u8' (keys: {sorted(batch)})")
    for key in ("video", "mix"):
        if key in batch:
            raise ValueError(f"apply_to_batch: batch already has {key!r}; it would be mixed or normalised twice")
    prompts = batch.get("text")
    video, info = mix_batch(batch["video_u8"], cfg, generator, prompts=prompts)
    return {**batch, "video": video, "mix": info}
