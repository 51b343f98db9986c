"""``selva check-reference ../shared/reference-44k`` as a user runs it, in both dtypes.

Every case runs except the medium and large generator forwards: those are the small generator's
code at other widths and depths (their manifests are checked in tests/test_reference_44k.py), and
their float64 runs cost minutes and ~9 GB. ``benchmarks/reference_44k.py`` runs the whole set
(docs/benchmarks.md has its result). The 16 kHz set keeps passing in tests/test_reference_rest.py.
"""

from __future__ import annotations

import json

from selva_cli.main import main

SUITE_CASES = ("generator/small44_*", "sampler/*", "sequence_config/*", "mel/*", "vae/*", "vocoder/*")


def test_check_reference_44k_passes_every_small_and_audio_vector(reference_44k_dir, capsys):
    cases = json.loads((reference_44k_dir / "cases.json").read_text())["cases"]
    left_out = {c["id"] for c in cases if c["id"].startswith(("generator/medium44_", "generator/large44_"))}
    chosen = [c for c in cases if c["id"] not in left_out]
    assert len(left_out) == 4 and len(chosen) == 14  # the suite's subset is what this file says it is
    code = main(["check-reference", str(reference_44k_dir), "--cases", ",".join(SUITE_CASES)])
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith(("PASS", "FAIL", "ERROR"))]
    assert code == 0, out
    assert len(lines) == sum(len(c["outputs"]) for c in chosen), out
    assert all(line.startswith("PASS") for line in lines), out
    assert "(note: ours is" not in out, out  # every output in the dtype of its run
    # both dtypes of the 8 s generator ran: their vectors differ by ~10 % (README 5.3), so both passing
    # means the sync upsampling picked each dtype's own frames
    runs = {line.split()[3] for line in lines if line.split()[1] == "generator/small44_A_t030_t090"}
    assert runs == {"float32", "float64"}, out


def test_cases_patterns_that_select_nothing_are_errors(reference_44k_dir, capsys):
    """An empty --cases would otherwise check everything (the large float64 runs: ~15 GB), a typo less."""
    assert main(["check-reference", str(reference_44k_dir), "--cases", " , "]) == 2
    assert "--cases needs at least one pattern" in capsys.readouterr().out
    assert main(["check-reference", str(reference_44k_dir), "--cases", "sequence_config/44k_8s,nomatch"]) == 1
    assert "'nomatch' match no selected case" in capsys.readouterr().out
