"""`selva demo` (what `make demo` runs) works end to end on the embedded default."""

from __future__ import annotations

import wave

import numpy as np
from conftest import require_shared, shared_dir

from selva_cli.main import main


def _read_wav(path) -> np.ndarray:
    with wave.open(str(path)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, 16_000)
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")


def test_demo_writes_audio_from_the_real_clips(tmp_path, capsys):
    table = require_shared(shared_dir() / "data" / "real" / "videos.tsv", "the real clips")
    assert main(["demo", "--input", str(table), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "clips:  2 ok, 0 failed" in out
    generated, reference = _read_wav(tmp_path / "demo.wav"), _read_wav(tmp_path / "reference.wav")
    assert len(generated) == len(reference) == 63 * 512  # tiny: 2 s of latents at 512 samples each
    assert np.abs(reference).max() > 1000  # the real clip's audio survives the codec round trip


def test_demo_without_its_clips_says_what_it_needs(tmp_path, capsys):
    from selva_cli.main import main

    assert main(["demo", "--input", str(tmp_path / "videos.tsv"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs the clip table" in err and "--input" in err
