"""Input tables and manifests: VGGSound lists as-is, validation with row numbers, keys, determinism."""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import require_shared, shared_dir

from preprocessing.errors import RejectReason
from preprocessing.manifest import (
    ManifestError,
    assign_shards,
    build_manifest,
    check_row,
    clip_key,
    manifest_hash,
    read_clips,
    read_manifest,
    resolve_media_path,
    validate,
    write_manifest,
)

REAL = shared_dir() / "data" / "real"
@pytest.fixture
def needs_real() -> None:
    require_shared(REAL / "vgg-test.tsv", "the VGGSound lists")


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.usefixtures("needs_real")
@pytest.mark.parametrize(("name", "count"), [("vgg-test.tsv", 15221), ("vgg-val.tsv", 2048), ("videos.tsv", 2)])
def test_vggsound_lists_read_as_is(name, count):
    clips, problems = read_clips(REAL / name, duration=8.0, check_files=False)
    assert len(clips) == count and problems == []
    assert all(c.path == f"{c.source_id}.mp4" and c.start == 0.0 and c.duration == 8.0 for c in clips)
    assert all(c.text and "\t" not in c.text for c in clips)
    assert all(len(c.key) == 16 and "." not in c.key for c in clips)


@pytest.mark.usefixtures("needs_real")
def test_vggsound_real_clips_are_found_and_labelled():
    clips, problems = read_clips(REAL / "videos.tsv", duration=8.0)
    assert problems == []  # both mp4 files sit next to the list
    by_id = {c.source_id: c for c in clips}
    assert by_id["0B4dYTMsgHA_000130"].text == "child speech, kid speaking"  # the comma survives
    assert by_id["F8Zt3mYlOqU_000094"].text == "whale calling"


def test_headerless_vggsound_list(tmp_path):
    table = _write(tmp_path / "list.tsv", "0B4dYTMsgHA_000130\tchild speech, kid speaking\n\nF8Zt3mYlOqU_000094\t\n")
    clips, problems = read_clips(table, duration=8.0, check_files=False)
    assert [(c.source_id, c.line) for c in clips] == [("0B4dYTMsgHA_000130", 1)]
    # the blank line is no data row, but it does move the file line; an empty prompt is rejected
    assert [(p.row, p.line, p.kind, p.id) for p in problems] == [(2, 3, "bad_text", "F8Zt3mYlOqU_000094")]


def test_original_vggsound_csv_layout(tmp_path):
    table = _write(
        tmp_path / "vggsound.csv", '---g-f_I2yQ,1,"people marching",test\n--0PQM4-hqg,30,waterfall burbling,train\n'
    )
    clips, problems = read_clips(table, duration=8.0, check_files=False)
    assert problems == []
    assert [(c.source_id, c.text, c.split) for c in clips] == [
        ("---g-f_I2yQ_000001", "people marching", "test"),
        ("--0PQM4-hqg_000030", "waterfall burbling", "train"),
    ]


def test_csv_with_caption_path_start_duration_split(tmp_path):
    media = tmp_path / "media"
    (media / "sub").mkdir(parents=True)
    (media / "sub" / "a.mp4").write_bytes(b"x")
    (media / "b.mp4").write_bytes(b"x")
    table = _write(
        tmp_path / "clips.csv",
        "id,caption,path,start,duration,split,notes\n"
        'a,"a dog barks, twice",sub/a.mp4,1.5,10,train,whatever\n'
        "b,rain on a roof,,,,val,\n",
    )
    clips, problems = read_clips(table, duration=8.0, media_root=media)
    assert problems == []
    a, b = clips
    # a 10 s span is cut to the preset's 8 s from its start
    assert (a.text, a.path, a.start, a.duration, a.split) == ("a dog barks, twice", "sub/a.mp4", 1.5, 8.0, "train")
    assert (b.text, b.path, b.start, b.duration, b.split) == ("rain on a roof", "b.mp4", 0.0, 8.0, "val")


