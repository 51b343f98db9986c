"""The official reference vectors, run through the CLI exactly as a user would."""

from __future__ import annotations

import json

import pytest
from reference_check import TEXTSYNCH, check_reference_components

from selva.presets import SMALL_16K


def test_check_reference_passes_every_textsynch_vector(reference_dir, capsys):
    """The video encoder's outputs (float32 and float64): the other half is tests/test_reference_rest.py."""
    check_reference_components(reference_dir, capsys, TEXTSYNCH)


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
