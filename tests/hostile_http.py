"""Loopback HTTP servers that misbehave, for the image-fetch tests: one that accepts and never
answers, one that trickles its body a byte at a time, one that sends an endless body, and
one that serves a good PNG. Plain sockets (``http.server`` would answer properly)."""

from __future__ import annotations

import contextlib
import io
import socket
import threading
import time
from collections.abc import Iterator

HEADER = b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nConnection: close\r\n"


def png_bytes(size: int = 16) -> bytes:
    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(size).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(
        buf, "PNG"
    )
    return buf.getvalue()


def _answer(conn: socket.socket, kind: str, stop: threading.Event) -> None:
    try:
        conn.recv(65536)
        if kind == "hang":  # accepted, never a byte back
            stop.wait()
        elif kind == "trickle":  # a byte every 0.2 s: never silent long enough for a socket timeout
            conn.sendall(HEADER + b"\r\n")
            while not stop.wait(0.2):
                conn.sendall(b"x")
        elif kind == "endless":
            conn.sendall(HEADER + b"\r\n")
            block = b"x" * 65536
            while not stop.is_set():
                conn.sendall(block)
        elif kind == "good":
            body = png_bytes()
            conn.sendall(HEADER + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    except OSError:
        pass
    finally:
        conn.close()


@contextlib.contextmanager
def hostile_server(kind: str) -> Iterator[str]:
    """``http://127.0.0.1:PORT/image.png`` served as ``kind`` (hang, trickle, endless, good)
    until the block ends."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    sock.settimeout(0.2)
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except (TimeoutError, OSError):
                continue
            threading.Thread(target=_answer, args=(conn, kind, stop), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/image.png"
    finally:
        stop.set()
        thread.join(5)
        sock.close()
        time.sleep(0)
