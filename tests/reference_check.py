"""``selva check-reference`` in two halves for the suite: tests/test_model_reference.py, test_reference_rest.py."""

from __future__ import annotations

import json

from selva_cli.main import main

# Two halves of similar cost (~55 % / ~45 % of the check's time), in two files so that the suite's two
# workers run them at once: tests/test_model_reference.py holds TextSynch, tests/test_reference_rest.py
# the others; together they are every component of cases.json (checked in each).
TEXTSYNCH = ("textsynch",)
OTHERS = ("generator", "sampler", "sequence_config", "mel", "vae", "vocoder")


def check_reference_components(reference_dir, capsys, components: tuple[str, ...]) -> None:
    """``selva check-reference DIR --only COMPONENTS`` as a user runs it: every selected output PASSes, in
    the dtype of its run; the two halves cover every component of the directory."""
    cases = json.loads((reference_dir / "cases.json").read_text())["cases"]
    assert {c["component"] for c in cases} == set(TEXTSYNCH + OTHERS)
    code = main(["check-reference", str(reference_dir), "--only", ",".join(components)])
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith(("PASS", "FAIL", "ERROR"))]
    assert code == 0, out
    assert len(lines) == sum(len(c["outputs"]) for c in cases if c["component"] in components), out
    assert all(line.startswith("PASS") for line in lines), out
    assert "(note: ours is" not in out, out  # every output in the dtype of its run
