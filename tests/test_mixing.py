"""Self-augmentation (DESIGN §5): exact pixels, single normalisation, seeding, and the batch contract."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from selva.mixing import MixConfig, MixInfo, _beta, _draw, apply_to_batch, mix_batch, mixing_generator

B, T, H, W = 6, 3, 8, 32


def frames(b: int = B, t: int = T, h: int = H, w: int = W, seed: int = 0) -> torch.Tensor:
    """Random (b, t, h, w, 3) uint8 clips that always contain both extremes 0 and 255."""
    x = torch.randint(0, 256, (b, t, h, w, 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    x[:, :, 0, 0, 0] = 0
    x[:, :, -1, -1, -1] = 255
    return x


def normalised(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 1, 4, 2, 3).float() / 127.5 - 1.0


def resized(clip_u8: torch.Tensor, width: int) -> torch.Tensor:
    """The expected resize of one (T, H, W, 3) clip, computed independently of mix_batch's internals."""
    x = clip_u8.permute(0, 3, 1, 2).float()
    y = F.interpolate(x, size=(x.shape[-2], width), mode="bilinear", align_corners=False, antialias=True)
    return (y / 127.5 - 1.0).clamp(-1.0, 1.0)


def same_info(a: MixInfo, b: MixInfo) -> bool:
    return all(torch.equal(getattr(a, k), getattr(b, k)) for k in ("mixed", "lam", "target_left", "partner", "width"))


def test_p0_is_plain_normalisation() -> None:
    x = frames()
    out, info = mix_batch(x, MixConfig(prob=0.0), mixing_generator(0, 0, 0))
    assert torch.equal(out, normalised(x))
    assert not info.mixed.any()
    assert torch.all(info.lam == 1.0) and torch.all(info.partner == -1) and torch.all(info.width == W)


def test_values_in_range_and_float32_by_default() -> None:
    for step in range(5):
        x = frames(seed=step)
        out, info = mix_batch(x, MixConfig(prob=1.0, alpha=0.3), mixing_generator(1, step, 0))
        assert out.dtype == torch.float32 and out.shape == (B, T, 3, H, W)
        assert out.min() >= -1.0 and out.max() <= 1.0
        assert info.mixed.all()
    # the extremes map to exactly -1 and 1: one normalisation, not two
    out, _ = mix_batch(frames(), MixConfig(prob=0.0), mixing_generator(0, 0, 0))
    assert out.min() == -1.0 and out.max() == 1.0


def test_float64_matches_float32() -> None:
    x, cfg = frames(), MixConfig(prob=1.0)
    out32, info32 = mix_batch(x, cfg, mixing_generator(2, 3, 0))
    out64, info64 = mix_batch(x, cfg, mixing_generator(2, 3, 0), out_dtype=torch.float64)
    assert out64.dtype == torch.float64
    assert same_info(info32, info64)
    torch.testing.assert_close(out64.float(), out32, atol=1e-5, rtol=0)


def test_mixed_columns_are_resized_target_and_partner() -> None:
    x = frames(b=8)
    out, info = mix_batch(x, MixConfig(prob=1.0), mixing_generator(3, 7, 1))
    assert torch.equal(x, frames(b=8))  # the caller's frames are not modified
    assert info.mixed.all()
    for i in range(8):
        tw, j = int(info.width[i]), int(info.partner[i])
        assert tw == math.floor(float(info.lam[i]) * W) and 1 <= tw <= W - 1
        tgt, prt = resized(x[i], tw), resized(x[j], W - tw)
        if info.target_left[i]:
            assert torch.equal(out[i, ..., :tw], tgt) and torch.equal(out[i, ..., tw:], prt)
        else:
            assert torch.equal(out[i, ..., W - tw :], tgt) and torch.equal(out[i, ..., : W - tw], prt)


def test_both_sides_occur_and_partner_is_never_self() -> None:
    mixed, _, left, partner, _ = _draw(MixConfig(prob=1.0), 400, mixing_generator(0, 0, 0))
    assert left.any() and (~left).any()
    assert 0.4 < left.double().mean() < 0.6
    assert torch.all(partner != torch.arange(400)) and partner.min() >= 0 and partner.max() < 400
    # every other sample can be picked: over many small batches, each sample meets all the others
    seen: set[tuple[int, int]] = set()
    for step in range(50):
        p = _draw(MixConfig(prob=1.0), 4, mixing_generator(0, step, 0))[3]
        seen |= {(i, int(j)) for i, j in enumerate(p)}
    assert seen == {(i, j) for i in range(4) for j in range(4) if i != j}
    for step in range(20):
        _, info = mix_batch(frames(b=3, h=2, w=24), MixConfig(prob=1.0), mixing_generator(0, step, 0))
        assert torch.all(info.partner != torch.arange(3))


