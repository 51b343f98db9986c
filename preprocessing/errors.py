"""Typed rejection reasons for bad inputs.

Every input the precompute job cannot use is recorded with one of these reasons and a message
naming the input and what is wrong; the job goes on with the others. Reasons are stable strings:
they appear in failure tables, shard stats and ``selva inspect`` output.
"""

from __future__ import annotations

from enum import StrEnum


class RejectReason(StrEnum):
    UNDECODABLE = "undecodable"  # the container or a stream cannot be decoded
    NO_VIDEO = "no_video"
    NO_AUDIO = "no_audio"
    TOO_SHORT = "too_short"  # fewer frames/samples than the clip needs, or a table span shorter than the clip
    SILENT = "silent"  # audio peak <= 1e-6
    BAD_TEXT = "bad_text"  # empty, non-text or invisible prompt
    MISSING_FILE = "missing_file"
    CRASHES_WORKER = "crashes_worker"  # decoding it killed the worker process (segfault, OOM) in N attempts
    # input rows rejected before shard assignment (failures/input.parquet); see preprocessing.input_rows
    BAD_ROW = "bad_row"  # the row cannot become a clip: unreadable line, no id, bad start/duration/split
    DUPLICATE = "duplicate"  # the clip (or its id, or its file and span) was already taken by an earlier row


class Rejected(Exception):
    """An input that cannot be used; ``reason`` is machine-readable, ``message`` is for people."""

    def __init__(self, reason: RejectReason | str, message: str):
        self.reason = RejectReason(reason)
        self.message = message
        super().__init__(f"{self.reason.value}: {message}")
