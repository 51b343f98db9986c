"""Tiny preset: forward + backward of TextSynch + generator, and what each stage trains."""

from __future__ import annotations

import pytest
import torch

from selva.flow_matching import FlowMatching
from selva.presets import TINY
from selva.stages import GENERATOR_FROZEN, Stage, set_trainable


def _step(textsynch, generator, seed=0):
    g = torch.Generator().manual_seed(seed)
    seq = TINY.seq
    b = 2
    video = torch.rand(b, seq.sync_num_frames, 3, TINY.frame_size, TINY.frame_size, generator=g) * 2 - 1
    t5 = torch.randn(b, 6, TINY.textsynch.text_dim, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    clip_text = torch.randn(b, 77, TINY.generator.text_dim, generator=g)
    data = torch.randn(b, seq.latent_seq_len, TINY.generator.latent_dim, generator=g)
    noise = torch.randn(data.shape, generator=g)
    t = FlowMatching.sample_t(b, g)
    fm = FlowMatching()
    sync = textsynch(video, t5, mask)
    x_t = fm.interpolate(noise, data, t)
    v = generator(x_t, generator.empty_clip_sequence(b), sync, clip_text, t)
    loss = fm.loss(v, noise, data).mean()
    loss.backward()
    return loss


def _nonzero_grads(module):
    return {n for n, p in module.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


def _randomise(*modules):
    # official zero-inits (adaLN, output conv, cross-block norm1) would block gradients: perturb them
    torch.manual_seed(0)
    with torch.no_grad():
        for m in modules:
            for p in m.parameters():
                p.add_(0.02 * torch.randn_like(p))


@pytest.mark.parametrize("stage", [Stage.ENCODER, Stage.GENERATOR])
def test_gradients_reach_exactly_what_the_stage_trains(stage):
    textsynch, generator = TINY.build_textsynch(), TINY.build_generator()
    _randomise(textsynch, generator)
    trained = set_trainable(textsynch, generator, stage)
    loss = _step(textsynch, generator)
    assert torch.isfinite(loss)
    ts_grads, gen_grads = _nonzero_grads(textsynch), _nonzero_grads(generator)
    trained_ids = {id(p) for p in trained}
    if stage is Stage.ENCODER:
        expected = {n for n, p in textsynch.named_parameters() if id(p) in trained_ids}
        assert expected == {n for n, _ in textsynch.named_parameters()
                            if n.startswith(("text_proj.", "synch_text_cross_blocks.")) or n == "sup_text_feat"}
        assert ts_grads == expected
        assert gen_grads == set()
    else:
        assert ts_grads == set()
        # Every generator parameter but the frozen statistics gets a gradient, except two that the
        # official graph never uses in a conditional training step: empty_sync_feat (only in the
        # unconditional branch) and the clip/text query norms of the last, pre-only joint block
        # (its clip/text outputs are dropped, so their queries do not matter).
        expected = {n for n, _ in generator.named_parameters() if n not in GENERATOR_FROZEN}
        last = TINY.generator.joint_depth - 1
        unused = {"empty_sync_feat", f"joint_blocks.{last}.clip_block.attn.q_norm.weight",
                  f"joint_blocks.{last}.text_block.attn.q_norm.weight"}
        assert gen_grads == expected - unused
    # frozen parameters never even get a grad tensor
    for module in (textsynch, generator):
        for p in module.parameters():
            if id(p) not in trained_ids:
                assert p.grad is None


def test_stage_names_parse_and_unknown_is_explained():
    assert Stage.parse("1") is Stage.ENCODER and Stage.parse("generator") is Stage.GENERATOR
    with pytest.raises(ValueError, match="unknown training stage 'three'"):
        Stage.parse("three")


def test_fresh_cross_block_is_the_identity_and_padding_is_ignored():
    torch.manual_seed(0)
    ts = TINY.build_textsynch().eval()
    video = torch.rand(1, 16, 3, 64, 64) * 2 - 1
    text = torch.randn(1, 6, TINY.textsynch.text_dim)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    with torch.no_grad():
        clips = ts.segment(video).flatten(0, 1)
        tokens = ts.vfeat_extractor.forward_tokens(clips)
        text_sup, mask_sup = ts.prepend_sup_text_tokens(text, mask)
        block = ts.synch_text_cross_blocks[0]
        assert torch.equal(block(tokens, ts.text_proj(text_sup), mask_sup), tokens)
        _randomise(ts)
        out = ts(video, text, mask)
        padded = text.clone()
        padded[:, 4:] = 7.0
        assert torch.equal(ts(video, padded, mask), out)
        assert not torch.allclose(ts(video, text, torch.ones_like(mask)), out)


def test_segments_are_independent():
    torch.manual_seed(0)
    ts = TINY.build_textsynch().eval()
    _randomise(ts)
    video = torch.rand(1, 32, 3, 64, 64) * 2 - 1
    text, mask = torch.randn(1, 5, TINY.textsynch.text_dim), torch.ones(1, 5, dtype=torch.bool)
    with torch.no_grad():
        three = ts(video, text, mask)
        one = ts(video[:, :16], text, mask)
        chunked = ts(video, text, mask, clips_per_chunk=2)
    assert three.shape == (1, 24, 64)
    assert torch.allclose(three[:, :8], one, atol=1e-6)
    assert torch.allclose(chunked, three, atol=1e-6)
