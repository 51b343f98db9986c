"""Reading the user's input table (TSV, CSV or Parquet) into raw rows.

This module only parses: it maps columns to canonical names and remembers where each row came from
(data row and file line) so that every later complaint can point at the row a user sees. Turning
rows into clips and judging them is ``preprocessing.manifest``'s job.

Accepted layouts:

* a header row naming the columns: ``id`` plus one text column (``caption``, ``label`` or ``text``);
  optional ``path``, ``start``, ``duration``, ``split``, ``category`` (a coarse sound group, read only by
  ``selva benchmark build``); other columns are ignored;
* no header, two columns: ``id<TAB>label`` -- VGGSound's clip lists (``<youtubeid>_<start>``);
* no header, four columns: the original ``vggsound.csv`` (``youtube_id,start_seconds,label,split``);
  the clip id becomes ``<youtube_id>_<start:06d>``, the name VGGSound downloads give the cut clips.

Text files are read line by line: one physical line is one row, and a line that cannot be split
(bytes that are not UTF-8, CSV quotes that do not close on their line) becomes a row with a
``problem`` instead of stopping the job or merging into its neighbours. Tab-separated files are
read literally: a ``"`` is part of the text (no CSV quoting), so an unbalanced quote in a caption
never swallows the rows after it. CSV files follow RFC 4180 quoting within a line.

Values are kept as read (strings for text files, Python values for Parquet) so that the judge can
tell an empty cell from a missing one and a number from a text.
"""

from __future__ import annotations

import contextlib
import csv
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TEXT_COLUMNS = ("caption", "label", "text")
# negative: the negative prompt of `selva generate --manifest` (other jobs ignore it)
OPTIONAL_COLUMNS = ("path", "start", "duration", "split", "category", "negative")
KNOWN_COLUMNS = ("id", *TEXT_COLUMNS, *OPTIONAL_COLUMNS)


class ManifestError(ValueError):
    """The input table cannot be read at all, or (strict mode) some of its rows have problems."""


@dataclass(frozen=True)
class TableRow:
    row: int  # 1-based data row: the first row after the header (if any) is row 1
    line: int | None  # 1-based line in a text file where the row starts; None for Parquet
    values: dict[str, Any]  # canonical column -> value as read (None where the cell is absent)
    extra_cells: int = 0  # cells beyond the header's width (a stray tab or comma in a text field)
    problem: str | None = None  # why the line could not be split into cells (bad bytes, broken quoting)


@dataclass(frozen=True)
class InputTable:
    path: Path
    layout: str  # "header", "parquet", "id-label" (headerless VGGSound list) or "vggsound-csv"
    text_column: str  # the column the prompts come from
    columns: tuple[str, ...]  # canonical columns present
    rows: list[TableRow]


def _table_format(path: Path, first_line: str) -> str:
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        return "parquet"
    if suffix in (".tsv", ".tab"):
        return "tsv"
    if suffix == ".csv":
        return "csv"
    # unknown extension: a tab on the first line is a far stronger signal than a comma,
    # since captions often contain commas but almost never tabs
    return "tsv" if "\t" in first_line else "csv"


def _choose_text_column(columns: list[str], text_column: str | None, path: Path) -> str:
    if text_column is not None:
        if text_column not in columns:
            raise ManifestError(f"{path}: no column {text_column!r} (columns: {', '.join(columns)})")
        return text_column
    present = [c for c in TEXT_COLUMNS if c in columns]
    if not present:
        raise ManifestError(f"{path}: no text column; expected one of {', '.join(TEXT_COLUMNS)}")
    if len(present) > 1:
        # guessing between a class label and a caption silently changes what the model learns
        raise ManifestError(f"{path}: several text columns ({', '.join(present)}); choose one with text_column")
    return present[0]


def _read_parquet(path: Path, text_column: str | None) -> InputTable:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise ManifestError(f"{path}: cannot read Parquet: {exc}") from exc
    names = {name.strip().lower(): name for name in table.column_names}
    if "id" not in names:
        raise ManifestError(f"{path}: no 'id' column (columns: {', '.join(table.column_names)})")
    columns = [c for c in KNOWN_COLUMNS if c in names]
    text = _choose_text_column(columns, text_column, path)
    data = {c: table.column(names[c]).to_pylist() for c in columns}
    rows = [TableRow(i + 1, None, {c: data[c][i] for c in columns}) for i in range(table.num_rows)]
    return InputTable(path, "parquet", text, tuple(columns), rows)


