"""Judging the rows of an input table: which become clips, which are rejected, and why.

The rules (docs/precompute.md, "Input table rules"), each a ``ManifestProblem.kind``:

* ``bad_row``: the row cannot become a clip: a line that could not be split into cells (not UTF-8,
  CSV quotes that do not close on the line), no id, a control character in the id or path, more
  cells than the header, a start or duration
  that is not a finite number, a negative start, a non-positive duration, a split that is not a
  plain name;
* ``bad_text``: the prompt is empty, not text, holds a control character, or has no visible
  character (a caption made only of zero-width spaces, joiners, bidi marks, Hangul fillers, blank
  Braille, lone combining marks ... is no prompt); blank characters are trimmed from both ends,
  combining marks never (they belong to the character before them);
* ``too_short``: the row's span (its ``duration`` cell) is shorter than the preset's clip. A longer
  span is cut to the preset's length from its start, as VGGSound's 10 s clips are for the 8 s preset;
  every clip of a dataset has the preset's duration, so every sample has the shapes of dataset.json;
* ``duplicate``: the clip was already taken from an earlier row (``collides_with_row``): the same
  (id, start, duration) after the cut, the same id naming a different file, or the same file and
  span under a different id (one video under two ids would leak between splits).

A row with a problem is rejected before shard assignment and recorded in the dataset-level table
``failures/input.parquet``; a clip whose file is missing is a warning here (``missing_file``) and a
recorded failure of its shard at run time.
"""

from __future__ import annotations

import hashlib
import math
import re
import unicodedata
from dataclasses import dataclass
from typing import Any

from preprocessing.input_table import InputTable, TableRow

SPLIT_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_]*$")  # becomes part of file names: keep it plain
KEY_HEX_DIGITS = 16
NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$|^[+-]?(inf|nan)$", re.ASCII | re.IGNORECASE)
VISIBLE = ("L", "N", "P", "S")  # Unicode major categories that put ink on the page
# letters and symbols that render as nothing (Hangul fillers, the blank Braille pattern): Unicode
# lists the fillers as default-ignorable; all of them are used to fake "non-empty" text
BLANK_GLYPHS = frozenset({0x115F, 0x1160, 0x3164, 0xFFA0, 0x2800})
REJECTING = ("bad_row", "bad_text", "too_short", "duplicate")  # kinds that keep a row out of the manifest


@dataclass(frozen=True)
class ManifestProblem:
    """One thing wrong with an input row. ``kind``: bad_row, bad_text, too_short, duplicate or missing_file."""

    row: int  # 1-based data row (header not counted)
    id: str
    kind: str
    message: str
    line: int | None = None  # line in a text file, for editors
    key: str | None = None  # the clip's key, where the row got that far
    collides_with_row: int | None = None  # duplicate: the earlier row that owns the clip
    collides_with_line: int | None = None

    @property
    def rejects(self) -> bool:
        """True if the row stays out of the manifest (everything but a missing file)."""
        return self.kind in REJECTING

    def __str__(self) -> str:
        where = f"row {self.row}" + (f" (line {self.line})" if self.line is not None else "")
        return f"{where} id={self.id!r}: {self.kind}: {self.message}"


@dataclass(frozen=True)
class ClipRow:
    """An input row that becomes a clip (before shard assignment)."""

    key: str
    source_id: str
    path: str
    start: float
    duration: float  # always the preset's clip duration
    text: str
    split: str
    row: int
    line: int | None = None


def clip_key(source_id: str, start: float, duration: float) -> str:
    """Stable sample key: sha1 of ``source_id|start|duration`` (ms resolution), 16 hex digits."""
    canonical = f"{source_id}|{start:.3f}|{duration:.3f}"
    return hashlib.sha1(canonical.encode("utf-8")).hexdigest()[:KEY_HEX_DIGITS]


def milliseconds(value: float) -> float:
    # store exactly what the key hashes, and turn -0.0 into 0.0 so it formats as "0.000"
    return float(f"{value:.3f}") + 0.0


# Unicode category Cc is exactly these 65 code points (C0, DEL, C1): one regex scan instead of a category
# lookup per character (the manifest step of a million-row table spent ~1 s per 20k rows there)
CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


def _control(text: str) -> str:
    """The first control character of ``text`` ("" if none)."""
    found = CONTROL.search(text)
    return found.group() if found else ""


def _blank(char: str) -> bool:
    """Renders as nothing: separators (spaces), format characters (zero-width, bidi, BOM) and the
    letters/symbols that are blank by design. Combining marks are not blank: they belong to the
    character before them (a Devanagari vowel sign, an emoji's variation selector)."""
    return unicodedata.category(char)[0] == "Z" or unicodedata.category(char) == "Cf" or ord(char) in BLANK_GLYPHS


def _visible(char: str) -> bool:
    return unicodedata.category(char)[0] in VISIBLE and ord(char) not in BLANK_GLYPHS


