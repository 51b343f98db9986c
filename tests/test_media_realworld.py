"""Real-world media variants for preprocessing.media: phone rotation, MPEG-TS / program stream seeking,
audio format changes mid-file, cover art. All on small generated files (tests/media_fixtures.py) and
checked on decoded content: which corner a marker is in, which source frame each output frame shows,
where a tone burst lands."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest
from conftest import require_shared
from media_fixtures import (
    frame_level,
    nearest_frame,
)
from realworld_media import (
    AUDIO_DELAY_S,
    BURST_HZ,
    BURST_S,
    display_matrix,
    make_cover_art_file,
    make_format_change_ts,
    make_oriented_clip,
    make_still_picture_clip,
    make_timeline_clip,
    marker_corners,
)

import preprocessing.media as media
from preprocessing.errors import Rejected, RejectReason
from preprocessing.media import AUDIO_PREROLL_S, SEEK_BACKOFF_S, TRAIN_PEAK, DecodedClip, decode_clip, probe
from preprocessing.orientation import from_display_matrix


def raw_audio(clip: DecodedClip) -> np.ndarray:
    return clip.audio * np.float32(clip.peak / TRAIN_PEAK)


def source_frames(clip: DecodedClip, first: int, span: int = 2) -> list[int]:
    """The source frame each output frame shows, searched within ``span`` of the expected one."""
    found = []
    for k, frame in enumerate(clip.frames):
        expected = first + k
        found.append(nearest_frame(frame.mean(), range(max(expected - span, 0), expected + span + 1)))
    return found


# ---------------------------------------------------------------- 2. display matrix (phone rotation)

# the coded picture has red top-left and green top-right (tests/media_fixtures.marked_picture)
ORIENTATION_CASES = [
    # (clockwise degrees, hflip, vflip, scale), red corner, green corner, description
    ((0, False, False, 1), "tl", "tr", "as coded"),
    ((90, False, False, 1), "tr", "br", "rotated 90° clockwise"),
    ((180, False, False, 1), "br", "bl", "rotated 180°"),
    ((270, False, False, 1), "bl", "tl", "rotated 90° counter-clockwise"),
    ((-90, False, False, 1), "bl", "tl", "rotated 90° counter-clockwise"),
    ((0, True, False, 1), "tr", "tl", "mirrored left-right"),
    ((0, False, True, 1), "bl", "br", "mirrored top-bottom"),
    ((180, True, False, 1), "bl", "br", "mirrored top-bottom"),
    ((90, True, False, 1), "tl", "bl", "transposed (mirrored across the main diagonal)"),
    ((90, False, True, 1), "br", "tr", "transposed across the anti-diagonal"),
    ((270, True, False, 1), "br", "tr", "transposed across the anti-diagonal"),
    ((90, False, False, 2.0), "tr", "br", "rotated 90° clockwise"),  # a scaled matrix: scale is ignored
    # angles off the quarter turns snap to the nearest one (exact ties to the earlier case)
    ((30, False, False, 1), "tl", "tr", "as coded (display matrix 30.0° clockwise, snapped"),
    ((60, False, False, 1), "tr", "br", "rotated 90° clockwise (display matrix 60.0°"),
    ((45, False, False, 1), "tl", "tr", "as coded (display matrix 45.0°"),
    ((135, False, False, 1), "tr", "br", "rotated 90° clockwise (display matrix 135.0°"),
    ((200, False, False, 1), "br", "bl", "rotated 180° (display matrix 200.0°"),
    ((-80, False, False, 1), "bl", "tl", "rotated 90° counter-clockwise (display matrix 280.0°"),
    ((80, True, False, 1), "tl", "bl", "transposed (mirrored across the main diagonal) (display matrix mirrored"),
]


@pytest.mark.parametrize(("params", "red", "green", "words"), ORIENTATION_CASES, ids=lambda v: str(v))
def test_display_matrix_is_applied_like_a_player(tmp_path: Path, params, red: str, green: str, words: str) -> None:
    rotate, hflip, vflip, scale = params
    matrix = display_matrix(rotate, hflip=hflip, vflip=vflip, scale=scale)
    path = make_oriented_clip(tmp_path / "phone.mp4", matrix, seconds=0.5)
    clip = decode_clip(path, duration=0.4, frame_size=32)
    assert clip.frames.shape == (10, 32, 32, 3)
    for frame in clip.frames:
        assert marker_corners(frame) == (red, green)
    assert clip.orientation.describe().startswith(words)
    assert clip.info.video.orientation == clip.orientation
    assert probe(path).video.orientation == clip.orientation  # probe reads the same matrix


@pytest.mark.parametrize("suffix", [".mov", ".mkv"])
def test_rotation_in_other_containers(tmp_path: Path, suffix: str) -> None:
    path = make_oriented_clip(tmp_path / f"phone{suffix}", display_matrix(90), seconds=0.5)
    clip = decode_clip(path, duration=0.4, frame_size=32)
    assert marker_corners(clip.frames[0]) == ("tr", "br")


def test_orientation_comes_before_the_squash(tmp_path: Path) -> None:
    # a wide 96x40 picture turned upright, squashed to 32x32: compare with orienting the full-size
    # picture first and squashing it afterwards (FFmpeg's order); only the colour conversion differs
    path = make_oriented_clip(tmp_path / "wide.mp4", display_matrix(90), seconds=0.5, size=(96, 40))
    clip = decode_clip(path, duration=0.4, frame_size=32)
    with av.open(str(path)) as container:
        rgb = next(container.decode(video=0)).to_ndarray(format="rgb24")
    upright = np.ascontiguousarray(np.rot90(rgb, k=-1))  # 40 wide, 96 high
    assert upright.shape[:2] == (96, 40)
    reference = av.VideoFrame.from_ndarray(upright, format="rgb24").reformat(
        32, 32, "rgb24", interpolation=media.INTERPOLATION
    )
    diff = np.abs(reference.to_ndarray().astype(int) - clip.frames[0].astype(int))
    assert diff.mean() < 4
    assert marker_corners(reference.to_ndarray()) == marker_corners(clip.frames[0]) == ("tr", "br")


def test_no_matrix_means_as_coded(tmp_path: Path) -> None:
    path = make_oriented_clip(tmp_path / "plain.mp4", None, seconds=0.5)
    clip = decode_clip(path, duration=0.4, frame_size=32)
    assert marker_corners(clip.frames[0]) == ("tl", "tr") and clip.orientation.is_identity
    assert clip.orientation.angle is None


def test_from_display_matrix_accepts_raw_bytes_and_rejects_bad_lengths() -> None:
    matrix = display_matrix(90)
    raw = np.asarray(matrix, dtype="<i4").tobytes()
    assert from_display_matrix(raw) == from_display_matrix(matrix)
    assert from_display_matrix([0] * 9).is_identity  # a degenerate matrix: as coded
    with pytest.raises(ValueError):
        from_display_matrix([1, 2, 3])


# ---------------------------------------------------------------- 3. seeking in every container

CONTAINERS = [".ts", ".m2ts", ".mpg", ".vob", ".mkv", ".mp4", ".mov", ".flv", ".webm", ".avi"]


@pytest.fixture(scope="module")
def timeline_clips(tmp_path_factory) -> dict[tuple[str, int | None], Path]:
    root = tmp_path_factory.mktemp("timeline")
    return {
        (suffix, keyint): make_timeline_clip(root / f"k{keyint}{suffix}", 3.0, keyint=keyint)
        for suffix in CONTAINERS
        for keyint in (12, None)
    }


def spy_passes(monkeypatch) -> list[float | None]:
    """Record the seek target of every decoding pass decode_clip makes (None: from the top)."""
    passes: list[float | None] = []
    original = media._decode_range

    def recording(*args, **kwargs):
        passes.append(kwargs["seek_to"])
        return original(*args, **kwargs)

    monkeypatch.setattr(media, "_decode_range", recording)
    return passes


@pytest.mark.parametrize("keyint", [12, None], ids=["keyint12", "one_keyframe"])
@pytest.mark.parametrize("suffix", CONTAINERS)
def test_clip_from_start_equals_decoding_from_the_top(timeline_clips, suffix: str, keyint, monkeypatch) -> None:
    path = timeline_clips[suffix, keyint]
    full = decode_clip(path, duration=2.8, frame_size=16)
    passes = spy_passes(monkeypatch)
    for start in (0.7, 1.32):  # 0.7 s lies between frames 17 and 18: output frame 0 shows frame 17
        first = int(start * 25 + 1e-9)
        part = decode_clip(path, start=start, duration=1.0, frame_size=16)
        np.testing.assert_array_equal(part.frames, full.frames[first : first + 25])
        at = round(start * 16_000)
        np.testing.assert_allclose(raw_audio(part)[:16_000], raw_audio(full)[at : at + 16_000], atol=1e-4)
        assert part.padded_frames == 0 and part.padded_samples == 0
        if suffix != ".avi":  # the clock starts with frame 0 (AVI: frames at their index, checked via full)
            assert source_frames(part, first) == list(range(first, first + 25))
    assert passes[0] is not None  # it seeks first
    if keyint == 12:  # a keyframe every 0.48 s: the first seek lands well, no decoding from the top
        assert len(passes) == 2 and None not in passes


def test_timeline_counts_from_the_container_start(tmp_path: Path) -> None:
    # the TS clock starts at 1.4 s, the program stream's at 1.4 + 0.5 s: start 0 is the first frame
    for suffix in (".ts", ".mpg"):
        path = make_timeline_clip(tmp_path / f"c{suffix}", 2.0, start_offset=1.4)
        clip = decode_clip(path, duration=1.0, frame_size=16)
        assert source_frames(clip, 0) == list(range(25))
        assert clip.padded_frames == 0
        # the audio starts AUDIO_DELAY_S after the first frame (its AAC/MP2 priming a little earlier)
        assert 0 < clip.padded_samples <= AUDIO_DELAY_S * 16_000


def test_ts_with_keyframes_costs_one_seek(tmp_path: Path, monkeypatch) -> None:
    path = make_timeline_clip(tmp_path / "k.ts", 3.0, keyint=12)
    passes = spy_passes(monkeypatch)
    decode_clip(path, start=2.0, duration=0.8, frame_size=16)
    assert len(passes) == 1 and passes[0] == pytest.approx(1.4 + 2.0 - SEEK_BACKOFF_S[0])


def test_single_keyframe_ts_falls_back_to_the_top(tmp_path: Path, monkeypatch) -> None:
    path = make_timeline_clip(tmp_path / "one.ts", 3.0, keyint=None)
    passes = spy_passes(monkeypatch)
    clip = decode_clip(path, start=1.3, duration=1.0, frame_size=16)
    assert passes[0] is not None and passes[-1] is None  # seeks, sees no keyframe before start, decodes from 0
    assert source_frames(clip, 32) == list(range(32, 57))


def test_retry_from_a_file_object_reopens_it(tmp_path: Path) -> None:
    path = make_timeline_clip(tmp_path / "one.ts", 3.0, keyint=None)
    from_path = decode_clip(path, start=1.3, duration=1.0, frame_size=16)
    with path.open("rb") as fh:
        from_file = decode_clip(fh, start=1.3, duration=1.0, frame_size=16, name="one.ts")
    np.testing.assert_array_equal(from_file.frames, from_path.frames)
    np.testing.assert_array_equal(from_file.audio, from_path.audio)


def test_real_clips_seek_once(monkeypatch) -> None:
    # the 25 fps clip's edit list hides 2.2 s before 0: after a seek the decoder's first frames are
    # not keyframes (the keyframe is decoded but hidden), yet sound: no fallback to the top
    from media_fixtures import real_clips_dir

    folder = real_clips_dir()
    names = ["0B4dYTMsgHA_000130.mp4", "F8Zt3mYlOqU_000094.mp4"]
    for name in names:
        require_shared(folder / name, "the real clips")
    passes = spy_passes(monkeypatch)
    for name in names:
        passes.clear()
        decode_clip(folder / name, start=2.0, duration=1.0, frame_size=16)
        assert passes == [pytest.approx(2.0 - SEEK_BACKOFF_S[0])], name


def test_seek_preroll_constants_are_consistent() -> None:
    assert SEEK_BACKOFF_S[0] > AUDIO_PREROLL_S and list(SEEK_BACKOFF_S) == sorted(SEEK_BACKOFF_S)


# ---------------------------------------------------------------- 4. audio format change mid-file


def burst_onsets(clip: DecodedClip) -> list[float]:
    """Seconds (from the clip start) where the tone bursts begin."""
    loud = np.nonzero(np.abs(clip.audio) > 0.3)[0]
    starts = [loud[0]] + [b for a, b in zip(loud[:-1], loud[1:], strict=True) if b - a > 1600]
    return [i / 16_000 for i in starts]


def burst_hz(clip: DecodedClip, onset: float, length: float) -> float:
    at = round(onset * 16_000) + 160
    piece = clip.audio[at : at + round(length * 16_000) - 320]
    spectrum = np.abs(np.fft.rfft(piece * np.hanning(len(piece)), n=16_000 * 4))
    return float(np.argmax(spectrum)) / 4


@pytest.mark.parametrize(
    "parts",
    [((48000, 2, 1.5), (44100, 1, 1.5)), ((44100, 1, 1.5), (48000, 2, 1.5)), ((48000, 2, 1.5), (48000, 2, 1.5))],
    ids=["48k_stereo_then_44k_mono", "44k_mono_then_48k_stereo", "same_format"],
)
def test_audio_format_change_mid_file(tmp_path: Path, parts) -> None:
    path = make_format_change_ts(tmp_path / "joined.ts", parts, burst_s=0.2)
    clip = decode_clip(path, duration=2.8, frame_size=16)
    onsets = burst_onsets(clip)
    assert len(onsets) == 2
    assert onsets[0] == pytest.approx(0.5, abs=0.002) and onsets[1] == pytest.approx(2.0, abs=0.002)
    for onset in onsets:  # both parts resampled at their own rate: the tone keeps its pitch
        assert burst_hz(clip, onset, 0.2) == pytest.approx(BURST_HZ, abs=3)
    assert source_frames(clip, 0) == list(range(70))  # the video runs on across the join
    # a clip that starts inside the second part (seeks past the join)
    late = decode_clip(path, start=1.7, duration=1.0, frame_size=16)
    assert burst_onsets(late) == [pytest.approx(0.3, abs=0.002)]
    assert source_frames(late, round(1.7 * 25)) == list(range(42, 67))


def test_format_change_default_fixture_has_short_bursts(tmp_path: Path) -> None:
    clip = decode_clip(make_format_change_ts(tmp_path / "j.ts"), duration=2.8, frame_size=16)
    loud = np.abs(clip.audio) > 0.3
    assert loud.sum() / 16_000 < 2 * BURST_S + 0.005 and len(burst_onsets(clip)) == 2


# ---------------------------------------------------------------- 5. cover art is not video


@pytest.mark.parametrize("suffix", [".m4a", ".mp3", ".mkv"])
def test_audio_with_cover_art_is_no_video(tmp_path: Path, suffix: str) -> None:
    path = make_cover_art_file(tmp_path / f"song{suffix}")
    info = probe(path)
    assert info.video is None and info.video_index is None
    assert [s.kind for s in info.streams].count("attached_pic") == 1
    with pytest.raises(Rejected) as err:
        decode_clip(path, duration=2.0, frame_size=16)
    assert err.value.reason is RejectReason.NO_VIDEO
    assert "no video stream (streams: audio, attached_pic)" in err.value.message


@pytest.mark.parametrize(("name", "cover_first"), [("v.m4a", False), ("v.mp4", True), ("v.mkv", False)])
def test_real_video_next_to_cover_art_is_decoded(tmp_path: Path, name: str, cover_first: bool) -> None:
    path = make_cover_art_file(tmp_path / name, video=True, cover_first=cover_first)
    info = probe(path)
    kinds = [s.kind for s in info.streams]
    assert sorted(kinds) == ["attached_pic", "audio", "video"]
    if cover_first:
        assert kinds[0] == "attached_pic"  # FFmpeg lists the cover first
    assert info.video is not None and info.video.codec == "h264"
    clip = decode_clip(path, duration=2.0, frame_size=16)
    assert source_frames(clip, 0) == list(range(50))  # the grey-level frames, not the cover picture
    assert abs(clip.frames[0].mean() - frame_level(0)) < 4


def test_still_picture_video_stream_is_too_short_and_says_why(tmp_path: Path) -> None:
    path = make_still_picture_clip(tmp_path / "still.mkv")
    assert probe(path).video is not None  # a real (if still) video stream, not cover art
    with pytest.raises(Rejected) as err:
        decode_clip(path, duration=2.0, frame_size=16)
    assert err.value.reason is RejectReason.TOO_SHORT
    assert "single still picture" in err.value.message
