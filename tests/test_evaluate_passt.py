"""The PaSST embedder (model class from the hear21passt dependency)
loads a local state dict strictly and returns the package's own 527 logits + 768-d embedding of the
10 s zero-padded input. Skipped where hear21passt is not installed (a venv from before it became a dependency).

The network is PaSST-S's architecture shrunk to one transformer block of width 48 (same input,
patching and heads layout), so the tests check loading, padding and the output split in seconds:
the 86M-parameter model takes minutes to build, save and run on 2 CPU cores, and scipy's sqrtm of
a rank-deficient 768 x 768 covariance product alone takes 20 s there."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
import torch

pytest.importorskip("hear21passt")

WIDTH = 48  # the real model's embedding is 768-d


def _one_block_passt(arch: str = "passt_s_swa_p16_128_ap476", pretrained: bool = False):
    """passt_s_swa_p16_128_ap476's architecture (get_model's defaults: 128 x 998 input, 16x16
    patches at stride 10, distilled, 527 classes) with depth 1 and width 48 (4 heads)."""
    from hear21passt.models.passt import PaSST

    assert arch == "passt_s_swa_p16_128_ap476" and not pretrained
    return PaSST(img_size=(128, 998), patch_size=16, stride=10, embed_dim=WIDTH, depth=1, num_heads=4,
                 distilled=True, num_classes=527)


def test_passt_embedder_matches_the_package_model_on_padded_input(tmp_path, monkeypatch):
    from hear21passt.models.preprocess import AugmentMelSTFT

    from training.embedders import PASST_SAMPLES, EmbedderUnavailable, load_embedder, sha256_path

    monkeypatch.setattr("hear21passt.models.passt.get_model", _one_block_passt)
    torch.manual_seed(0)
    with contextlib.redirect_stdout(io.StringIO()):
        net = _one_block_passt().eval()
    path = tmp_path / "passt.pt"
    torch.save(net.state_dict(), path)
    embedder = load_embedder("passt", path, "cpu")
    assert embedder.sample_rate == 32_000 and embedder.weights.sha256 == sha256_path(path)

    rng = np.random.RandomState(0)
    waves = [0.1 * rng.randn(32_000 * 3).astype(np.float32), 0.1 * rng.randn(32_000 * 12).astype(np.float32)]
    out = embedder.embed(waves)
    assert out.vectors.shape == (2, WIDTH) and out.logits.shape == (2, 527)

    mel = AugmentMelSTFT(n_mels=128, sr=32000, win_length=800, hopsize=320, n_fft=1024, freqm=48, timem=192,
                         htk=False, fmin=0.0, fmax=None, norm=1, fmin_aug_range=10, fmax_aug_range=2000).eval()
    padded = np.zeros((2, PASST_SAMPLES), np.float32)
    padded[0, : waves[0].size] = waves[0]  # 3 s: zero-padded to 10 s
    padded[1] = waves[1][:PASST_SAMPLES]  # 12 s: the first 10 s
    with torch.no_grad():
        logits, features = net(mel(torch.from_numpy(padded)).unsqueeze(1))
    np.testing.assert_allclose(out.logits, logits.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out.vectors, features.numpy(), rtol=1e-4, atol=1e-5)

    state = net.state_dict()
    state.pop("head_dist.weight")
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(EmbedderUnavailable, match=r"^passt: .*bad.pt does not fit .*missing head_dist.weight"):
        load_embedder("passt", tmp_path / "bad.pt")


def test_evaluate_with_passt_reports_fd_kl_isc_kad_from_the_package_outputs(tmp_path, monkeypatch):
    import json

    import torchaudio.functional as AF
    from hear21passt.models.preprocess import AugmentMelSTFT

    from preprocessing.compact import encode_flac
    from selva_cli.main import main
    from training import metrics as M

    monkeypatch.setattr("hear21passt.models.passt.get_model", _one_block_passt)
    torch.manual_seed(1)
    with contextlib.redirect_stdout(io.StringIO()):
        net = _one_block_passt().eval()
    torch.save(net.state_dict(), tmp_path / "passt.pt")
    rng = np.random.RandomState(0)
    waves = {}
    for side in ("gen", "ref"):
        (tmp_path / side).mkdir()
        for i in range(10):  # 10 pairs: the fewest 10 IS splits allow
            t = np.arange(16_000) / 16_000
            wave = 0.3 * np.sin(2 * np.pi * (200 + 40 * i + (side == "gen") * 15) * t) + 0.02 * rng.randn(t.size)
            (tmp_path / side / f"c{i:02d}.flac").write_bytes(encode_flac(wave.astype(np.float32), 16_000))
            waves[side, i] = wave
    out = tmp_path / "m.json"
    assert main(["evaluate", "--generated", str(tmp_path / "gen"), "--reference", str(tmp_path / "ref"),
                 "--embedders", f"passt={tmp_path / 'passt.pt'}", "--out", str(out), "--no-progress",
                 "--device", "cpu", "--batch-size", "4"]) == 0
    report = json.loads(out.read_text())["metrics"]["overall"]

    # the same numbers by hand: 16 kHz FLAC -> decoded (16-bit) -> mean removed -> 32 kHz -> 10 s -> PaSST
    from training.evaluate_data import decode_audio

    mel = AugmentMelSTFT(n_mels=128, sr=32000, win_length=800, hopsize=320, n_fft=1024, freqm=48, timem=192,
                         htk=False, fmin=0.0, fmax=None, norm=1, fmin_aug_range=10, fmax_aug_range=2000).eval()
    outs = {}
    for side in ("gen", "ref"):
        batch = np.zeros((10, 320_000), np.float32)
        for i in range(10):
            audio, rate = decode_audio(tmp_path / side / f"c{i:02d}.flac")
            mono = torch.from_numpy(audio[0] - audio[0].mean())
            up = AF.resample(mono, rate, 32_000).numpy()
            batch[i, : up.size] = up
        with torch.no_grad():
            outs[side] = [t.numpy() for t in net(mel(torch.from_numpy(batch)).unsqueeze(1))]
    (gen_logits, gen_vec), (ref_logits, ref_vec) = outs["gen"], outs["ref"]
    assert report["FD-PASST"]["value"] == pytest.approx(M.fd_from_embeddings(gen_vec, ref_vec).value, rel=1e-3)
    assert report["KL-PASST-softmax"]["value"] == pytest.approx(M.kl_softmax(ref_logits, gen_logits), rel=1e-3)
    assert report["ISC-PASST-mean"]["value"] == pytest.approx(M.inception_score(gen_logits).mean, rel=1e-3)
    assert report["KAD-PASST"]["value"] == pytest.approx(M.kernel_audio_distance(ref_vec, gen_vec).value,
                                                         rel=1e-3, abs=1e-3)
    assert "rank-deficient covariance: 10 vectors for 48 dimensions" in report["FD-PASST"]["note"]
