"""A TCP proxy on loopback that delays every request by a fixed time: a local S3 server (moto)
made to answer like a remote object store.

Each HTTP request waits ``delay_s`` before it is forwarded: on every connection, the first
bytes sent by the client after the server last answered (or the connection's first bytes)
are held for ``delay_s``; the rest of that request (a PUT's body) goes through at once.
With keep-alive connections that is one delay per request, whatever its size. Loopback only.
"""

from __future__ import annotations

import socket
import threading
import time


class DelayProxy:
    """``with DelayProxy(("127.0.0.1", moto_port), 0.02) as proxy: proxy.url``."""

    def __init__(self, target: tuple[str, int], delay_s: float):
        self.target, self.delay_s = target, float(delay_s)
        self.requests = 0
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", 0))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True, name="delay-proxy")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.getsockname()[1]}"

    def __enter__(self) -> DelayProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._server.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            answered = threading.Event()
            answered.set()  # the connection's first bytes are a new request
            threading.Thread(target=self._pump, args=(client, upstream, answered, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, answered, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, answered: threading.Event, request: bool) -> None:
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                if request and answered.is_set():  # a new request: hold it
                    answered.clear()
                    with self._lock:
                        self.requests += 1
                    time.sleep(self.delay_s)
                elif not request:
                    answered.set()
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
