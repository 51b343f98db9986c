"""The shared tar-walk rules: names, grouping, member problems, and lazy (unread) groups."""

from __future__ import annotations

import io
import tarfile

import pytest

from preprocessing.tar_walk import iter_sample_groups, split_member_name


def _tar(entries: list[tuple[str, bytes | None]]) -> bytes:
    """A tar of ``(name, data)`` entries; ``data=None`` makes a symlink instead of a regular file."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_split_member_name():
    assert split_member_name("ab_C-1.clip_text.npy") == ("ab_C-1", "clip_text.npy")
    assert split_member_name("noext") is None
    assert split_member_name("../evil.json") is None
    assert split_member_name("dir/key.json") is None
    assert split_member_name(".json") is None


def test_groups_consecutive_members_and_reports_problems_from_headers():
    data = _tar(
        [
            ("a.json", b"{}"),
            ("a.t5.npy", b"x"),
            ("stray", b"?"),  # not <key>.<field>: belongs to no sample
            ("b.json", b"{}"),
            ("b.t5.pth", b"pickle"),
            ("b.json", b"{}"),
            ("b.sync.mp4", None),
            ("c.json", b"{}"),
        ]
    )
    bad: list[str] = []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as tar:
        got = []
        for group in iter_sample_groups(tar, lambda info: bad.append(info.name)):
            members = [(m.field, m.problem) for m in group.members()]
            got.append((group.position, group.key, group.first_name, members))
    assert bad == ["stray"]
    assert [g[:3] for g in got] == [(0, "a", "a.json"), (1, "b", "b.json"), (2, "c", "c.json")]
    assert got[0][3] == [("json", None), ("t5.npy", None)]
    problems = [p for _, p in got[1][3]]
    assert problems[0] is None
    assert "unexpected member type 't5.pth'" in problems[1]
    assert "b.json appears twice" in problems[2]
    assert "b.sync.mp4 is not a regular file" in problems[3]


def test_unread_groups_are_skipped_and_read_groups_give_their_bytes():
    data = _tar([("a.json", b"A" * 5000), ("a.t5.npy", b"a"), ("b.json", b"B"), ("b.t5.npy", b"bb")])
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as tar:  # a stream: no going back
        read = {}
        for group in iter_sample_groups(tar, lambda info: None):
            if group.key == "a":
                continue  # never touched: the walk skips its data
            for member in group.members():
                read[member.field] = tar.extractfile(member.info).read()
    assert read == {"json": b"B", "t5.npy": b"bb"}


def test_a_raising_bad_name_handler_stops_the_walk():
    data = _tar([("a.json", b"{}"), ("bad name.json", b"{}"), ("b.json", b"{}")])

    def refuse(info: tarfile.TarInfo) -> None:
        raise ValueError(info.name)

    with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as tar, pytest.raises(ValueError, match="bad name"):
        for group in iter_sample_groups(tar, refuse):
            list(group.members())