def prompt_text(value: Any) -> tuple[str, str | None]:
    """(prompt, None) for a usable prompt, else ("", what is wrong). Blank characters (spaces,
    format characters such as U+200B, fillers such as U+3164) are stripped from both ends; inside,
    everything is kept as written."""
    if value is None:
        return "", "is empty"
    if not isinstance(value, str):
        return "", f"is not text ({value!r})"
    start, end = 0, len(value)
    while start < end and (_blank(value[start]) or value[start].isspace()):
        start += 1
    while end > start and (_blank(value[end - 1]) or value[end - 1].isspace()):
        end -= 1
    text = value[start:end]
    if not text:
        shown = ", ".join(dict.fromkeys(f"U+{ord(c):04X}" for c in value)) if value else ""
        return "", "is empty" + (f" (only invisible characters: {shown[:60]})" if shown and value.strip() else "")
    control = _control(text)
    if control:
        return "", f"holds the control character U+{ord(control):04X}"
    if not any(_visible(c) for c in text):
        return "", "has no visible character"
    return text, None


def _number(value: Any, default: float, name: str) -> float:
    if value is None or (isinstance(value, str) and not value.strip()):
        return default
    if isinstance(value, bool) or (isinstance(value, str) and not NUMBER.match(value.strip())):
        raise ValueError(f"{name} {value!r} is not a number")  # float() also takes "1_0", "١", "２"
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} {value!r} is not a number") from None
    if not math.isfinite(number):
        raise ValueError(f"{name} {value!r} is not finite")
    return number


def judge_row(
    item: TableRow, table: InputTable, duration: float, default_split: str
) -> tuple[ClipRow | None, ManifestProblem | None]:
    """The clip a row becomes, or the problem that rejects it. ``duration``: the preset's clip length (s)."""
    values = item.values
    raw_id = values.get("id")
    source_id = str(raw_id).strip() if raw_id is not None else ""

    def reject(kind: str, message: str) -> tuple[None, ManifestProblem]:
        return None, ManifestProblem(item.row, source_id, kind, message, item.line)

    if item.problem is not None:
        return reject("bad_row", item.problem)
    if not source_id:
        return reject("bad_row", "empty id")
    if _control(source_id):  # ids become file names and log lines: a NUL or newline in one breaks both
        return reject("bad_row", f"id holds the control character U+{ord(_control(source_id)):04X}")
    if item.extra_cells:
        # a stray tab/comma inside a text field: which cell is the prompt is a guess, so do not guess
        return reject("bad_row", f"{item.extra_cells} more cell(s) than the header")
    clip_length = milliseconds(duration)
    try:
        start = _number(values.get("start"), 0.0, "start")
        span = _number(values.get("duration"), clip_length, "duration")
    except ValueError as exc:
        return reject("bad_row", str(exc))
    if start < 0:
        return reject("bad_row", f"start {start:g} is negative")
    if milliseconds(span) <= 0:
        return reject("bad_row", f"duration {span:g} is not positive")
    split = str(values.get("split") or "").strip() or default_split
    if not SPLIT_PATTERN.match(split):
        return reject("bad_row", f"split {split!r} must be letters, digits and '_'")
    text, text_problem = prompt_text(values.get(table.text_column))
    if text_problem is not None:
        return reject("bad_text", f"{table.text_column} {text_problem}")
    if milliseconds(span) < clip_length:
        span_s = milliseconds(span)
        return reject("too_short", f"span of {span_s:g} s is shorter than the preset's {clip_length:g} s clip")
    raw_path = values.get("path")
    path = str(raw_path).strip() if raw_path is not None and str(raw_path).strip() else f"{source_id}.mp4"
    if _control(path):
        return reject("bad_row", f"path holds the control character U+{ord(_control(path)):04X}")
    start = milliseconds(start)
    key = clip_key(source_id, start, clip_length)
    return ClipRow(key, source_id, path, start, clip_length, text, split, item.row, item.line), None


class Collisions:
    """Finds the earlier row a clip duplicates: same key, same id with another file, or same file
    and span under another id. ``resolved`` is the clip's file as the job will open it."""

    def __init__(self) -> None:
        self._by_key: dict[str, ClipRow] = {}
        self._by_id: dict[str, tuple[ClipRow, str]] = {}
        self._by_span: dict[tuple[str, float], ClipRow] = {}

    def check(self, clip: ClipRow, resolved: str) -> ManifestProblem | None:
        """The duplicate problem of ``clip``, or None (then the clip is registered as taken)."""
        found: tuple[ClipRow, str] | None = None
        if clip.key in self._by_key:
            first = self._by_key[clip.key]
            found = first, f"same clip (id, start {clip.start:g} s, {clip.duration:g} s) as row {first.row}"
        elif clip.source_id in self._by_id and self._by_id[clip.source_id][1] != resolved:
            first, first_path = self._by_id[clip.source_id]
            found = first, f"id already names another file at row {first.row} ({first_path}, not {resolved})"
        elif (resolved, clip.start) in self._by_span:
            first = self._by_span[(resolved, clip.start)]
            found = first, f"same file and span as row {first.row} (id {first.source_id!r})"
        if found is not None:
            first, message = found
            if first.text != clip.text:
                message += f"; its prompt {first.text!r} is kept, this row's {clip.text!r} is not"
            return ManifestProblem(
                clip.row, clip.source_id, "duplicate", message, clip.line, clip.key, first.row, first.line
            )
        self._by_key[clip.key] = clip
        self._by_id.setdefault(clip.source_id, (clip, resolved))
        self._by_span[(resolved, clip.start)] = clip
        return None