def _vggsound_csv_row(cells: list[str]) -> dict[str, Any] | None:
    """``youtube_id,start_seconds,label,split`` -> canonical values, or None if the start is no integer."""
    ytid, start, label, split = (c.strip() for c in cells)
    if not start.isdigit():
        return None
    # the clips are already cut at ``start``: the clip starts at 0 s of its own file
    return {"id": f"{ytid}_{int(start):06d}", "label": label, "split": split}


_LINE_END = re.compile(rb"\r\n|\r|\n")
MAX_CONTINUATION_LINES = 10  # a CSV quoted field may span at most this many more lines
LAYOUT_SAMPLE = 100  # headerless tables: the layout is the most common width of the first rows


def _physical_lines(data: bytes) -> list[bytes]:
    """Universal line ends: LF, CRLF and a lone CR all end a line (no prompt holds a line break)."""
    return _LINE_END.split(data)


def _cells(text: str, fmt: str) -> list[str]:
    """One line's cells. TSV is literal: a quote is a character like any other (no CSV quoting), so
    an unbalanced quote in a caption cannot swallow the rows after it. CSV follows RFC 4180."""
    if fmt == "tsv":
        return text.split("\t")
    try:
        return next(csv.reader([text], strict=True))
    except csv.Error as exc:
        raise ValueError(f"CSV quoting: {exc}") from None


@dataclass
class _Line:
    number: int
    text: str | None  # None: not UTF-8
    problem: str | None = None
    guessed_id: str = ""  # the first cell of an unreadable line, where it is clean


