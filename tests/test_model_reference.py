"""The official reference vectors, run through the CLI exactly as a user would."""

from __future__ import annotations

import json

import pytest

from selva.presets import SMALL_16K
from selva_cli.main import main


def test_check_reference_passes_every_vector(reference_dir, capsys):
    """Video encoder, generator, sampler, sequence lengths, mel, VAE and vocoder: every output."""
    code = main(["check-reference", str(reference_dir)])
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith(("PASS", "FAIL", "ERROR"))]
    cases = json.loads((reference_dir / "cases.json").read_text())["cases"]
    assert {c["component"] for c in cases} == {
        "textsynch", "generator", "sampler", "sequence_config", "mel", "vae", "vocoder"
    }
    assert code == 0, out
    assert len(lines) == sum(len(c["outputs"]) for c in cases), out
    assert all(line.startswith("PASS") for line in lines), out
    assert "(note: ours is" not in out, out  # every output in the dtype of its run


@pytest.mark.parametrize(
    ("build", "manifest"),
    [(SMALL_16K.build_textsynch, "textsynch_depth1_sup5"), (SMALL_16K.build_generator, "generator_small_16k")],
)
def test_small_16k_state_dict_is_the_official_manifest(reference_dir, build, manifest):
    entries = json.loads((reference_dir / f"{manifest}.keys.json").read_text())
    official = {name: tuple(shape) for name, shape, _dtype, _kind in entries}
    module = build()
    ours = {name: tuple(t.shape) for name, t in module.state_dict().items()}
    assert ours == official
    # parameters vs buffers as in the official module (latent_mean/std are frozen *parameters*)
    params = {name for name, _ in module.named_parameters()}
    assert params == {name for name, _s, _d, kind in entries if kind == "parameter"}
