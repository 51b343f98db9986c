"""Whose fault is an error: the file's (record it), the storage's (retry it), or our code's (raise it).

A data error is a statement about a file's bytes and stays true on every retry; a storage fault
(a network reset, an NFS hiccup, an exhausted memory) says nothing about the file and may be gone
a second later. Recording a storage fault as a data error loses the clip for good; retrying a data
error wastes time and hides nothing. So every error met while reading media or shards is put in
one of these classes (docs/precompute.md, "Error classes"):

* ``MISSING``: the file does not exist (ENOENT, HTTP 404): recorded as ``missing_file``, not retried.
* ``DATA``: FFmpeg says the bytes are bad (invalid data, a decoder error, end of data), or our own
  checks rejected the clip: recorded per clip, never retried.
* ``TRANSIENT``: the storage or the network failed (an errno of :data:`TRANSIENT_ERRNOS`, an HTTP
  error other than 404, any Python-level ``OSError`` of a read) or memory ran out: retried with a
  bounded back-off, then the unit of work fails loudly so that a rerun tries again.
* ``BUG``: anything else (a ``TypeError`` in our code): never recorded as a property of the file.

PyAV maps FFmpeg's ``AVERROR(errno)`` codes to exception classes that subclass ``OSError``, and its
own tags (``AVERROR_INVALIDDATA``, ``AVERROR_EOF``, ...) to classes that do not; ``err.errno``
holds the code in both cases, so the table below decides by errno, not by class.
"""

from __future__ import annotations

import errno
from enum import StrEnum

import av

from preprocessing.errors import Rejected, RejectReason

# Errnos of a read that fail because of the storage or the network, not the file's content.
# EACCES/EPERM are here too: a permission problem is the storage's set-up, never the clip's data;
# retrying it is harmless and failing the shard afterwards says what to fix.
TRANSIENT_ERRNOS = frozenset({
    errno.EIO, errno.EAGAIN, errno.EINTR, errno.EBUSY, errno.ENOMEM, errno.ENFILE, errno.EMFILE,
    errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNABORTED, errno.ECONNREFUSED, errno.EPIPE, errno.ENOTCONN,
    errno.ESHUTDOWN, errno.EHOSTUNREACH, errno.EHOSTDOWN, errno.ENETUNREACH, errno.ENETDOWN, errno.ENETRESET,
    errno.ESTALE, errno.EREMOTEIO, errno.ENOLINK, errno.ECOMM, errno.EPROTO, errno.EACCES, errno.EPERM,
})  # fmt: skip
MISSING_ERRNOS = frozenset({errno.ENOENT, errno.ENOTDIR, errno.EISDIR})

DEFAULT_RETRY_DELAYS = (0.5, 2.0)  # seconds slept before the 2nd and 3rd attempt at a clip


class FaultClass(StrEnum):
    MISSING = "missing"
    DATA = "data"
    TRANSIENT = "transient"
    BUG = "bug"


class TransientFault(RuntimeError):
    """A storage or network fault that outlasted its retries: the unit of work fails, a rerun retries."""


def classify(err: BaseException) -> FaultClass:
    """The class of ``err``, raised while reading one media file or shard (rules in the module doc)."""
    if isinstance(err, Rejected):
        return FaultClass.MISSING if err.reason == RejectReason.MISSING_FILE else FaultClass.DATA
    if isinstance(err, MemoryError):  # also av.error.MemoryError (ENOMEM inside FFmpeg)
        return FaultClass.TRANSIENT
    if isinstance(err, av.error.HTTPNotFoundError):
        return FaultClass.MISSING
    if isinstance(err, (av.error.HTTPError, av.error.HTTPClientError)):  # 5xx, 429, 401/403: the server's state
        return FaultClass.TRANSIENT
    code = getattr(err, "errno", None)
    if isinstance(err, av.FFmpegError):
        if code in TRANSIENT_ERRNOS:
            return FaultClass.TRANSIENT
        return FaultClass.MISSING if code in MISSING_ERRNOS else FaultClass.DATA
    if isinstance(err, OSError):
        # A Python-level read (open, stat, a pipe's exit status) fails only because of the storage;
        # a file's content never raises OSError in Python code. Errno-less ones (a pipe: command's
        # exit status, as WebDataset reports it) are network or storage faults too.
        return FaultClass.MISSING if code in MISSING_ERRNOS else FaultClass.TRANSIENT
    return FaultClass.BUG


def is_transient(err: BaseException) -> bool:
    return classify(err) is FaultClass.TRANSIENT


def describe(err: BaseException) -> str:
    """``Type: message`` of an error, for one-line messages."""
    return f"{type(err).__name__}: {err}"
