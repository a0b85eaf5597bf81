"""Ray processes left behind by a ``vcut run`` that was killed (``kill -9``, OOM killer).

A driver started without ``--address`` starts a local Ray instance. When the driver dies
without shutting it down, Ray's GCS and raylet go with it, but the raylet's agents
(``ray::DashboardAgent``, ``ray::RuntimeEnvAgent``, ~190 MB) are re-parented to init and
stay. Their command line is renamed, so they are recognised by their open files: they keep
the session's log files (``<session dir>/logs/...``) open.

Only processes of sessions that a vcut driver started are touched: after ``ray.init`` the
driver writes :data:`MARKER` (its pid and start time) into the session folder
(:func:`mark_session`). A process is a leftover when one of its open files or arguments lies
in such a session folder and that driver is gone (no such pid, or the pid now belongs to a
process started at another time). ``vcut run`` ends them before starting its own Ray
(:func:`end`); ``vcut doctor`` lists them with the command to end them. Never by name: other
sessions' Ray instances on the machine are never looked at beyond their open files.
Linux (``/proc``) only; elsewhere nothing is found.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from dataclasses import dataclass

log = logging.getLogger("jobs")

#: The file a vcut driver writes into the session folder of the Ray instance it started.
MARKER = "vcut-driver.json"
PROC = "/proc"


@dataclass(frozen=True)
class Leftover:
    pid: int
    name: str  # its command line's first word (``ray::DashboardAgent`` ...)
    session: str  # the session folder it belongs to
    driver_pid: int  # the vcut driver that started that session (gone)


def _start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (``/proc/PID/stat`` field 22);
    None when there is no such process (or only its zombie)."""
    try:
        with open(f"{PROC}/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] in ("Z", "X") else int(fields[19])  # a zombie is gone


def mark_session(session_dir: str) -> str | None:
    """Record this process as the vcut driver of the Ray session in ``session_dir``; the
    marker's path, None when it cannot be written (then no later run touches the session)."""
    path = os.path.join(session_dir, MARKER)
    try:
        with open(path, "w") as f:
            json.dump({"pid": os.getpid(), "start_ticks": _start_ticks(os.getpid())}, f)
    except OSError:
        return None
    return path


def _driver_gone(session: str) -> int | None:
    """The pid of the vcut driver of ``session`` when it is gone; None when the session has
    no marker (not vcut's) or its driver still runs."""
    try:
        with open(os.path.join(session, MARKER)) as f:
            marker = json.load(f)
        pid = int(marker["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    ticks = _start_ticks(pid)
    alive = ticks is not None and (marker.get("start_ticks") is None or ticks == marker["start_ticks"])
    return None if alive else pid


def _session_of(path: str) -> str | None:
    """The Ray session folder (``.../session_<date>_<pid>``) a path lies in, if any."""
    parts = path.split(os.sep)
    for i, part in enumerate(parts):
        if part.startswith("session_") and part != "session_latest":
            return os.sep.join(parts[: i + 1])
    return None


def _sessions(pid: int) -> set[str]:
    """Session folders among a process's arguments and open files (ours only: others'
    ``/proc`` entries are not readable and are skipped)."""
    found: set[str] = set()
    try:
        with open(f"{PROC}/{pid}/cmdline", "rb") as f:
            args = f.read().decode(errors="replace").split("\0")
    except OSError:
        return found
    for arg in args:
        session = _session_of(arg.split("=", 1)[-1])
        if session:
            found.add(session)
    try:
        fds = os.listdir(f"{PROC}/{pid}/fd")
    except OSError:
        return found
    for fd in fds:
        try:
            session = _session_of(os.readlink(f"{PROC}/{pid}/fd/{fd}"))
        except OSError:
            continue
        if session:
            found.add(session)
    return found


def _name(pid: int) -> str:
    try:
        with open(f"{PROC}/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")[0].decode(errors="replace").strip() or "?"
    except OSError:
        return "?"


def find() -> list[Leftover]:
    """Processes of Ray sessions whose vcut driver is gone (see the module docstring)."""
    if not os.path.isdir(PROC):
        return []
    me = os.getpid()
    verdicts: dict[str, int | None] = {}
    found = []
    for entry in os.listdir(PROC):
        if not entry.isdigit() or int(entry) == me:
            continue
        pid = int(entry)
        for session in _sessions(pid):
            if session not in verdicts:
                verdicts[session] = _driver_gone(session)
            driver = verdicts[session]
            if driver is not None and driver != pid:
                found.append(Leftover(pid, _name(pid), session, driver))
                break
    return found


def kill_command(leftovers: list[Leftover]) -> str:
    """The shell command that ends ``leftovers``."""
    return "kill " + " ".join(str(p.pid) for p in leftovers)


def end(leftovers: list[Leftover] | None = None, grace_s: float = 3.0) -> list[Leftover]:
    """SIGTERM each leftover (``find()`` when None), SIGKILL those still there after
    ``grace_s``; returns those that were signalled."""
    leftovers = find() if leftovers is None else leftovers
    ended = []
    for p in leftovers:
        try:
            os.kill(p.pid, signal.SIGTERM)
            ended.append(p)
        except OSError:
            pass
    deadline = time.monotonic() + grace_s
    while ended and time.monotonic() < deadline and any(_start_ticks(p.pid) is not None for p in ended):
        time.sleep(0.1)
    for p in ended:
        if _start_ticks(p.pid) is not None:
            try:
                os.kill(p.pid, signal.SIGKILL)
            except OSError:
                pass
    return ended


def end_and_say() -> None:
    """``vcut run`` before it starts a local Ray: end the leftovers of killed vcut drivers,
    one log line; never an error (a process that cannot be signalled is skipped)."""
    try:
        ended = end()
    except Exception as exc:  # best effort: never the job's problem
        log.info("looking for Ray processes of killed vcut drivers failed: %s", exc)
        return
    if ended:
        sessions = sorted({p.session for p in ended})
        log.warning(
            "ended %d Ray process(es) left by a vcut driver that was killed (%s; pids %s)",
            len(ended),
            ", ".join(os.path.basename(s) for s in sessions),
            " ".join(str(p.pid) for p in ended),
        )
