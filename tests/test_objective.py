"""The training objective: which parameters each stage trains, where gradients flow, and the draws."""

from __future__ import annotations

import pytest
import torch

from selva.presets import get_preset
from selva.stages import GENERATOR_FROZEN
from training.objective import SelvaObjective, draw, set_stage_trainable

PRESET = get_preset("tiny")
B = 3


@pytest.fixture(scope="module")
def modules():
    torch.manual_seed(0)
    ts, gen = PRESET.build_textsynch(), PRESET.build_generator()
    with torch.no_grad():  # a "trained" state: zero-initialised outputs would pass no gradient at all
        for p in (*ts.parameters(), *gen.parameters()):
            p.add_(torch.randn_like(p) * 0.02)
    return ts, gen


def batch() -> dict:
    g = torch.Generator().manual_seed(1)
    n, d = PRESET.seq.latent_seq_len, PRESET.generator.latent_dim
    return {"key": ["k0", "k1", "k2"], "video": torch.rand(B, 50, 3, 64, 64, generator=g) * 2 - 1,
            "t5": torch.randn(B, 6, 64, generator=g), "t5_mask": torch.ones(B, 6, dtype=torch.bool),
            "clip_text": torch.randn(B, 77, 64, generator=g), "latent_mean": torch.randn(B, n, d, generator=g),
            "latent_std": torch.rand(B, n, d, generator=g) * 0.1}


def grads(named) -> set[str]:
    return {n for n, p in named if p.grad is not None and p.grad.abs().sum() > 0}


def test_each_stage_trains_its_set(modules):
    ts, gen = modules
    pretrain = dict(set_stage_trainable(ts, gen, "pretrain"))
    assert all(n.startswith(("textsynch.vfeat_extractor.", "generator.")) for n in pretrain)
    assert not any(".patch_embed." in n for n in pretrain)  # unused 2-D embedding: never a gradient
    assert not any(n.split(".")[-1] in GENERATOR_FROZEN for n in pretrain)
    generator_only = dict(set_stage_trainable(ts, gen, "pretrain", pretrain_backbone=False))
    assert set(generator_only) == {n for n in pretrain if n.startswith("generator.")}
    assert not any(p.requires_grad for p in ts.parameters())
    encoder = set_stage_trainable(ts, gen, "encoder")
    assert {id(p) for _, p in encoder} == {id(p) for p in ts.trainable_parameters()}
    generator = dict(set_stage_trainable(ts, gen, "generator"))
    assert len(generator) == sum(1 for n, _ in gen.named_parameters() if n not in GENERATOR_FROZEN)
    assert all(not p.requires_grad for p in ts.parameters())


def test_stage1_gradient_reaches_textsynch_through_the_frozen_generator(modules):
    ts, gen = modules
    named = set_stage_trainable(ts, gen, "encoder")
    seen = []
    hook = ts.vfeat_extractor.register_forward_hook(lambda m, i, o: seen.append(o.requires_grad))
    try:
        loss, per_sample, t = SelvaObjective(ts, gen, stage="encoder", text_in_encoder=True, cfg_dropout=0.0,
                                             seed=0).loss(batch(), 0)
        loss.backward()
    finally:
        hook.remove()
    with_grad = grads(named)
    assert {n for n in with_grad if n.startswith("textsynch.text_proj")} and "textsynch.sup_text_feat" in with_grad
    assert all(p.grad is None for p in gen.parameters())  # frozen: no gradient kept, yet it flowed through
    assert all(p.grad is None for p in ts.vfeat_extractor.parameters())
    assert per_sample.shape == (B,) and t.shape == (B,)
    for _, p in named:
        p.grad = None


def test_the_draws_of_a_sample_do_not_depend_on_its_batch():
    shape = (4, 5)
    ab, ba, a = draw(["a", "b"], shape, 7, 3, 0.5), draw(["b", "a"], shape, 7, 3, 0.5), draw(["a"], shape, 7, 3, 0.5)
    for field in ("eps", "noise", "t", "null_video", "null_text"):
        x, y, z = getattr(ab, field), getattr(ba, field), getattr(a, field)
        assert torch.equal(x[0], y[1]) and torch.equal(x[1], y[0]) and torch.equal(x[0], z[0])
    assert not torch.equal(draw(["a"], shape, 7, 4, 0.5).noise, a.noise)  # another step, other numbers
    assert not torch.equal(draw(["a"], shape, 8, 3, 0.5).noise, a.noise)  # another seed too


def test_no_text_in_the_encoder_ignores_the_prompt(modules):
    ts, gen = modules
    set_stage_trainable(ts, gen, "generator")
    b1, b2 = batch(), batch()
    b2["t5"] = torch.randn_like(b2["t5"])
    ablation = SelvaObjective(ts, gen, stage="generator", text_in_encoder=False, cfg_dropout=0.0, seed=0)
    selva = SelvaObjective(ts, gen, stage="generator", text_in_encoder=True, cfg_dropout=0.0, seed=0)
    with torch.no_grad():
        assert torch.equal(ablation.sync_features(b1), ablation.sync_features(b2))
        assert not torch.allclose(selva.sync_features(b1), selva.sync_features(b2))


def test_cfg_dropout_replaces_the_conditions_by_the_empty_tokens(modules):
    ts, gen = modules
    set_stage_trainable(ts, gen, "generator")
    b = batch()
    dropped = draw(b["key"], tuple(b["latent_mean"].shape[1:]), 0, 0, 0.0)
    dropped.null_video[:] = True
    dropped.null_text[:] = True
    obj = SelvaObjective(ts, gen, stage="generator", text_in_encoder=True, cfg_dropout=0.0, seed=0)
    other = {**b, "video": torch.rand_like(b["video"]), "clip_text": torch.randn_like(b["clip_text"]),
             "t5": torch.randn_like(b["t5"])}
    with torch.no_grad():
        assert torch.equal(obj.loss(b, 0, draws=dropped)[1], obj.loss(other, 0, draws=dropped)[1])
        kept = draw(b["key"], tuple(b["latent_mean"].shape[1:]), 0, 0, 0.0)
        assert not torch.equal(obj.loss(b, 0, draws=kept)[1], obj.loss(other, 0, draws=kept)[1])
