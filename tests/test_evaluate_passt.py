"""The PaSST embedder (hear21passt, an optional dependency: ``pip install 'selva-pipeline[eval]'``)
loads a local state dict strictly and returns the package's own 527 logits + 768-d embedding of the
10 s zero-padded input. Skipped where hear21passt is not installed (the default test set-up)."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
import torch

pytest.importorskip("hear21passt")


def test_passt_embedder_matches_the_package_model_on_padded_input(tmp_path):
    from hear21passt.models.passt import get_model
    from hear21passt.models.preprocess import AugmentMelSTFT

    from training.embedders import PASST_SAMPLES, EmbedderUnavailable, load_embedder, sha256_path

    torch.manual_seed(0)
    with contextlib.redirect_stdout(io.StringIO()):
        net = get_model(arch="passt_s_swa_p16_128_ap476", pretrained=False).eval()
    path = tmp_path / "passt.pt"
    torch.save(net.state_dict(), path)
    embedder = load_embedder("passt", path, "cpu")
    assert embedder.sample_rate == 32_000 and embedder.weights.sha256 == sha256_path(path)

    rng = np.random.RandomState(0)
    waves = [0.1 * rng.randn(32_000 * 3).astype(np.float32), 0.1 * rng.randn(32_000 * 12).astype(np.float32)]
    out = embedder.embed(waves)
    assert out.vectors.shape == (2, 768) and out.logits.shape == (2, 527)

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
