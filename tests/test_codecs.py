"""Audio codecs: the embedded codec round-trips real audio; the official codec wires mel -> VAE -> BigVGAN."""

from __future__ import annotations

import av
import numpy as np
import pytest
import torch
from conftest import require_shared, shared_dir

from selva.audio.bigvgan import BigVGANVocoder
from selva.audio.codec import AudioCodec, EmbeddedCodec, OfficialCodec
from selva.audio.mel import get_mel_converter
from selva.audio.vae import get_my_vae
from selva.sequence import SequenceConfig


def _real_audio(seconds: float) -> torch.Tensor:
    """16 kHz mono float32 from a real VGGSound clip, decoded with PyAV."""
    path = require_shared(shared_dir() / "data" / "real" / "0B4dYTMsgHA_000130.mp4", "the real clips")
    resampler = av.AudioResampler(format="flt", layout="mono", rate=16_000)
    chunks = []
    with av.open(str(path)) as container:
        for frame in container.decode(audio=0):
            chunks.extend(r.to_ndarray().reshape(-1) for r in resampler.resample(frame))
    wave = np.concatenate(chunks)[: int(seconds * 16_000)]
    return torch.from_numpy(wave)[None]


def test_embedded_codec_round_trips_real_audio_with_small_spectral_error():
    seq = SequenceConfig(2.0)
    wave = _real_audio(seq.num_audio_frames / 16_000)
    codec = EmbeddedCodec()
    assert isinstance(codec, AudioCodec)
    mean, std = codec.encode(wave)
    assert mean.shape == (1, seq.latent_seq_len, codec.latent_dim) and torch.equal(std, torch.zeros_like(std))
    rebuilt = codec.decode(mean)
    assert rebuilt.shape == wave.shape and rebuilt.abs().max() <= 1
    again, _ = codec.encode(rebuilt)
    # log-mel of the Griffin-Lim reconstruction vs the original, in latent units (measured 0.051)
    spectral_error = ((again - mean).norm() / mean.norm()).item()
    assert spectral_error < 0.08, spectral_error
    # the same latent decodes to the same waveform (fixed phase seed), alone or at any batch position:
    # generation batches clips, and a clip's sound must not depend on its neighbour
    assert torch.equal(codec.decode(mean), rebuilt)
    # (batched FFTs round differently in the last bits, and 32 Griffin-Lim iterations grow that to ~6e-4;
    # a phase drawn per batch position instead moved samples by up to 1.0)
    batch = codec.decode(torch.cat([mean.flip(1), mean]))
    assert (batch[1] - rebuilt[0]).abs().max() < 2e-3
    assert (batch[0] - codec.decode(mean.flip(1))[0]).abs().max() < 2e-3


def test_embedded_codec_refuses_ragged_lengths():
    with pytest.raises(ValueError, match="not a multiple of the hop 512"):
        EmbeddedCodec().encode(torch.zeros(1, 1000))


def test_official_codec_shapes_at_the_official_rates():
    torch.manual_seed(0)
    vae = get_my_vae("16k").remove_weight_norm().eval()
    codec = OfficialCodec(get_mel_converter("16k"), vae, BigVGANVocoder().remove_weight_norm())
    assert isinstance(codec, AudioCodec)
    assert (codec.sampling_rate, codec.latent_dim, codec.samples_per_latent) == (16_000, 20, 512)
    seq = SequenceConfig(1.0)
    wave = torch.rand(1, seq.num_audio_frames) * 2 - 1
    with torch.inference_mode():
        mean, std = codec.encode(wave)
        assert mean.shape == std.shape == (1, seq.latent_seq_len, 20)
        assert (std > 0).all()
        out = codec.decode(mean)
    assert out.shape == (1, seq.num_audio_frames)


def test_embedded_family_builds_for_every_preset_with_matching_widths():
    from selva.encoders import build_encoders
    from selva.presets import PRESETS

    for preset in PRESETS.values():
        enc = build_encoders("embedded", preset)
        assert enc.codec.latent_dim == preset.generator.latent_dim
        assert enc.t5.dim == preset.textsynch.text_dim and enc.clip.dim == preset.generator.text_dim


def test_missing_official_weights_are_all_named_before_any_work(tmp_path):
    from selva.encoders import build_encoders
    from selva.presets import SMALL_16K, TINY
    from selva.weights import MissingWeightsError

    (tmp_path / "ext_weights").mkdir()
    (tmp_path / "ext_weights" / "v1-16.pth").write_bytes(b"")
    with pytest.raises(MissingWeightsError) as err:
        build_encoders("official", SMALL_16K, tmp_path)
    text = str(err.value)
    for expected in ("ext_weights/best_netG.pt", "flan-t5-base", "clip-vit-h-14-384"):
        assert expected in text
    assert "v1-16.pth is missing" not in text
    with pytest.raises(MissingWeightsError, match="--weights DIR"):
        build_encoders("official", SMALL_16K, None)
    with pytest.raises(ValueError, match="40-channel latents"):
        build_encoders("official", TINY, tmp_path)


def test_official_weight_files_load_through_the_release_layout(tmp_path):
    """Files saved in the release's format and names load strictly through selva.weights."""
    from selva.encoders import build_codec
    from selva.presets import SMALL_16K
    from selva.weights import OFFICIAL_FILES

    (tmp_path / "ext_weights").mkdir()
    vae = get_my_vae("16k")
    torch.save(vae.state_dict(), tmp_path / OFFICIAL_FILES["vae"].path)
    torch.save({"generator": BigVGANVocoder().state_dict()}, tmp_path / OFFICIAL_FILES["vocoder"].path)
    codec = build_codec("official", SMALL_16K, tmp_path)
    assert isinstance(codec, OfficialCodec) and codec.vae.weight_norm_removed


def test_precompute_needs_no_vocoder(tmp_path):
    from selva.encoders import build_encoders
    from selva.presets import SMALL_16K
    from selva.weights import PRECOMPUTE_ROLES, MissingWeightsError

    assert "vocoder" not in PRECOMPUTE_ROLES
    with pytest.raises(MissingWeightsError) as err:  # every file precompute needs is named, the vocoder is not
        build_encoders("official", SMALL_16K, tmp_path, decoder=False)
    assert "v1-16.pth" in str(err.value) and "best_netG.pt" not in str(err.value)
