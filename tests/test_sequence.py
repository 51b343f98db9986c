from __future__ import annotations

import json

import pytest

from selva.sequence import SequenceConfig, num_sync_segments


def test_official_lengths_for_every_listed_duration(reference_dir):
    table = json.loads((reference_dir / "sequence_lengths_16k.json").read_text())
    assert table, "the reference lists sequence lengths"
    for duration, expected in table.items():
        assert SequenceConfig(float(duration)).as_dict() == expected


@pytest.mark.parametrize(
    ("duration", "latent", "clip", "segments"),
    [(8.0, 250, 64, 24), (10.0, 313, 80, 30), (2.0, 63, 16, 5), (1.0, 32, 8, 2)],
)
def test_lengths_follow_the_official_formulas(duration, latent, clip, segments):
    seq = SequenceConfig(duration)
    assert (seq.latent_seq_len, seq.clip_seq_len, seq.sync_seg_len) == (latent, clip, segments)
    assert seq.sync_seq_len == 8 * segments
    assert seq.num_audio_frames == latent * 512 >= duration * 16_000


def test_segments_drop_trailing_frames_and_reject_short_videos():
    assert num_sync_segments(16) == 1
    assert num_sync_segments(32) == 3
    assert num_sync_segments(39) == 3  # frames 32..38 do not fill a segment
    with pytest.raises(ValueError, match="shorter than one 16-frame segment"):
        num_sync_segments(15)
