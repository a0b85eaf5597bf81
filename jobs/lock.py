"""One driver per output folder: ``vcut run`` holds a lock on ``--out`` for the whole job.

- **Local folder**: ``DIR/.vcut.lock`` with an exclusive ``flock``. The kernel releases it when
  the process dies (``kill -9`` included), so a crashed driver never leaves a stale lock. The
  file holds the holder's host, pid and start time (for the second driver's error line); the
  holder removes it on release. (Over NFS, ``flock`` is as reliable as the server's lock
  support: NFSv4 or NFSv3 with ``lockd``.)
- **Object stores** (S3, GCS ...): no locks there, so a *lease*: the object ``DIR/.vcut.lease``
  (JSON: owner token, host, pid, start, expiry), refreshed every ``ttl / 3`` seconds by a
  thread and deleted on release. A driver that finds a lease that has not expired refuses to
  start; a lease whose holder died expires after ``ttl`` seconds (default 120). The first
  lease is written with a conditional create (``If-None-Match: *``) where the store supports
  it (AWS S3 through s3fs); elsewhere, or when an expired lease is taken over, it is written,
  read back after a short pause and kept only if it is still ours. That is not atomic: two
  drivers starting within that pause on a store without conditional writes can both win.
- **Other fsspec filesystems**: no lock (logged once).

A driver that holds the lock is the only one that deletes temporaries in ``DIR``, so starting a
second driver never removes the first one's in-progress files.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from jobs.output import OutputDir, open_output
from jobs.stop import ExitStatus

log = logging.getLogger("jobs")

LOCK_NAME = ".vcut.lock"
LEASE_NAME = ".vcut.lease"
#: Exit status of ``vcut run`` when another driver holds ``--out`` (sysexits' EX_TEMPFAIL:
#: try again later; every status is in ``jobs.stop.ExitStatus``).
EXIT_LOCKED = int(ExitStatus.LOCKED)


class OutputLockedError(RuntimeError):
    """Another live driver holds the output folder; the message is one line naming it."""


def _owner() -> dict[str, Any]:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "another driver (its host and pid are not recorded yet)"
    return (
        f"the driver with pid {holder.get('pid', '?')} on host {holder.get('host', '?')} "
        f"(started {holder.get('started_at', '?')})"
    )


class OutputLock:
    """The lock on one output folder. ``acquire()`` raises :class:`OutputLockedError`;
    ``release()`` is idempotent. Also a context manager."""

    def __init__(
        self,
        out: str | os.PathLike | OutputDir,
        *,
        ttl_s: float = 120.0,
        settle_s: float = 1.0,
        clock: Callable[[], float] = time.time,
    ):
        self.out = open_output(out)
        self.ttl_s = float(ttl_s)
        self.clock = clock  # wall-clock seconds (leases are compared across hosts); a test's fake one
        self.settle_s = float(settle_s)  # pause before reading a non-conditional lease back
        self._fd: int | None = None
        self._token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.info: dict[str, Any] = {}

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    # -- local: flock ----------------------------------------------------------------------

    def _acquire_local(self) -> None:
        import fcntl

        os.makedirs(self.out.root, exist_ok=True)
        path = self.out.path(LOCK_NAME)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                try:
                    holder = json.loads(os.pread(fd, 4096, 0) or b"null")
                except ValueError:
                    holder = None
                os.close(fd)
                raise OutputLockedError(
                    f"--out {self.out.uri} is in use by {_describe(holder)}; one driver per output "
                    f"folder: wait for it to finish (or stop it), then run again"
                ) from None
            # The holder unlinks the file on release: make sure we locked the file at ``path``.
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self.info = _owner()
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(self.info).encode(), 0)
        os.fsync(fd)
        self._fd = fd

    def _release_local(self) -> None:
        if self._fd is None:
            return
        try:
            os.remove(self.out.path(LOCK_NAME))  # while still holding it (see _acquire_local)
        except OSError:
            pass
        os.close(self._fd)  # releases the flock
        self._fd = None

    # -- object stores: a lease ------------------------------------------------------------

    def _lease_path(self) -> str:
        return self.out.path(LEASE_NAME)

    def _read_lease(self) -> dict[str, Any] | None:
        fs = self.out.fs
        fs.invalidate_cache(self._lease_path())
        try:
            return json.loads(fs.cat_file(self._lease_path()))
        except FileNotFoundError:
            return None
        except ValueError:  # unreadable: treat as someone else's, expiring after ttl from now
            return {"token": "?", "expires": self.clock() + self.ttl_s}

    def _lease_bytes(self) -> bytes:
        return json.dumps({**self.info, "token": self._token, "expires": self.clock() + self.ttl_s}).encode()

    def _acquire_lease(self) -> None:
        fs = self.out.fs
        self.info = _owner()
        current = self._read_lease()
        if (
            current is not None
            and current.get("expires", 0) > self.clock()
            and current.get("token") != self._token
        ):
            self._locked(current)
        conditional = False
        if current is None:
            try:  # exclusive create where the store supports it (s3fs: If-None-Match: *)
                fs.pipe_file(self._lease_path(), self._lease_bytes(), mode="create")
                conditional = True
            except (TypeError, NotImplementedError, ValueError):
                conditional = False
            except FileExistsError:
                self._locked(self._read_lease())
            except OSError as exc:
                if "PreconditionFailed" in str(exc) or "412" in str(exc):
                    self._locked(self._read_lease())
                conditional = False
        if not conditional:
            fs.pipe_file(self._lease_path(), self._lease_bytes())
            time.sleep(self.settle_s)
            mine = self._read_lease()
            if mine is None or mine.get("token") != self._token:
                self._locked(mine)
        self._thread = threading.Thread(target=self._refresh, name="vcut-lease", daemon=True)
        self._thread.start()

    def _locked(self, holder: dict[str, Any] | None) -> None:
        raise OutputLockedError(
            f"--out {self.out.uri} is in use by {_describe(holder)}; its lease {LEASE_NAME} expires "
            f"{self.ttl_s:.0f} s after that driver stops; one driver per output folder"
        )

    def _refresh(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            self.refresh()

    def refresh(self) -> None:
        """Move the lease's expiry to ``ttl_s`` from now (done every ``ttl_s / 3`` seconds while
        held); a failure is a warning, the next refresh tries again."""
        try:
            current = self._read_lease()
            if current is not None and current.get("token") not in (self._token, None):
                log.warning("the lease on %s was taken by %s", self.out.uri, _describe(current))
            self.out.fs.pipe_file(self._lease_path(), self._lease_bytes())
        except Exception as exc:
            log.warning("could not refresh the lease on %s: %s: %s", self.out.uri, type(exc).__name__, exc)

    def _release_lease(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout=10)
        self._thread = None
        try:
            current = self._read_lease()
            if current is not None and current.get("token") == self._token:
                self.out.fs.rm_file(self._lease_path())
        except Exception as exc:
            log.warning("could not remove the lease on %s: %s: %s", self.out.uri, type(exc).__name__, exc)

    # -- public ----------------------------------------------------------------------------

    def acquire(self) -> OutputLock:
        if self.out.local:
            self._acquire_local()
        elif self.out.object_store:
            self._acquire_lease()
        else:
            log.warning("no lock on %s: only local folders and object stores are locked", self.out.uri)
        return self

    def release(self) -> None:
        if self.out.local:
            self._release_local()
        else:
            self._release_lease()
