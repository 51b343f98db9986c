"""The official reference vectors of every component but TextSynch, through the CLI as a user runs it
(the TextSynch half is in tests/test_model_reference.py: two files, so the suite's workers share the cost)."""

from __future__ import annotations

from reference_check import OTHERS, check_reference_components


def test_check_reference_passes_every_other_vector(reference_dir, capsys):
    """Generator, sampler, sequence lengths, mel, VAE and vocoder: every output, in the dtype of its run."""
    check_reference_components(reference_dir, capsys, OTHERS)