@pytest.mark.parametrize(
    ("alpha", "cdf"),
    [
        (0.5, lambda x: 2 / math.pi * torch.asin(x.sqrt())),  # arcsine law
        (1.0, lambda x: x),  # uniform
        (2.0, lambda x: 3 * x**2 - 2 * x**3),
    ],
)
def test_lambda_draws_follow_beta(alpha, cdf) -> None:
    """Raw draws (before the floor) against the exact Beta(α, α) CDF: Kolmogorov-Smirnov distance
    below the 99.9% critical value 1.95/sqrt(n), and the variance 1 / (4 (2α + 1))."""
    n = 20000
    lam = _beta(alpha, n, mixing_generator(7, 0, 0)).sort().values
    assert lam.dtype == torch.float64 and lam.min() >= 0.0 and lam.max() <= 1.0
    empirical = torch.arange(1, n + 1, dtype=torch.float64) / n
    assert float((empirical - cdf(lam)).abs().max()) < 1.95 / math.sqrt(n)
    assert abs(float(lam.var()) - 1 / (4 * (2 * alpha + 1))) < 0.004
    # one seed draw per batch whatever its size: the generator is left in the same state
    g1, g2 = mixing_generator(7, 0, 0), mixing_generator(7, 0, 0)
    _beta(alpha, 3, g1), _beta(alpha, 300, g2)
    assert torch.equal(torch.rand(4, generator=g1), torch.rand(4, generator=g2))


def test_partner_has_another_prompt_when_the_batch_has_one() -> None:
    prompts = ["dog", "dog", "cat", "dog", "rain", "cat"]
    seen: set[tuple[int, int]] = set()
    for step in range(60):
        _, info = mix_batch(frames(), MixConfig(prob=1.0), mixing_generator(0, step, 0), prompts=prompts)
        assert info.mixed.all() and not info.no_distinct_partner.any()
        for i, j in enumerate(info.partner.tolist()):
            assert prompts[j] != prompts[i], (step, i, j)
            seen.add((i, j))
        assert info.stats()["mix/no_distinct_partner"] == 0.0
    # uniform over the different-prompt samples: each of them turns up as a partner
    assert seen == {(i, j) for i in range(B) for j in range(B) if prompts[i] != prompts[j]}


def test_a_batch_of_one_prompt_is_not_mixed_and_counted() -> None:
    x = frames()
    out, info = mix_batch(x, MixConfig(prob=1.0), mixing_generator(0, 0, 0), prompts=["dog"] * B)
    assert not info.mixed.any() and info.no_distinct_partner.all()
    assert torch.equal(out, normalised(x)) and torch.all(info.partner == -1)
    assert info.stats()["mix/no_distinct_partner"] == B
    # only the samples drawn for mixing are counted; with prob 0 none is
    _, info = mix_batch(x, MixConfig(prob=0.0), mixing_generator(0, 0, 0), prompts=["dog"] * B)
    assert not info.no_distinct_partner.any()
    # one odd prompt out: it pairs with any other sample, the others can only pair with it
    prompts = ["dog"] * (B - 1) + ["cat"]
    _, info = mix_batch(x, MixConfig(prob=1.0), mixing_generator(0, 1, 0), prompts=prompts)
    assert info.mixed.all() and not info.no_distinct_partner.any()
    assert info.partner[:-1].tolist() == [B - 1] * (B - 1)
    # the prompts steer only the partner: the other decisions are those of a batch without prompts
    _, plain = mix_batch(x, MixConfig(prob=1.0), mixing_generator(0, 1, 0))
    assert torch.equal(plain.lam, info.lam) and torch.equal(plain.target_left, info.target_left)
    with pytest.raises(ValueError, match="prompts"):
        mix_batch(x, MixConfig(), mixing_generator(0, 0, 0), prompts=["dog"])


def test_apply_to_batch_passes_the_prompts() -> None:
    batch = {"video_u8": frames(), "text": ["dog"] * B}
    out = apply_to_batch(batch, MixConfig(prob=1.0), mixing_generator(0, 0, 0))
    assert not out["mix"].mixed.any() and out["mix"].no_distinct_partner.all()


def test_mix_rate_follows_prob() -> None:
    mixed, *_ = _draw(MixConfig(prob=0.3), 4000, mixing_generator(5, 0, 0))
    assert 0.27 < mixed.double().mean() < 0.33


