"""``selva inspect`` on media files (preprocessing.inspect_cli), driven through its own parser."""

from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path

import pytest
from media_fixtures import (
    make_clip,
    truncate_copy,
    write_text_as,
)
from realworld_media import (
    display_matrix,
    make_cover_art_file,
    make_oriented_clip,
)

from preprocessing.inspect_cli import add_parser


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="selva")
    add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["inspect", *argv])


def run(argv: list[str]) -> tuple[int, list[str]]:
    lines: list[str] = []
    args = parse(argv)
    return args.func(args, out=lines.append), lines


def verdict_for(lines: list[str], path: Path) -> str:
    """The ``result:`` line printed under ``path``'s header line."""
    start = lines.index(str(path))
    return next(line for line in lines[start + 1 :] if line.startswith("  result: "))


def test_inspect_shows_each_verdict_and_exits_zero(tmp_path: Path) -> None:
    good = make_clip(tmp_path / "good.mp4", seconds=2.5)
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    expected = {
        good: "ok",
        empty: "undecodable",
        truncate_copy(good, tmp_path / "truncated.mp4"): "undecodable",
        write_text_as(tmp_path / "notes.mp4"): "undecodable",
        make_clip(tmp_path / "audio_only.m4a", 2.5, video=False): "no_video",
        make_clip(tmp_path / "video_only.mp4", 2.5, audio=False): "no_audio",
        make_clip(tmp_path / "short.mp4", 1.0): "too_short",
        make_clip(tmp_path / "silent.mp4", 2.5, silent=True): "silent",
        tmp_path / "missing.mp4": "missing_file",
    }
    code, lines = run([str(p) for p in expected])
    assert code == 1  # missing.mp4: a path that is not there fails the command, after every verdict
    for path, reason in expected.items():
        line = verdict_for(lines, path)
        assert line.startswith(f"  result: {reason}"), line
        if reason != "ok":
            assert str(path) in line  # the message names the file
    assert "short.mp4: video has 25 frames from 0.00 s, 50 needed for 2 s" in verdict_for(lines, tmp_path / "short.mp4")
    # the facts a user needs to see why: streams, fps, sample rate
    header = lines.index(str(good))
    assert any("video #0: h264 64x48, 30.00 fps" in line for line in lines[header : header + 4])
    assert any("audio #1: aac 44100 Hz, 2 ch" in line for line in lines[header : header + 4])
    assert lines[-1].startswith("9 paths: ")


def test_preset_and_range_overrides(tmp_path: Path) -> None:
    clip = make_clip(tmp_path / "c.mp4", seconds=3.0, fps=25)
    code, lines = run([str(clip), "--preset", "tiny"])
    assert code == 0 and "ok (50 frames 64x64" in verdict_for(lines, clip)
    code, lines = run([str(clip), "--duration", "8"])  # longer than the clip: rejected, still exit 0
    assert code == 0 and verdict_for(lines, clip).startswith("  result: too_short")
    code, lines = run([str(clip), "--start", "1.5", "--duration", "1"])
    assert code == 0 and "ok (25 frames" in verdict_for(lines, clip)
    code, lines = run([str(clip), "--preset", "small_16k", "--duration", "2"])
    assert code == 0 and "ok (50 frames 224x224" in verdict_for(lines, clip)


def test_inspect_shows_rotation_and_cover_art(tmp_path: Path) -> None:
    phone = make_oriented_clip(tmp_path / "phone.mp4", display_matrix(90), seconds=2.5)
    tilted = make_oriented_clip(tmp_path / "tilted.mov", display_matrix(-100), seconds=2.5)
    plain = make_clip(tmp_path / "plain.mp4", seconds=2.5)
    song = make_cover_art_file(tmp_path / "song.m4a")
    both = make_cover_art_file(tmp_path / "both.mp4", video=True, cover_first=True)
    code, lines = run([str(p) for p in (phone, tilted, plain, song, both)])
    assert code == 0

    def block(path: Path) -> list[str]:
        start = lines.index(str(path))
        end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith("  result: "))
        return lines[start : end + 1]

    assert "video #0: h264 64x48, 25.00 fps" in block(phone)[2] and "shown rotated 90° clockwise" in block(phone)[2]
    assert "frames rotated 90° clockwise)" in verdict_for(lines, phone)
    assert "shown rotated 90° counter-clockwise (display matrix 260.0° clockwise, snapped" in block(tilted)[2]
    assert not any("shown" in line for line in block(plain)) and "frames as coded)" in verdict_for(lines, plain)
    assert "  attached picture #1: mjpeg 32x32 (cover art, not video)" in block(song)
    assert verdict_for(lines, song).startswith("  result: no_video") and "attached_pic" in verdict_for(lines, song)
    assert block(both)[2].startswith("  attached picture #0: mjpeg")
    assert verdict_for(lines, both).startswith("  result: ok")


def test_bad_options_exit_2(tmp_path: Path) -> None:
    clip = make_clip(tmp_path / "c.mp4", seconds=1.0)
    assert run([str(clip), "--preset", "huge"])[0] == 2
    assert run([str(clip), "--duration", "0"])[0] == 2


def test_folder_with_dataset_json_is_summarised_as_a_dataset(tmp_path: Path, monkeypatch) -> None:
    # the summary itself belongs to preprocessing.dataset_summary: here only the dispatch is checked
    calls = []
    fake = types.ModuleType("preprocessing.dataset_summary")
    fake.print_dataset_summary = lambda path, out=print: (calls.append(Path(path)), out(f"dataset {path}"))
    monkeypatch.setitem(sys.modules, "preprocessing.dataset_summary", fake)
    dataset = tmp_path / "ds"
    dataset.mkdir()
    (dataset / "dataset.json").write_text("{}")
    plain = tmp_path / "plain"
    plain.mkdir()
    code, lines = run([str(dataset), str(plain)])
    assert code == 1 and calls == [dataset]  # 1: the plain folder is neither a clip nor a dataset
    assert f"dataset {dataset}" in lines
    assert verdict_for(lines, plain).startswith("  result: missing_file")  # a folder is not a clip


def test_unexpected_errors_are_reported_per_path(tmp_path: Path, monkeypatch) -> None:
    fake = types.ModuleType("preprocessing.dataset_summary")

    def broken(path, out=print):
        raise RuntimeError("unreadable manifest")

    fake.print_dataset_summary = broken
    monkeypatch.setitem(sys.modules, "preprocessing.dataset_summary", fake)
    dataset = tmp_path / "ds"
    dataset.mkdir()
    (dataset / "dataset.json").write_text("{}")
    clip = make_clip(tmp_path / "c.mp4", seconds=2.5)
    code, lines = run([str(dataset), str(clip)])
    assert code == 1  # one path got no answer
    assert any("could not inspect: RuntimeError: unreadable manifest" in line for line in lines)
    assert verdict_for(lines, clip).startswith("  result: ok")  # the other path still answered


@pytest.mark.parametrize("argv", [["--help"]])
def test_help(argv: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as info:
        parse(argv)
    assert info.value.code == 0 and "--preset" in capsys.readouterr().out
