"""Raw samples out of shard tars: member bytes grouped by key, nothing decoded.

The loader keeps samples raw (a few tens of KB of compact H.264 and fp16 arrays) until the shuffle
buffer emits them, and decodes only what it emits: a shuffle buffer of decoded 224-pixel clips would
hold 30 MB per sample, and a resumed run must skip the samples it already trained on without
decoding them (training/sample_stream.py).

Opening uses ``webdataset.gopen``, so every URL WebDataset streams works here too: local paths,
``file:``, ``pipe:CMD`` (e.g. ``pipe:aws s3 cp s3://bucket/train-000000.tar -``), ``http(s)://`` via
curl. Local files are read in random-access mode so that samples before a segment's start are
skipped by seeking over their data instead of reading it.

The tar walk applies the shard format's rules (``preprocessing.tar_walk``, shared with the strict
``preprocessing.shard_reader``) before any byte of a member is read: a member
suffix outside the format (``.pth``, ``.pkl``, ...) or a member that is not a regular file marks its
sample as damaged (counted and skipped when emitted), it is never read; arrays are later parsed by
``preprocessing.shard_reader.decode_sample`` with ``allow_pickle=False`` semantics. WebDataset's own
decoders are never used (its default handlers can unpickle).

Reading a segment is retried when the storage or the network fails (``preprocessing.faults``: an
OSError of a read, ECONNRESET, a ``pipe:``/curl exit status): after each delay of
``READ_RETRY_DELAYS`` the tar is opened again and the walk resumes at the first sample not yet
delivered; past the last delay :class:`ShardReadError` stops training. A blip must not silently
drop samples, and an unreachable store must not quietly train on a fraction of the data.
Damaged data (a tar that does not parse, keys that disagree with the marker) and a missing file
are the shard's own problem: counted and skipped, never retried.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shlex
import tarfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

from preprocessing.faults import describe, is_transient
from preprocessing.tar_walk import bad_name_message, iter_sample_groups
from training.shard_order import Segment, ShardEntry, local_path

log = logging.getLogger("selva.loader")

# The loader trains on precomputed latents, not on the waveform: audio.flac (often the largest
# member) is checked for presence but its bytes are never read into memory.
UNREAD_MEMBERS = frozenset({"audio.flac"})
READ_RETRY_DELAYS = (1.0, 4.0, 16.0)  # seconds before each re-read of a segment after a storage fault
RETRY_KIND = "read_retry"  # ErrorLog kind counting re-reads (no sample is lost to them)
# A shard server that accepts and then sends nothing would block a loader worker forever (WebDataset's
# curl line sets only a connect timeout): an http(s) read that moves no byte for this long fails, as
# a storage fault (retried, then ShardReadError). Seconds.
READ_STALL_S = 60.0
# curl's exit codes met when reading a shard (curl(1), "EXIT CODES"), for one readable line
CURL_EXITS = {
    6: "could not resolve the host", 7: "could not connect", 18: "transfer ended early",
    22: "the server answered with an HTTP error (>= 400)", 28: "timed out: no data moved",
    35: "TLS handshake failed", 52: "the server sent nothing", 55: "sending failed", 56: "receiving failed",
}  # fmt: skip


class ShardReadError(RuntimeError):
    """A shard stayed unreadable through every retry: training stops rather than drop its samples."""


class ErrorLog:
    """Counts data errors by kind and logs at most one line per ``interval_s`` with the running totals.

    A run over millions of samples with a few bad ones must neither crash nor flood the log; the
    totals travel with each batch so the trainer can report them as metrics.
    """

    def __init__(self, where: str, interval_s: float = 60.0):
        self.where = where
        self.interval_s = interval_s
        self.counts: Counter[str] = Counter()
        self.muted = False  # set while a resumed stream skips what the interrupted run already counted
        self._counted: set[tuple[str, ...]] = set()
        self._last = -float("inf")
        self._unlogged = 0

    def record(self, kind: str, message: str, samples: int = 1, ident: tuple[str, ...] | None = None) -> None:
        """Count ``samples`` lost to ``kind``; ``ident`` names the sample or shard, so a re-draw that
        meets the same bad sample again does not count it twice."""
        if self.muted or ident in self._counted:
            return
        if ident is not None:
            self._counted.add(ident)
        self.counts[kind] += samples
        now = time.monotonic()
        if now - self._last < self.interval_s:
            self._unlogged += 1
            return
        totals = ", ".join(f"{k} {v}" for k, v in sorted(self.counts.items()))
        more = f"; {self._unlogged} more since the last report" if self._unlogged else ""
        log.warning("%s: skipped %s (totals: %s%s)", self.where, message, totals, more)
        self._last, self._unlogged = now, 0

    def retried(self, message: str) -> None:
        """Count one re-read after a storage fault; logged every time (rare, and worth a line each).
        Counted even while muted: a retry is this run's event, not a replay of the checkpointed run's."""
        self.counts[RETRY_KIND] += 1
        log.warning("%s: retrying %s", self.where, message)


@dataclass
class RawSample:
    """One sample's member bytes (suffix -> bytes), or why the tar walk already found it unusable."""

    key: str
    source: str
    members: dict[str, bytes] = field(default_factory=dict)
    problem: str | None = None