def test_lambda_floor_and_constant() -> None:
    cfg = MixConfig(prob=1.0, alpha=0.05)  # U-shaped Beta: most raw draws fall outside the floor
    _, lam, *_ = _draw(cfg, 2000, mixing_generator(0, 0, 0))
    assert lam.min() == 0.05 and lam.max() == 0.95
    _, lam, *_ = _draw(MixConfig(alpha=1.0), 4000, mixing_generator(0, 1, 0))
    assert abs(float(lam.mean()) - 0.5) < 0.02 and abs(float((lam < 0.25).double().mean()) - 0.25) < 0.03

    out, info = mix_batch(frames(), MixConfig(prob=1.0, constant_lambda=0.3), mixing_generator(0, 0, 0))
    assert torch.all(info.lam == 0.3) and torch.all(info.width == math.floor(0.3 * W))
    with pytest.raises(ValueError, match="constant_lambda"):
        MixConfig(constant_lambda=0.99)
    with pytest.raises(ValueError, match="prob"):
        MixConfig(prob=1.5)
    with pytest.raises(ValueError, match="alpha"):
        MixConfig(alpha=0.0)


def test_apply_to_batch_keeps_target_conditioning() -> None:
    batch = {
        "video_u8": frames(),
        "t5": torch.randn(B, 5, 4),
        "clip_text": torch.randn(B, 4),
        "latents": torch.randn(B, 10, 2),
        "text": [f"prompt {i}" for i in range(B)],
    }
    before = dict(batch)
    out = apply_to_batch(batch, MixConfig(prob=1.0), mixing_generator(0, 0, 0))
    assert batch == before and "video" not in batch  # the input dict is untouched
    for key, value in before.items():
        assert out[key] is value  # same objects: the target's features, latent and prompt
    assert out["video"].shape == (B, T, 3, H, W) and isinstance(out["mix"], MixInfo)
    with pytest.raises(ValueError, match="twice"):
        apply_to_batch(out, MixConfig(), mixing_generator(0, 0, 0))
    with pytest.raises(KeyError, match="video_u8"):
        apply_to_batch({"t5": batch["t5"]}, MixConfig(), mixing_generator(0, 0, 0))


def test_seeding_is_a_function_of_seed_step_rank() -> None:
    x, cfg = frames(), MixConfig(prob=0.7)
    a = apply_to_batch({"video_u8": x}, cfg, mixing_generator(11, 5, 2))
    b = apply_to_batch({"video_u8": x}, cfg, MixConfig(prob=0.7, seed=11).generator(5, 2))
    assert torch.equal(a["video"], b["video"]) and same_info(a["mix"], b["mix"])

    def lam_draws(seed: int, step: int, rank: int) -> torch.Tensor:
        return _draw(MixConfig(), 64, mixing_generator(seed, step, rank))[1]

    base = lam_draws(11, 5, 2)
    assert not torch.equal(base, lam_draws(11, 5, 3))  # another rank
    assert not torch.equal(base, lam_draws(11, 6, 2))  # another step
    assert not torch.equal(base, lam_draws(12, 5, 2))  # another seed
    assert not torch.equal(lam_draws(1, 2, 3), lam_draws(3, 2, 1))  # order of the three matters
    # not Python's salted hash(): the derived seed is a fixed number across processes and versions
    assert mixing_generator(0, 0, 0).initial_seed() == 1176272930116069315


def test_single_sample_never_mixes() -> None:
    for step in range(10):
        out, info = mix_batch(frames(b=1), MixConfig(prob=1.0), mixing_generator(0, step, 0))
        assert not info.mixed.any() and info.partner.item() == -1
        assert torch.equal(out, normalised(frames(b=1)))


def test_input_validation() -> None:
    with pytest.raises(TypeError, match="uint8"):
        mix_batch(frames().float(), MixConfig(), mixing_generator(0, 0, 0))
    with pytest.raises(ValueError, match="shape"):
        mix_batch(frames().permute(0, 1, 4, 2, 3), MixConfig(), mixing_generator(0, 0, 0))


def test_stats() -> None:
    _, info = mix_batch(frames(), MixConfig(prob=1.0, constant_lambda=0.25), mixing_generator(0, 0, 0))
    stats = info.stats()
    assert stats["mix/rate"] == 1.0 and stats["mix/lambda_mean"] == 0.25
    assert 0.0 <= stats["mix/target_left_rate"] <= 1.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_makes_the_same_decisions() -> None:
    x, cfg = frames(), MixConfig(prob=0.8)
    cpu, info_cpu = mix_batch(x, cfg, mixing_generator(4, 4, 4))
    gpu, info_gpu = mix_batch(x.cuda(), cfg, mixing_generator(4, 4, 4))
    assert gpu.device.type == "cuda" and same_info(info_cpu, info_gpu)
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-5, rtol=0)
