"""A local HTTP file server that injects real network faults, for the storage-fault tests.

It serves a folder (with Range requests, as FFmpeg needs to seek in an mp4) and, per file, resets
the TCP connection of the first N requests for it (N = -1: every request), the way a flaky object
store or a dropped network link does: the client's read fails with ECONNRESET. The faults happen in
whichever process reads (a Ray worker, a loader worker, curl), which a monkeypatch cannot reach.
"""

from __future__ import annotations

import re
import socket
import struct
import threading
from collections import Counter
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

_RANGE = re.compile(r"bytes=(\d+)-(\d*)$")


class FaultServer:
    """``with FaultServer(folder) as server:`` serves ``folder`` at ``server.url``."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.faults: dict[str, int] = {}  # file name -> connections still to reset (-1: all)
        self.cut_after: dict[str, int] = {}  # file name -> body bytes sent before the reset (0: none)
        self.requests: Counter[str] = Counter()  # file name -> requests seen
        self.resets: Counter[str] = Counter()  # file name -> connections reset
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def reset_first(self, name: str, count: int, after_bytes: int = 0) -> None:
        """Reset the next ``count`` connections that ask for ``name`` (-1: every one until changed),
        after sending the headers and ``after_bytes`` of the body (0: before any response)."""
        with self._lock:
            self.faults[name] = count
            self.cut_after[name] = after_bytes
            self.resets[name] = 0

    def _take_fault(self, name: str) -> bool:
        with self._lock:
            self.requests[name] += 1
            left = self.faults.get(name, 0)
            if left == 0:
                return False
            if left > 0:
                self.faults[name] = left - 1
            self.resets[name] += 1
            return True

    def _handler(self):
        server = self

        class Handler(SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(server.folder), **kwargs)

            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def do_GET(self) -> None:  # noqa: N802 - the http.server naming
                name = self.path.lstrip("/").split("?")[0]
                fault = server._take_fault(name)
                cut = server.cut_after.get(name, 0) if fault else None
                if cut == 0:
                    self._reset()
                    return
                path = server.folder / name
                if not path.is_file():
                    self.send_error(404)
                    return
                data = path.read_bytes()
                match = _RANGE.match(self.headers.get("Range", ""))
                if match:
                    first = int(match[1])
                    last = int(match[2]) if match[2] else len(data) - 1
                    body = data[first : last + 1]
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {first}-{first + len(body) - 1}/{len(data)}")
                else:
                    body = data
                    self.send_response(200)
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if cut is not None:  # a link that drops mid-transfer
                    self.wfile.write(body[:cut])
                    self.wfile.flush()
                    self._reset()
                    return
                try:
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client stopped reading (a seek): normal for FFmpeg

            def _reset(self) -> None:
                # SO_LINGER 0 makes close() send RST instead of FIN: the client sees ECONNRESET
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True
                self.connection.close()

        return Handler

    def __enter__(self) -> FaultServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
