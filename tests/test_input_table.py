"""Input tables as they come from the web: quoting, invisible prompts, spans, bad bytes, duplicates.

Every row of a table must become a clip or a recorded rejection with its line and reason; these tests
build small tables with each kind of fault and check which rows survive with which content.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.precompute import PrecomputeConfig, PrecomputeError, prepare_dataset
from preprocessing.dataset_summary import print_dataset_summary
from preprocessing.input_rows import clip_key, prompt_text
from preprocessing.manifest import read_clips, read_manifest
from preprocessing.shards import input_failures_path, read_input_failures


def _table(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


def _judge(path: Path, duration: float = 8.0):
    clips, problems = read_clips(path, duration=duration, check_files=False)
    return {c.source_id: c for c in clips}, {p.row: p for p in problems}


def test_tsv_is_literal_an_unbalanced_quote_swallows_nothing(tmp_path):
    table = _table(
        tmp_path / "t.tsv",
        'id\tcaption\na\t"a dog barks\nb\tbirds sing\nc\the said "hi"\nd\t"quoted"\ne\train\n',
    )
    clips, problems = _judge(table)
    assert problems == {}
    assert {k: c.text for k, c in clips.items()} == {
        "a": '"a dog barks', "b": "birds sing", "c": 'he said "hi"', "d": '"quoted"', "e": "rain",
    }
    assert {k: c.line for k, c in clips.items()} == {"a": 2, "b": 3, "c": 4, "d": 5, "e": 6}
    # the headerless VGGSound layout is literal too
    headerless = _table(tmp_path / "list.tsv", 'x_000001\t"open quote\ny_000002\tdog barking\n')
    clips, problems = _judge(headerless)
    assert problems == {} and clips["y_000002"].text == "dog barking" and clips["x_000001"].text == '"open quote'


@pytest.mark.parametrize("suffix", [".csv", ".txt"])
def test_csv_quotes_close_on_their_line_or_the_row_is_rejected(tmp_path, suffix):
    table = _table(
        tmp_path / f"t{suffix}",
        'id,caption\na,"a dog barks\nb,birds sing\nc,"x, y"\nd,"bad"tail\ne,"multi\nline",\nf,rain\n',
    )
    clips, problems = _judge(table)
    assert {k: c.text for k, c in clips.items()} == {"b": "birds sing", "c": "x, y", "f": "rain"}
    # rows 1, 4, 5 and the stray second half of row 5 (line 7, no prompt): each rejected on its own line
    assert {r: (p.line, p.kind) for r, p in problems.items()} == {
        1: (2, "bad_row"), 4: (5, "bad_row"), 5: (6, "bad_row"), 6: (7, "bad_text"),
    }
    assert "quot" in problems[1].message.lower()


INVISIBLE = [
    "\u200b", "\u200c\u200d", "\u2060", "\ufeff", "\u00ad", "\u200e\u200f", "\u202a\u202c", "\u2066\u2069",
    "\u00a0", "\u3000", " \u200b \t", "\u0301", "\ufe0f", "\u180e", "\u3164", "\u115f\u1160", "\uffa0",
    "\u2800\u2800", "\u2028", "\u2029",
]


@pytest.mark.parametrize("caption", INVISIBLE, ids=[f"U+{ord(c[0]):04X}" for c in INVISIBLE])
def test_invisible_prompts_are_rejected(caption):
    text, problem = prompt_text(caption)
    assert text == "" and problem is not None


@pytest.mark.parametrize(
    ("raw", "kept"),
    [("dog", "dog"), ("\u200bdog barks\u200b", "dog barks"), ("\ufeffrain", "rain"), ("犬が吠える", "犬が吠える"),
     ("🐕", "🐕"), ("42", "42"), ("a\u200bb", "a\u200bb"), ("\u00a0piano\u00a0", "piano"),
     # combining marks belong to the character before them: never trimmed
     ("कुत्ता भौंकता है", "कुत्ता भौंकता है"), ("un cafe\u0301", "un cafe\u0301"), ("❤\ufe0f", "❤\ufe0f"),
     ("keycap 1\ufe0f\u20e3", "keycap 1\ufe0f\u20e3"), ("\u3164dog\u3164", "dog")],
)
def test_visible_prompts_are_kept_with_invisible_ends_stripped(raw, kept):
    assert prompt_text(raw) == (kept, None)


def test_control_characters_and_non_text_are_bad_text(tmp_path):
    assert prompt_text("dog\x07bark")[1] == "holds the control character U+0007"
    assert prompt_text(7)[1] == "is not text (7)"
    table = _table(tmp_path / "t.tsv", "id\tlabel\na\t\u200b\u200b\nb\tdog\x00\nc\tcat\n")
    clips, problems = _judge(table)
    assert list(clips) == ["c"]
    assert {r: p.kind for r, p in problems.items()} == {1: "bad_text", 2: "bad_text"}
    assert "U+200B" in problems[1].message


def test_spans_are_cut_to_the_preset_or_rejected(tmp_path):
    table = _table(
        tmp_path / "t.tsv",
        "id\tlabel\tstart\tduration\n"
        "long\tdog\t1.5\t10\n"  # cut to [1.5, 9.5)
        "exact\tcat\t0\t8\n"
        "rounded\tbird\t0\t7.9996\n"  # 8.000 at millisecond resolution
        "short\tcow\t0\t7.999\n"
        "blank\tpig\t2\t\n"  # no duration cell: the preset's
        "zero\tant\t0\t0\n"
        "text\tbee\t0\tten\n"
        "inf\towl\t0\tinf\n",
    )
    clips, problems = _judge(table)
    assert {k: (c.start, c.duration) for k, c in clips.items()} == {
        "long": (1.5, 8.0), "exact": (0.0, 8.0), "rounded": (0.0, 8.0), "blank": (2.0, 8.0),
    }
    assert clips["long"].key == clip_key("long", 1.5, 8.0)
    assert {r: p.kind for r, p in problems.items()} == {4: "too_short", 6: "bad_row", 7: "bad_row", 8: "bad_row"}
    assert "7.999 s is shorter than the preset's 8 s" in problems[4].message


def test_csv_captions_may_span_lines_only_over_lines_that_are_no_rows(tmp_path):
    # pandas writes a caption with a line break as a quoted field over two lines: one row, one line
    pandas_style = _table(
        tmp_path / "p.csv", 'id,path,start,caption\nml,a.mp4,1.0,"a dog\nbarking loudly, then quiet"\nb,b.mp4,0,cat\n'
    )
    clips, problems = _judge(pandas_style)
    assert problems == {} and {k: (c.text, c.line) for k, c in clips.items()} == {
        "ml": ("a dog barking loudly, then quiet", 2), "b": ("cat", 4),
    }
    # an open quote whose closing quote is on a line that is a row itself swallows nothing
    swallow = _table(tmp_path / "s.csv", 'id,caption\na,"open quote\nb,birds"\nc,cow\n')
    clips, problems = _judge(swallow)
    assert {k: c.text for k, c in clips.items()} == {"b": 'birds"', "c": "cow"}
    assert {r: (p.kind, p.id, p.line) for r, p in problems.items()} == {1: ("bad_row", "a", 2)}


def test_headerless_lists_survive_a_damaged_first_line(tmp_path):
    extra = _table(tmp_path / "a.tsv", "aaa\tdog\textra\nbbb\tcat\nccc\tcow\n")
    clips, problems = _judge(extra)
    assert {k: c.text for k, c in clips.items()} == {"bbb": "cat", "ccc": "cow"}
    assert {r: (p.kind, p.id) for r, p in problems.items()} == {1: ("bad_row", "aaa")}
    bad_bytes = _table(tmp_path / "b.tsv", b"aaa\tcaf\xe9\nbbb\tcat\nccc\tcow\n")
    clips, problems = _judge(bad_bytes)
    assert list(clips) == ["bbb", "ccc"] and {r: (p.kind, p.id) for r, p in problems.items()} == {1: ("bad_row", "aaa")}


def test_numbers_are_plain_ascii_decimals(tmp_path):
    table = _table(tmp_path / "t.tsv", "id\tlabel\tstart\na\tdog\t1_0\nb\tcat\t\u0661\nc\tcow\t\uff12\nd\tpig\t1e0\n")
    clips, problems = _judge(table)
    assert {k: c.start for k, c in clips.items()} == {"d": 1.0}
    assert {r: p.kind for r, p in problems.items()} == {1: "bad_row", 2: "bad_row", 3: "bad_row"}


def test_bad_bytes_and_line_endings(tmp_path):
    crlf = _table(tmp_path / "crlf.tsv", b"id\tlabel\r\na\tdog\r\nb\tca\xfft\r\nc\tcow\r\n")
    clips, problems = _judge(crlf)
    assert {k: c.text for k, c in clips.items()} == {"a": "dog", "c": "cow"}
    assert problems[2].kind == "bad_row" and problems[2].line == 3 and "0xff" in problems[2].message
    old_mac = _table(tmp_path / "cr.tsv", b"\xef\xbb\xbfid\tlabel\ra\tdog\rb\tcat\r")
    clips, problems = _judge(old_mac)
    assert problems == {} and {k: c.text for k, c in clips.items()} == {"a": "dog", "b": "cat"}
    # a lone CR inside an LF file, and CR line ends with one CRLF at the end: every line ending counts
    mixed = _table(tmp_path / "mixed.tsv", b"id\tlabel\na\tdog\rb\tcat\nc\tcow\r\nd\tpig\r")
    clips, problems = _judge(mixed)
    assert problems == {} and {k: (c.text, c.line) for k, c in clips.items()} == {
        "a": ("dog", 2), "b": ("cat", 3), "c": ("cow", 4), "d": ("pig", 5),
    }


def test_duplicates_name_the_row_they_collide_with(tmp_path):
    media = tmp_path / "media"
    table = _table(
        tmp_path / "t.tsv",
        "id\tlabel\tpath\tstart\tduration\n"
        "a\tdog\ta.mp4\t0\t\n"  # row 1
        "a\tcat\ta.mp4\t0\t10\n"  # row 2: same clip after the cut, another prompt
        "a\tdog\tother.mp4\t3\t\n"  # row 3: the id already names a.mp4
        "b\tdog\ta.mp4\t0\t\n"  # row 4: a.mp4 from 0 s under another id
        "a\tdog later\ta.mp4\t3\t\n"  # row 5: another clip of the same video: fine
        "c\tcow\t./a.mp4\t3\t\n",  # row 6: the same file spelled differently, same span as row 5
    )
    clips, problems = read_clips(table, duration=8.0, media_root=media, check_files=False)
    assert [c.row for c in clips] == [1, 5]
    found = {p.row: p for p in problems}
    assert {r: (p.kind, p.collides_with_row, p.collides_with_line) for r, p in found.items()} == {
        2: ("duplicate", 1, 2), 3: ("duplicate", 1, 2), 4: ("duplicate", 1, 2), 6: ("duplicate", 5, 6),
    }
    assert "'dog' is kept, this row's 'cat' is not" in found[2].message
    assert "another file" in found[3].message and "same file and span" in found[4].message


def test_parquet_rows_are_judged_the_same_way(tmp_path):
    pq.write_table(
        pa.table({"id": ["a", "b", None, "d", "e\x00vil", "f"], "caption": ["dog", "\u200b", "cat", "cow", "x", "y"],
                  "path": [None, None, None, None, None, "f\n.mp4"], "duration": [10.0, 8.0, 8.0, 2.0, 8.0, 8.0]}),
        tmp_path / "t.parquet",
    )
    clips, problems = _judge(tmp_path / "t.parquet")
    assert {k: c.duration for k, c in clips.items()} == {"a": 8.0}
    assert {r: (p.kind, p.line) for r, p in problems.items()} == {
        2: ("bad_text", None), 3: ("bad_row", None), 4: ("too_short", None), 5: ("bad_row", None), 6: ("bad_row", None),
    }
    assert "U+0000" in problems[5].message and "path holds the control character U+000A" in problems[6].message


def _mixed_table(tmp_path: Path) -> Path:
    return _table(
        tmp_path / "mixed.tsv",
        b"id\tlabel\tstart\tduration\n"
        b'q\t"unbalanced\t0\t\n'
        b"r\tdog\t0\t5\n"  # 5 s: the tiny preset's clip is 2 s, so cut
        b"s\t\xe2\x80\x8b\t0\t\n"  # zero-width space only
        b"t\tcow\t0\t1\n"  # shorter than 2 s
        b"q\tdog again\t0\t\n"  # duplicate of row 1
        b"u\tbad \xff byte\t0\t\n"
        b"v\tpig\t-1\t\n",
    )


def test_prepare_dataset_records_every_rejected_row(tmp_path, capsys):
    table = _mixed_table(tmp_path)
    out = tmp_path / "data"
    cfg = PrecomputeConfig(input=str(table), out=str(out), preset="tiny", max_failed_fraction=1.0, progress=False)
    rows, info = prepare_dataset(cfg)
    assert sorted((r.source_id, r.duration, r.line) for r in rows) == [("q", 2.0, 2), ("r", 2.0, 3)]
    assert info.input_rows == {
        "rows": 7, "clips": 2, "rejected": 5,
        "rejected_by_reason": {"bad_row": 2, "bad_text": 1, "duplicate": 1, "too_short": 1},
    }
    assert json.loads((out / "dataset.json").read_text())["input_rows"]["rejected"] == 5
    failures = read_input_failures(out)
    assert [(f.row, f.line, f.source_id, f.reason) for f in failures] == [
        (3, 4, "s", "bad_text"), (4, 5, "t", "too_short"), (5, 6, "q", "duplicate"), (6, 7, "u", "bad_row"),
        (7, 8, "v", "bad_row"),
    ]
    assert (failures[2].collides_with_row, failures[2].collides_with_line) == (1, 2)
    assert failures[2].key == clip_key("q", 0.0, 2.0) == next(r.key for r in rows if r.source_id == "q")
    assert read_manifest(out / "manifest.parquet") == rows

    capsys.readouterr()
    print_dataset_summary(out)
    shown = capsys.readouterr().out
    assert "input table: 7 rows, 2 clips, 5 rejected before sharding: bad_row 2," in shown
    assert "row 5 (line 6) id='q': duplicate: same clip" in shown and "failures/input.parquet" in shown


def test_a_table_over_the_failure_budget_stops_before_any_shard(tmp_path):
    out = tmp_path / "data"
    cfg = PrecomputeConfig(input=str(_mixed_table(tmp_path)), out=str(out), preset="tiny", max_failed_fraction=0.5)
    with pytest.raises(PrecomputeError, match=r"5 of 7 rows rejected .*failures/input.parquet"):
        prepare_dataset(cfg)
    assert input_failures_path(out).is_file() and len(read_input_failures(out)) == 5
    assert not (out / "manifest.parquet").exists() and not (out / "dataset.json").exists()


def test_a_table_without_data_rows_is_an_error_naming_it(tmp_path):
    table = _table(tmp_path / "t.tsv", "id\tlabel\n\n")
    cfg = PrecomputeConfig(input=str(table), out=str(tmp_path / "data"), preset="tiny", max_failed_fraction=1.0)
    with pytest.raises(PrecomputeError, match=r"t.tsv: the table has no data rows"):
        prepare_dataset(cfg)