def test_parquet_input(tmp_path):
    table = pa.table(
        {
            "id": ["a", "b", "c"],
            "caption": ["birds sing", None, " "],
            "start": [0.0, 2.25, None],
            "duration": [8.0, 8.0, 8.0],
            "split": ["train", "train", "test"],
        }
    )
    pq.write_table(table, tmp_path / "clips.parquet")
    clips, problems = read_clips(tmp_path / "clips.parquet", duration=8.0, check_files=False)
    assert [c.start for c in clips] == [0.0]
    assert [(p.row, p.kind) for p in problems] == [(2, "bad_text"), (3, "bad_text")]
    assert problems[0].line is None

    pq.write_table(pa.table({"id": ["a"], "label": [7]}), tmp_path / "numbers.parquet")
    _, problems = read_clips(tmp_path / "numbers.parquet", duration=8.0, check_files=False)
    assert [(p.row, p.kind) for p in problems] == [(1, "bad_text")] and "not text" in problems[0].message


def test_validation_reports_rows(tmp_path):
    media = tmp_path / "media"
    media.mkdir()
    for name in ("a", "b", "d"):
        (media / f"{name}.mp4").write_bytes(b"x")
    table = _write(
        tmp_path / "clips.tsv",
        "id\tlabel\tstart\n"
        "a\tdog barking\t0\n"  # row 1
        "b\t  \t0\n"  # row 2: empty text
        "c\tcat purring\t0\n"  # row 3: no file
        "a\tdog barking again\t0.0001\n"  # row 4: same clip as row 1 at ms resolution
        "d\tbird\t-1\n"  # row 5: negative start
        "a\tdog, later\t5\n",  # row 6: another clip of the same video: fine
    )
    problems = validate(table, duration=8.0, media_root=media)
    assert [(p.row, p.line, p.kind) for p in problems] == [
        (2, 3, "bad_text"),
        (3, 4, "missing_file"),
        (4, 5, "duplicate"),
        (5, 6, "bad_row"),
    ]
    assert "row 1" in problems[2].message and "row 4 (line 5) id='a': duplicate" in str(problems[2])
    with pytest.raises(ManifestError, match="4 problem"):
        validate(table, duration=8.0, media_root=media, strict=True)

    assert problems[2].collides_with_row == 1 and problems[2].collides_with_line == 2
    assert [p.rejects for p in problems] == [True, False, True, True]

    rows, found = build_manifest(table, duration=8.0, seed=0, media_root=media)
    assert found == problems
    # missing files stay (the job records them as failures of their shard); rejected rows go
    assert sorted(r.row for r in rows) == [1, 3, 6]
    by_row = {r.row: r for r in rows}
    assert {r.row: r.line for r in rows} == {1: 2, 3: 4, 6: 7}
    assert check_row(by_row[3], media).reason is RejectReason.MISSING_FILE
    assert check_row(by_row[1], media) is None


def test_text_column_must_be_unambiguous(tmp_path):
    table = _write(tmp_path / "t.csv", "id,label,caption\na,dog,a dog barks\n")
    with pytest.raises(ManifestError, match="several text columns"):
        read_clips(table, duration=8.0, check_files=False)
    clips, _ = read_clips(table, duration=8.0, check_files=False, text_column="caption")
    assert clips[0].text == "a dog barks"


def test_key_rule_is_stable_and_dot_free():
    expected = hashlib.sha1(b"0B4dYTMsgHA_000130|0.000|8.000").hexdigest()[:16]
    assert clip_key("0B4dYTMsgHA_000130", 0.0, 8.0) == expected == "d038838412c12a87"
    assert clip_key("x", 1.0, 8.0) == clip_key("x", 1.0004, 8.0) != clip_key("x", 1.001, 8.0)
    assert clip_key("x", -0.0 + 0.0, 8.0) == clip_key("x", 0.0, 8.0)
    assert "." not in clip_key("a.b.c", 1.5, 2.5)


def _clips(tmp_path: Path, n: int) -> Path:
    lines = ["id\tlabel\tsplit"] + [
        f"vid{i:04d}_000010\tsound {i}\t{'val' if i % 5 == 0 else 'train'}" for i in range(n)
    ]
    return _write(tmp_path / "clips.tsv", "\n".join(lines) + "\n")


