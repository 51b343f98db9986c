"""Acceptance for real-world inputs: one precompute over a table that mixes every kind of fault.

Phone rotation, MPEG-TS / program streams with late clocks and seeks, an audio format change mid-file,
cover art, an unbalanced quote, invisible and short rows, duplicates, bad bytes and missing files go
through the real job (local Ray, tiny preset). Every row's outcome is stated below, and the samples'
content (orientation, frame timing, audio timing) is checked from the shard bytes, not from the
decoder's return value. Then `selva data check` must accept the dataset.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from media_fixtures import (
    frame_level,
    make_clip,
    nearest_frame,
)
from realworld_media import (
    BURST_HZ,
    display_matrix,
    make_cover_art_file,
    make_format_change_ts,
    make_oriented_clip,
    make_timeline_clip,
    marker_corners,
)

from preprocessing.compact import decode_flac, decode_sync_mp4
from preprocessing.shard_reader import iter_shard
from preprocessing.shards import done_and_missing, read_dataset_info, read_failures, read_input_failures
from selva.sequence import SequenceConfig
from selva_cli.main import main

FPS = 25
# id -> expected outcome: "sample", or the reason it is recorded with (shard or input failure)
EXPECTED = {
    "rot90": "sample",
    "rot270_flip": "sample",
    "quoted": "sample",
    "after_quote": "sample",
    "ts_seek": "sample",
    "ts_one_key": "sample",
    "ps_seek": "sample",
    "join": "sample",
    "cover": "no_video",
    "invisible": "bad_text",
    "short_span": "too_short",
    "rot90_again": "duplicate",
    "negative": "bad_row",
    "bad": "bad_row",  # the line that is not UTF-8 (its id cell is readable)
    "nowhere": "missing_file",
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("realworld")
    media = root / "media"
    media.mkdir()
    make_oriented_clip(media / "rot90.mp4", display_matrix(90), seconds=2.5)
    make_oriented_clip(media / "rot270_flip.mov", display_matrix(270, hflip=True), seconds=2.5)
    make_clip(media / "plain.mp4", seconds=2.5)
    make_clip(media / "plain2.mp4", seconds=2.5, fps=25)  # its row's 10 s span is cut to 2 s: 2.5 s suffice
    make_timeline_clip(media / "seek.ts", seconds=3.5)
    make_timeline_clip(media / "one_key.ts", seconds=3.5, keyint=None)
    make_timeline_clip(media / "seek.mpg", seconds=3.5)
    make_format_change_ts(media / "join.ts")
    make_cover_art_file(media / "song.m4a")
    header = "id\tlabel\tpath\tstart\tduration\n"
    rows = [
        "rot90\ta phone video\trot90.mp4\t0\t",
        "rot270_flip\ta mirrored phone video\trot270_flip.mov\t0\t",
        'quoted\t"an open quote never closed\tplain.mp4\t0\t',
        "after_quote\train on a roof\tplain2.mp4\t0\t10",  # a 10 s span: cut to the preset's 2 s
        "ts_seek\ta broadcast clip\tseek.ts\t0.7\t",
        "ts_one_key\ta clip with one keyframe\tone_key.ts\t0.7\t",
        "ps_seek\ta program stream\tseek.mpg\t0.7\t",
        "join\ttwo recordings joined\tjoin.ts\t0.5\t",
        "cover\ta song with cover art\tsong.m4a\t0\t",
        "invisible\t\u200b\u200d\tplain.mp4\t0\t",
        "short_span\ta dog\tplain.mp4\t0\t1",
        "rot90_again\tanother caption\trot90.mp4\t0\t",  # same file and span as row 1
        "negative\ta cat\tplain.mp4\t-1\t",
    ]
    table = root / "clips.tsv"
    body = (header + "\n".join(rows) + "\n").encode("utf-8")
    body += b"bad\tcaf\xe9 noise\tplain.mp4\t0\t\n"  # Latin-1 bytes in a UTF-8 table
    body += b"nowhere\ta lost file\tnowhere.mp4\t0\t\n"
    table.write_bytes(body)
    out = root / "dataset"
    argv = ["precompute", "--input", str(table), "--media-root", str(media), "--out", str(out),
            "--samples-per-shard", "4", "--workers", "2", "--no-progress", "--max-failed-fraction", "1"]
    assert main(argv) == 0
    return out


def _samples(dataset: Path) -> dict:
    done, missing = done_and_missing(dataset)
    assert missing == []
    return {s.meta.source_id: s for shard in done for s in iter_shard(dataset, shard)}


def test_every_row_has_its_stated_outcome(dataset):
    samples = _samples(dataset)
    done, _ = done_and_missing(dataset)
    outcome = {sid: "sample" for sid in samples}
    for shard in done:
        for failure in read_failures(dataset, shard):
            outcome[failure.source_id] = failure.reason
            assert failure.line is not None and failure.message
    for failure in read_input_failures(dataset):
        assert failure.source_id not in outcome
        outcome[failure.source_id] = failure.reason
    assert outcome == EXPECTED
    info = read_dataset_info(dataset)
    assert info.input_rows["rows"] == len(EXPECTED) and info.input_rows["rejected"] == 5
    # the rows after the open quote keep their own captions
    assert samples["quoted"].meta.text == '"an open quote never closed'
    assert samples["after_quote"].meta.text == "rain on a roof"
    assert samples["ts_seek"].meta.text == "a broadcast clip"


@pytest.mark.parametrize(("clip_id", "red", "green"), [("rot90", "tr", "br"), ("rot270_flip", "br", "tr")])
def test_rotated_samples_are_stored_as_a_player_shows_them(dataset, clip_id, red, green):
    frames = decode_sync_mp4(_samples(dataset)[clip_id].sync_mp4)
    assert frames.shape == (50, 64, 64, 3)
    assert {marker_corners(f) for f in frames[::10]} == {(red, green)}


@pytest.mark.parametrize("clip_id", ["ts_seek", "ts_one_key", "ps_seek"])
def test_seeked_samples_start_at_their_start(dataset, clip_id):
    frames = decode_sync_mp4(_samples(dataset)[clip_id].sync_mp4)
    first = 17  # on the clip's own time line frame 17 is shown from 0.68 s to 0.72 s: it is what 0.7 s shows
    for k in (0, 1, 10, 49):
        level = float(frames[k].mean())
        picked = nearest_frame(level, range(first + k - 2, first + k + 3))
        assert picked == first + k, (clip_id, k, level, frame_level(first + k))


def test_format_change_audio_is_in_place(dataset):
    audio, rate = decode_flac(_samples(dataset)["join"].audio_flac)
    assert rate == 16000 and audio.shape == (SequenceConfig(2.0).num_audio_frames,)  # 2 s + the codec's padding
    # bursts 0.5 s into each 1.5 s part; the clip starts 0.5 s in, so at 0.0 s and 1.5 s
    hop = 160
    energy = np.array([np.sqrt(np.mean(audio[i : i + hop] ** 2)) for i in range(0, len(audio) - hop, hop)])
    loud = energy > 0.25 * energy.max()
    onsets = [i * hop / rate for i in range(len(loud)) if loud[i] and (i == 0 or not loud[i - 1])]
    assert len(onsets) == 2 and abs(onsets[0] - 0.0) <= 0.02 and abs(onsets[1] - 1.5) <= 0.02, onsets
    spectrum = np.abs(np.fft.rfft(audio[: int(0.1 * rate)]))
    assert abs(np.argmax(spectrum) * rate / int(0.1 * rate) - BURST_HZ) <= 20


def test_data_check_accepts_the_dataset(dataset, capsys):
    assert main(["data", "check", str(dataset), "--ranks", "1", "--workers", "0", "--batch", "2"]) == 0
    assert "result: OK" in capsys.readouterr().out