@contextlib.contextmanager
def _open_tar(url: str, stall_s: float = READ_STALL_S) -> Iterator[tarfile.TarFile]:
    path = local_path(url)
    if path is not None:
        with tarfile.open(path, mode="r:") as tar:  # seekable: unread member data is skipped, not read
            yield tar
        return
    import webdataset as wds

    source = url
    if url.startswith(("http://", "https://")):
        source = "pipe:" + shlex.join(_curl_command(url, stall_s))
    try:
        # TarFile does not close a stream it was handed: close it here, so a pipe's process is reaped
        # (and its exit status checked) now rather than whenever the garbage collector runs
        with contextlib.closing(wds.gopen(source, "rb")) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
            yield tar
    except OSError as err:
        raise _readable(err, url) from err


def _curl_command(url: str, stall_s: float) -> list[str]:
    """curl for one shard: no retries of its own (``iter_segment`` retries, resuming where it stopped),
    and a stall (no byte for ``stall_s``) or a slow connect ends it."""
    stall = str(max(1, round(stall_s)))
    return ["curl", "--fail", "--silent", "--location", "--connect-timeout", stall,
            "--speed-limit", "1", "--speed-time", stall, url]  # fmt: skip


def _readable(err: OSError, url: str) -> OSError:
    """WebDataset reports a pipe's failure as ``((args,), {kwargs}): exit N (read) {}``: name the shard
    and say what curl's N means."""
    found = re.search(r"exit (\d+)", str(err)) if err.errno is None else None
    if found is None:
        return err
    code = int(found.group(1))
    return OSError(f"{url}: curl exit {code}: {CURL_EXITS.get(code, 'see curl(1), EXIT CODES')}")


def _expected_keys(shard: ShardEntry) -> list[str] | None:
    if shard.marker is None:
        return None
    with open(shard.marker, encoding="utf-8") as handle:
        return list(json.load(handle)["keys"])


def iter_segment(
    shard: ShardEntry, segment: Segment, errors: ErrorLog, retry_delays: Sequence[float] = READ_RETRY_DELAYS,
    stall_s: float = READ_STALL_S,
) -> Iterator[RawSample]:
    """The raw samples at positions ``[segment.start, segment.stop)`` of ``shard``'s tar, in order,
    each once: a read that fails for the storage's sake is retried from the first sample not yet
    delivered, after each of ``retry_delays``; then :class:`ShardReadError`."""
    delivered = 0
    for attempt in range(len(retry_delays) + 1):
        try:
            for sample in _read_segment(shard, replace(segment, start=segment.start + delivered), errors, stall_s):
                delivered += 1
                yield sample
            return
        except Exception as exc:
            if not is_transient(exc):
                raise
            if attempt == len(retry_delays):
                raise ShardReadError(
                    f"{shard.url}: unreadable after {attempt + 1} attempts: {describe(exc)}"
                ) from exc
            errors.retried(f"{shard.url} from sample {segment.start + delivered} ({describe(exc)})")
            time.sleep(retry_delays[attempt])


def _read_segment(shard: ShardEntry, segment: Segment, errors: ErrorLog, stall_s: float) -> Iterator[RawSample]:
    """One attempt at the raw samples at positions ``[segment.start, segment.stop)`` of ``shard``'s tar.

    Problems that concern one sample travel with it (``RawSample.problem``); problems that make the
    rest of the shard unreadable (missing file, damaged tar, keys that disagree with the marker)
    are recorded as a "shard" error counting the samples lost, and the segment ends early.
    """
    url = shard.url
    position = -1  # of the sample being collected
    stop = segment.stop

    def lost() -> int:
        end = stop if stop is not None else (shard.num_samples or position + 2)
        return max(1, end - max(position, segment.start))

    try:
        expected = _expected_keys(shard)
        with _open_tar(url, stall_s) as tar:

            def bad_name(info: tarfile.TarInfo) -> None:
                errors.record("member", f"{url}: {bad_name_message(info.name)}", ident=(url, info.name))

            for group in iter_sample_groups(tar, bad_name):
                position = group.position
                if stop is not None and position >= stop:
                    return  # closing early: a pipe: reader sees SIGPIPE, which gopen ignores
                if expected is not None and (position >= len(expected) or expected[position] != group.key):
                    want = expected[position] if position < len(expected) else "no more samples"
                    raise ValueError(f"sample {position} is {group.key}, the marker says {want}")
                if position < segment.start:
                    continue  # skipping: the data is never read (a seek for local files)
                sample = RawSample(group.key, url)
                for member in group.members():
                    if sample.problem is not None:
                        continue  # a damaged sample's other members are never read
                    if member.problem is not None:
                        sample.problem = member.problem
                    elif member.field in UNREAD_MEMBERS:
                        sample.members[member.field] = b""
                    else:
                        handle = tar.extractfile(member.info)
                        sample.members[member.field] = handle.read() if handle is not None else b""
                yield sample  # after its last member: a damaged tar past it loses it with the rest
            position += 1
        if stop is not None and position < stop:
            raise ValueError(f"truncated: {position} sample(s), the segment ends at {stop}")
        if expected is not None and stop is None and position < len(expected):
            raise ValueError(f"truncated: {position} sample(s), the marker lists {len(expected)}")
    except (tarfile.TarError, OSError, EOFError, ValueError, KeyError) as exc:
        if is_transient(exc):
            raise  # the storage's fault, not the shard's: iter_segment retries it
        message = f"the rest of {url} ({type(exc).__name__}: {exc})"
        errors.record("shard", message, samples=lost(), ident=(url, str(segment.start)))