def _decode_lines(data: bytes, fmt: str) -> list[_Line]:
    lines = []
    for number, raw in enumerate(_physical_lines(data), start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            first = raw.decode("utf-8", errors="replace").split("\t" if fmt == "tsv" else ",")[0].strip()
            why = f"not UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})"
            lines.append(_Line(number, None, why, "" if "\ufffd" in first else first))
            continue
        if text.strip():  # blank lines are not data rows (they still move the line count)
            lines.append(_Line(number, text))
    return lines


def _records(lines: list[_Line], fmt: str, width: int) -> list[tuple[int, list[str] | None, str | None, str]]:
    """(line, cells or None, problem, guessed id) per row. In CSV a quoted field may continue on the
    next lines (RFC 4180; pandas writes such captions) only if the lines it takes could not be rows
    of ``width`` cells themselves and the record closes with exactly ``width`` cells; otherwise the
    line is one rejected row and the next line is read on its own. Line breaks in a field become
    spaces (a prompt is one line)."""
    out: list[tuple[int, list[str] | None, str | None, str]] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if line.text is None:
            out.append((line.number, None, line.problem, line.guessed_id))
            continue
        try:
            out.append((line.number, _cells(line.text, fmt), None, ""))
            continue
        except ValueError as exc:
            problem = str(exc)
        joined, accepted = line.text, False
        for taken, nxt in enumerate(lines[i : i + MAX_CONTINUATION_LINES], start=1):
            if nxt.text is None or _is_row(nxt.text, fmt, width):
                break
            joined += "\n" + nxt.text
            try:
                cells = next(csv.reader([joined], strict=True))
            except csv.Error:
                continue  # the field is still open (or broken): try one more line
            if len(cells) == width:
                out.append((line.number, [c.replace("\n", " ") for c in cells], None, ""))
                i += taken
                accepted = True
            break  # the record closed: more lines would be rows of their own
        if not accepted:
            guess = line.text.split(",")[0].strip().strip('"')
            why = "a quoted field must close on its line, or on lines that are no rows themselves"
            out.append((line.number, None, f"{problem} ({why})", guess))
    return out


def _is_row(text: str, fmt: str, width: int) -> bool:
    try:
        return len(_cells(text, fmt)) == width
    except ValueError:
        return False


def _layout_width(lines: list[_Line], fmt: str) -> int:
    widths: dict[int, int] = {}
    for line in lines[:LAYOUT_SAMPLE]:
        if line.text is not None:
            with contextlib.suppress(ValueError):
                n = len(_cells(line.text, fmt))
                widths[n] = widths.get(n, 0) + 1
    return max(widths, key=lambda n: (widths[n], -n)) if widths else 0


def _read_text(path: Path, fmt: str, text_column: str | None) -> InputTable:
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):  # the byte-order mark spreadsheet programs put in front
        data = data[3:]
    lines = _decode_lines(data, fmt)
    if not lines:
        raise ManifestError(f"{path}: the table is empty")
    first = lines[0]
    header: list[str] = []
    if first.text is not None:
        with contextlib.suppress(ValueError):
            header = [c.strip().lower() for c in _cells(first.text, fmt)]
    if "id" in header:
        columns = [c for c in KNOWN_COLUMNS if c in header]
        index = {c: header.index(c) for c in columns}
        text = _choose_text_column(columns, text_column, path)
        rows = []
        for n, (line, cells, problem, guess) in enumerate(_records(lines[1:], fmt, len(header)), start=1):
            if cells is None:
                rows.append(TableRow(n, line, {"id": guess}, problem=problem))
                continue
            values = {c: (cells[i] if i < len(cells) else None) for c, i in index.items()}
            rows.append(TableRow(n, line, values, max(0, len(cells) - len(header))))
        return InputTable(path, "header", text, tuple(columns), rows)

    # no header: the layout is what most of the first rows look like, so one damaged first line is
    # one rejected row, not a rejected table
    width = _layout_width(lines, fmt)
    records = _records(lines, fmt, width)
    if width == 2:
        rows = []
        for n, (line, cells, problem, guess) in enumerate(records, start=1):
            if cells is None:
                rows.append(TableRow(n, line, {"id": guess}, problem=problem))
            else:
                label = cells[1] if len(cells) > 1 else None
                rows.append(TableRow(n, line, {"id": cells[0], "label": label}, max(0, len(cells) - 2)))
        return InputTable(
            path, "id-label", _choose_text_column(["id", "label"], text_column, path), ("id", "label"), rows
        )
    good = [cells for _, cells, _, _ in records[:LAYOUT_SAMPLE] if cells is not None and len(cells) == 4]
    if width == 4 and any(_vggsound_csv_row(cells) is not None for cells in good):
        rows = []
        for n, (line, cells, problem, guess) in enumerate(records, start=1):
            if cells is None:
                rows.append(TableRow(n, line, {"id": guess}, problem=problem))
                continue
            values = _vggsound_csv_row(cells) if len(cells) == 4 else None
            if values is None:
                why = f"{len(cells)} cells, 4 expected" if len(cells) != 4 else "start_seconds is not an integer"
                rows.append(TableRow(n, line, {"id": cells[0].strip()}, problem=f"not a vggsound.csv row: {why}"))
            else:
                rows.append(TableRow(n, line, values))
        columns = ("id", "label", "split")
        return InputTable(path, "vggsound-csv", _choose_text_column(list(columns), text_column, path), columns, rows)
    raise ManifestError(
        f"{path}: line {first.number}: no 'id' column in the first row, and most rows have {width} cells; give a "
        f"header row (id, caption|label|text, optional path, start, duration, split) or use VGGSound's "
        f"id<TAB>label layout"
    )


def read_input_table(path: str | Path, *, text_column: str | None = None) -> InputTable:
    """Read a TSV/CSV/Parquet clip table; raises ``ManifestError`` if it cannot be read at all."""
    path = Path(path)
    if path.is_dir():
        raise ManifestError(f"{path}: is a folder; --input wants a clip table (TSV, CSV or Parquet)")
    if not path.is_file():
        raise ManifestError(f"{path}: no such file")
    if path.suffix.lower() in (".parquet", ".pq"):
        return _read_parquet(path, text_column)
    with path.open("r", encoding="utf-8-sig", errors="replace") as handle:
        first_line = handle.readline()
    return _read_text(path, _table_format(path, first_line), text_column)
