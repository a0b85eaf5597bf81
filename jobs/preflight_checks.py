"""Pre-flight checks of what a job reads back and serves, before Ray starts (``jobs.preflight``
runs them in ``run_preflight``): the committed results parts and the ``/metrics`` endpoint.
Each failure is one line (``PreflightError``), exit 2."""

from __future__ import annotations

import socket
from typing import Any

from jobs.preflight import PreflightError


def check_results(out: Any) -> int:
    """Every part in ``DIR/results/`` has a readable Parquet footer (a truncated or foreign
    file is one line naming it and the fix, before Ray starts). Returns the number of parts.
    Damage inside a part's data shows when the job reads it (``jobs.results.CorruptPartError``)."""
    from jobs import results

    try:
        return len(results.committed_schema(out) or [])  # reads each part's footer
    except results.CorruptPartError as exc:
        raise PreflightError(str(exc)) from exc


def check_metrics(metrics: Any) -> str | None:
    """``--metrics-address`` / ``--metrics-port`` (``metrics.*``): the address resolves to one
    of this machine's and the port can be bound there (tried and released: the hook binds it
    right after, before Ray starts). Returns what will be served, None when nothing is."""
    import errno

    port, address = metrics.port, str(metrics.address)
    if port is None:
        return None
    if not 0 <= int(port) <= 65535:
        raise PreflightError(f"--metrics-port {port} is not a port (0..65535)")
    try:
        family, kind, proto, _, where = socket.getaddrinfo(
            address, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except (socket.gaierror, UnicodeError, ValueError) as exc:
        bad = f"--metrics-address {address!r} is not a valid address or host name"
        raise PreflightError(f"{bad}: {exc}") from exc
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the metrics server does
        try:
            sock.bind(where)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise PreflightError(
                    f"--metrics-port {port} is in use on {address} (EADDRINUSE): choose another port "
                    "(0: any free one) or stop what listens there"
                ) from exc
            if exc.errno == errno.EADDRNOTAVAIL:
                raise PreflightError(
                    f"--metrics-address {address!r} is not an address of this machine (EADDRNOTAVAIL)"
                ) from exc
            why = exc.strerror or exc
            raise PreflightError(f"/metrics cannot be served on {address}:{port}: {why}") from exc
    return f"http://{address}:{port}/metrics"
