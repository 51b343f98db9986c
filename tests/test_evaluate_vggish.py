"""The VGGish embedder (network class from the torch-vggish-yamnet dependency): strict local load,
the final ReLU removed, av-benchmark's front-end, and FD-VGG over the 0.96 s frames of all files.
Skipped where the package is not installed (a venv from before it became a dependency)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("torch_vggish_yamnet")


@pytest.fixture(scope="module")
def vggish_file(tmp_path_factory):
    """A randomly initialised VGGish state dict (72M parameters: saved once for the module)."""
    from torch_vggish_yamnet.vggish.model import VGGish

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vggish") / "vggish.pth"
    torch.save(VGGish().state_dict(), path)
    return path


def test_vggish_embedder_is_the_package_network_without_its_last_relu_on_tf_log_mel_examples(tmp_path, vggish_file):
    from torch_vggish_yamnet.vggish.model import VGGish

    from training.embedders import EmbedderUnavailable, load_embedder, sha256_path
    from training.vggish_frontend import examples

    net = VGGish().eval()
    net.load_state_dict(torch.load(vggish_file, weights_only=True))
    embedder = load_embedder("vggish", vggish_file)
    assert embedder.sample_rate == 16_000 and embedder.weights.sha256 == sha256_path(vggish_file)
    rng = np.random.RandomState(0)
    waves = [0.1 * rng.randn(32_000).astype(np.float32), 0.1 * rng.randn(10_000).astype(np.float32)]
    out = embedder.embed(waves)
    assert out.vectors is None and out.logits is None
    assert out.frames[0].shape == (2, 128) and out.frames[1].shape == (0, 128)  # 2 s: 2 examples; 0.6 s: none
    with torch.no_grad():
        x = torch.from_numpy(examples(waves[0]))[:, None]
        pre_relu = net.embeddings[:-1](net.features(x).permute(0, 2, 3, 1).reshape(2, -1))
    np.testing.assert_allclose(out.frames[0], pre_relu.numpy(), rtol=1e-5, atol=1e-6)
    assert (out.frames[0] < 0).any()  # the ReLU the package ends with is gone
    state = net.state_dict()
    state["pproc.pca_means"] = torch.zeros(128)
    torch.save({"model": state}, tmp_path / "extra.pth")
    with pytest.raises(EmbedderUnavailable, match=r"^vggish: .*extra.pth does not fit .*unexpected pproc.pca_means"):
        load_embedder("vggish", tmp_path / "extra.pth")


def test_fd_vgg_pools_the_frames_of_all_files(tmp_path, vggish_file):
    from preprocessing.compact import encode_flac
    from selva_cli.main import main
    from training import metrics as M
    from training.embedders import load_embedder
    from training.evaluate_data import load_audio

    rng = np.random.RandomState(2)
    for side, shift in (("gen", 30), ("ref", 0)):
        (tmp_path / side).mkdir()
        for i in range(3):
            t = np.arange(int(16_000 * (2.5 + i))) / 16_000  # 2, 3 and 4 whole examples
            wave = 0.3 * np.sin(2 * np.pi * (300 + 90 * i + shift) * t) + 0.02 * rng.randn(t.size)
            (tmp_path / side / f"c{i}.flac").write_bytes(encode_flac(wave.astype(np.float32), 16_000))
    out = tmp_path / "m.json"
    assert main(["evaluate", "--generated", str(tmp_path / "gen"), "--reference", str(tmp_path / "ref"),
                 "--embedders", f"vggish={vggish_file}", "--out", str(out), "--no-progress",
                 "--duration", "8"]) == 0
    fd = json.loads(out.read_text())["metrics"]["overall"]["FD-VGG"]
    assert fd["frames"] == {"generated": 9, "reference": 9} and fd["embedder"] == "vggish"
    embedder = load_embedder("vggish", vggish_file)
    frames = {side: np.concatenate(embedder.embed([load_audio(tmp_path / side / f"c{i}.flac", 16_000, 8.0)
                                                   for i in range(3)]).frames) for side in ("gen", "ref")}
    assert fd["value"] == pytest.approx(M.fd_from_embeddings(frames["gen"], frames["ref"]).value, rel=1e-6)
