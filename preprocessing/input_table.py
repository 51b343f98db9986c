"""Reading the user's input table (TSV, CSV or Parquet) into raw rows.

This module only parses: it maps columns to canonical names and remembers where each row came from
(data row and file line) so that every later complaint can point at the row a user sees. Turning
rows into clips and judging them is ``preprocessing.manifest``'s job.

Accepted layouts:

* a header row naming the columns: ``id`` plus one text column (``caption``, ``label`` or ``text``);
  optional ``path``, ``start``, ``duration``, ``split``; other columns are ignored;
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

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TEXT_COLUMNS = ("caption", "label", "text")
OPTIONAL_COLUMNS = ("path", "start", "duration", "split")
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


def _physical_lines(data: bytes) -> list[bytes]:
    """Split on LF (CRLF's CR is dropped); a file with only CRs (old Mac) splits on CR."""
    if b"\n" not in data and b"\r" in data:
        return data.split(b"\r")
    return [line[:-1] if line.endswith(b"\r") else line for line in data.split(b"\n")]


def _cells(text: str, fmt: str) -> list[str]:
    """One line's cells. TSV is literal: a quote is a character like any other (no CSV quoting), so
    an unbalanced quote in a caption cannot swallow the rows after it. CSV follows RFC 4180 within
    the line; a quoted field may not run past its line (prompts have no line breaks)."""
    if fmt == "tsv":
        return text.split("\t")
    try:
        return next(csv.reader([text], strict=True))
    except csv.Error as exc:
        raise ValueError(f"CSV quoting: {exc} (a quoted field must close on its own line)") from None


def _read_text(path: Path, fmt: str, text_column: str | None) -> InputTable:
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):  # the byte-order mark spreadsheet programs put in front
        data = data[3:]
    # (line number, cells or None, problem): each physical line on its own, so one damaged line
    # (bad bytes, broken quoting) is one rejected row and never takes its neighbours with it
    records: list[tuple[int, list[str] | None, str | None]] = []
    for number, raw in enumerate(_physical_lines(data), start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            if not records:
                raise ManifestError(f"{path}: line {number}: not UTF-8 text: {exc}") from None
            records.append((number, None, f"not UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})"))
            continue
        if not text.strip():
            continue  # blank lines are not data rows (they still move the line count)
        try:
            records.append((number, _cells(text, fmt), None))
        except ValueError as exc:
            if not records:
                raise ManifestError(f"{path}: line {number} (the header): {exc}") from None
            records.append((number, None, str(exc)))
    if not records:
        raise ManifestError(f"{path}: the table is empty")

    header_line, first, _ = records[0]
    assert first is not None
    header = [c.strip().lower() for c in first]
    if "id" in header:
        columns = [c for c in KNOWN_COLUMNS if c in header]
        index = {c: header.index(c) for c in columns}
        text = _choose_text_column(columns, text_column, path)
        rows = []
        for n, (line, cells, problem) in enumerate(records[1:], start=1):
            if cells is None:
                rows.append(TableRow(n, line, {}, problem=problem))
                continue
            values = {c: (cells[i] if i < len(cells) else None) for c, i in index.items()}
            rows.append(TableRow(n, line, values, max(0, len(cells) - len(header))))
        return InputTable(path, "header", text, tuple(columns), rows)

    width = len(first)
    if width == 2:
        rows = []
        for n, (line, cells, problem) in enumerate(records, start=1):
            if cells is None:
                rows.append(TableRow(n, line, {}, problem=problem))
            else:
                label = cells[1] if len(cells) > 1 else None
                rows.append(TableRow(n, line, {"id": cells[0], "label": label}, max(0, len(cells) - 2)))
        return InputTable(
            path, "id-label", _choose_text_column(["id", "label"], text_column, path), ("id", "label"), rows
        )
    if width == 4 and _vggsound_csv_row(first) is not None:
        rows = []
        for n, (line, cells, problem) in enumerate(records, start=1):
            if cells is None:
                rows.append(TableRow(n, line, {}, problem=problem))
                continue
            values = _vggsound_csv_row(cells) if len(cells) == 4 else None
            if values is None:
                why = f"{len(cells)} cells, 4 expected" if len(cells) != 4 else "start_seconds is not an integer"
                rows.append(TableRow(n, line, {}, problem=f"not a vggsound.csv row: {why}"))
            else:
                rows.append(TableRow(n, line, values))
        columns = ("id", "label", "split")
        return InputTable(path, "vggsound-csv", _choose_text_column(list(columns), text_column, path), columns, rows)
    raise ManifestError(
        f"{path}: line {header_line}: the first row has no 'id' column and {width} cells; give a header row "
        f"(id, caption|label|text, optional path, start, duration, split) or use VGGSound's id<TAB>label layout"
    )


def read_input_table(path: str | Path, *, text_column: str | None = None) -> InputTable:
    """Read a TSV/CSV/Parquet clip table; raises ``ManifestError`` if it cannot be read at all."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: no such file")
    if path.suffix.lower() in (".parquet", ".pq"):
        return _read_parquet(path, text_column)
    with path.open("r", encoding="utf-8-sig", errors="replace") as handle:
        first_line = handle.readline()
    return _read_text(path, _table_format(path, first_line), text_column)
