"""``selva benchmark build`` and ``read_benchmark`` on real mp4 files made here.

Every source clip is one flat colour with one sine tone, so a composite's halves and its audio
track can be traced back to the clips they came from, after H.264 and AAC.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from media_fixtures import make_clip, write_colour_clip, write_text_as

from preprocessing.compact import decode_flac, decode_sync_mp4
from preprocessing.media import decode_clip
from selva_cli.main import main
from training.benchmark_build import METADATA_COLUMNS, BuildOptions, build_benchmark
from training.benchmark_plan import BenchClip, choose_partners, plan_items
from training.benchmark_read import BenchmarkError, read_benchmark

DURATION, SIZE, RATE = 1.0, 32, 16_000
N = round(DURATION * RATE)
# id -> (label, category, RGB, tone Hz): two animals and two instruments
CLIPS = {
    "dog_1": ("dog barking", "animal", (220, 40, 40), 440.0),
    "cat_1": ("cat meowing", "animal", (40, 200, 40), 1000.0),
    "cello_1": ("playing cello", "music", (40, 40, 220), 1700.0),
    "violin_1": ("playing violin", "music", (230, 220, 40), 2600.0),
}


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("clips")
    lines = ["id\tlabel\tcategory\tpath"]
    for clip_id, (label, category, rgb, tone) in CLIPS.items():
        write_colour_clip(folder / f"{clip_id}.mp4", rgb, tone)
        lines.append(f"{clip_id}\t{label}\t{category}\t{clip_id}.mp4")
    make_clip(folder / "mute.mp4", 1.5, audio=False)  # a video with no audio stream
    write_text_as(folder / "broken.mp4")  # not a video at all
    make_clip(folder / "short.mp4", 0.4)  # shorter than the 1 s clip
    lines += ["mute\thorse neighing\tanimal\tmute.mp4", "broken\tplaying drums\tmusic\tbroken.mp4",
              "short\towl hooting\tanimal\tshort.mp4", "blank\t \tanimal\tdog_1.mp4"]  # fmt: skip
    (folder / "clips.tsv").write_text("\n".join(lines) + "\n")
    return folder / "clips.tsv"


@pytest.fixture(scope="module")
def built(table, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench"
    log: list[str] = []
    result = build_benchmark(table, out, BuildOptions(duration=DURATION, frame_size=SIZE, seed=3), log=log.append)
    return out, result, log


def _metadata(out: Path, subset: str) -> list[dict[str, str]]:
    with (out / subset / "metadata.csv").open(newline="") as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames) == METADATA_COLUMNS
        return list(reader)


def test_pairs_follow_the_subset_rules_with_both_placements(built):
    out, result, _ = built
    assert result.clips == 4 and result.items == {"intra_class": 8, "inter_class": 16}
    for subset in ("intra_class", "inter_class"):
        rows = _metadata(out, subset)
        pairs = {}
        for row in rows:
            target, partner = CLIPS[row["target"]], CLIPS[row["partner"]]
            assert row["label"] == target[0] and row["negative"] == row["paired_label"] == partner[0]
            assert target[0] != partner[0]
            assert (target[1] == partner[1]) == (subset == "intra_class")
            assert row["file_name"] == f"mixed/{row['target']}_{row['partner']}_{row['placement']}.mp4"
            pairs.setdefault((row["target"], row["partner"]), set()).add(row["placement"])
        assert all(sides == {"left", "right"} for sides in pairs.values())
        # every clip is a target; intra partners are the one other clip of the category, inter the two others
        assert {t for t, _ in pairs} == set(CLIPS)
        assert len(pairs) == (4 if subset == "intra_class" else 8)


def test_target_pixels_are_on_the_stated_side(built):
    out, _, _ = built
    for subset in ("intra_class", "inter_class"):
        for row in _metadata(out, subset):
            frames = decode_sync_mp4((out / subset / row["file_name"]).read_bytes())
            assert frames.shape == (25, SIZE, 2 * SIZE, 3)
            # skip the two columns next to the seam: yuv420p's halved chroma blends them
            left = frames[:, :, : SIZE - 2].reshape(-1, 3).mean(0)
            right = frames[:, :, SIZE + 2 :].reshape(-1, 3).mean(0)
            target, partner = np.array(CLIPS[row["target"]][2]), np.array(CLIPS[row["partner"]][2])
            on_target, on_partner = (left, right) if row["placement"] == "left" else (right, left)
            assert np.abs(on_target - target).max() < 12, (row, on_target)
            assert np.abs(on_partner - partner).max() < 12, (row, on_partner)
    # target dog left of cat is the composite of target cat right of dog: encoded once, the same bytes
    mixed = out / "intra_class" / "mixed"
    assert (mixed / "dog_1_cat_1_left.mp4").read_bytes() == (mixed / "cat_1_dog_1_right.mp4").read_bytes()


def _tone_level(wave: np.ndarray, hz: float, rate: int = RATE) -> float:
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
    return float(spectrum[round(hz * len(wave) / rate)] / spectrum.max())


def test_reference_is_the_target_decoded_span_and_the_track_mixes_both(built, table):
    out, _, _ = built
    decoded = {c: decode_clip(table.parent / f"{c}.mp4", duration=DURATION, frame_size=SIZE).audio for c in CLIPS}
    for subset in ("intra_class", "inter_class"):
        for row in _metadata(out, subset):
            name = Path(row["file_name"]).stem
            reference, rate = decode_flac((out / subset / "target_audio" / f"{name}.flac").read_bytes())
            assert rate == RATE and reference.shape == (N,)
            np.testing.assert_allclose(reference, decoded[row["target"]][:N], atol=1 / 32768 + 1e-7)
            track = decode_clip(out / subset / row["file_name"], duration=DURATION, frame_size=8).audio[:N]
            target_hz, partner_hz = CLIPS[row["target"]][3], CLIPS[row["partner"]][3]
            assert _tone_level(track, target_hz) > 0.5 and _tone_level(track, partner_hz) > 0.5
            assert _tone_level(reference, partner_hz) < 0.01


def test_bad_rows_are_recorded_and_the_rest_is_built(built):
    out, result, log = built
    with (out / "rejected.csv").open(newline="") as handle:
        rejected = {row["id"]: row for row in csv.DictReader(handle)}
    assert {k: v["reason"] for k, v in rejected.items()} == {
        "mute": "no_audio", "broken": "undecodable", "short": "too_short", "blank": "bad_text",
    }  # fmt: skip
    assert rejected["mute"]["path"].endswith("mute.mp4") and rejected["mute"]["line"] == "6"
    for clip_id in rejected:  # one printed line per bad row, naming it
        assert sum(f"id={clip_id!r}" in line for line in log) == 1
    assert all(r.id not in (row["target"], row["partner"]) for r in result.rejected
               for s in ("intra_class", "inter_class") for row in _metadata(out, s))  # fmt: skip


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_inputs_give_byte_identical_outputs(built, table, tmp_path):
    out, _, _ = built
    again = tmp_path / "again"
    build_benchmark(table, again, BuildOptions(duration=DURATION, frame_size=SIZE, seed=3), log=lambda _: None)
    first, second = _tree(out), _tree(again)
    assert first.keys() == second.keys() and len(first) == 2 * 24 + 4
    assert [k for k in first if first[k] != second[k]] == []
    assert not list(again.rglob(".*.tmp"))


def test_read_benchmark_reads_our_layout(built):
    out, _, _ = built
    items = read_benchmark(out)
    assert [i.subset for i in items] == ["intra_class"] * 8 + ["inter_class"] * 16
    for item in items:
        assert item.video == out / item.subset / "mixed" / f"{item.name}.mp4" and item.video.is_file()
        assert item.target_audio == out / item.subset / "target_audio" / f"{item.name}.flac"
        assert item.label == CLIPS[item.target][0] and item.negative == CLIPS[item.partner][0]
        assert item.name == f"{item.target}_{item.partner}_{item.placement}"


def test_read_benchmark_reads_the_released_layout(tmp_path):
    # the release: metadata with file_name,label only, or with its own column names; wav references
    a, b = "3qesirWAGt4_000020", "AHom7lBbtoY_000030"
    for subset in ("intra_class", "inter_class"):
        (tmp_path / subset / "mixed").mkdir(parents=True)
        (tmp_path / subset / "target_audio").mkdir()
        for side in ("left", "right"):
            (tmp_path / subset / "mixed" / f"{a}_{b}_{side}.mp4").write_bytes(b"")
    (tmp_path / "inter_class" / "target_audio" / f"{a}_{b}_left.wav").write_bytes(b"")
    (tmp_path / "inter_class" / "metadata.csv").write_text(
        f"file_name,label\n{a}_{b}_left.mp4,dog barking\nmixed/{a}_{b}_right.mp4,dog barking\n")
    (tmp_path / "intra_class" / "metadata.csv").write_text(
        "file_name,label,paired_label,target_position,target_file,paired_file\n"
        f"{a}_{b}_left.mp4,dog barking,train wheels squealing,Left,{a}.mp4,{b}.mp4\n")
    items = {(i.subset, i.name): i for i in read_benchmark(tmp_path)}
    left = items[("inter_class", f"{a}_{b}_left")]
    assert left.negative is None and left.placement == "left" and (left.target, left.partner) == (a, b)
    assert left.target_audio == tmp_path / "inter_class" / "target_audio" / f"{a}_{b}_left.wav"
    assert items[("inter_class", f"{a}_{b}_right")].target_audio is None
    intra = items[("intra_class", f"{a}_{b}_left")]
    assert (intra.negative, intra.placement, intra.target) == ("train wheels squealing", "left", a)
    broken = {
        "file_name,label\nmissing.mp4,x\n": "line 2: no file .*missing.mp4",
        f"file_name,label\n{a}_{b}_left.mp4,x\nmixed/{a}_{b}_left.mp4,x\n": "line 3: .* listed again",
        f"file_name,label,placement\n{a}_{b}_left.mp4,x,middle\n": "placement 'middle'",
        f"file_name,caption\n{a}_{b}_left.mp4,x\n": "no column label",
    }
    for text, error in broken.items():
        (tmp_path / "intra_class" / "metadata.csv").write_text(text)
        with pytest.raises(BenchmarkError, match=error):
            read_benchmark(tmp_path)
    # every bad row of every subset in one error, not only the first; evaluation needs no videos
    (tmp_path / "intra_class" / "metadata.csv").write_text("file_name,label\nmissing.mp4,x\n")
    (tmp_path / "inter_class" / "metadata.csv").write_text(
        f"file_name,label,placement\n{a}_{b}_left.mp4,x,middle\ngone.mp4,y,left\n")
    with pytest.raises(BenchmarkError) as caught:
        read_benchmark(tmp_path)
    lines = str(caught.value).splitlines()
    assert lines[0] == f"{tmp_path}: 3 bad metadata rows:"
    assert [line.split(": line ")[1] for line in lines[1:]] == [
        f"2: no file {tmp_path / 'intra_class' / 'missing.mp4'} (nor in mixed/)",
        "2: placement 'middle' is not left or right",
        f"3: no file {tmp_path / 'inter_class' / 'gone.mp4'} (nor in mixed/)"]
    (tmp_path / "inter_class" / "metadata.csv").write_text("file_name,label\ngone.mp4,y\n")
    items = read_benchmark(tmp_path, require_videos=False)
    assert [(i.subset, i.name, i.video) for i in items] == [("intra_class", "missing", None),
                                                            ("inter_class", "gone", None)]


def _clip(clip_id: str, label: str, category: str | None = None) -> BenchClip:
    return BenchClip(clip_id, f"{clip_id}.mp4", 0.0, label, category, 1)


def test_partner_rules_without_categories_and_seeded_draws():
    clips = [_clip("a", "dog barking"), _clip("b", "Dog  Barking"), _clip("c", "cat meowing"),
             _clip("d", "owl hooting"), _clip("e", "rain falling")]  # fmt: skip
    inter = choose_partners(clips, "inter_class", seed=0, partners=2)
    assert choose_partners(clips, "intra_class", seed=0, partners=2) == []  # no categories: no intra pairs
    assert all(t.prompt_key != p.prompt_key for t, p in inter)  # "Dog  Barking" is "dog barking"
    assert [len([p for t, p in inter if t.id == c.id]) for c in clips] == [2] * 5
    # the draw depends on the seed, not on the table's order
    assert {(t.id, p.id) for t, p in choose_partners(clips[::-1], "inter_class", seed=0, partners=2)} == {
        (t.id, p.id) for t, p in inter}
    draws = {tuple((t.id, p.id) for t, p in choose_partners(clips, "inter_class", seed=s, partners=2))
             for s in range(6)}  # fmt: skip
    assert len(draws) > 1
    items = plan_items(clips, seed=0, partners=1)
    assert [i.placement for i in items] == ["left", "right"] * 5
    # reciprocal: every drawn pair also the other way round, each once
    both = plan_items(clips, seed=0, partners=1, reciprocal=True)
    pairs = {(i.target.id, i.partner.id) for i in both}
    assert pairs == {(t, p) for t, p in pairs} | {(p, t) for t, p in pairs} and len(both) == 2 * len(pairs)
    assert {(i.target.id, i.partner.id) for i in items} <= pairs


def test_cli_builds_and_refuses_a_foreign_folder(table, tmp_path, capsys):
    args = ["benchmark", "build", "--clips", str(table), "--duration", "1", "--frame-size", "16", "--partners", "1"]
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    assert "rejected row 5 (line 6) id='mute'" in capsys.readouterr().err
    assert len(read_benchmark(tmp_path / "b")) == 16
    # a rebuild with other options into the same folder leaves exactly the new plan's files
    assert main([*args[:-1], "2", "--out", str(tmp_path / "b")]) == 0
    items = read_benchmark(tmp_path / "b")
    assert len(items) == 24
    media = {p for p in (tmp_path / "b").rglob("*") if p.suffix in (".mp4", ".flac")}
    assert media == {i.video for i in items} | {i.target_audio for i in items}
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    assert main([*args, "--out", str(tmp_path / "mine")]) == 1
    assert "not overwriting" in capsys.readouterr().err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