def test_manifest_bytes_are_reproducible(tmp_path):
    table = _clips(tmp_path, 230)
    rows, _ = build_manifest(table, duration=2.0, seed=7, samples_per_shard=50, check_files=False)
    write_manifest(rows, tmp_path / "m1.parquet")
    write_manifest(read_manifest(tmp_path / "m1.parquet"), tmp_path / "m2.parquet")
    assert (tmp_path / "m1.parquet").read_bytes() == (tmp_path / "m2.parquet").read_bytes()
    assert read_manifest(tmp_path / "m1.parquet") == rows
    assert not list(tmp_path.glob(".*tmp"))  # the temporary was renamed away

    # the assignment depends on the set of clips and the seed, not on the table's row order
    lines = (tmp_path / "clips.tsv").read_text().splitlines()
    body = lines[1:]
    random.Random(0).shuffle(body)
    shuffled = _write(tmp_path / "shuffled.tsv", "\n".join([lines[0], *body]) + "\n")
    again, _ = build_manifest(shuffled, duration=2.0, seed=7, samples_per_shard=50, check_files=False)
    assert [(r.key, r.shard, r.index_in_shard) for r in again] == [(r.key, r.shard, r.index_in_shard) for r in rows]

    other, _ = build_manifest(table, duration=2.0, seed=8, samples_per_shard=50, check_files=False)
    assert [(r.key, r.shard) for r in other] != [(r.key, r.shard) for r in rows]
    assert sorted(r.key for r in other) == sorted(r.key for r in rows)
    assert manifest_hash(rows) == manifest_hash(read_manifest(tmp_path / "m2.parquet")) != manifest_hash(other)


def test_samples_per_shard(tmp_path):
    rows, _ = build_manifest(_clips(tmp_path, 230), duration=2.0, seed=0, samples_per_shard=50, check_files=False)
    sizes = Counter(r.shard for r in rows)
    # 184 train clips -> 50+50+50+34; 46 val clips -> one shard
    assert sizes == {"train-000000": 50, "train-000001": 50, "train-000002": 50, "train-000003": 34, "val-000000": 46}
    for shard in sizes:
        assert sorted(r.index_in_shard for r in rows if r.shard == shard) == list(range(sizes[shard]))
    assert [r.shard for r in rows] == sorted(r.shard for r in rows)  # rows sorted by shard, then index
    with pytest.raises(ValueError):
        assign_shards([], seed=0, samples_per_shard=0)


@pytest.mark.usefixtures("needs_real")
def test_vggsound_test_split_shards():
    rows, problems = build_manifest(
        REAL / "vgg-test.tsv", duration=8.0, seed=0, samples_per_shard=1000, default_split="test", check_files=False
    )
    assert problems == [] and len(rows) == 15221
    sizes = Counter(r.shard for r in rows)
    assert len(sizes) == 16 and sizes["test-000015"] == 221 and set(sizes.values()) == {1000, 221}


@pytest.mark.parametrize("root", ["http://127.0.0.1:8702", "http://127.0.0.1:8702/media/", "s3://bucket/videos"])
def test_a_url_media_root_is_kept_as_a_url(tmp_path, root):
    """Files under a URL root are not checked here (the worker that opens them is), and the URL's
    "//" survives: Path() would turn http://host into http:/host and every row into missing_file."""
    table = _write(tmp_path / "list.tsv", "a1\ta dog barks\nb2\train on a roof\n")
    clips, problems = read_clips(table, duration=2.0, media_root=root)
    assert problems == [] and [c.source_id for c in clips] == ["a1", "b2"]
    rows, _ = build_manifest(table, duration=2.0, seed=0, samples_per_shard=4, media_root=root)
    paths = {row.path: resolve_media_path(row.path, root) for row in rows}
    assert sorted(paths.values()) == [f"{root.rstrip('/')}/a1.mp4", f"{root.rstrip('/')}/b2.mp4"]
    assert all(check_row(row, root) is None for row in rows)
