"""Storage faults vs data errors: the classifier on real errors, media reads over a faulty HTTP server.

Every fault here is real: a corrupt or truncated file read by FFmpeg, a TCP connection reset by a
local HTTP server (fault_server.py), curl's exit status through WebDataset's pipe.
"""

from __future__ import annotations

import errno

import av
import numpy as np
import pytest
import webdataset as wds
from fault_server import FaultServer
from media_fixtures import make_clip, truncate_copy, write_text_as
from tracking_servers import silent_server

from preprocessing.errors import Rejected, RejectReason
from preprocessing.faults import FaultClass, classify
from preprocessing.media import decode_clip


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    folder = tmp_path_factory.mktemp("faults-media")
    make_clip(folder / "clip.mp4", seconds=2.5)
    truncate_copy(folder / "clip.mp4", folder / "truncated.mp4", fraction=1 / 3)
    write_text_as(folder / "text.mp4")
    with FaultServer(folder) as server:
        yield folder, server


def _error_of(fn) -> BaseException:
    try:
        fn()
    except BaseException as err:  # noqa: BLE001 - the error is the result
        return err
    raise AssertionError("no error raised")


def _read_and_close(stream) -> None:
    with stream:  # the pipe's exit status is checked when it closes
        stream.read()


def _decode(source: str):
    return decode_clip(source, duration=2.0, frame_size=32, threads=1)


def test_real_errors_are_classified(media):
    folder, server = media
    # the file's fault: FFmpeg's own verdict on bad bytes, locally and over HTTP
    assert classify(_error_of(lambda: av.open(str(folder / "text.mp4")))) is FaultClass.DATA
    assert classify(_error_of(lambda: av.open(f"{server.url}/truncated.mp4").decode().__next__())) is FaultClass.DATA
    # not there: local and HTTP 404
    assert classify(_error_of(lambda: open(folder / "nowhere.mp4", "rb"))) is FaultClass.MISSING
    assert classify(_error_of(lambda: av.open(f"{server.url}/nowhere.mp4"))) is FaultClass.MISSING
    # the storage's fault: a reset connection, in FFmpeg and through WebDataset's curl pipe
    server.reset_first("clip.mp4", 1)
    reset = _error_of(lambda: av.open(f"{server.url}/clip.mp4"))
    assert isinstance(reset, av.error.ConnectionResetError) and classify(reset) is FaultClass.TRANSIENT
    server.reset_first("clip.mp4", 1)
    piped = _error_of(lambda: _read_and_close(wds.gopen(f"{server.url}/clip.mp4", "rb")))
    assert "exit 56" in str(piped) and classify(piped) is FaultClass.TRANSIENT
    assert server.resets["clip.mp4"] == 1
    assert classify(OSError(errno.EIO, "Input/output error")) is FaultClass.TRANSIENT  # a failing disk
    assert classify(OSError(errno.ESTALE, "Stale file handle")) is FaultClass.TRANSIENT  # NFS
    assert classify(MemoryError()) is FaultClass.TRANSIENT
    assert classify(Rejected(RejectReason.TOO_SHORT, "x")) is FaultClass.DATA
    assert classify(TypeError("a bug")) is FaultClass.BUG


def test_decoding_over_http_equals_decoding_the_file(media):
    folder, server = media
    local = _decode(str(folder / "clip.mp4"))
    url = f"{server.url}/clip.mp4"
    remote = _decode(url)
    assert np.array_equal(remote.frames, local.frames) and np.array_equal(remote.audio, local.audio)
    # a transfer that drops mid-response resumes where it stopped (FFmpeg's reconnect), it is no
    # truncated file; one whose connection fails is raised as the storage fault it is, not Rejected
    server.reset_first("clip.mp4", 2, after_bytes=5000)
    dropped = _decode(url)
    assert server.resets["clip.mp4"] == 2 and np.array_equal(dropped.frames, local.frames)
    server.reset_first("clip.mp4", 1)
    assert isinstance(_error_of(lambda: _decode(url)), av.error.ConnectionResetError)
    server.reset_first("clip.mp4", 0)
    with pytest.raises(Rejected) as missing:
        _decode(f"{server.url}/nowhere.mp4")
    assert missing.value.reason == RejectReason.MISSING_FILE and "nowhere.mp4" in missing.value.message
    with pytest.raises(Rejected) as bad:
        _decode(f"{server.url}/truncated.mp4")
    assert bad.value.reason == RejectReason.UNDECODABLE


def test_a_media_server_that_never_answers_is_a_storage_fault_not_a_hang():
    """A server that accepts the connection and sends nothing: the read ends at ``io_timeout_s`` as a
    transient fault (which the precompute job retries, then fails the shard), instead of blocking a
    worker forever."""
    with silent_server() as port:
        err = _error_of(lambda: decode_clip(f"http://127.0.0.1:{port}/clip.mp4", duration=2.0, frame_size=32,
                                            io_timeout_s=1.0))  # fmt: skip
    assert isinstance(err, av.error.TimeoutError) and classify(err) is FaultClass.TRANSIENT
    assert f"127.0.0.1:{port}/clip.mp4" in str(err)
