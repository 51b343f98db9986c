"""The shard format's tar-walk rules, in one place: member names, the member whitelist, grouping.

A shard tar is a sequence of samples; a sample is the run of consecutive members named
``<key>.<field>`` with the same key (WebDataset's convention). Two readers walk shard tars with
different policies -- ``preprocessing.shard_reader`` refuses any damage with a ``ShardError``,
``training.tar_stream`` counts damage and skips the sample -- but what counts as damage is the
format's business, so it lives here:

* a member name must be ``<key>.<field>`` with a key matching ``KEY_PATTERN``;
* a member must be a regular file (links, folders and devices have no place in a shard);
* its field must be one of the format's members (``shards.MEMBER_ORDER``): ``.pth``, ``.pkl`` and
  the like are refused *before* a byte of them is read, since a shard is data, never code;
* a field appears at most once per sample.

``iter_sample_groups`` yields one ``MemberGroup`` per sample as soon as its first header is read and
hands out its members lazily, so a caller decides per sample whether to read the data at all: a
group left unread is skipped by ``tarfile`` (a seek in random-access mode, read-and-discard on a
stream). No member data is read here.
"""

from __future__ import annotations

import re
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from preprocessing.shards import MEMBER_ORDER

KEY_PATTERN = re.compile(r"^[A-Za-z0-9_-]+$")


def split_member_name(name: str) -> tuple[str, str] | None:
    """``"<key>.<field>"`` -> ``(key, field)``; None when ``name`` is not so named.

    The field is everything after the first dot (``"abc.clip_text.npy"`` -> ``("abc", "clip_text.npy")``),
    so dots inside a field stay in it.
    """
    key, dot, field = name.partition(".")
    if not dot or not KEY_PATTERN.match(key):
        return None
    return key, field


def bad_name_message(name: str) -> str:
    """The one wording for a member that is not named ``<key>.<field>``."""
    return f"member {name!r} is not named <key>.<field>"


@dataclass(frozen=True)
class TarMember:
    """One member of a sample: its header, its field, and why the format refuses it (if it does).

    ``problem`` is decided from the header alone; a member with a problem must not be read.
    """

    info: tarfile.TarInfo
    field: str
    problem: str | None


def member_problem(info: tarfile.TarInfo, field: str, seen_fields: set[str] | frozenset[str]) -> str | None:
    """Why the member ``info`` (of field ``field``) breaks the format, or None when it is acceptable.

    ``seen_fields`` are the fields its sample already had before it.
    """
    if not info.isreg():  # links, folders and devices have no place in a shard
        return f"member {info.name} is not a regular file"
    if field not in MEMBER_ORDER:  # refused before reading a byte of it
        return f"member {info.name}: unexpected member type {field!r}"
    if field in seen_fields:
        return f"member {info.name} appears twice"
    return None


class MemberGroup:
    """The consecutive members of one sample: ``key``, ``position`` (0-based index of the sample in
    the tar), ``first_name`` (its first member's name, for messages) and ``members()``.

    ``members()`` can be iterated once, and only until the walk moves on to the next sample; data is
    read by the caller (``tar.extractfile(member.info)``) while the member is current.
    """

    def __init__(self, key: str, position: int, first_name: str, members: Iterator[TarMember]):
        self.key = key
        self.position = position
        self.first_name = first_name
        self._members = members

    def members(self) -> Iterator[TarMember]:
        return self._members


def iter_sample_groups(tar: tarfile.TarFile, on_bad_name: Callable[[tarfile.TarInfo], None]) -> Iterator[MemberGroup]:
    """The samples of ``tar`` in tar order, one ``MemberGroup`` each, yielded at their first header.

    A member whose name is not ``<key>.<field>`` belongs to no sample: it is passed to ``on_bad_name``
    (which may raise to stop the walk) and otherwise ignored. Headers of finished samples are dropped
    from ``tar.members`` as the walk goes (``TarFile`` would keep all of them, and a shard can hold
    10^4 samples). Tar errors (``tarfile.TarError``, ``OSError``, ``EOFError``) propagate.
    """
    entries = _named_entries(tar, on_bad_name)
    head = next(entries, None)
    position = 0
    while head is not None:
        tar.members = []
        lookahead: list[tuple[tarfile.TarInfo, str, str] | None] = []
        group = MemberGroup(head[1], position, head[0].name, _group_members(head, entries, lookahead))
        yield group
        for _ in group.members():  # drain what the caller left: headers only, data is skipped
            pass
        head = lookahead[0] if lookahead else None
        position += 1


def _named_entries(
    tar: tarfile.TarFile, on_bad_name: Callable[[tarfile.TarInfo], None]
) -> Iterator[tuple[tarfile.TarInfo, str, str]]:
    for info in tar:
        parts = split_member_name(info.name)
        if parts is None:
            on_bad_name(info)
            continue
        yield info, *parts


def _group_members(
    head: tuple[tarfile.TarInfo, str, str],
    entries: Iterator[tuple[tarfile.TarInfo, str, str]],
    lookahead: list[tuple[tarfile.TarInfo, str, str] | None],
) -> Iterator[TarMember]:
    key = head[1]
    seen: set[str] = set()
    entry: tuple[tarfile.TarInfo, str, str] | None = head
    while entry is not None and entry[1] == key:
        info, _, field = entry
        problem = member_problem(info, field, seen)
        seen.add(field)
        yield TarMember(info, field, problem)
        entry = next(entries, None)
    lookahead.append(entry)  # the next sample's first member (None at the end of the tar)
