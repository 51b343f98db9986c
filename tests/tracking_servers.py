"""Tracking-server outages for tests: a closed port, a server that accepts and never answers, a clean
MLflow environment, and a recorder of the threads that make MLflow HTTP requests."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field


@contextlib.contextmanager
def no_mlflow_env() -> Iterator[None]:
    """No ``MLFLOW_*`` variable while inside (so MLflow's own defaults apply, as for a user who set
    none), and exactly the previous ones afterwards: the tracker sets its HTTP defaults in
    ``os.environ``, which must not leak into later tests."""
    saved = {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")}
    for name in saved:
        del os.environ[name]
    try:
        yield
    finally:
        for name in [k for k in os.environ if k.startswith("MLFLOW_")]:
            del os.environ[name]
        os.environ.update(saved)


def closed_port() -> int:
    """A port nothing listens on: bound to learn a free number, then closed (connect: refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def silent_server() -> Iterator[int]:
    """A port that accepts TCP connections and never sends a byte (a hung server or proxy)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held: list[socket.socket] = []

    def accept_forever() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:  # the listening socket was shut down: the test is over
                return
            held.append(conn)

    acceptor = threading.Thread(target=accept_forever, name="silent-server", daemon=True)
    acceptor.start()
    try:
        yield server.getsockname()[1]
    finally:
        # shutdown wakes a blocked accept() on Linux; close() alone would not
        with contextlib.suppress(OSError):
            server.shutdown(socket.SHUT_RDWR)
        server.close()
        acceptor.join(timeout=5)
        for conn in held:  # a client still waiting on one of these now sees the connection end
            conn.close()


@dataclass
class HttpCalls:
    """Every MLflow REST request: the thread that made it and how it ended."""

    threads: list[int] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)
    started: threading.Event = field(default_factory=threading.Event)
    ended: threading.Event = field(default_factory=threading.Event)


def record_http_calls(monkeypatch) -> HttpCalls:
    """Wrap (not replace) MLflow's one HTTP entry point so a test sees which threads call it."""
    from mlflow.utils import rest_utils

    calls = HttpCalls()
    real = rest_utils.http_request

    def observed(*args, **kwargs):
        calls.threads.append(threading.get_ident())
        calls.started.set()
        try:
            return real(*args, **kwargs)
        except BaseException as err:
            calls.errors.append(err)
            raise
        finally:
            calls.ended.set()

    # call_endpoint (used by the REST tracking store) looks http_request up in this module
    monkeypatch.setattr(rest_utils, "http_request", observed)
    return calls
